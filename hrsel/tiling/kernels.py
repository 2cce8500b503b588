"""Numba kernels for tiling: grid coordinates, patch extraction, gather, block-mean downscale.

Kernels (leading underscore) take arrays and scalars only; the public wrappers
check shapes and dtypes first and name what is wrong. Every kernel has a numpy
reference in `tests/test_tiling.py` (uint8) and `tests/test_multispectral.py`
(uint16, float32). Image kernels are typed by Numba per dtype: uint8 (the fast
path), uint16 and float32 compile to their own specialisations of the same code;
`_downscale_mean_float` averages float images without integer rounding.
"""
from __future__ import annotations

import numba
import numpy as np

from hrsel.io.pixels import NATIVE_DTYPES

# ---- kernels ------------------------------------------------------------------------------


@numba.njit(cache=True, nogil=True)
def _grid_coords(rows, cols, stride, offset):
    """(rows * cols, 2) int64 (x, y) of top-left corners in raster order, in level pixels."""
    out = np.empty((rows * cols, 2), dtype=np.int64)
    for r in range(rows):
        for c in range(cols):
            i = r * cols + c
            out[i, 0] = c * stride - offset
            out[i, 1] = r * stride - offset
    return out


@numba.njit(cache=True, nogil=True)
def _extract_one(image, x0, y0, size, fill, out_i):
    """out_i (c, p, p) = image[y0:y0+p, x0:x0+p] transposed to channels-first; outside -> fill."""
    h, w, channels = image.shape
    xa = min(max(-x0, 0), size)  # first dx inside the image
    xb = max(min(w - x0, size), xa)  # one past the last dx inside
    for dy in range(size):
        y = y0 + dy
        if y < 0 or y >= h:
            out_i[:, dy, :] = fill
            continue
        if xa > 0:
            out_i[:, dy, :xa] = fill
        if xb < size:
            out_i[:, dy, xb:] = fill
        src = image[y]  # (w, c)
        if channels == 3:  # RGB: three contiguous output rows per image row (~4x faster)
            r0, r1, r2 = out_i[0, dy], out_i[1, dy], out_i[2, dy]
            for dx in range(xa, xb):
                r0[dx] = src[x0 + dx, 0]
                r1[dx] = src[x0 + dx, 1]
                r2[dx] = src[x0 + dx, 2]
        else:
            for ch in range(channels):
                row = out_i[ch, dy]
                for dx in range(xa, xb):
                    row[dx] = src[x0 + dx, ch]


@numba.njit(cache=True, nogil=True)
def _crop_one(image, x0, y0, size, fill, out_i):
    """out_i (p, p, c) = image[y0:y0+p, x0:x0+p], channels kept last; outside -> fill."""
    h, w, _ = image.shape
    xa = min(max(-x0, 0), size)
    xb = max(min(w - x0, size), xa)
    for dy in range(size):
        y = y0 + dy
        if y < 0 or y >= h:
            out_i[dy] = fill
            continue
        out_i[dy, :xa] = fill
        out_i[dy, xb:] = fill
        out_i[dy, xa:xb] = image[y, x0 + xa : x0 + xb]


@numba.njit(cache=True, nogil=True)
def _patch_into(image, x0, y0, size, fill, out_i, channels_last):
    if channels_last:
        _crop_one(image, x0, y0, size, fill, out_i)
    else:
        _extract_one(image, x0, y0, size, fill, out_i)


@numba.njit(cache=True, nogil=True, parallel=True)
def _extract_patches(image, coords, size, fill, out, channels_last):
    """out[i] = patch at coords[i] = (x, y), patches spread over Numba's threads."""
    for i in numba.prange(coords.shape[0]):
        _patch_into(image, coords[i, 0], coords[i, 1], size, fill, out[i], channels_last)


@numba.njit(cache=True, nogil=True)
def _extract_patches_serial(image, coords, size, fill, out, channels_last):
    """As `_extract_patches` on the calling thread only (safe inside a Python thread pool)."""
    for i in range(coords.shape[0]):
        _patch_into(image, coords[i, 0], coords[i, 1], size, fill, out[i], channels_last)


@numba.njit(cache=True, nogil=True, parallel=True)
def _gather_patches(patches, indices, out):
    """out[j] = patches[indices[j]] for (N, C, p, p) patches."""
    for j in numba.prange(indices.shape[0]):
        out[j] = patches[indices[j]]


@numba.njit(cache=True, nogil=True)
def _block_sum(image, y0, y1, x0, x1, ch, total):
    """total + the sum of image[y0:y1, x0:x1, ch] (total's type sets the accumulator: 0 or 0.0)."""
    for y in range(y0, y1):
        for x in range(x0, x1):
            total += image[y, x, ch]
    return total


@numba.njit(cache=True, nogil=True, parallel=True)
def _downscale_mean(image, factor, out):
    """Block average (h, w, c) -> (ceil(h/f), ceil(w/f), c); edge blocks average valid pixels."""
    h, w, channels = image.shape
    for oy in numba.prange(out.shape[0]):
        y1 = min((oy + 1) * factor, h)
        for ox in range(out.shape[1]):
            x1 = min((ox + 1) * factor, w)
            count = (y1 - oy * factor) * (x1 - ox * factor)
            for ch in range(channels):
                total = _block_sum(image, oy * factor, y1, ox * factor, x1, ch, 0)
                out[oy, ox, ch] = (2 * total + count) // (2 * count)  # round half up


@numba.njit(cache=True, nogil=True, parallel=True)
def _downscale_mean_float(image, factor, out):
    """As `_downscale_mean` for float images: the plain mean, accumulated in float64."""
    h, w, channels = image.shape
    for oy in numba.prange(out.shape[0]):
        y1 = min((oy + 1) * factor, h)
        for ox in range(out.shape[1]):
            x1 = min((ox + 1) * factor, w)
            count = (y1 - oy * factor) * (x1 - ox * factor)
            for ch in range(channels):
                out[oy, ox, ch] = _block_sum(image, oy * factor, y1, ox * factor, x1, ch, 0.0) / count


@numba.njit(cache=True, nogil=True)
def _box_fractions(mask, boxes):
    """Fraction of True pixels of a (h, w) bool mask inside each (x0, y0, x1, y1) box (clipped)."""
    h, w = mask.shape
    integral = np.zeros((h + 1, w + 1), dtype=np.int64)
    for y in range(h):
        running = 0
        for x in range(w):
            running += mask[y, x]
            integral[y + 1, x + 1] = integral[y, x + 1] + running
    out = np.empty(boxes.shape[0], dtype=np.float64)
    for i in range(boxes.shape[0]):
        x0 = min(max(boxes[i, 0], 0), w)
        y0 = min(max(boxes[i, 1], 0), h)
        x1 = min(max(boxes[i, 2], 0), w)
        y1 = min(max(boxes[i, 3], 0), h)
        area = (boxes[i, 2] - boxes[i, 0]) * (boxes[i, 3] - boxes[i, 1])
        inside = integral[y1, x1] - integral[y0, x1] - integral[y1, x0] + integral[y0, x0]
        out[i] = inside / area if area > 0 else 0.0
    return out


# ---- checked wrappers ---------------------------------------------------------------------


IMAGE_DTYPES = NATIVE_DTYPES  # the dtypes the readers return; each compiles its own kernels


def _check_image(image: np.ndarray, name: str = "image") -> np.ndarray:
    if not isinstance(image, np.ndarray) or image.ndim != 3 or image.dtype not in IMAGE_DTYPES:
        shape = getattr(image, "shape", None)
        dtype = getattr(image, "dtype", type(image).__name__)
        raise ValueError(f"{name} must be a (h, w, c) uint8, uint16 or float32 numpy array, got {dtype} {shape}")
    return image


def _check_coords(coords: np.ndarray) -> np.ndarray:
    coords = np.asarray(coords)
    if coords.ndim != 2 or coords.shape[1] != 2 or not np.issubdtype(coords.dtype, np.integer):
        raise ValueError(f"coords must be an (n, 2) integer array of (x, y), got {coords.dtype} {coords.shape}")
    return np.ascontiguousarray(coords, dtype=np.int64)


def grid_coords(rows: int, cols: int, stride: int, offset: int = 0) -> np.ndarray:
    """(rows * cols, 2) int64 (x, y) = (c * stride - offset, r * stride - offset), raster order."""
    if rows < 0 or cols < 0 or stride <= 0:
        raise ValueError(f"grid needs rows, cols >= 0 and stride > 0, got {rows}, {cols}, {stride}")
    return _grid_coords(int(rows), int(cols), int(stride), int(offset))


def extract_patches(
    image: np.ndarray,
    coords: np.ndarray,
    size: int,
    out: np.ndarray | None = None,
    *,
    fill: int | float = 0,
    parallel: bool = True,
    channels_last: bool = False,
) -> np.ndarray:
    """Copy size x size patches at (x, y) `coords` of an (h, w, c) image into (n, c, p, p), same dtype.

    The image is uint8, uint16 or float32. Pixels past the image edge are `fill` (in the image's
    units: `ImageSource.fill_value`). `out` (preallocated, the image's dtype) is reused when given.
    `parallel=False` stays on the calling thread (use it from Python worker threads).
    `channels_last=True` gives (n, p, p, c): row copies, no transpose.
    """
    image = _check_image(image)
    coords = _check_coords(coords)
    size = int(size)
    if size <= 0:
        raise ValueError(f"patch size must be positive, got {size}")
    n, channels = coords.shape[0], image.shape[2]
    expected = (n, size, size, channels) if channels_last else (n, channels, size, size)
    if out is None:
        out = np.empty(expected, dtype=image.dtype)
    elif out.shape != expected or out.dtype != image.dtype or not out.flags.c_contiguous:
        raise ValueError(
            f"out must be a C-contiguous {image.dtype} array of shape {expected}, got {out.dtype} {out.shape}"
        )
    kernel = _extract_patches if parallel else _extract_patches_serial
    kernel(image, coords, size, image.dtype.type(fill), out, bool(channels_last))
    return out


def gather_patches(patches: np.ndarray, indices: np.ndarray, out: np.ndarray | None = None) -> np.ndarray:
    """patches[indices] for (N, C, p, p) patches (any dtype), in parallel, into (k, C, p, p)."""
    if not isinstance(patches, np.ndarray) or patches.ndim != 4:
        raise ValueError(f"patches must be an (N, C, p, p) numpy array, got {getattr(patches, 'shape', None)}")
    indices = np.ascontiguousarray(indices, dtype=np.int64).reshape(-1)
    if indices.size and (indices.min() < 0 or indices.max() >= patches.shape[0]):
        raise IndexError(f"indices must lie in [0, {patches.shape[0]}), got {indices.min()}..{indices.max()}")
    expected = (indices.shape[0],) + patches.shape[1:]
    if out is None:
        out = np.empty(expected, dtype=patches.dtype)
    elif out.shape != expected or out.dtype != patches.dtype:
        raise ValueError(f"out must be {patches.dtype} {expected}, got {out.dtype} {out.shape}")
    _gather_patches(patches, indices, out)
    return out


def downscale_mean(image: np.ndarray, factor: int) -> np.ndarray:
    """Block-average an (h, w, c) image by an integer factor -> (ceil(h/f), ceil(w/f), c), same dtype.

    uint8 and uint16 round half up; float32 is the plain mean."""
    image = _check_image(image)
    factor = int(factor)
    if factor <= 0:
        raise ValueError(f"downscale factor must be a positive integer, got {factor}")
    h, w, c = image.shape
    out = np.empty((-(-h // factor), -(-w // factor), c), dtype=image.dtype)
    (_downscale_mean_float if image.dtype.kind == "f" else _downscale_mean)(image, factor, out)
    return out


def box_fractions(mask: np.ndarray, boxes: np.ndarray) -> np.ndarray:
    """Fraction of True pixels of a 2-D mask in each (x0, y0, x1, y1) box; outside counts False."""
    mask = np.asarray(mask)
    if mask.ndim != 2:
        raise ValueError(f"mask must be 2-D (h, w), got shape {mask.shape}")
    boxes = np.asarray(boxes)
    if boxes.ndim != 2 or boxes.shape[1] != 4:
        raise ValueError(f"boxes must be (n, 4) (x0, y0, x1, y1), got {boxes.shape}")
    mask_u8 = np.ascontiguousarray(mask.astype(np.uint8))
    return _box_fractions(mask_u8, np.ascontiguousarray(boxes, dtype=np.int64))

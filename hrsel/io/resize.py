"""Block-average downscaling in numpy, strip by strip, for thumbnails of huge images."""
from __future__ import annotations

import math
from typing import TYPE_CHECKING

import numpy as np

from hrsel.errors import ImageTooLargeError

if TYPE_CHECKING:
    from hrsel.io.base import ImageSource

STRIP_BYTES = 64 << 20  # pixels read per strip while building a thumbnail
THUMBNAIL_READ_PIXELS = 1 << 28  # 268 M pixels (16384^2): a level this large decodes in seconds, not minutes


def block_mean(image: np.ndarray, factor: int) -> np.ndarray:
    """(h, w, c) -> (ceil(h/f), ceil(w/f), c) of the same dtype (integers rounded); edge blocks
    average their valid pixels."""
    if factor == 1:
        return image
    h, w, c = image.shape
    out_h, out_w = -(-h // factor), -(-w // factor)
    padded = np.zeros((out_h * factor, out_w * factor, c), dtype=np.float64 if image.dtype != np.uint8 else np.float32)
    padded[:h, :w] = image
    sums = padded.reshape(out_h, factor, out_w, factor, c).sum(axis=(1, 3))  # (oh, ow, c)
    rows = np.full(out_h, factor, dtype=np.float32)
    rows[-1] = h - (out_h - 1) * factor
    cols = np.full(out_w, factor, dtype=np.float32)
    cols[-1] = w - (out_w - 1) * factor
    counts = rows[:, None, None] * cols[None, :, None]
    means = sums / counts
    return means.astype(image.dtype) if image.dtype.kind == "f" else np.rint(means).astype(image.dtype)


def thumbnail_from(
    source: "ImageSource", max_size: int, *, max_read_pixels: int = THUMBNAIL_READ_PIXELS
) -> np.ndarray:
    """Read the smallest level that is still >= the target size and block-average it in strips.

    Raises `ImageTooLargeError` when that level has more than `max_read_pixels` pixels.
    """
    w0, h0 = source.dimensions
    target = max_size / max(w0, h0)  # scale of the thumbnail relative to level 0
    level = 0
    for candidate, (w, h) in enumerate(source.level_dimensions):
        if max(w, h) >= min(max_size, max(w0, h0)):
            level = candidate
    width, height = source.level_dimensions[level]
    check_read_size(source, level, max_size=max_size, max_read_pixels=max_read_pixels)
    factor = max(1, math.ceil(max(width, height) / max_size))
    if target >= 1.0:
        factor = 1
    row_bytes = width * source.channels * source.dtype.itemsize
    strip_rows = max(factor, (STRIP_BYTES // max(row_bytes, 1)) // factor * factor)
    downsample = source.level_downsamples[level]
    strips = []
    for top in range(0, height, strip_rows):
        rows = min(strip_rows, height - top)
        y0 = int(round(top * downsample))
        strip = source.read_region(0, y0, width, rows, level=level)
        strips.append(block_mean(strip, factor))
    return np.concatenate(strips, axis=0)


def check_read_size(source: "ImageSource", level: int, *, max_size: int, max_read_pixels: int) -> None:
    """Refuse a thumbnail whose source level has more than `max_read_pixels` pixels."""
    width, height = source.level_dimensions[level]
    if width * height <= max_read_pixels:
        return
    raise ImageTooLargeError(
        f"a {max_size} px thumbnail of {source._name()} would decode level {level} of {width}x{height} "
        f"= {width * height:,} pixels, more than max_read_pixels={max_read_pixels:,}: the image has "
        f"{source.level_count} level(s) and none is near {max_size} px. Fix: convert it to a pyramidal "
        "tiled TIFF (hrsel.io.writer.write_pyramid, or `vips tiffsave in out.tif --tile --pyramid`), pass "
        "a mask instead of computing one, or raise max_read_pixels to accept the cost"
    )

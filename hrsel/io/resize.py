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
    source: "ImageSource", max_size: int, *, box: tuple[float, float, float, float] | None = None,
    max_read_pixels: int = THUMBNAIL_READ_PIXELS,
) -> np.ndarray:
    """Read the smallest level at which `box` is still >= the target size and block-average it in strips.

    `box`: (x0, y0, x1, y1) in level-0 pixels (default: the whole image; clipped to it). Raises
    `ImageTooLargeError` when the part of that level to decode has more than `max_read_pixels` pixels.
    """
    w0, h0 = source.dimensions
    x0, y0, x1, y1 = _clip_box(box, (w0, h0))
    side = max(x1 - x0, y1 - y0)  # level-0 pixels
    level = 0
    for candidate in range(source.level_count):
        if _level_box(source, candidate, (x0, y0, x1, y1))[4] >= min(max_size, side):
            level = candidate
    lx0, ly0, width, height, _ = _level_box(source, level, (x0, y0, x1, y1))
    check_read_size(source, level, max_size=max_size, max_read_pixels=max_read_pixels, size=(width, height))
    factor = 1 if max_size >= side else max(1, math.ceil(max(width, height) / max_size))
    row_bytes = width * source.channels * source.dtype.itemsize
    strip_rows = max(factor, (STRIP_BYTES // max(row_bytes, 1)) // factor * factor)
    strips = []
    for top in range(0, height, strip_rows):
        strip = source.read_level_region(lx0, ly0 + top, width, min(strip_rows, height - top), level)
        strips.append(block_mean(strip, factor))
    return np.concatenate(strips, axis=0)


def _clip_box(box: tuple[float, float, float, float] | None, image_wh: tuple[int, int]) -> tuple[int, int, int, int]:
    """(x0, y0, x1, y1) level-0 box -> whole pixels inside the image (at least one pixel each way)."""
    w0, h0 = image_wh
    if box is None:
        return 0, 0, int(w0), int(h0)
    x0, y0 = min(max(int(math.floor(box[0])), 0), w0 - 1), min(max(int(math.floor(box[1])), 0), h0 - 1)
    x1, y1 = min(max(int(math.ceil(box[2])), x0 + 1), w0), min(max(int(math.ceil(box[3])), y0 + 1), h0)
    return x0, y0, x1, y1


def _level_box(source: "ImageSource", level: int, box: tuple[int, int, int, int]) -> tuple[int, int, int, int, int]:
    """The level-0 `box` in pixels of `level`: (x, y, width, height, longer side), within the level."""
    w, h = source.level_dimensions[level]
    if box == (0, 0, *source.dimensions):
        return 0, 0, w, h, max(w, h)
    d = source.level_downsamples[level]
    lx0, ly0 = min(int(math.floor(box[0] / d)), w - 1), min(int(math.floor(box[1] / d)), h - 1)
    lx1, ly1 = max(min(int(math.ceil(box[2] / d)), w), lx0 + 1), max(min(int(math.ceil(box[3] / d)), h), ly0 + 1)
    return lx0, ly0, lx1 - lx0, ly1 - ly0, max(lx1 - lx0, ly1 - ly0)


def check_read_size(source: "ImageSource", level: int, *, max_size: int, max_read_pixels: int,
                    size: tuple[int, int] | None = None) -> None:
    """Refuse a thumbnail that would decode more than `max_read_pixels` pixels of `level` (`size`: the
    part read, default the whole level)."""
    width, height = source.level_dimensions[level] if size is None else size
    if width * height <= max_read_pixels:
        return
    part = "" if size is None else "a region "
    raise ImageTooLargeError(
        f"a {max_size} px thumbnail of {source._name()} would decode {part}level {level} of {width}x{height} "
        f"= {width * height:,} pixels, more than max_read_pixels={max_read_pixels:,}: the image has "
        f"{source.level_count} level(s) and none is near {max_size} px. Fix: convert it to a pyramidal "
        "tiled TIFF (hrsel.io.writer.write_pyramid, or `vips tiffsave in out.tif --tile --pyramid`), pass "
        "a mask instead of computing one, or raise max_read_pixels to accept the cost"
    )

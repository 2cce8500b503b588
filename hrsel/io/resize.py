"""Block-average downscaling in numpy, strip by strip, for thumbnails of huge images."""
from __future__ import annotations

import math
from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:
    from hrsel.io.base import ImageSource

STRIP_BYTES = 64 << 20  # pixels read per strip while building a thumbnail


def block_mean(image: np.ndarray, factor: int) -> np.ndarray:
    """(h, w, c) uint8 -> (ceil(h/f), ceil(w/f), c) uint8; edge blocks average their valid pixels."""
    if factor == 1:
        return image
    h, w, c = image.shape
    out_h, out_w = -(-h // factor), -(-w // factor)
    padded = np.zeros((out_h * factor, out_w * factor, c), dtype=np.float32)
    padded[:h, :w] = image
    sums = padded.reshape(out_h, factor, out_w, factor, c).sum(axis=(1, 3))  # (oh, ow, c)
    rows = np.full(out_h, factor, dtype=np.float32)
    rows[-1] = h - (out_h - 1) * factor
    cols = np.full(out_w, factor, dtype=np.float32)
    cols[-1] = w - (out_w - 1) * factor
    counts = rows[:, None, None] * cols[None, :, None]
    return np.rint(sums / counts).astype(np.uint8)


def thumbnail_from(source: "ImageSource", max_size: int) -> np.ndarray:
    """Read the smallest level that is still >= the target size and block-average it in strips."""
    w0, h0 = source.dimensions
    target = max_size / max(w0, h0)  # scale of the thumbnail relative to level 0
    level = 0
    for candidate, (w, h) in enumerate(source.level_dimensions):
        if max(w, h) >= min(max_size, max(w0, h0)):
            level = candidate
    width, height = source.level_dimensions[level]
    factor = max(1, math.ceil(max(width, height) / max_size))
    if target >= 1.0:
        factor = 1
    row_bytes = width * source.channels
    strip_rows = max(factor, (STRIP_BYTES // max(row_bytes, 1)) // factor * factor)
    downsample = source.level_downsamples[level]
    strips = []
    for top in range(0, height, strip_rows):
        rows = min(strip_rows, height - top)
        y0 = int(round(top * downsample))
        strip = source.read_region(0, y0, width, rows, level=level)
        strips.append(block_mean(strip, factor))
    return np.concatenate(strips, axis=0)

"""Write pyramidal tiled TIFFs that OpenSlide ('generic-tiff') and tifffile both open.

Layout (what OpenSlide opens as a multi-level 'generic-tiff'): every level a separate
top-level tiled page, pages after the first marked `subfiletype=1` (reduced resolution), tiles of
`tile` pixels, a codec OpenSlide accepts (deflate, jpeg, lzw, zstd, none).
`write_pyramid` takes an in-memory array; `write_sparse_pyramid` builds huge,
mostly-background images tile by tile without ever holding a level in memory.
"""
from __future__ import annotations

import logging
import os
import zlib
from typing import Callable, Iterator

import numpy as np

from hrsel.io.resize import block_mean

logger = logging.getLogger(__name__)

# (level, tile_x, tile_y) -> (t, t, C) uint8 pixels, `encode_tile` bytes, or None for background
TileFn = Callable[[int, int, int], "np.ndarray | bytes | None"]


def _resolution(mpp: float | None, downsample: float) -> dict:
    if not mpp:
        return {}
    per_cm = 1e4 / (mpp * downsample)
    return {"resolution": (per_cm, per_cm), "resolutionunit": "CENTIMETER"}


def write_pyramid(
    path: str | os.PathLike,
    image: np.ndarray,
    *,
    levels: int = 3,
    tile: int = 256,
    compression: str | None = "zlib",
    mpp: float | None = None,
) -> list[tuple[int, int]]:
    """Write (H, W, C) uint8 `image` and `levels - 1` halvings; returns (width, height) per level."""
    import tifffile

    if image.ndim == 2:
        image = image[:, :, None]
    if image.dtype != np.uint8 or image.ndim != 3:
        raise ValueError(f"write_pyramid needs an (H, W, C) uint8 image, got {image.dtype} {image.shape}")
    dims = []
    photometric = "rgb" if image.shape[2] == 3 else "minisblack"
    with tifffile.TiffWriter(path, bigtiff=image.nbytes > 2**31) as tiff:
        for level in range(levels):
            data = image if image.shape[2] != 1 or photometric == "rgb" else image[:, :, 0]
            tiff.write(
                data,
                tile=(tile, tile),
                compression=compression,
                photometric=photometric,
                subfiletype=1 if level else 0,
                **_resolution(mpp, 2.0**level),
            )
            dims.append((image.shape[1], image.shape[0]))
            if level + 1 < levels:
                image = block_mean(image, 2)
    return dims


def encode_tile(pixels: np.ndarray) -> bytes:
    """A (t, t, C) uint8 tile deflate-compressed as `write_sparse_pyramid` stores it."""
    return zlib.compress(np.ascontiguousarray(pixels, dtype=np.uint8).tobytes(), 1)


def write_sparse_pyramid(
    path: str | os.PathLike,
    *,
    size: tuple[int, int],
    tile_fn: TileFn,
    levels: int,
    tile: int = 256,
    channels: int = 3,
    background: int = 255,
    mpp: float | None = None,
) -> list[tuple[int, int]]:
    """Write a (width, height) image tile by tile; `tile_fn` returns None for background tiles.

    Tiles are deflate-compressed here (or passed through when `tile_fn` returns
    `encode_tile` bytes), the background tile once, so a huge mostly-background
    pyramid is written in seconds with O(tile) memory.
    """
    import tifffile

    width, height = size
    blank = encode_tile(np.full((tile, tile, channels), background, dtype=np.uint8))
    dims = []
    with tifffile.TiffWriter(path, bigtiff=True) as tiff:
        for level in range(levels):
            w, h = max(1, width >> level), max(1, height >> level)
            cols, rows = -(-w // tile), -(-h // tile)

            def tiles(level: int = level, rows: int = rows, cols: int = cols) -> Iterator[bytes]:
                for ty in range(rows):
                    for tx in range(cols):
                        pixels = tile_fn(level, tx, ty)
                        if pixels is None:
                            yield blank
                        else:
                            yield pixels if isinstance(pixels, bytes) else encode_tile(pixels)

            tiff.write(
                tiles(),
                shape=(h, w, channels),
                dtype=np.uint8,
                tile=(tile, tile),
                compression="zlib",
                photometric="rgb" if channels == 3 else "minisblack",
                subfiletype=1 if level else 0,
                **_resolution(mpp, 2.0**level),
            )
            dims.append((w, h))
    return dims

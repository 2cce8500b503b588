"""Stream every patch of a grid in chunks, read by a thread pool with bounded prefetch.

Memory in flight is at most (prefetch + 1) chunks of (chunk_size, C, p, p)
pixels of the source's dtype (uint8, uint16 or float32), whatever the image size. Patches made of whole stored tiles are decoded
straight into the chunk; other patches next to each other on a grid row are
read with one `read_level_region` call and cut from it.

Patches come in `torch.channels_last` memory format: logically (n, C, p, p),
stored (n, p, p, C) as decoders and arrays lay pixels out, so no transposing
copy is made on the CPU (conv layers on a GPU prefer that format anyway). Call
`.contiguous()` if you need `.view`.
"""
from __future__ import annotations

import logging
import time
from collections import deque
from concurrent.futures import Future, ThreadPoolExecutor
from typing import TYPE_CHECKING, Any, Iterator, NamedTuple

import numpy as np

from hrsel.io import ArraySource, ImageSource, open_image
from hrsel.tiling.grid import PatchGrid
from hrsel.tiling.kernels import extract_patches

if TYPE_CHECKING:
    import torch

logger = logging.getLogger(__name__)

MAX_RUN = 16  # patches of one grid row read by a single region call
CHEAP_READ_S = 30e-6  # per patch: below this, handing reads to threads costs more than it saves


class PatchChunk(NamedTuple):
    indices: np.ndarray  # (n,) int64 positions in the grid (rows of grid.coords)
    coords: np.ndarray  # (n, 2) int64 level-0 (x, y) top-left corners
    patches: "torch.Tensor"  # (n, C, p, p) of the source's dtype (uint8, uint16, float32), channels_last


def as_source(source_or_array: Any, fill: int | None = None) -> ImageSource:
    if isinstance(source_or_array, ImageSource):
        return source_or_array
    if fill is None:
        return open_image(source_or_array)
    return open_image(source_or_array, fill=fill)


def _check_grid(source: ImageSource, grid: PatchGrid) -> None:
    level = source.check_level(grid.level)
    if tuple(grid.image_size) != tuple(source.dimensions) or tuple(grid.level_size) != tuple(
        source.level_dimensions[level]
    ):
        raise ValueError(
            f"grid {grid} does not match {source!r} (level-0 size {source.dimensions}, level "
            f"{level} size {source.level_dimensions[level]}); build it with PatchGrid.for_source"
        )


def row_runs(level_coords: np.ndarray, stride: int, patch_size: int, max_run: int = MAX_RUN) -> list[tuple[int, int]]:
    """[start, stop) runs of consecutive patches on one row, `stride` apart, to read at once."""
    n = level_coords.shape[0]
    if n == 0:
        return []
    if stride > 2 * patch_size:  # gaps would waste most of a joint read
        return [(i, i + 1) for i in range(n)]
    same_row = level_coords[1:, 1] == level_coords[:-1, 1]
    adjacent = same_row & (level_coords[1:, 0] - level_coords[:-1, 0] == stride)
    runs, start = [], 0
    for i in range(1, n):
        if not adjacent[i - 1] or i - start >= max_run:
            runs.append((start, i))
            start = i
    runs.append((start, n))
    return runs


def channels_first(patches_nhwc: np.ndarray) -> "torch.Tensor":
    """(n, p, p, C) numpy -> (n, C, p, p) tensor in channels_last memory format, no copy."""
    import torch

    return torch.from_numpy(patches_nhwc).permute(0, 3, 1, 2)


def tile_aligned(source: ImageSource, grid: PatchGrid, level_coords: np.ndarray) -> bool:
    """True when patches are made of whole stored tiles and do not overlap: each tile is decoded once."""
    tile = source.tile_size(grid.level)
    if tile is None or level_coords.shape[0] == 0 or grid.stride < grid.patch_size:
        return False
    tw, th = tile
    p = grid.patch_size
    return p % tw == 0 and p % th == 0 and bool(np.all(level_coords % np.array([tw, th]) == 0))


def _read_run(source: ImageSource, grid: PatchGrid, level_coords: np.ndarray, out: np.ndarray, aligned: bool) -> float:
    """Fill out (m, p, p, C) with the m patches of one row run starting at level_coords[0].

    Tile-aligned patches are decoded straight into `out`; others are cut from one
    region read across the run, so tiles shared by neighbours are decoded once.
    Returns the seconds it took.
    """
    start, p = time.perf_counter(), grid.patch_size
    if aligned:
        source.read_level_patches(level_coords, p, grid.level, out=out)
        return time.perf_counter() - start
    x0, y0 = int(level_coords[0, 0]), int(level_coords[0, 1])
    width = int(level_coords[-1, 0] - x0) + p
    region = source.read_level_region(x0, y0, width, p, grid.level)  # (p, width, C), edges padded
    for j, dx in enumerate(level_coords[:, 0] - x0):
        out[j] = region[:, dx : dx + p]  # numpy copies whole rows: several times faster than Numba here
    return time.perf_counter() - start


class ReadCost:
    """Running estimate of seconds per patch, to read cheap chunks (blank or repeated tiles) in
    the calling thread: thread hand-offs and GIL contention cost more than such reads."""

    def __init__(self) -> None:
        self.per_patch: float | None = None  # None until a chunk was read

    def add(self, seconds: float, patches: int) -> None:
        latest = seconds / max(patches, 1)
        self.per_patch = latest if self.per_patch is None else 0.5 * (self.per_patch + latest)

    @property
    def cheap(self) -> bool:
        return self.per_patch is not None and self.per_patch < CHEAP_READ_S


def _in_memory(source: ImageSource, grid: PatchGrid) -> bool:
    return isinstance(source, ArraySource) and grid.level == 0


def stream_patches(
    source_or_array: Any,
    grid: PatchGrid,
    *,
    chunk_size: int,
    workers: int = 2,
    prefetch: int = 2,
    fill: int | None = None,
) -> Iterator[PatchChunk]:
    """Yield `PatchChunk`s covering `grid` in order; the next chunks are read while you work.

    `workers` threads read regions (0: read in the calling thread); at most
    `prefetch` chunks are read ahead. Chunks that read faster than a thread
    hand-off (blank or repeated tiles) are read in the calling thread instead.
    `fill` applies when an array is wrapped.
    Patches are in channels_last memory format (see the module docstring).
    """
    if chunk_size <= 0 or workers < 0 or prefetch < 0:
        raise ValueError(f"need chunk_size > 0, workers >= 0, prefetch >= 0; got {chunk_size}, {workers}, {prefetch}")
    source = as_source(source_or_array, fill)
    _check_grid(source, grid)
    starts = list(range(0, len(grid), chunk_size))
    coords = grid.coords
    if _in_memory(source, grid):  # one parallel Numba call per chunk, nothing to prefetch
        image = source.array
        for start in starts:
            sl = slice(start, start + chunk_size)
            patches = extract_patches(image, grid.level_coords[sl], grid.patch_size, fill=source.fill_value,
                                      channels_last=True)
            yield PatchChunk(np.arange(sl.start, sl.start + len(patches), dtype=np.int64), coords[sl],
                             channels_first(patches))
        return
    pool = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="hrsel-read") if workers > 0 else None
    pending: deque[tuple[int, np.ndarray, list[Future]]] = deque()
    cost = ReadCost()

    def submit(start: int) -> None:
        level_coords = grid.level_coords[start : start + chunk_size]
        p = grid.patch_size
        buffer = np.empty((len(level_coords), p, p, source.channels), dtype=source.dtype)
        futures = []
        aligned = tile_aligned(source, grid, level_coords)
        inline = pool is None or cost.cheap
        for a, b in row_runs(level_coords, grid.stride, grid.patch_size):
            args = (source, grid, level_coords[a:b], buffer[a:b], aligned)
            if inline:
                cost.add(_read_run(*args), b - a)
            else:
                futures.append(pool.submit(_read_run, *args))
        pending.append((start, buffer, futures))

    try:
        queue = deque(starts)
        while queue or pending:
            if not pending:
                submit(queue.popleft())
            start, buffer, futures = pending.popleft()
            if futures:
                seconds = sum(future.result() for future in futures)  # re-raises a read error here
                cost.add(seconds, buffer.shape[0])
            while queue and pool is not None and not cost.cheap and len(pending) < prefetch:
                submit(queue.popleft())  # `prefetch` chunks read while the consumer works
            stop = start + buffer.shape[0]
            yield PatchChunk(np.arange(start, stop, dtype=np.int64), coords[start:stop], channels_first(buffer))
    finally:
        if pool is not None:
            pool.shutdown(wait=True, cancel_futures=True)


def read_patches(
    source: Any,
    coords: Any,
    size: int,
    level: int = 0,
    *,
    workers: int = 0,
    fill: int | None = None,
) -> "torch.Tensor":
    """(n, C, size, size) patches (the source's dtype) with level-0 top-left `coords` (n, 2) (x, y), read at `level`.

    Like `stream_patches`, the result is in channels_last memory format.
    """
    import torch

    source = as_source(source, fill)
    level = source.check_level(level)
    coords = np.asarray(coords.cpu() if isinstance(coords, torch.Tensor) else coords)
    if coords.ndim != 2 or coords.shape[1] != 2:
        raise ValueError(f"coords must be (n, 2) level-0 (x, y), got shape {coords.shape}")
    coords = coords.astype(np.int64)
    if size <= 0:
        raise ValueError(f"patch size must be positive, got {size}")
    if isinstance(source, ArraySource) and level == 0:
        return channels_first(extract_patches(source.array, coords, size, fill=source.fill_value, channels_last=True))
    out = np.empty((coords.shape[0], size, size, source.channels), dtype=source.dtype)

    def read_one(i: int) -> None:
        out[i] = source.read_region(int(coords[i, 0]), int(coords[i, 1]), size, size, level)

    if workers > 0 and coords.shape[0] > 1:
        with ThreadPoolExecutor(max_workers=workers, thread_name_prefix="hrsel-read") as pool:
            list(pool.map(read_one, range(coords.shape[0])))
    else:
        for i in range(coords.shape[0]):
            read_one(i)
    return channels_first(out)

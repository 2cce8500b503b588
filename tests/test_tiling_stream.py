"""Streaming patches: same pixels as a numpy reference, bounded prefetch, errors reach the consumer."""
from __future__ import annotations

import threading
import time

import numpy as np
import pytest
import torch

from hrsel.errors import ImageReadError
from hrsel.io import ArraySource, TiffSource, ZarrSource, open_image
from hrsel.io.resize import block_mean
from hrsel.io.writer import write_pyramid
from hrsel.tiling import PatchChunk, PatchGrid, foreground_mask, read_patches, stream_patches
from hrsel.tiling import stream as stream_module
from hrsel.tiling.stream import row_runs, tile_aligned


def reference_patches(level_image: np.ndarray, level_coords: np.ndarray, size: int, fill: int) -> np.ndarray:
    h, w, c = level_image.shape
    out = np.full((len(level_coords), c, size, size), fill, np.uint8)
    for i, (x, y) in enumerate(level_coords):
        ys, xs = slice(max(y, 0), min(y + size, h)), slice(max(x, 0), min(x + size, w))
        if ys.stop > ys.start and xs.stop > xs.start:
            out[i, :, ys.start - y : ys.stop - y, xs.start - x : xs.stop - x] = level_image[ys, xs].transpose(2, 0, 1)
    return out


@pytest.fixture(scope="module")
def image() -> np.ndarray:
    img = np.random.default_rng(5).integers(0, 256, (520, 610, 3), dtype=np.uint8)
    img[:200, :300] = 250  # some background so masks drop patches
    return img


@pytest.fixture(scope="module")
def tiff(tmp_path_factory, image) -> str:
    path = tmp_path_factory.mktemp("stream") / "s.tif"
    write_pyramid(path, image, levels=2, tile=128)
    return str(path)


def collect(chunks) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    chunks = list(chunks)
    assert all(isinstance(c, PatchChunk) and c.patches.dtype == torch.uint8 for c in chunks)
    assert all(c.patches.is_contiguous(memory_format=torch.channels_last) for c in chunks)  # no transpose copy
    return (np.concatenate([c.indices for c in chunks]), np.concatenate([c.coords for c in chunks]),
            torch.cat([c.patches for c in chunks]).numpy())


@pytest.mark.parametrize("workers, prefetch", [(0, 0), (1, 1), (2, 2), (3, 5)])
@pytest.mark.parametrize("level, patch, stride, padding",
                         [(0, 64, 64, 0), (0, 48, 40, 8), (1, 32, 100, 0), (0, 128, 128, 0), (0, 256, 384, 0)])
def test_stream_from_tiff_matches_reference(tiff, image, workers, prefetch, level, patch, stride, padding):
    source = open_image(tiff)
    grid = PatchGrid.for_source(source, patch_size=patch, stride=stride, level=level, padding=padding, cover=True)
    indices, coords, patches = collect(stream_patches(source, grid, chunk_size=7, workers=workers, prefetch=prefetch))
    level_image = image if level == 0 else block_mean(image, 2)
    np.testing.assert_array_equal(indices, np.arange(len(grid)))
    np.testing.assert_array_equal(coords, grid.coords)
    np.testing.assert_array_equal(patches, reference_patches(level_image, grid.level_coords, patch, 255))


@pytest.mark.parametrize("patch, stride, padding, aligned", [
    (128, 128, 0, True), (256, 384, 0, True),  # whole 128-pixel tiles, decoded straight into the chunk
    (64, 64, 0, False), (128, 64, 0, False), (128, 128, 8, False),  # part tiles, overlap, shifted grid
])
def test_tile_aligned_grids_decode_into_the_chunk(tiff, patch, stride, padding, aligned):
    source = open_image(tiff)
    assert source.tile_size(0) == (128, 128)
    grid = PatchGrid.for_source(source, patch_size=patch, stride=stride, padding=padding)
    assert tile_aligned(source, grid, grid.level_coords) == aligned
    assert not tile_aligned(ArraySource(np.zeros((8, 8, 3), np.uint8)), PatchGrid(image_size=(8, 8), patch_size=4),
                            np.zeros((1, 2), np.int64))


class ThreadRecordingSource(TiffSource):
    """Records which thread read each patch."""

    def __init__(self, path: str):
        super().__init__(path)
        self.threads: list[str] = []

    def _read_into(self, handle, level, x, y, out):
        self.threads.append(threading.current_thread().name)
        super()._read_into(handle, level, x, y, out)


@pytest.mark.parametrize("cheap_below, expect_inline", [(0.0, False), (10.0, True)])
def test_cheap_chunks_are_read_in_the_calling_thread(tiff, monkeypatch, cheap_below, expect_inline):
    monkeypatch.setattr(stream_module, "CHEAP_READ_S", cheap_below)
    source = ThreadRecordingSource(tiff)
    grid = PatchGrid.for_source(source, patch_size=128)  # whole tiles: one read per patch
    chunks = list(stream_patches(source, grid, chunk_size=4, workers=2, prefetch=1))
    assert sum(len(c.indices) for c in chunks) == len(grid) == len(source.threads)
    first_chunk, rest = source.threads[:4], source.threads[8:]  # chunks 1 and 2 are handed out before any timing
    assert all(name.startswith("hrsel-read") for name in first_chunk)
    caller = threading.current_thread().name
    assert all((name == caller) == expect_inline for name in rest)


def test_stream_masked_grid_yields_positions_in_the_grid(tiff, image):
    source = open_image(tiff)
    full = PatchGrid.for_source(source, patch_size=64)
    grid = full.with_mask(foreground_mask(source.thumbnail(128)), min_tissue_fraction=0.5)  # noise: no tissue
    assert 0 < len(grid) < len(full)
    indices, coords, patches = collect(stream_patches(source, grid, chunk_size=5))
    np.testing.assert_array_equal(indices, np.arange(len(grid)))
    np.testing.assert_array_equal(coords, full.coords[grid.indices])
    np.testing.assert_array_equal(patches, reference_patches(image, grid.level_coords, 64, 255))


@pytest.mark.parametrize("wrap", ["numpy", "torch_chw", "array_source"])
def test_stream_and_read_patches_in_memory(image, wrap):
    data = {"numpy": image, "torch_chw": torch.from_numpy(image).permute(2, 0, 1),
            "array_source": ArraySource(image, fill=0)}[wrap]
    grid = PatchGrid(image_size=(610, 520), patch_size=100, stride=60, padding=20)
    indices, coords, patches = collect(stream_patches(data, grid, chunk_size=16, fill=0))
    expected = reference_patches(image, grid.level_coords, 100, 0)
    np.testing.assert_array_equal(patches, expected)
    picked = np.array([3, 0, len(grid) - 1])
    gathered = read_patches(data, torch.from_numpy(grid.coords[picked]), 100, fill=0)
    assert gathered.shape == (3, 3, 100, 100) and gathered.dtype == torch.uint8
    assert gathered.is_contiguous(memory_format=torch.channels_last)
    np.testing.assert_array_equal(gathered.numpy(), expected[picked])


@pytest.mark.parametrize("workers", [0, 2])
def test_read_patches_at_level_one(tiff, image, workers):
    coords = np.array([[0, 0], [400, 300], [580, 500], [-64, 10]])  # level-0 corners
    got = read_patches(open_image(tiff), coords, 40, level=1, workers=workers)
    np.testing.assert_array_equal(got.numpy(), reference_patches(block_mean(image, 2), coords // 2, 40, 255))


class CountingSource(ZarrSource):
    """Counts region reads and how many are in progress at once."""

    def __init__(self, path: str):
        super().__init__(path)
        self.reads = 0
        self.active = 0
        self.max_active = 0
        self.count_lock = threading.Lock()

    def read_level_region(self, *args, **kwargs):
        with self.count_lock:
            self.reads += 1
            self.active += 1
            self.max_active = max(self.max_active, self.active)
        try:
            time.sleep(0.002)
            return super().read_level_region(*args, **kwargs)
        finally:
            with self.count_lock:
                self.active -= 1


@pytest.mark.parametrize("prefetch", [0, 1, 3])
def test_prefetch_is_bounded(tiff, prefetch):
    source = CountingSource(tiff)
    grid = PatchGrid.for_source(source, patch_size=32, stride=70)  # stride > 2 patch: one read per patch
    chunk = 4
    stream = stream_patches(source, grid, chunk_size=chunk, workers=2, prefetch=prefetch)
    next(stream)
    time.sleep(0.3)  # a slow consumer: the readers must stop at the prefetch bound
    assert source.reads == chunk * (1 + prefetch)  # the chunk held plus `prefetch` read ahead, no more
    rest = sum(len(c.indices) for c in stream)
    assert rest == len(grid) - chunk and source.reads == len(grid)
    assert source.max_active <= 2


def test_early_exit_stops_reader_threads(tiff):
    before = threading.active_count()
    stream = stream_patches(open_image(tiff), PatchGrid(image_size=(610, 520), patch_size=16, level_size=(610, 520)),
                            chunk_size=8, workers=3, prefetch=2)
    next(stream)
    stream.close()
    assert threading.active_count() == before


def test_read_error_reaches_consumer(tmp_path, tiff):
    import tifffile

    with tifffile.TiffFile(tiff) as tif:
        offset = tif.pages[0].dataoffsets[5]
    data = bytearray(open(tiff, "rb").read())
    data[offset : offset + 32] = b"\x00" * 32
    path = tmp_path / "bad.tif"
    path.write_bytes(bytes(data))
    source = open_image(path)
    grid = PatchGrid.for_source(source, patch_size=64)
    with pytest.raises(ImageReadError, match="bad.tif"):
        for _ in stream_patches(source, grid, chunk_size=8, workers=2):
            pass


def test_grid_must_match_source(tiff):
    grid = PatchGrid(image_size=(100, 100), patch_size=10)
    with pytest.raises(ValueError, match="PatchGrid.for_source"):
        next(stream_patches(open_image(tiff), grid, chunk_size=4))


def test_row_runs_split_rows_and_cap_length():
    coords = np.array([[0, 0], [10, 0], [20, 0], [0, 10], [10, 10], [30, 10]])
    assert row_runs(coords, 10, 10) == [(0, 3), (3, 5), (5, 6)]
    assert row_runs(coords, 10, 10, max_run=2) == [(0, 2), (2, 3), (3, 5), (5, 6)]
    assert row_runs(coords, 30, 10) == [(i, i + 1) for i in range(6)]

"""ImageBatch: the same patches from an in-memory tensor and from a lazy source."""
import threading

import numpy as np
import pytest
import torch

from hrsel.io import ArraySource
from hrsel.models.patches import ImageBatch
from hrsel.select.extract import GridGeometry, gather_patches, grid_chunk
from toy_bright import one_torch_thread  # noqa: F401 (autouse fixture)


@pytest.fixture
def pair():
    rng = np.random.default_rng(0)
    arrays = [rng.integers(0, 256, (45, 50, 3), dtype=np.uint8) for _ in range(2)]
    tensor = torch.from_numpy(np.stack(arrays)).permute(0, 3, 1, 2).contiguous()
    return ImageBatch(tensor), ImageBatch([ArraySource(a, fill=0) for a in arrays]), tensor


@pytest.mark.parametrize("geometry", [GridGeometry.regular((45, 50), patch_size=10, stride=7),
                                      GridGeometry.centred((45, 50), (4, 5), patch_size=16)])
def test_tensor_and_lazy_source_agree(pair, geometry):
    dense, lazy, tensor = pair
    n = geometry.num_patches
    ref = grid_chunk(*_padded(tensor.float() / 255, geometry), 0, n)
    for start, stop in [(0, n), (3, 11), (n - 1, n)]:
        torch.testing.assert_close(dense.chunk(geometry, start, stop), ref[:, start:stop])
        torch.testing.assert_close(lazy.chunk(geometry, start, stop), ref[:, start:stop])
    idx = torch.tensor([[0, n - 1, 5], [2, -1, 7]])
    expected = gather_patches(tensor.float() / 255, geometry, idx.clamp_min(0))
    expected[1, 1] = 0  # absent slot
    torch.testing.assert_close(dense.gather(geometry, idx), expected)
    torch.testing.assert_close(lazy.gather(geometry, idx), expected)
    chunks = list(dense.chunks(geometry, 4))
    assert torch.equal(torch.cat([i for i, _ in chunks], 1), torch.arange(n).expand(2, -1))
    streamed = list(lazy.chunks(geometry, 4))  # lazy sources go through hrsel.tiling.stream_patches
    assert [i.shape for i, _ in streamed] == [i.shape for i, _ in chunks]
    torch.testing.assert_close(torch.cat([i for i, _ in streamed], 1), torch.arange(n).expand(2, -1))
    torch.testing.assert_close(torch.cat([p for _, p in streamed], 1), ref)


def test_streamed_chunks_from_tiff_match_the_tensor(tmp_path):
    from hrsel.io import open_image
    from hrsel.io.writer import write_pyramid

    rng = np.random.default_rng(1)
    arrays = [rng.integers(0, 256, (300, 260, 3), dtype=np.uint8) for _ in range(2)]
    paths = [tmp_path / f"{i}.tif" for i in range(2)]
    for path, array in zip(paths, arrays):
        write_pyramid(path, array, levels=1, tile=32)
    sources = [open_image(p, backend="tiff", fill=0) for p in paths]
    tensor = torch.from_numpy(np.stack(arrays)).permute(0, 3, 1, 2)
    for geometry in (GridGeometry.regular((300, 260), patch_size=32), GridGeometry.regular((300, 260), patch_size=40,
                                                                                             stride=30, padding=5)):
        expected = list(ImageBatch(tensor).chunks(geometry, 16))
        got = list(ImageBatch(sources).chunks(geometry, 16))
        assert len(got) == len(expected)
        for (gi, gp), (ei, ep) in zip(got, expected):
            assert torch.equal(gi, ei)
            torch.testing.assert_close(gp, ep)
        picked = torch.tensor([[0, geometry.num_patches - 1, 3], [5, -1, 2]])
        torch.testing.assert_close(ImageBatch(sources).gather(geometry, picked),
                                   ImageBatch(tensor).gather(geometry, picked))
    before = threading.active_count()
    stream = ImageBatch(sources).chunks(GridGeometry.regular((300, 260), patch_size=32), 4)
    next(stream)
    assert threading.active_count() > before  # reader threads at work
    stream.close()  # stopping early shuts them
    assert threading.active_count() == before


def _padded(image, geometry):
    padded, offset = geometry.pad_image(image)
    return padded, geometry, offset


def test_downscaled_block_mean_matches(pair):
    dense, lazy, tensor = pair
    expected = torch.nn.functional.avg_pool2d(tensor.float() / 255, 4)  # (2, 3, 11, 12)
    torch.testing.assert_close(dense.downscaled(4, band_rows=3), expected)
    torch.testing.assert_close(lazy.downscaled(4, band_rows=5), expected)
    torch.testing.assert_close(dense.full(), tensor.float() / 255)
    with pytest.raises(ValueError, match="positive int"):
        dense.downscaled(0)


def test_batch_errors():
    with pytest.raises(ValueError, match="one size"):
        ImageBatch([ArraySource(np.zeros((8, 8, 3), np.uint8)), ArraySource(np.zeros((8, 9, 3), np.uint8))])
    with pytest.raises(ValueError, match=r"\(B, C, H, W\)"):
        ImageBatch(torch.zeros(3, 8, 8))

"""Streaming soft extraction against the dense einsum; grid geometry; hard gathers."""
import pytest
import torch
import torch.nn.functional as F

from hrsel.select.extract import (GridGeometry, gather_patches, grid_chunk, soft_extract,
                                  streaming_soft_extract)


def dense_patches(image: torch.Tensor, g: GridGeometry) -> torch.Tensor:
    """Reference: every grid patch by explicit slicing of a zero-padded copy -> (B, N, C, p, p)."""
    p, (py, px) = g.patch_size, g.padding
    big = F.pad(image, (p + abs(px),) * 2 + (p + abs(py),) * 2)
    oy, ox = p + abs(py), p + abs(px)
    out = []
    for r in range(g.shape[0]):
        for c in range(g.shape[1]):
            y, x = r * g.stride[0] - py + oy, c * g.stride[1] - px + ox
            out.append(big[:, :, y:y + p, x:x + p])
    return torch.stack(out, dim=1)


GEOMETRIES = [
    lambda hw: GridGeometry.regular(hw, patch_size=5, stride=3),
    lambda hw: GridGeometry.regular(hw, patch_size=4, padding=2),
    lambda hw: GridGeometry.centred(hw, (3, 4), patch_size=7),  # patches overlap and stick out
    lambda hw: GridGeometry.centred(hw, (3, 4), patch_size=2),  # patches smaller than the stride
]


@pytest.mark.parametrize("make", GEOMETRIES)
@pytest.mark.parametrize("chunk", [1, 5, 64])
def test_streaming_matches_dense_forward_and_backward(make, chunk):
    torch.manual_seed(0)
    image = torch.rand(2, 3, 15, 17, requires_grad=True)
    g = make((15, 17))
    y = torch.rand(2, 3, g.num_patches, requires_grad=True)
    upstream = torch.randn(2, 3, 3, g.patch_size, g.patch_size)

    out = soft_extract(y, image, g, chunk_size=chunk)
    gy, gi = torch.autograd.grad((out * upstream).sum(), (y, image))
    ref = torch.einsum("bkn,bnchw->bkchw", y, dense_patches(image, g))
    ry, ri = torch.autograd.grad((ref * upstream).sum(), (y, image))
    torch.testing.assert_close(out, ref)
    torch.testing.assert_close(gy, ry)
    torch.testing.assert_close(gi, ri)


def test_gradcheck_float64():
    torch.manual_seed(1)
    g = GridGeometry.centred((9, 10), (2, 3), patch_size=5)
    image = torch.rand(1, 2, 9, 10, dtype=torch.float64, requires_grad=True)
    y = torch.rand(1, 2, g.num_patches, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda a, b: soft_extract(a, b, g, chunk_size=4), (y, image))


def test_lazy_reader_without_image_gets_indicator_gradient_only():
    g = GridGeometry.regular((8, 8), patch_size=4)
    image = torch.rand(1, 1, 8, 8)
    padded, offset = g.pad_image(image)
    y = torch.rand(1, 2, g.num_patches, dtype=torch.float64, requires_grad=True)
    read = lambda _img, s, e: grid_chunk(padded, g, offset, s, e).double()  # noqa: E731
    assert torch.autograd.gradcheck(
        lambda a: streaming_soft_extract(a, read, num_patches=g.num_patches, chunk_size=3), (y,))


def test_one_hot_indicators_equal_hard_gather():
    g = GridGeometry.centred((20, 24), (4, 4), patch_size=8)
    image = torch.rand(2, 3, 20, 24)
    idx = torch.tensor([[0, 5, 15], [3, 4, 12]])
    onehot = F.one_hot(idx, g.num_patches).float()
    torch.testing.assert_close(soft_extract(onehot, image, g, chunk_size=6), gather_patches(image, g, idx))
    torch.testing.assert_close(gather_patches(image, g, idx), dense_patches(image, g)[torch.arange(2)[:, None], idx])


def test_centred_geometry_follows_dps():
    g = GridGeometry.centred((960, 1280), (39, 52), patch_size=100)  # DPS traffic
    assert g.stride == (24, 24) and g.padding == (38, 38) and g.num_patches == 2028
    corners = g.top_left(torch.tensor([0, 53]))
    assert corners.tolist() == [[-38, -38], [24 - 38, 24 - 38]]


def test_regular_geometry_counts_and_errors():
    assert GridGeometry.regular((100, 60), patch_size=20).shape == (5, 3)
    assert GridGeometry.regular((100, 60), patch_size=20, stride=10).shape == (9, 5)
    with pytest.raises(ValueError, match="smaller than patch_size"):
        GridGeometry.regular((10, 10), patch_size=20)


def test_shape_errors_name_the_shapes():
    with pytest.raises(ValueError, match="num_patches=4"):
        streaming_soft_extract(torch.rand(1, 2, 5), lambda *a: None, num_patches=4, chunk_size=2)
    with pytest.raises(ValueError, match="float"):
        soft_extract(torch.rand(1, 1, 4), torch.zeros(1, 1, 8, 8, dtype=torch.uint8),
                     GridGeometry.regular((8, 8), patch_size=4))

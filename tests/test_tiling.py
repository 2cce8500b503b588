"""Numba kernels against numpy references; grids and masks against brute force."""
from __future__ import annotations

import numpy as np
import pytest

from hrsel.io import ArraySource
from hrsel.tiling import PatchGrid, foreground_mask, grid_shape, kernels, otsu_threshold


def ref_extract(image: np.ndarray, coords: np.ndarray, size: int, fill: int) -> np.ndarray:
    """numpy reference: pad the image by `size` on every side, then slice."""
    h, w, c = image.shape
    m = size + int(np.abs(coords).max(initial=0))  # margin wide enough for every patch
    padded = np.full((h + 2 * m, w + 2 * m, c), fill, dtype=np.uint8)
    padded[m : m + h, m : m + w] = image
    out = []
    for x, y in coords:
        out.append(padded[y + m : y + m + size, x + m : x + m + size].transpose(2, 0, 1))
    return np.stack(out) if out else np.empty((0, c, size, size), np.uint8)


def ref_downscale(image: np.ndarray, f: int) -> np.ndarray:
    h, w, c = image.shape
    out = np.empty((-(-h // f), -(-w // f), c), dtype=np.uint8)
    for oy in range(out.shape[0]):
        for ox in range(out.shape[1]):
            block = image[oy * f : (oy + 1) * f, ox * f : (ox + 1) * f].astype(np.float64)
            out[oy, ox] = np.floor(block.mean(axis=(0, 1)) + 0.5)
    return out


@pytest.fixture(scope="module")
def image() -> np.ndarray:
    return np.random.default_rng(0).integers(0, 256, (97, 131, 3), dtype=np.uint8)


# ---- kernels ---------------------------------------------------------------------------------


@pytest.mark.parametrize("parallel", [True, False])
def test_extract_patches_matches_numpy_including_edges(image, parallel):
    coords = np.array([[0, 0], [120, 90], [-10, -5], [-40, 50], [125, -3], [60, 30], [200, 200]])
    out = kernels.extract_patches(image, coords, 16, fill=9, parallel=parallel)
    np.testing.assert_array_equal(out, ref_extract(image, coords, 16, 9))


@pytest.mark.parametrize("parallel", [True, False])
def test_extract_patches_channels_last_matches_numpy(image, parallel):
    coords = np.array([[0, 0], [120, 90], [-10, -5], [-40, 50], [125, -3], [60, 30], [200, 200]])
    out = kernels.extract_patches(image, coords, 16, fill=9, parallel=parallel, channels_last=True)
    assert out.shape == (len(coords), 16, 16, 3)
    np.testing.assert_array_equal(out, ref_extract(image, coords, 16, 9).transpose(0, 2, 3, 1))
    with pytest.raises(ValueError, match=r"\(7, 16, 16, 3\)"):
        kernels.extract_patches(image, coords, 16, out=np.empty((7, 3, 16, 16), np.uint8), channels_last=True)


def test_extract_patches_reuses_out_and_checks_inputs(image):
    coords = np.array([[1, 2], [3, 4]])
    buffer = np.zeros((2, 3, 8, 8), np.uint8)
    assert kernels.extract_patches(image, coords, 8, out=buffer) is buffer
    np.testing.assert_array_equal(buffer, ref_extract(image, coords, 8, 0))
    with pytest.raises(ValueError, match=r"out must be .* \(2, 3, 8, 8\)"):
        kernels.extract_patches(image, coords, 8, out=np.zeros((2, 3, 7, 8), np.uint8))
    with pytest.raises(ValueError, match="image must be a \\(h, w, c\\) uint8, uint16 or float32"):
        kernels.extract_patches(image.astype(np.float64), coords, 8)  # uint16 / float32: test_multispectral.py
    with pytest.raises(ValueError, match="coords must be an \\(n, 2\\) integer"):
        kernels.extract_patches(image, coords.astype(float), 8)


def test_gather_patches_matches_fancy_indexing():
    patches = np.random.default_rng(1).integers(0, 256, (20, 3, 5, 5), dtype=np.uint8)
    indices = np.array([19, 0, 7, 7, 3])
    np.testing.assert_array_equal(kernels.gather_patches(patches, indices), patches[indices])
    with pytest.raises(IndexError, match=r"\[0, 20\)"):
        kernels.gather_patches(patches, np.array([20]))


@pytest.mark.parametrize("factor", [1, 2, 3, 8, 200])
def test_downscale_mean_matches_numpy(image, factor):
    np.testing.assert_array_equal(kernels.downscale_mean(image, factor), ref_downscale(image, factor))


def test_grid_coords_raster_order():
    coords = kernels.grid_coords(3, 4, 10, 2)
    ys, xs = np.meshgrid(np.arange(3) * 10 - 2, np.arange(4) * 10 - 2, indexing="ij")  # y outer, x inner
    np.testing.assert_array_equal(coords, np.stack([xs.ravel(), ys.ravel()], axis=1))
    assert coords.dtype == np.int64


def test_box_fractions_brute_force():
    mask = np.random.default_rng(2).random((30, 40)) > 0.6
    boxes = np.array([[0, 0, 40, 30], [5, 5, 15, 9], [-5, -5, 5, 5], [35, 25, 45, 35], [10, 10, 11, 11]])
    expected = []
    for x0, y0, x1, y1 in boxes:
        padded = np.zeros((60, 80), bool)
        padded[10:40, 10:50] = mask
        expected.append(padded[y0 + 10 : y1 + 10, x0 + 10 : x1 + 10].mean())
    np.testing.assert_allclose(kernels.box_fractions(mask, boxes), expected)


def test_kernels_are_cached():
    for kernel in (kernels._extract_patches, kernels._grid_coords, kernels._downscale_mean, kernels._box_fractions):
        assert kernel._cache.__class__.__name__ != "NullCache", kernel


# ---- grids -------------------------------------------------------------------------------------


def ref_grid(width, height, patch, stride, padding, downsample=1.0):
    xs = [x - padding for x in range(0, width + 2 * padding - patch + 1, stride)]
    ys = [y - padding for y in range(0, height + 2 * padding - patch + 1, stride)]
    return np.array([[round(x * downsample), round(y * downsample)] for y in ys for x in xs]).reshape(-1, 2), (len(ys), len(xs))


@pytest.mark.parametrize(
    "size, patch, stride, padding",
    [((131, 97), 16, 16, 0), ((131, 97), 32, 24, 4), ((100, 100), 100, 50, 0), ((50, 40), 64, 64, 0), ((960, 1280), 100, 24, 38)],
)
def test_grid_matches_reference(size, patch, stride, padding):
    grid = PatchGrid(image_size=size, patch_size=patch, stride=stride, padding=padding)
    coords, shape = ref_grid(*size, patch, stride, padding)
    assert grid.shape == shape == grid_shape(size, patch, stride, padding) and len(grid) == len(coords)
    np.testing.assert_array_equal(grid.coords, coords)
    np.testing.assert_array_equal(grid.indices, np.arange(len(coords)))


def test_centred_grid_has_one_patch_per_stride():
    # DPS centres patches on stride cells: padding (patch - stride) // 2 -> H // stride rows
    grid = PatchGrid(image_size=(1280, 960), patch_size=100, stride=24, padding=38)
    assert grid.shape == (960 // 24, 1280 // 24)


def test_grid_at_level_and_cover():
    grid = PatchGrid(image_size=(1000, 800), patch_size=64, level=2, downsample=4.0, level_size=(250, 200))
    assert grid.shape == (3, 3)
    np.testing.assert_array_equal(grid.coords[:4], [[0, 0], [256, 0], [512, 0], [0, 256]])
    covering = PatchGrid(image_size=(1000, 800), patch_size=64, level=2, downsample=4.0, level_size=(250, 200), cover=True)
    assert covering.shape == (4, 4) and covering.level_coords[-1].tolist() == [192, 192]


def test_grid_coords_computed_once_and_subsets_get_their_own():
    grid = PatchGrid(image_size=(1000, 700), patch_size=64, stride=48, level=1, downsample=2.0)
    assert grid.coords is grid.coords  # cached: indexing it in a loop stays O(1) per access
    keep = np.array([5, 0, len(grid) - 1])
    sub = grid.subset(keep)
    assert sub.coords is not grid.coords
    np.testing.assert_array_equal(sub.coords, grid.coords[keep])
    np.testing.assert_array_equal(sub.coords, np.rint(sub.level_coords * 2.0).astype(np.int64))


def test_grid_from_corners_keeps_them_in_order():
    corners = np.array([[30, 0], [0, 0], [-5, 40]])
    grid = PatchGrid.from_corners(corners, image_size=(100, 80), patch_size=16, stride=16)
    assert len(grid) == 3 and grid.indices.tolist() == [0, 1, 2]
    np.testing.assert_array_equal(grid.coords, corners)
    with pytest.raises(ValueError, match=r"corners must be \(n, 2\).*\(3,\)"):
        PatchGrid.from_corners(np.zeros(3), image_size=(100, 80), patch_size=16, stride=16)


def test_grid_rejects_bad_arguments():
    with pytest.raises(ValueError, match="stride > 0"):
        PatchGrid(image_size=(10, 10), patch_size=4, stride=0)


# ---- masks -------------------------------------------------------------------------------------


def test_otsu_matches_brute_force():
    rng = np.random.default_rng(4)
    values = np.concatenate([rng.normal(60, 10, 3000), rng.normal(200, 15, 5000)]).clip(0, 255).astype(np.uint8)
    best, best_t = -1.0, -1
    for t in range(256):
        low, high = values[values <= t].astype(float), values[values > t].astype(float)
        if len(low) == 0 or len(high) == 0:
            continue
        score = len(low) * len(high) * (low.mean() - high.mean()) ** 2
        if score > best:
            best, best_t = score, t
    assert otsu_threshold(values) == best_t
    assert 90 < best_t < 170


def tissue_image() -> np.ndarray:
    img = np.full((512, 768, 3), 245, np.uint8)  # white background
    img[128:384, 256:640] = (150, 60, 140)  # a purple slab of "tissue"
    return img


def test_with_mask_keeps_tissue_and_matches_reference():
    img = tissue_image()
    source = ArraySource(img)
    grid = PatchGrid.for_source(source, patch_size=64)
    masked = grid.with_mask(source=source, min_tissue_fraction=0.5, mask_size=96)
    mask = img.mean(axis=2) < 200  # reference foreground at full resolution
    fractions = np.array([mask[y : y + 64, x : x + 64].mean() for x, y in grid.coords])
    np.testing.assert_array_equal(masked.indices, np.flatnonzero(fractions >= 0.5))
    np.testing.assert_array_equal(masked.coords, grid.coords[masked.indices])
    assert len(masked) == 4 * 6 and masked.shape == grid.shape
    assert foreground_mask(img).mean() == pytest.approx(mask.mean(), abs=1e-6)


def test_mask_agrees_across_levels(tmp_path):
    from hrsel.io import open_image
    from hrsel.io.writer import write_pyramid

    write_pyramid(tmp_path / "t.tif", tissue_image(), levels=3, tile=128)
    source = open_image(tmp_path / "t.tif")
    level0 = PatchGrid.for_source(source, patch_size=128, min_tissue_fraction=0.5)
    level1 = PatchGrid.for_source(source, patch_size=64, level=1, min_tissue_fraction=0.5)
    level2 = PatchGrid.for_source(source, patch_size=32, level=2, min_tissue_fraction=0.5)
    assert len(level0) == 6
    np.testing.assert_array_equal(level0.coords, level1.coords)
    np.testing.assert_array_equal(level0.coords, level2.coords)


def test_with_mask_function_and_chained_subsets():
    grid = PatchGrid(image_size=(100, 100), patch_size=10)
    left = grid.with_mask(lambda coords: coords[:, 0] < 50)
    top_left = left.with_mask(lambda coords: coords[:, 1] < 30)
    assert len(left) == 50 and len(top_left) == 15
    np.testing.assert_array_equal(top_left.indices, [r * 10 + c for r in range(3) for c in range(5)])
    with pytest.raises(ValueError, match="must return bool"):
        grid.with_mask(lambda coords: np.ones(3, bool))


def test_uniform_thumbnail_keeps_everything():
    assert foreground_mask(np.full((10, 10, 3), 255, np.uint8)).all()

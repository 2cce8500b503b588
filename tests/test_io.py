"""Image sources: every backend returns the same pixels, pads edges, pickles, reads from threads."""
from __future__ import annotations

import multiprocessing
import operator
import pickle
import threading

import numpy as np
import pytest
import torch
import zarr

from hrsel.io import ArraySource, ImageSource, OpenSlideSource, PillowSource, TiffSource, ZarrSource, open_image
from hrsel.io.resize import block_mean
from hrsel.io.writer import write_pyramid

LEVELS = 3


def reference_levels(image: np.ndarray, levels: int = LEVELS) -> list[np.ndarray]:
    out = [image]
    for _ in range(levels - 1):
        out.append(block_mean(out[-1], 2))
    return out


def padded_reference(level_image: np.ndarray, x: int, y: int, w: int, h: int, fill: int) -> np.ndarray:
    """Region [y, y+h) x [x, x+w) of a level with `fill` outside (numpy reference)."""
    H, W, C = level_image.shape
    out = np.full((h, w, C), fill, dtype=np.uint8)
    ys, xs = slice(max(y, 0), min(y + h, H)), slice(max(x, 0), min(x + w, W))
    if ys.stop > ys.start and xs.stop > xs.start:
        out[ys.start - y : ys.stop - y, xs.start - x : xs.stop - x] = level_image[ys, xs]
    return out


@pytest.fixture(scope="module")
def image() -> np.ndarray:
    rng = np.random.default_rng(3)
    img = rng.integers(0, 256, (600, 700, 3), dtype=np.uint8)  # (H, W, C), not a tile multiple
    img[100:300, 200:500] = (40, 90, 160)
    return img


@pytest.fixture(scope="module")
def pyramid(tmp_path_factory, image) -> str:
    path = tmp_path_factory.mktemp("pyr") / "slide 😐.tif"  # non-ASCII name on purpose
    write_pyramid(path, image, levels=LEVELS, tile=256, compression="zlib", mpp=0.25)
    return str(path)


# ---- arrays --------------------------------------------------------------------------------


@pytest.mark.parametrize("layout", ["hwc", "chw", "torch_chw", "float_hwc"])
def test_array_layouts_read_the_same_pixels(image, layout):
    data = {
        "hwc": image,
        "chw": image.transpose(2, 0, 1).copy(),
        "torch_chw": torch.from_numpy(image.transpose(2, 0, 1).copy()),
        "float_hwc": image.astype(np.float32) / 255.0,
    }[layout]
    source = open_image(data)
    assert isinstance(source, ArraySource)
    assert source.dimensions == (700, 600) and source.channels == 3 and source.level_count == 1
    expected = data[20:60, 10:40] if layout == "float_hwc" else image[20:60, 10:40]  # float stays float32
    np.testing.assert_array_equal(source.read_region(10, 20, 30, 40), expected)


def test_gray_array_has_one_channel():
    gray = np.arange(12 * 10, dtype=np.uint8).reshape(12, 10)
    source = ArraySource(gray)
    assert source.channels == 1
    np.testing.assert_array_equal(source.read_region(2, 3, 4, 5)[..., 0], gray[3:8, 2:6])


@pytest.mark.parametrize("x, y", [(-30, -20), (680, 590), (-5, 300), (690, -100)])
def test_array_region_past_edge_is_fill(image, x, y):
    source = ArraySource(image, fill=7)
    np.testing.assert_array_equal(source.read_region(x, y, 64, 48), padded_reference(image, x, y, 64, 48, 7))


# ---- pyramidal TIFF through OpenSlide and tifffile's zarr store ----------------------------


def test_pyramid_opens_with_every_backend_and_identical_pixels(pyramid, image):
    sources = OpenSlideSource(pyramid), TiffSource(pyramid), ZarrSource(pyramid)
    expected = reference_levels(image)
    for source in sources:
        assert source.level_count == LEVELS
        assert source.level_dimensions == ((700, 600), (350, 300), (175, 150))
        assert source.level_downsamples == pytest.approx((1.0, 2.0, 4.0))
        assert source.mpp == pytest.approx(0.25)
    for level in range(LEVELS):
        for source in sources:
            np.testing.assert_array_equal(source.read_level(level), expected[level])


@pytest.mark.parametrize("level", range(LEVELS))
@pytest.mark.parametrize("x, y", [(-64, -64), (600, 500), (344, -8)])
def test_pyramid_regions_crossing_the_edge_are_padded(pyramid, image, level, x, y):
    expected = padded_reference(reference_levels(image)[level], x >> level, y >> level, 100, 90, 255)
    for source in (OpenSlideSource(pyramid), TiffSource(pyramid), ZarrSource(pyramid)):
        np.testing.assert_array_equal(source.read_region(x, y, 100, 90, level=level), expected)


@pytest.mark.parametrize("backend", ["openslide", "tiff", "zarr"])
@pytest.mark.parametrize("x, y", [(0, 0), (256, 256), (-40, 30), (650, 550)])
def test_read_region_into_out(pyramid, image, backend, x, y):
    source = open_image(pyramid, backend=backend)
    out = np.zeros((300, 400, 3), np.uint8)
    assert source.read_region(x, y, 400, 300, out=out) is out
    np.testing.assert_array_equal(out, padded_reference(image, x, y, 400, 300, source.fill))
    view = np.zeros((300, 800, 3), np.uint8)[:, ::2]  # a strided view is written in place too
    source.read_region(x, y, 400, 300, out=view)
    np.testing.assert_array_equal(view, out)
    with pytest.raises(ValueError, match=r"out must be .*\(300, 400, 3\)"):
        source.read_region(x, y, 400, 300, out=np.zeros((300, 400), np.uint8))


@pytest.mark.parametrize("compression", ["zlib", "lzw", "zstd", "jpeg", None])
def test_tiff_tile_sized_out_is_decompressed_in_place(tmp_path, image, compression, monkeypatch):
    path = tmp_path / f"{compression}.tif"
    write_pyramid(path, image, levels=1, tile=64, compression=compression)
    source = TiffSource(path)
    expected = image if compression != "jpeg" else source.read_region(0, 0, 700, 600)
    region = source.read_region(64, 128, 192, 128)  # 2 x 3 whole tiles into strided windows: decode + copy
    np.testing.assert_array_equal(region, expected[128:256, 64:256])
    if compression in ("zlib", "lzw", "zstd"):  # a tile-sized `out` skips tifffile's decode + copy
        monkeypatch.setattr(TiffSource, "_decode", staticmethod(lambda *a: pytest.fail("decoded with a copy")))
    patch = np.empty((64, 64, 3), np.uint8)
    assert source.read_region(320, 64, 64, 64, out=patch) is patch
    np.testing.assert_array_equal(patch, expected[64:128, 320:384])


def test_tiff_repeated_blank_tiles_are_inflated_once(tmp_path, monkeypatch):
    from hrsel.io import tiff as tiff_module
    from hrsel.io.writer import write_sparse_pyramid

    rng = np.random.default_rng(0)
    tissue = rng.integers(0, 256, (64, 64, 3), dtype=np.uint8)
    path = tmp_path / "sparse.tif"
    write_sparse_pyramid(path, size=(64 * 8, 64 * 4), tile=64, levels=1,
                         tile_fn=lambda level, tx, ty: tissue if tx == ty else None)  # 4 tissue, 28 blank tiles
    inflated = []  # one entry per segment actually decompressed

    def counted(original):
        def call(*args):
            result = original(*args)
            if result is not False:  # `_decompress_into` says False when it did not decompress
                inflated.append(1)
            return result
        return staticmethod(call)

    for name in ("_decompress_into", "_decode"):
        monkeypatch.setattr(TiffSource, name, counted(getattr(TiffSource, name)))
    source = TiffSource(path)
    whole = source.read_region(0, 0, 512, 256)
    patch = np.empty((64, 64, 3), np.uint8)
    for ty in range(4):
        for tx in range(8):
            np.testing.assert_array_equal(source.read_region(64 * tx, 64 * ty, 64, 64, out=patch),
                                          tissue if tx == ty else np.full((64, 64, 3), 255, np.uint8))
            np.testing.assert_array_equal(patch, whole[64 * ty : 64 * ty + 64, 64 * tx : 64 * tx + 64])
    assert len(inflated) == 1 + 4 + 4  # blank inflated once; each tissue tile once per read (never kept)
    kept = list(source.handle.repeats.values())
    assert len(kept) == 1 and not kept[0].flags.writeable
    monkeypatch.setattr(tiff_module, "REPEAT_BUDGET", 0)  # nothing fits: every blank tile inflated again
    fresh = TiffSource(path)
    inflated.clear()
    fresh.read_region(0, 64, 512, 64)
    assert len(inflated) == 8 and not fresh.handle.repeats


@pytest.mark.parametrize("backend", ["tiff", "zarr", "array"])
def test_read_level_patches_matches_regions(pyramid, image, backend):
    source = ArraySource(image) if backend == "array" else open_image(pyramid, backend=backend)
    coords = np.array([[0, 0], [256, 256], [-20, 30], [650, 560], [300, -64]])
    got = source.read_level_patches(coords, 64)
    assert got.shape == (5, 64, 64, 3)
    for patch, (x, y) in zip(got, coords):
        np.testing.assert_array_equal(patch, padded_reference(image, x, y, 64, 64, source.fill))
    level1 = source.read_level_patches(coords[:2] // 2, 32, level=1) if backend != "array" else None
    if level1 is not None:
        np.testing.assert_array_equal(level1[1], reference_levels(image)[1][128:160, 128:160])
    with pytest.raises(ValueError, match=r"out must be .*\(5, 64, 64, 3\)"):
        source.read_level_patches(coords, 64, out=np.empty((5, 3, 64, 64), np.uint8))


def test_tiff_missing_tiles_read_as_fill(tmp_path, image):
    import tifffile

    path = tmp_path / "sparse.tif"
    tifffile.imwrite(path, image[:100, :130], tile=(32, 32), compression="zlib")
    with tifffile.TiffFile(path, mode="r+b") as tif:  # a sparse TIFF: byte count 0 = tile never written
        tag = tif.pages[0].tags["TileByteCounts"]
        counts = list(tag.value)
        counts[1] = counts[5] = 0  # 5 tiles per row: (row 0, col 1) and (row 1, col 0)
        tag.overwrite(counts)
    expected = image[:100, :130].copy()
    expected[0:32, 32:64] = expected[32:64, 0:32] = 7
    for source in (TiffSource(path, fill=7), OpenSlideSource(path, fill=7)):  # OpenSlide: transparent -> fill
        np.testing.assert_array_equal(source.read_region(0, 0, 130, 100), expected)
        np.testing.assert_array_equal(source.read_region(20, 20, 30, 30), expected[20:50, 20:50])


def test_open_image_picks_backend(tmp_path, pyramid, image):
    from PIL import Image

    assert isinstance(open_image(pyramid), TiffSource)
    assert isinstance(open_image(pyramid, backend="zarr"), ZarrSource)
    assert isinstance(open_image(pyramid, backend="openslide"), OpenSlideSource)
    png = tmp_path / "photo.png"
    Image.fromarray(image).save(png)
    assert isinstance(open_image(png), PillowSource)
    assert isinstance(open_image(zarr.array(image)), ZarrSource)
    source = open_image(image)
    assert open_image(source) is source


def test_striped_tiff_reads_through_zarr_store(tmp_path, image):
    import tifffile

    path = tmp_path / "striped.tiff"
    tifffile.imwrite(path, image, rowsperstrip=64, compression="zlib", photometric="rgb")
    for source in (open_image(path), ZarrSource(path)):
        assert source.level_count == 1
        np.testing.assert_array_equal(source.read_region(650, 10, 100, 50), padded_reference(image, 650, 10, 100, 50, 255))


def test_planar_tiff_falls_back_to_zarr_store(tmp_path, image):
    import tifffile

    path = tmp_path / "planar.tif"
    tifffile.imwrite(path, image.transpose(2, 0, 1), planarconfig="separate", photometric="rgb", tile=(128, 128))
    source = open_image(path)
    assert isinstance(source, ZarrSource)
    np.testing.assert_array_equal(source.read_region(10, 20, 300, 200), image[20:220, 10:310])


def test_zarr_store_on_disk_hwc(tmp_path, image):
    path = str(tmp_path / "plain.zarr")
    array = zarr.open(path, mode="w", shape=image.shape, chunks=(128, 128, 3), dtype="uint8")
    array[:] = image
    source = open_image(path)
    assert isinstance(source, ZarrSource) and source.dimensions == (700, 600)
    np.testing.assert_array_equal(source.read_region(5, 6, 70, 80), image[6:86, 5:75])


def test_ome_zarr_multiscale_cyx(tmp_path, image):
    path = str(tmp_path / "image.ome.zarr")
    group = zarr.open_group(path, mode="w")
    levels = reference_levels(image)
    for i, level in enumerate(levels):
        chw = level.transpose(2, 0, 1)
        array = group.create_array(str(i), shape=chw.shape, chunks=(3, 128, 128), dtype="uint8") if hasattr(
            group, "create_array") else group.create_dataset(str(i), shape=chw.shape, chunks=(3, 128, 128), dtype="uint8")
        array[:] = chw
    group.attrs["multiscales"] = [{
        "version": "0.4",
        "axes": [{"name": "c", "type": "channel"}, {"name": "y", "type": "space", "unit": "micrometer"},
                 {"name": "x", "type": "space", "unit": "micrometer"}],
        "datasets": [{"path": str(i), "coordinateTransformations": [{"type": "scale", "scale": [1, 0.5 * 2**i, 0.5 * 2**i]}]}
                     for i in range(LEVELS)],
    }]
    source = open_image(path)
    assert source.level_count == LEVELS and source.channels == 3 and source.mpp == pytest.approx(0.5)
    for level in range(LEVELS):
        np.testing.assert_array_equal(source.read_level(level), levels[level])


def test_pillow_gray_and_transparent(tmp_path):
    from PIL import Image

    gray = np.arange(40 * 30, dtype=np.uint8).reshape(30, 40)
    Image.fromarray(gray).save(tmp_path / "g.png")
    source = open_image(tmp_path / "g.png")
    assert source.channels == 1
    np.testing.assert_array_equal(source.read_level(0)[..., 0], gray)
    rgba = np.zeros((8, 8, 4), dtype=np.uint8)
    rgba[:4, :, 3] = 255  # top half opaque black, bottom half transparent
    Image.fromarray(rgba).save(tmp_path / "t.png")
    pixels = open_image(tmp_path / "t.png", fill=200).read_level(0)
    assert pixels.shape == (8, 8, 3) and (pixels[:4] == 0).all() and (pixels[4:] == 200).all()


def test_thumbnail_fits_and_matches_block_mean(pyramid, image):
    thumb = ZarrSource(pyramid).thumbnail(100)
    assert max(thumb.shape[:2]) <= 100 and thumb.shape[2] == 3
    # level 2 (175x150) block-averaged by 2 -> 88x75
    expected = block_mean(reference_levels(image)[2], 2)
    assert thumb.shape == expected.shape
    assert np.abs(thumb.astype(int) - expected.astype(int)).max() <= 1
    small = ArraySource(image).thumbnail(5000)
    np.testing.assert_array_equal(small, image)


def test_thumbnail_of_a_box_reads_the_level_it_needs(pyramid, image):
    source = ZarrSource(pyramid)
    levels = reference_levels(image)
    box = (300, 200, 500, 360)  # 200 x 160 level-0 pixels
    # 150 px: only level 0 holds the box in >= 150 px; block-averaged by 2
    np.testing.assert_array_equal(source.thumbnail(150, box=box), block_mean(image[200:360, 300:500], 2))
    # 100 and 50 px: levels 1 and 2 hold it in exactly 100 x 80 and 50 x 40 pixels
    for size, level, (x0, y0, x1, y1) in ((100, 1, (150, 100, 250, 180)), (50, 2, (75, 50, 125, 90))):
        got = source.thumbnail(size, box=box)
        assert got.shape == (y1 - y0, x1 - x0, 3)
        assert np.abs(got.astype(int) - levels[level][y0:y1, x0:x1].astype(int)).max() <= 1
    # a box past the edge is clipped to the image; the whole image is the plain thumbnail
    assert source.thumbnail(64, box=(650, 550, 900, 900)).shape == (50, 50, 3)
    np.testing.assert_array_equal(source.thumbnail(100, box=(0, 0, 700, 600)), source.thumbnail(100))


# ---- workers, threads, lifetime --------------------------------------------------------------


@pytest.mark.parametrize("backend", ["openslide", "tiff", "zarr"])
def test_pickled_source_reads_in_spawned_process(pyramid, image, backend):
    source = open_image(pyramid, backend=backend)
    source.read_region(0, 0, 8, 8)  # the handle is open here and must not travel
    clone = pickle.loads(pickle.dumps(source))
    np.testing.assert_array_equal(clone.read_region(1, 2, 3, 4), image[2:6, 1:4])
    with multiprocessing.get_context("spawn").Pool(1) as pool:
        region = pool.apply(operator.methodcaller("read_region", 600, 500, 128, 128, 1), (source,))
    np.testing.assert_array_equal(region, padded_reference(reference_levels(image)[1], 300, 250, 128, 128, 255))


@pytest.mark.parametrize("backend", ["openslide", "tiff", "zarr"])
def test_concurrent_reads_match_serial(pyramid, image, backend):
    source = open_image(pyramid, backend=backend)
    rng = np.random.default_rng(0)
    boxes = [(int(x), int(y)) for x, y in rng.integers(-50, 650, (48, 2))]
    results: dict[int, np.ndarray] = {}

    def work(offset: int) -> None:
        for i in range(offset, len(boxes), 4):
            results[i] = source.read_region(*boxes[i], 64, 64)

    threads = [threading.Thread(target=work, args=(k,)) for k in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(results) == len(boxes)
    for i, (x, y) in enumerate(boxes):
        np.testing.assert_array_equal(results[i], padded_reference(image, x, y, 64, 64, 255))


def test_context_manager_closes_and_repr_names_path(pyramid):
    with open_image(pyramid) as source:
        source.read_region(0, 0, 4, 4)
        assert source._handle is not None
        assert "slide 😐.tif" in repr(source)
    assert source._handle is None
    assert source.read_region(0, 0, 4, 4).shape == (4, 4, 3)  # reopens lazily
    assert isinstance(source, ImageSource)

"""Bad input raises an hrsel error naming the path and the fix; nothing hangs or crashes."""
from __future__ import annotations

import logging

import numpy as np
import pytest
import zarr

from hrsel.errors import HrselError, ImageReadError, UnsupportedFormatError
from hrsel.io import ArraySource, OpenSlideSource, PillowSource, ZarrSource, open_image
from hrsel.io.writer import write_pyramid


@pytest.fixture(scope="module")
def good_tiff(tmp_path_factory) -> str:
    path = tmp_path_factory.mktemp("ok") / "good.tif"
    rng = np.random.default_rng(0)
    write_pyramid(path, rng.integers(0, 256, (300, 400, 3), dtype=np.uint8), levels=2, tile=128)
    return str(path)


@pytest.fixture(autouse=True)
def quiet_tifffile():
    logging.getLogger("tifffile").setLevel(logging.CRITICAL)  # it logs the broken offsets itself
    yield


@pytest.mark.parametrize("backend", [None, "openslide", "tiff", "zarr", "pillow"])
def test_missing_path(tmp_path, backend):
    path = tmp_path / "nope" / "slide.svs"
    with pytest.raises(ImageReadError, match="no such file") as info:
        open_image(path, backend=backend)
    assert str(path) in str(info.value)


@pytest.mark.parametrize("backend", [None, "openslide"])
def test_text_file_named_svs(tmp_path, backend):
    path = tmp_path / "notes.svs"
    path.write_text("this is not a slide\n" * 20)
    with pytest.raises(UnsupportedFormatError) as info:
        open_image(path, backend=backend)
    assert str(path) in str(info.value)


@pytest.mark.parametrize("fraction", [0.02, 0.5, 0.95])
@pytest.mark.parametrize("backend", [None, "openslide", "tiff", "zarr"])
def test_truncated_tiff(tmp_path, good_tiff, fraction, backend):
    data = open(good_tiff, "rb").read()
    path = tmp_path / "cut.tif"
    path.write_bytes(data[: int(len(data) * fraction)])
    with pytest.raises(ImageReadError) as info:
        source = open_image(path, backend=backend)
        for level in range(source.level_count):  # OpenSlide may only notice while decoding
            source.read_level(level)
    assert str(path) in str(info.value)


def test_corrupt_tile_data_raises_on_read(tmp_path, good_tiff):
    import tifffile

    with tifffile.TiffFile(good_tiff) as tif:
        offset = tif.pages[0].dataoffsets[0]
    data = bytearray(open(good_tiff, "rb").read())
    data[offset : offset + 64] = b"\x00" * 64  # garbage where the first deflate tile starts
    path = tmp_path / "corrupt.tif"
    path.write_bytes(bytes(data))
    for backend in ("tiff", "zarr", "openslide"):
        source = open_image(path, backend=backend)
        with pytest.raises(ImageReadError, match="corrupt"):
            source.read_region(0, 0, 64, 64)


def test_truncated_png(tmp_path):
    from PIL import Image

    Image.fromarray(np.random.default_rng(0).integers(0, 256, (64, 64, 3), dtype=np.uint8)).save(tmp_path / "a.png")
    data = (tmp_path / "a.png").read_bytes()
    (tmp_path / "b.png").write_bytes(data[: len(data) // 2])
    with pytest.raises(ImageReadError, match="b.png"):
        open_image(tmp_path / "b.png")


@pytest.mark.parametrize("level", [-1, 2, 7, 1.0, True])
@pytest.mark.parametrize("backend", ["openslide", "tiff", "zarr"])
def test_bad_level(good_tiff, backend, level):
    source = open_image(good_tiff, backend=backend)
    with pytest.raises(ImageReadError, match=r"level=.*out of range.*use 0\.\.1"):
        source.read_region(0, 0, 8, 8, level=level)


@pytest.mark.parametrize("width, height", [(0, 8), (8, 0), (-3, 5)])
def test_region_size_must_be_positive(good_tiff, width, height):
    for source in (open_image(good_tiff), OpenSlideSource(good_tiff), ArraySource(np.zeros((4, 4, 3), np.uint8))):
        with pytest.raises(ImageReadError, match="must be positive"):
            source.read_region(0, 0, width, height)


def test_unknown_backend_lists_valid_ones(good_tiff):
    with pytest.raises(UnsupportedFormatError, match="valid: array, openslide, pillow, tiff, zarr"):
        open_image(good_tiff, backend="bioformats")


def test_directory_that_is_not_zarr(tmp_path):
    with pytest.raises(UnsupportedFormatError, match="not a zarr store"):
        open_image(tmp_path)


def test_zarr_group_without_levels(tmp_path):
    zarr.open_group(str(tmp_path / "empty.zarr"), mode="w")
    with pytest.raises(UnsupportedFormatError, match="no multiscales"):
        open_image(str(tmp_path / "empty.zarr"))


@pytest.mark.parametrize(
    "array, match",
    [
        (np.zeros((5, 6, 7), np.uint8), "cannot tell the channel axis"),
        (np.zeros((4, 4, 3), np.int32), "dtype int32"),  # uint16 is read since issue 13
        (np.zeros((2, 3, 4, 5), np.uint8), "cannot tell the channel axis"),
    ],
)
def test_bad_arrays(array, match):
    with pytest.raises(ImageReadError, match=match):
        ArraySource(array)


def test_every_error_is_an_hrsel_error_and_an_oserror(tmp_path):
    with pytest.raises(HrselError):
        PillowSource(tmp_path / "missing.png").read_region(0, 0, 1, 1)
    with pytest.raises(OSError):
        ZarrSource(str(tmp_path / "missing.zarr")).read_region(0, 0, 1, 1)


@pytest.mark.parametrize("tile_sized_out", [True, False])
def test_corrupt_tile_raises_whether_decoded_in_place_or_not(tmp_path, good_tiff, tile_sized_out):
    import tifffile

    with tifffile.TiffFile(good_tiff) as tif:
        offset, count = tif.pages[0].dataoffsets[1], tif.pages[0].databytecounts[1]
    data = bytearray(open(good_tiff, "rb").read())
    data[offset + 2 : offset + count] = b"\xff" * (count - 2)  # keep the zlib header, garble the stream
    path = tmp_path / "garbled.tif"
    path.write_bytes(bytes(data))
    source = open_image(path, backend="tiff")
    out = np.empty((128, 128, 3), np.uint8) if tile_sized_out else None
    with pytest.raises(ImageReadError, match="garbled.tif.*corrupt"):
        source.read_region(128, 0, 128, 128, out=out)


@pytest.mark.parametrize("tifffile_version, zarr_version, says", [
    ("2024.8.30", "3.1.6", "tifffile 2024.8.30 makes zarr 2 stores but zarr 3.1.6"),
    ("2026.3.3", "2.18.3", "tifffile 2026.3.3 makes zarr 3 stores but zarr 2.18.3"),
])
def test_tifffile_and_zarr_disagreeing_is_named(good_tiff, monkeypatch, tifffile_version, zarr_version, says):
    import tifffile

    monkeypatch.setattr(tifffile, "__version__", tifffile_version)
    monkeypatch.setattr(zarr, "__version__", zarr_version)
    with pytest.raises(UnsupportedFormatError, match=says + r".*backend='tiff'"):
        ZarrSource(good_tiff).read_region(0, 0, 8, 8)
    assert open_image(good_tiff, backend="tiff").read_region(0, 0, 8, 8).shape == (8, 8, 3)

"""Bad image inputs: each case names the error type and the file, reads fast and leaves the file alone.

Pixel types (16-bit PNG, float or integer TIFF/zarr), alpha (RGBA TIFF vs PNG), channel counts
against a model's in_chans, unreadable files (permission, simulated so the tests run as root),
directories, empty or zero-sized images, unknown suffixes, truncated or corrupt files, non-ASCII
names and a tiny TIFF declaring 1e6 x 1e6 pixels.
"""
from __future__ import annotations

import builtins
import io
import logging
import os
import struct
import time
import zlib
from pathlib import Path

import numpy as np
import pytest
import tifffile
import torch
import zarr
from PIL import Image

from hrsel.errors import (
    ChannelMismatchError,
    ImageReadError,
    ImageTooLargeError,
    PixelTypeError,
    UnsupportedFormatError,
)
from hrsel.io import ArraySource, open_image
from hrsel.io.pixels import composite_alpha
from hrsel.models import build_pipeline
from hrsel.models.patches import ImageBatch
from hrsel.select.extract import GridGeometry
from hrsel.tasks import TaskSpec
from hrsel.tiling import PatchGrid

RNG = np.random.default_rng(0)
RGBA = RNG.integers(0, 256, (20, 24, 4), dtype=np.uint8)
RGBA[0, :, 3], RGBA[1, :, 3] = 0, 255  # a transparent row and an opaque row besides random alpha
SIXTEEN = np.array([[0, 255, 256, 1000, 30000, 65279, 65535]], dtype=np.uint16)


@pytest.fixture(autouse=True)
def quiet_tifffile():
    logging.getLogger("tifffile").setLevel(logging.CRITICAL)  # it logs the broken files itself
    yield


# ---- tiny file writers ---------------------------------------------------------------------------


def write_png16(path: Path, samples: np.ndarray) -> Path:
    """A 16-bit PNG (gray, gray+alpha, RGB or RGBA by the last axis) written byte by byte."""
    samples = samples[:, :, None] if samples.ndim == 2 else samples
    h, w, c = samples.shape
    rows = b"".join(b"\x00" + samples[y].astype(">u2").tobytes() for y in range(h))

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    header = struct.pack(">IIBBBBB", w, h, 16, {1: 0, 2: 4, 3: 2, 4: 6}[c], 0, 0, 0)
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(rows))
                     + chunk(b"IEND", b""))
    return path


def write_sparse_tiff(path: Path, width: int, height: int, *, tile: int = 16384, samples: int = 3) -> Path:
    """A classic tiled TIFF declaring width x height pixels with every tile missing (byte count 0)."""
    tiles = (-(-width // tile)) * (-(-height // tile))
    entries = [(256, 4, 1, width), (257, 4, 1, height), (258, 3, samples, 0), (259, 3, 1, 1),
               (262, 3, 1, 2), (277, 3, 1, samples), (284, 3, 1, 1), (322, 4, 1, tile), (323, 4, 1, tile),
               (324, 4, tiles, 0), (325, 4, tiles, 0)]
    bits_at = 8 + 2 + 12 * len(entries) + 4  # the arrays follow the one IFD
    arrays = {258: bits_at, 324: bits_at + 2 * samples, 325: bits_at + 2 * samples + 4 * tiles}
    out = bytearray(b"II*\x00" + struct.pack("<IH", 8, len(entries)))
    for tag, kind, count, value in entries:
        value = arrays.get(tag, value)
        out += struct.pack("<HHIHH" if kind == 3 and count == 1 else "<HHII", tag, kind, count, value,
                           *((0,) if kind == 3 and count == 1 else ()))
    out += struct.pack("<I", 0) + struct.pack(f"<{samples}H", *[8] * samples) + bytes(8 * tiles)
    path.write_bytes(bytes(out))
    return path


def write_bomb_png(path: Path, side: int = 20000) -> Path:
    """A tiny PNG whose header declares side x side pixels (Pillow's decompression-bomb check)."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    header = struct.pack(">IIBBBBB", side, side, 8, 0, 0, 0, 0)
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(b"\x00" * 64))
                     + chunk(b"IEND", b""))
    return path


def write_zarr(path: Path, data: np.ndarray | None = None, *, shape: tuple = (), dtype: str = "uint8") -> Path:
    """A zarr array store on disk (the zarr 2 and 3 API alike)."""
    shape, dtype = (data.shape, data.dtype) if data is not None else (shape, dtype)
    array = zarr.open(str(path), mode="w", shape=shape, chunks=tuple(max(s, 1) for s in shape), dtype=dtype)
    if data is not None:
        array[...] = data
    return path


def snapshot(path: Path) -> tuple:
    """What must not change when reading fails: bytes (or the listing of a folder) and mtime."""
    path = Path(path)
    content = sorted(p.name for p in path.iterdir()) if path.is_dir() else path.read_bytes()
    return content, path.stat().st_mtime_ns


def raises_naming(error: type, path: Path, call, *, match: str | None = None) -> str:
    """Run `call`, assert it raises `error` whose message names `path` (and `match`), and that
    the file is unchanged; returns the message."""
    before = snapshot(path)
    with pytest.raises(error) as info:
        call()
    message = str(info.value)
    assert str(path) in message or repr(str(path)) in message, message
    if match is not None:
        assert match in message, message
    assert snapshot(path) == before
    return message


def read_all(source) -> np.ndarray:
    return source.read_region(0, 0, *source.dimensions)


# ---- 16-bit PNG, float and integer pixels ---------------------------------------------------------


@pytest.mark.parametrize("channels", [1, 2, 3, 4])
def test_16bit_png_not_saturated(tmp_path, channels):
    """Issue 13: a 16-bit gray PNG is read as uint16, every bit kept; Pillow itself reduces 16-bit
    colour and gray + alpha PNGs to their high byte (v >> 8), never saturating."""
    alpha = np.full_like(SIXTEEN, 65535)
    planes = {1: [SIXTEEN], 2: [SIXTEEN, alpha], 3: [SIXTEEN] * 3, 4: [SIXTEEN] * 3 + [alpha]}[channels]
    path = write_png16(tmp_path / f"sixteen_{channels}.png", np.stack(planes, -1))
    source = open_image(path)
    assert source.channels == (1 if channels <= 2 else 3)  # gray(+alpha) stays gray, alpha is composited
    pixels = read_all(source)
    as_float = ImageBatch([source]).full()[0, 0, 0]  # the hand-over to the model: / 65535 or / 255
    if channels == 1:
        assert pixels.dtype == np.uint16
        np.testing.assert_array_equal(pixels[0, :, 0], SIXTEEN[0])
        np.testing.assert_allclose(as_float.numpy(), SIXTEEN[0] / 65535, rtol=1e-6)
    else:
        np.testing.assert_array_equal(pixels[0, :, 0], [0, 0, 1, 3, 117, 254, 255])  # v >> 8, never 255 for 1000
        np.testing.assert_allclose(as_float.numpy(), SIXTEEN[0] / 65535, atol=1 / 255)


def _float_tiff(path, values, **kw):
    tifffile.imwrite(path, values, photometric="rgb" if values.ndim == 3 else "minisblack", **kw)


PIXEL_CASES = {  # refused when read (issue 13: uint16 and finite floats are read, see FLOAT_CASES)
    "float_nan.tif": (lambda p: _float_tiff(p, np.where(np.eye(16) > 0, np.nan, 0.5)), None, "NaN"),
    "int32.tif": (lambda p: tifffile.imwrite(p, np.full((16, 16), 7, np.int32)), None, "dtype int32"),
    "int32_pillow.tif": (lambda p: tifffile.imwrite(p, np.full((16, 16), 4095, np.int32)), "pillow", "dtype int32"),
    "int16.zarr": (lambda p: write_zarr(p, np.full((16, 16, 3), 9, np.int16)), None, "dtype int16"),
}


@pytest.mark.parametrize("name", sorted(PIXEL_CASES))
def test_pixel_type_refused_naming_file_dtype_and_range(tmp_path, name):
    write, backend, match = PIXEL_CASES[name]
    path = tmp_path / name
    write(path)
    message = raises_naming(PixelTypeError, path, lambda: read_all(open_image(path, backend=backend)), match=match)
    assert "Fix:" in message or "Convert it" in message


FLOAT_CASES = {  # read as float32 as they are; without data.band_norm the hand-over refuses them, naming the file
    "float0to255.tif": (lambda p: _float_tiff(p, np.linspace(0, 255, 16 * 16 * 3, dtype=np.float32).reshape(16, 16, 3)),
                        None, "0..255"),
    "float_negative.tif": (lambda p: _float_tiff(p, np.linspace(-1, 1, 256, dtype=np.float32).reshape(16, 16)),
                           None, "-1..1"),
    "float_tiled.tif": (lambda p: _float_tiff(p, np.full((32, 32, 3), 2.0, np.float32), tile=(16, 16)), "tiff",
                        "2..2"),
    "float_pillow.tif": (lambda p: Image.fromarray(np.full((16, 16), 200.0, np.float32)).save(p), "pillow",
                         "200..200"),
    "float0to255.zarr": (lambda p: write_zarr(p, np.full((16, 16, 3), 255.0, np.float32)), None, "255..255"),
}


@pytest.mark.parametrize("name", sorted(FLOAT_CASES))
def test_float_out_of_unit_range_is_read_then_refused_at_the_hand_over(tmp_path, name):
    write, backend, match = FLOAT_CASES[name]
    path = tmp_path / name
    write(path)
    source = open_image(path, backend=backend)
    assert read_all(source).dtype == np.float32  # read as it is: no clipping, no guessed scale
    message = raises_naming(PixelTypeError, path, lambda: ImageBatch([source]).full(), match=match)
    assert "data.band_norm" in message


@pytest.mark.parametrize("name, values", [("uint16.tif", np.full((16, 16), 4095, np.uint16)),
                                          ("uint16.zarr", np.full((16, 16, 3), 9, np.uint16))])
def test_uint16_is_read_as_uint16(tmp_path, name, values):
    path = tmp_path / name
    (write_zarr if name.endswith(".zarr") else tifffile.imwrite)(path, values)
    pixels = read_all(open_image(path))
    assert pixels.dtype == np.uint16
    np.testing.assert_array_equal(pixels.reshape(values.shape), values)


def test_float_tiff_in_unit_range_is_kept_not_clipped(tmp_path):
    values = np.linspace(0, 1, 16 * 16 * 3, dtype=np.float32).reshape(16, 16, 3)
    _float_tiff(tmp_path / "unit.tif", values)
    np.testing.assert_array_equal(read_all(open_image(tmp_path / "unit.tif")), values)


def test_float_array_0_to_255_is_kept_then_refused_at_the_hand_over():
    source = ArraySource(np.linspace(0, 255, 48).reshape(4, 4, 3))
    assert source.dtype == np.float32
    with pytest.raises(PixelTypeError, match=r"ArraySource\(in-memory.*float pixels in 0\.\.255.*data\.band_norm"):
        ImageBatch([source]).full()


@pytest.mark.parametrize("band_norm", [None, {"scale": 2.0}, {"mean": [0.5], "std": [0.1], "clip": True}])
@pytest.mark.parametrize("tile", [None, (16, 16)])
def test_a_nan_pixel_is_refused_whatever_the_band_norm(tmp_path, band_norm, tile):
    from hrsel.io.bands import normalizer_from_spec

    values = np.full((32, 32, 3), 0.5, np.float32)
    values[5, 7, 1] = np.nan  # float32 TIFFs are read as they are: the hand-over must see it
    path = tmp_path / "nan.tif"
    _float_tiff(path, values, **({"tile": tile} if tile else {}))
    source = open_image(path)
    if band_norm is not None:
        source.band_norm = normalizer_from_spec(band_norm)
    raises_naming(PixelTypeError, path, lambda: ImageBatch([source]).full(), match="NaN")
    batch = ImageBatch([source])
    with pytest.raises(PixelTypeError, match="NaN"):  # the streamed chunks too, not only the full image
        list(batch.chunks(GridGeometry.regular((32, 32), patch_size=16), chunk_size=4))


# ---- alpha: the same rule for RGBA TIFF and PNG --------------------------------------------------------


ALPHA_LAYOUTS = {
    "rgba_tiled": (RGBA, dict(photometric="rgb", tile=(16, 16))),
    "rgba_striped": (RGBA, dict(photometric="rgb", rowsperstrip=5)),
    "rgba_planar": (RGBA, dict(photometric="rgb", planarconfig="separate", tile=(16, 16))),
    "gray_alpha": (RGBA[..., [0, 3]], dict(photometric="minisblack", extrasamples=["unassalpha"], tile=(16, 16))),
}


@pytest.mark.parametrize("fill", [255, 0])
@pytest.mark.parametrize("layout", sorted(ALPHA_LAYOUTS))
def test_alpha_tiff_and_png_read_identical_pixels(tmp_path, layout, fill):
    pixels, options = ALPHA_LAYOUTS[layout]
    tiff, png = tmp_path / f"{layout}.tif", tmp_path / f"{layout}.png"
    data = pixels.transpose(2, 0, 1) if options.get("planarconfig") == "separate" else pixels
    tifffile.imwrite(tiff, data, **options)
    Image.fromarray(pixels, mode="LA" if pixels.shape[-1] == 2 else "RGBA").save(png)
    from_tiff, from_png = read_all(open_image(tiff, fill=fill)), read_all(open_image(png, fill=fill))
    assert from_tiff.shape == from_png.shape == pixels.shape[:2] + (pixels.shape[-1] - 1,)
    np.testing.assert_array_equal(from_tiff, from_png)
    np.testing.assert_array_equal(from_png, composite_alpha(pixels, fill=fill))
    assert (from_png[0] == fill).all() and (from_png[1] == pixels[1, :, :-1]).all()


def test_associated_alpha_tiff_is_composited_as_premultiplied(tmp_path):
    premultiplied = RGBA.copy()
    premultiplied[..., :3] = (RGBA[..., :3].astype(np.uint32) * RGBA[..., 3:] // 255).astype(np.uint8)
    tifffile.imwrite(tmp_path / "assoc.tif", premultiplied, photometric="rgb", extrasamples=["assocalpha"])
    got = read_all(open_image(tmp_path / "assoc.tif", fill=255))
    np.testing.assert_array_equal(got, composite_alpha(premultiplied, fill=255, associated=True))
    assert np.abs(got.astype(int) - composite_alpha(RGBA, fill=255)).max() <= 2  # rounding of the premultiply


# ---- channels against the model's in_chans ---------------------------------------------------------------


TASKS = {"y": TaskSpec("multiclass", 3)}
LIGHT = dict(in_chans=3, backbone="narrow_resnet", backbone_options={"width": 8, "strides": (2, 2), "blocks": (1, 1)})
PIPELINE_OPTIONS = {
    "ips": dict(LIGHT, patch_size=20, k=3, score_chunk=5,
                aggregator_options={"heads": 2, "head_dim": 4, "mlp_dim": 16}),
    "dps": dict(LIGHT, patch_size=20, k=3, downscale=2, num_samples=10),
    "dps_candidates": dict(LIGHT, patch_size=20, k=2, num_candidates=5, downscale=1, num_samples=10),
    "ats": dict(LIGHT, patch_size=20, k=3, downscale=2),
    "patchdrop": dict(LIGHT, patch_size=20, downscale=2),
    "cnn": dict(LIGHT, downscale=2),
}


@pytest.fixture(scope="module")
def two_channel_tiff(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("chans") / "two_bands.tif"
    tifffile.imwrite(path, RNG.integers(0, 256, (80, 80, 2), dtype=np.uint8), photometric="minisblack",
                     extrasamples=["unspecified"], tile=(16, 16))
    return path


def forward_calls(model: torch.nn.Module) -> list:
    calls: list = []
    for module in list(model.modules())[1:]:  # every layer, not the pipeline's own entry
        module.register_forward_pre_hook(lambda module, args: calls.append(type(module).__name__))
    return calls


@pytest.mark.parametrize("name", sorted(PIPELINE_OPTIONS))
def test_two_channel_image_into_three_channel_model(two_channel_tiff, name):
    model = build_pipeline(name, tasks=TASKS, **PIPELINE_OPTIONS[name])
    calls, source = forward_calls(model), open_image(two_channel_tiff)
    assert source.channels == 2  # an unspecified extra sample is a band, not alpha
    reads: list = []
    source.read_region = lambda *a, **k: reads.append(a)  # no pixel may be read either
    message = raises_naming(ChannelMismatchError, two_channel_tiff, lambda: model([source]), match="2 channel(s)")
    assert "in_chans=3" in message and "model.in_chans: 2" in message
    assert calls == [] and reads == []


@pytest.mark.parametrize("name, in_chans, channels, options", [
    ("ips", 3, 2, {}),
    ("dps", 1, 4, {}),
    ("cnn", 3, 1, {"coord_channels": True}),
    ("ats", 1, 3, {"coord_channels": True}),
])
def test_tensor_with_wrong_channels_is_named_before_forward(name, in_chans, channels, options):
    model = build_pipeline(name, tasks=TASKS, **dict(PIPELINE_OPTIONS[name], in_chans=in_chans, **options))
    calls = forward_calls(model)
    images = torch.zeros(1, channels, 80, 80, dtype=torch.uint8)
    with pytest.raises(ChannelMismatchError) as info:
        model(images)
    message = str(info.value)
    assert f"images tensor of shape (1, {channels}, 80, 80)" in message and f"in_chans={in_chans}" in message
    assert f"model.in_chans: {channels}" in message and calls == []


# ---- unreadable, missing pieces, wrong kinds of path ----------------------------------------------------


@pytest.fixture(scope="module")
def files(tmp_path_factory) -> dict[str, Path]:
    folder = tmp_path_factory.mktemp("files")
    image = RNG.integers(0, 256, (48, 64, 3), dtype=np.uint8)
    Image.fromarray(image).save(folder / "photo.png")
    tifffile.imwrite(folder / "slide.tif", image, photometric="rgb", tile=(16, 16))
    write_zarr(folder / "store.zarr", image)
    return {"png": folder / "photo.png", "tif": folder / "slide.tif", "zarr": folder / "store.zarr"}


@pytest.mark.parametrize("kind, backend", [
    ("tif", None), ("tif", "tiff"), ("tif", "zarr"), ("tif", "openslide"), ("png", None), ("png", "pillow"),
    ("zarr", None),
])
def test_no_read_permission_is_named(files, monkeypatch, kind, backend):
    path, real_access = files[kind], os.access
    monkeypatch.setattr(os, "access", lambda p, mode, *a, **k: False if os.fspath(p) == str(path)
                        else real_access(p, mode, *a, **k))
    raises_naming(ImageReadError, path, lambda: open_image(path, backend=backend), match="permission denied")


@pytest.mark.parametrize("kind, backend", [("tif", None), ("tif", "tiff"), ("png", "pillow"), ("tif", "zarr")])
def test_permission_error_from_open_itself_is_named(files, monkeypatch, kind, backend):
    path, real_open = files[kind], builtins.open

    def denying_open(file, *args, **kwargs):
        if isinstance(file, (str, os.PathLike)) and os.fspath(file) == str(path):
            raise PermissionError(13, "Permission denied", str(path))
        return real_open(file, *args, **kwargs)

    monkeypatch.setattr(builtins, "open", denying_open)
    raises_naming(ImageReadError, path, lambda: open_image(path, backend=backend), match="permission denied")


@pytest.mark.parametrize("folder_name, backend", [
    ("scans", None), ("scan.png", None), ("scan.tif", "tiff"), ("scan.png", "pillow"), ("scan.svs", "openslide"),
])
def test_directory_passed_as_image(tmp_path, folder_name, backend):
    folder = tmp_path / folder_name
    folder.mkdir()
    (folder / "inside.txt").write_text("not an image")
    raises_naming(UnsupportedFormatError, folder, lambda: open_image(folder, backend=backend), match="directory")


@pytest.mark.parametrize("name, backend", [
    ("empty.png", None), ("empty.tif", None), ("empty.svs", None), ("empty.jpg", "pillow"), ("empty.tif", "zarr"),
])
def test_empty_file(tmp_path, name, backend):
    path = tmp_path / name
    path.write_bytes(b"")
    raises_naming(ImageReadError, path, lambda: open_image(path, backend=backend), match="empty file (0 bytes)")


@pytest.mark.parametrize("name, shape", [("flat.zarr", (0, 7, 3)), ("thin.zarr", (5, 0)), ("zero_wide.tif", None)])
def test_zero_sized_image(tmp_path, name, shape):
    path = tmp_path / name
    if shape is None:
        write_sparse_tiff(path, 0, 10, tile=16)
    else:
        write_zarr(path, shape=shape)
    raises_naming(ImageReadError, path, lambda: open_image(path), match="has no pixels")


def test_zero_sized_array_is_named():
    with pytest.raises(ImageReadError, match=r"in-memory array image> has no pixels: level 0 is 5x0"):
        ArraySource(np.zeros((0, 5, 3), np.uint8)).read_region(0, 0, 1, 1)


@pytest.mark.parametrize("name, content", [
    ("blob.xyz", bytes(RNG.integers(0, 256, 300, dtype=np.uint8))),
    ("notes.dat", b"just some text\n" * 20),
    ("README", b"# no suffix, no image\n"),
    ("fake.png", b"\x89PNX not really a png"),
])
def test_unknown_extension_or_content(tmp_path, name, content):
    path = tmp_path / name
    path.write_bytes(content)
    raises_naming(UnsupportedFormatError, path, lambda: open_image(path))


def test_known_content_under_unknown_extension_opens(tmp_path, files):
    path = tmp_path / "photo.xyz"
    path.write_bytes(files["png"].read_bytes())
    np.testing.assert_array_equal(read_all(open_image(path)), read_all(open_image(files["png"])))


# ---- truncated, corrupt, non-ASCII names ------------------------------------------------------------------


def encoded(fmt: str) -> bytes:
    buffer = io.BytesIO()
    options = {"compression": "tiff_adobe_deflate"} if fmt == "tiff" else {}  # garbled deflate fails to inflate
    Image.fromarray(RNG.integers(0, 256, (64, 64, 3), dtype=np.uint8)).save(buffer, format=fmt, **options)
    return buffer.getvalue()


def truncated(data: bytes) -> bytes:
    return data[: len(data) // 2]


def garbled(data: bytes) -> bytes:
    middle = len(data) // 2
    return data[:middle] + b"\x00" * 64 + data[middle + 64:]


@pytest.mark.parametrize("name, fmt, damage", [
    ("half.png", "png", truncated), ("half.jpg", "jpeg", truncated), ("half.bmp", "bmp", truncated),
    ("half.gif", "gif", truncated), ("half.webp", "webp", truncated), ("half.tif", "tiff", truncated),
    ("garbled.png", "png", garbled), ("garbled.tif", "tiff", garbled),
    ("ünïcødé 😐.png", "png", truncated), ("schön slide.tif", "tiff", truncated),
])
def test_truncated_or_corrupt_file(tmp_path, name, fmt, damage):
    path = tmp_path / name
    path.write_bytes(damage(encoded(fmt)))
    raises_naming(ImageReadError, path, lambda: read_all(open_image(path)))


@pytest.mark.parametrize("name", ["ünïcødé 😐.png", "日本語.tif", "naïve café.zarr"])
def test_non_ascii_names_open_and_read(tmp_path, name):
    pixels = RNG.integers(0, 256, (12, 10, 3), dtype=np.uint8)
    path = tmp_path / name
    if name.endswith(".png"):
        Image.fromarray(pixels).save(path)
    elif name.endswith(".tif"):
        tifffile.imwrite(path, pixels, photometric="rgb")
    else:
        write_zarr(path, pixels)
    source = open_image(path)
    np.testing.assert_array_equal(read_all(source), pixels)
    assert name in repr(source)


# ---- giant declared sizes: bounded work or a named refusal, in seconds -------------------------------


@pytest.fixture(scope="module")
def huge_tiff(tmp_path_factory) -> Path:
    return write_sparse_tiff(tmp_path_factory.mktemp("huge") / "million.tif", 1_000_000, 1_000_000)


def test_huge_sparse_tiff_opens_and_reads_a_region_fast(huge_tiff):
    start = time.perf_counter()
    source = open_image(huge_tiff)
    assert source.dimensions == (1_000_000, 1_000_000) and huge_tiff.stat().st_size < 100_000
    np.testing.assert_array_equal(source.read_region(500_000, 500_000, 32, 32), 255)  # missing tiles are fill
    assert time.perf_counter() - start < 5


@pytest.mark.parametrize("what", ["thumbnail", "masked_grid", "dense_grid"])
def test_huge_sparse_tiff_refuses_unbounded_work_fast(huge_tiff, what):
    source = open_image(huge_tiff)
    call = {
        "thumbnail": lambda: source.thumbnail(512),
        "masked_grid": lambda: PatchGrid.for_source(source, patch_size=8192, min_tissue_fraction=0.5),
        "dense_grid": lambda: PatchGrid.for_source(source, patch_size=16),
    }[what]
    start = time.perf_counter()
    message = raises_naming(ImageTooLargeError, huge_tiff, call, match="1000000x1000000")
    assert "Fix:" in message and time.perf_counter() - start < 5


def test_huge_sparse_tiff_coarse_grid_is_fast(huge_tiff):
    start = time.perf_counter()
    grid = PatchGrid.for_source(open_image(huge_tiff), patch_size=8192)
    assert len(grid) == 122 * 122 and time.perf_counter() - start < 5


def test_thumbnail_bound_can_be_raised(files):
    source = open_image(files["tif"])
    with pytest.raises(ImageTooLargeError, match="max_read_pixels=1,000"):
        source.thumbnail(16, max_read_pixels=1000)
    assert source.thumbnail(16, max_read_pixels=48 * 64).shape == (12, 16, 3)


def test_png_declaring_a_giant_size(tmp_path):
    path = write_bomb_png(tmp_path / "bomb.png")
    start = time.perf_counter()
    raises_naming(ImageTooLargeError, path, lambda: open_image(path), match="too large to decode")
    assert time.perf_counter() - start < 5

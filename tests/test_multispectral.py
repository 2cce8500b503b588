"""Multispectral and 16-bit imagery: native dtypes through readers, kernels, the float hand-over and training."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from hrsel.data.band_norm import resolve_band_norm, with_band_norm
from hrsel.errors import ChannelMismatchError, ConfigError, PixelTypeError
from hrsel.io import ArraySource, open_image
from hrsel.io.bands import BandNormalizer, default_normalizer, normalizer_from_spec
from hrsel.models.patches import ImageBatch
from hrsel.select.extract import GridGeometry
from hrsel.tiling import PatchGrid, read_patches, stream_patches
from hrsel.tiling.kernels import downscale_mean, extract_patches, gather_patches
from hrsel.train import main

from toy_bright import one_torch_thread  # noqa: F401 (autouse fixture)

REPO = Path(__file__).resolve().parents[1]


def bands(seed: int, h: int = 48, w: int = 64, c: int = 4, high: int = 4096) -> np.ndarray:
    """(h, w, c) uint16 values 0..high-1 (12-bit data, as satellites store it)."""
    return np.random.default_rng(seed).integers(0, high, (h, w, c), dtype=np.uint16)


def write_geotiff(path: Path, image: np.ndarray, *, tile: int | None = 16) -> Path:
    """A GeoTIFF: ModelPixelScale, ModelTiepoint and a GeoKeyDirectory (WGS 84 / UTM 32N) beside the pixels."""
    import tifffile

    geo = [(33550, "d", 3, (10.0, 10.0, 0.0)), (33922, "d", 6, (0.0, 0.0, 0.0, 500000.0, 5000000.0, 0.0)),
           (34735, "H", 16, (1, 1, 0, 3, 1024, 0, 1, 1, 1025, 0, 1, 1, 3072, 0, 1, 32632))]
    extra = {"tile": (tile, tile)} if tile else {}
    tifffile.imwrite(path, image, photometric="minisblack", planarconfig="contig", compression="zlib",
                     extratags=geo, **extra)
    return path


# ---- readers ------------------------------------------------------------------------------------

@pytest.mark.parametrize("tile", [16, None])
def test_four_band_uint16_geotiff_reads_native(tmp_path, tile):
    image = bands(0)
    with open_image(str(write_geotiff(tmp_path / "s2.tif", image, tile=tile))) as source:
        assert (source.channels, source.dtype, source.dimensions) == (4, np.uint16, (64, 48))
        np.testing.assert_array_equal(source.read_region(0, 0, 64, 48), image)
        edge = source.read_region(60, 40, 8, 8)  # past the edge: fill 255 -> 65535
        np.testing.assert_array_equal(edge[:8 - 0, :4], image[40:48, 60:64])
        assert (edge[:, 4:] == 65535).all()
        assert source.thumbnail(16).dtype == np.uint16


def test_big_endian_and_planar_uint16_tiffs_give_the_same_values(tmp_path):
    import tifffile

    image = bands(1)
    tifffile.imwrite(tmp_path / "be.tif", image, photometric="minisblack", planarconfig="contig", byteorder=">",
                     tile=(16, 16))
    tifffile.imwrite(tmp_path / "planar.tif", image.transpose(2, 0, 1), photometric="minisblack",
                     planarconfig="separate")
    for name in ("be.tif", "planar.tif"):
        with open_image(str(tmp_path / name)) as source:
            assert source.dtype == np.uint16 and source.channels == 4
            np.testing.assert_array_equal(source.read_region(0, 0, 64, 48), image)


def test_float32_tiff_and_array_keep_their_values(tmp_path):
    import tifffile

    image = (bands(2).astype(np.float32) / 7.0 - 100.0)  # negative and large: reflectances, dB
    tifffile.imwrite(tmp_path / "f.tif", image, photometric="minisblack", planarconfig="contig", tile=(16, 16))
    with open_image(str(tmp_path / "f.tif")) as source:
        assert source.dtype == np.float32
        np.testing.assert_array_equal(source.read_region(0, 0, 64, 48), image)
        assert source.read_region(-1, 0, 2, 1)[0, 0, 0] == 1.0  # fill 255 -> 1.0
    array = ArraySource(image.astype(np.float64), layout="hwc")
    assert array.dtype == np.float32 and array.channels == 4
    np.testing.assert_array_equal(array.read_region(0, 0, 64, 48), image)


def test_nan_and_int32_are_refused_by_name(tmp_path):
    nan = np.zeros((8, 8, 3), np.float32)
    nan[2, 3, 1] = np.nan
    with pytest.raises(PixelTypeError, match="NaN"):
        ArraySource(nan)
    with pytest.raises(PixelTypeError, match="int32"):
        ArraySource(np.zeros((8, 8, 3), np.int32))


def test_16bit_png_keeps_every_bit(tmp_path):
    values = np.array([[0, 1, 255, 256], [1000, 4095, 40000, 65535]], dtype=np.uint16)
    Image.fromarray(values).save(tmp_path / "g16.png")
    with open_image(str(tmp_path / "g16.png")) as source:
        assert source.dtype == np.uint16 and source.channels == 1
        np.testing.assert_array_equal(source.read_region(0, 0, 4, 2)[..., 0], values)  # 1 stays 1, not 0


def test_16bit_png_and_uint16_tiff_normalise_alike(tmp_path):
    import tifffile

    values = bands(3, c=1)[..., 0]
    Image.fromarray(values).save(tmp_path / "g.png")
    tifffile.imwrite(tmp_path / "g.tif", values)
    geometry = GridGeometry(16, (16, 16), (0, 0), (3, 4))
    chunks = [ImageBatch([open_image(str(tmp_path / n))]).chunk(geometry, 0, 12) for n in ("g.png", "g.tif")]
    torch.testing.assert_close(chunks[0], chunks[1])
    torch.testing.assert_close(chunks[0][0, 5, 0], torch.from_numpy(values[16:32, 16:32] / 65535.0).float())


# ---- kernels at uint16 / float32 vs numpy ------------------------------------------------------

def numpy_patches(image: np.ndarray, coords: np.ndarray, size: int, fill) -> np.ndarray:
    """(n, p, p, c) reference: pad with fill, then slice."""
    h, w, c = image.shape
    pad = size + int(np.abs(coords).max())
    padded = np.full((h + 2 * pad, w + 2 * pad, c), fill, dtype=image.dtype)
    padded[pad:pad + h, pad:pad + w] = image
    return np.stack([padded[y + pad:y + pad + size, x + pad:x + pad + size] for x, y in coords])


@pytest.mark.parametrize("dtype", [np.uint16, np.float32])
def test_kernels_match_numpy(dtype):
    image = bands(4, h=37, w=29, c=5).astype(dtype) * (np.float32(0.5) if dtype == np.float32 else 1)
    image = image.astype(dtype)
    coords = np.array([[0, 0], [-5, 3], [20, 30], [25, -7], [8, 8]])
    fill = 65535 if dtype == np.uint16 else 1.0
    reference = numpy_patches(image, coords, 11, fill)
    for parallel in (True, False):
        last = extract_patches(image, coords, 11, fill=fill, channels_last=True, parallel=parallel)
        first = extract_patches(image, coords, 11, fill=fill, parallel=parallel)
        assert last.dtype == dtype and first.dtype == dtype
        np.testing.assert_array_equal(last, reference)
        np.testing.assert_array_equal(first, reference.transpose(0, 3, 1, 2))
    np.testing.assert_array_equal(gather_patches(first, np.array([4, 0, 4])), first[[4, 0, 4]])
    down = downscale_mean(image, 4)
    ref = np.zeros(down.shape)
    for oy in range(down.shape[0]):
        for ox in range(down.shape[1]):
            ref[oy, ox] = image[oy * 4:oy * 4 + 4, ox * 4:ox * 4 + 4].astype(np.float64).mean(axis=(0, 1))
    assert down.dtype == dtype
    if dtype == np.uint16:
        np.testing.assert_array_equal(down, np.floor(ref + 0.5).astype(np.uint16))  # round half up
        assert down.max() > 255  # no 8-bit wrap
    else:
        np.testing.assert_allclose(down, ref, rtol=1e-6)


def test_streaming_uint16_matches_the_file(tmp_path):
    image = bands(5)
    source = open_image(str(write_geotiff(tmp_path / "s.tif", image)))
    grid = PatchGrid.for_source(source, patch_size=16, stride=16)
    chunks = list(stream_patches(source, grid, chunk_size=5, workers=2))
    patches = torch.cat([c.patches for c in chunks])  # (12, 4, 16, 16)
    assert patches.dtype == torch.uint16 and patches.shape == (12, 4, 16, 16)
    np.testing.assert_array_equal(patches[7].permute(1, 2, 0).numpy(), image[16:32, 48:64])
    arr = ArraySource(image)
    grid = PatchGrid.for_source(arr, patch_size=16, stride=16)
    in_memory = torch.cat([c.patches for c in stream_patches(arr, grid, chunk_size=5)])
    torch.testing.assert_close(in_memory, patches, rtol=0, atol=0, check_dtype=True)
    edge = read_patches(source, [[56, 40]], 16)  # past the edge: fill in uint16 units
    assert int(edge[0, 0, 15, 15]) == 65535 and int(edge[0, 2, 0, 0]) == int(image[40, 56, 2])


# ---- normalisation -------------------------------------------------------------------------

def test_defaults_per_dtype():
    x8 = torch.tensor([0, 51, 255], dtype=torch.uint8).view(1, 3, 1, 1)
    torch.testing.assert_close(default_normalizer(torch.uint8)(x8), x8.float() / 255)
    x16 = torch.tensor([0, 4095, 65535], dtype=torch.uint16).view(1, 3, 1, 1)
    torch.testing.assert_close(default_normalizer(np.uint16)(x16), x16.float() / 65535)
    with pytest.raises(PixelTypeError, match="data.band_norm"):
        default_normalizer(np.float32)(torch.full((3, 2, 2), 200.0))  # 0..255 floats: say how to scale


def test_mean_std_from_config_per_band():
    norm = normalizer_from_spec({"mean": [100, 200], "std": [10, 20]})
    x = torch.tensor([[[[110.0]], [[160.0]]]], dtype=torch.float32).to(torch.uint16)  # (1, 2, 1, 1)
    torch.testing.assert_close(norm(x).flatten(), torch.tensor([1.0, -2.0]))
    with pytest.raises(ChannelMismatchError, match=r"3 band\(s\) but .* has 2"):
        norm(torch.zeros(1, 3, 1, 1, dtype=torch.uint16))
    with pytest.raises(ConfigError, match="data.band_norm"):
        normalizer_from_spec({"mean": [1, 2]})


def training_set(tmp_path: Path, n: int = 4) -> list[dict]:
    items = []
    for i in range(n):
        image = bands(10 + i)
        image[..., 3] = image[..., 3] // 16 + 1000  # band 3: 1000..1255
        items.append({"image": open_image(str(write_geotiff(tmp_path / f"{i}.tif", image))), "targets": {}})
    return items


def test_percentiles_and_mean_std_computed_once_and_reloaded(tmp_path):
    train = training_set(tmp_path)
    pixels = np.concatenate([item["image"].read_region(0, 0, 64, 48).reshape(-1, 4) for item in train]).astype(float)
    norm = resolve_band_norm({"percentiles": [1, 99]}, train)
    np.testing.assert_allclose(norm.offset, np.percentile(pixels, 1, axis=0), rtol=1e-6)
    np.testing.assert_allclose(np.add(norm.offset, norm.scale), np.percentile(pixels, 99, axis=0), rtol=1e-6)
    assert norm.clip and 1000 <= norm.offset[3] < norm.offset[3] + norm.scale[3] <= 1255
    saved = tmp_path / "band_norm.json"
    norm.save(saved)
    reloaded = resolve_band_norm({"percentiles": [1, 99]}, [], saved=saved)  # no images read: none given
    assert reloaded == norm and json.loads(saved.read_text())["rule"].startswith("percentiles [1, 99]")
    stats = resolve_band_norm({"mean": "auto", "std": "auto", "sample": 2}, train)
    first_two = pixels[: 2 * 48 * 64]  # sample=2 spreads over items 0 and 3
    last = np.concatenate([first_two[: 48 * 64], pixels[3 * 48 * 64:]])
    np.testing.assert_allclose(stats.offset, last.mean(axis=0), rtol=1e-6)
    np.testing.assert_allclose(stats.scale, last.std(axis=0), rtol=1e-5)


def test_the_batch_uses_the_normaliser_its_sources_carry(tmp_path):
    train = with_band_norm(training_set(tmp_path, 2), BandNormalizer(offset=(1000.0,), scale=(2.0,)))
    source = train[0]["image"]
    geometry = GridGeometry(16, (16, 16), (0, 0), (3, 4))
    got = ImageBatch([source], in_chans=4).chunk(geometry, 0, 1)[0, 0]  # (4, 16, 16)
    expected = (torch.from_numpy(source.read_region(0, 0, 16, 16).astype(np.float32)) - 1000) / 2
    torch.testing.assert_close(got, expected.permute(2, 0, 1))
    with pytest.raises(ChannelMismatchError, match="in_chans=3"):
        ImageBatch([source], in_chans=3)


# ---- end to end ---------------------------------------------------------------------------

def write_multispectral_manifest(root: Path, n: int = 6) -> Path:
    (root / "tiles").mkdir(parents=True)
    rows = ["path,label"]
    for i in range(n):
        image = bands(20 + i, h=64, w=64, high=1000)
        if i % 2:
            image[16:40, 16:40, 3] += 3000  # the "vegetation" class: a bright near-infrared block
        write_geotiff(root / f"tiles/{i}.tif", image)
        rows.append(f"tiles/{i}.tif,{'veg' if i % 2 else 'bare'}")
    (root / "slides.csv").write_text("\n".join(rows) + "\n")
    return root


def cli_args(root: Path, tmp_path: Path, *extra: str) -> list[str]:
    """configs/manifest_example.yaml without target_mpp (a GeoTIFF has metres, not microns, per pixel)."""
    import yaml

    config = yaml.safe_load((REPO / "configs/manifest_example.yaml").read_text())
    del config["data"]["target_mpp"]
    (tmp_path / "multispectral.yaml").write_text(yaml.safe_dump(config))
    return [str(tmp_path / "multispectral.yaml"), f"data.root={root}", "data.num_workers=0",
            "data.batch_size=2", "train.epochs=1", "train.progress_bar=false", "eval.pictures=1",
            "data.test_fraction=0.34", "data.val_fraction=0.25", "model.patch_size=16", "model.k=4",
            "model.score_chunk=8", "model.backbone_options={}",
            f"--output-dir={tmp_path / 'runs'}", "--device=cpu", *extra]


def test_four_band_uint16_geotiffs_train_one_epoch(tmp_path, capsys):
    root = write_multispectral_manifest(tmp_path / "data")
    code = main(cli_args(root, tmp_path, "model.in_chans=4", "data.band_norm={percentiles: [1, 99], sample: 3}"))
    assert code == 0, capsys.readouterr().err[-3000:]
    run = tmp_path / "runs/manifest_example"
    saved = json.loads((run / "band_norm.json").read_text())
    assert len(saved["offset"]) == 4 and saved["clip"] and (run / "test_metrics.json").is_file()
    assert list((run / "pictures").rglob("*.png"))  # uint16 thumbnails drawn
    # predict reads the run's band_norm.json: the same probabilities as the trainer's evaluation
    from hrsel.inference import load_model, predict_sources
    from hrsel.inference.preprocess import run_band_norm

    model = load_model(run)
    assert run_band_norm(model).offset == tuple(saved["offset"])
    result = predict_sources(model, [root / "tiles/0.tif"], out_dir=tmp_path / "preds", pictures=False,
                             progress=False)
    probs = [float(v) for k, v in result.rows[0].items() if "/prob/" in k]
    assert len(probs) == 2 and abs(sum(probs) - 1) < 1e-5
    # evaluate applies the run's band_norm too: its figures equal the trainer's test metrics
    from hrsel.inference.evaluate import evaluate_run

    report = evaluate_run(run, out_dir=tmp_path / "eval")
    trained = json.loads((run / "test_metrics.json").read_text())["metrics"]
    assert report.metrics["loss"] == pytest.approx(trained["loss"], rel=1e-5)


def test_in_chans_other_than_the_bands_is_named(tmp_path, capsys):
    root = write_multispectral_manifest(tmp_path / "data")
    code = main(cli_args(root, tmp_path, "model.in_chans=3"))
    err = capsys.readouterr().err
    assert code == 2 and "4 channel(s) but the model was built with in_chans=3" in err, err[-2000:]
    assert not (tmp_path / "runs/manifest_example/config.yaml").exists()  # stopped before writing the run

"""What `hrsel.predict` writes besides the probabilities: score maps in physical units, GeoJSON of the
patches that carry information, and heatmaps a person can read (cropped, an honest colour scale,
multispectral galleries, scale bars, class names). An untrained tiny IPS pipeline is enough: the
maps depend on the patch grid and scores, not on what the model learnt."""
from __future__ import annotations

import json
import logging
import types
from pathlib import Path

import numpy as np
import pytest
import torch

from hrsel.engine.colorscale import check_scale, percentile_ranks, score_colors
from hrsel.errors import ConfigError
from hrsel.inference.informative import BLANK_STD, blank_patches, informative

SMALL_CNN = {"width": 8, "strides": [2, 2, 2, 2], "blocks": [1, 1, 1, 1]}


def tiny_model(tmp_path: Path, *, patch: int = 32, k: int = 2, in_chans: int = 3, target_mpp: float | None = None):
    """An untrained IPS LoadedModel (binary task 'tumor') with the run options predict reads."""
    from hrsel.inference.load import LoadedModel
    from hrsel.models import build_pipeline
    from hrsel.tasks import TaskSpec

    torch.manual_seed(0)
    tasks = {"tumor": TaskSpec("binary", 1)}
    pipeline = build_pipeline("ips", tasks=tasks, in_chans=in_chans, patch_size=patch, k=k, score_chunk=8,
                              backbone="narrow_resnet", backbone_options=SMALL_CNN,
                              aggregator_options={"heads": 2, "head_dim": 4, "mlp_dim": 8}).eval()
    config = types.SimpleNamespace(seed=0, train=types.SimpleNamespace(precision="fp32"),
                                   data=types.SimpleNamespace(options={"target_mpp": target_mpp} if target_mpp else {}))
    return LoadedModel(pipeline=pipeline, tasks=tasks, class_names={"tumor": ["normal", "tumor"]}, config=config,
                       checkpoint_path=tmp_path / "none.pt", hrsel_version="test")


def write_ome_zarr_image(path: Path, image: np.ndarray, *, mpp: float, levels: int = 2) -> None:
    """(h, w, c) uint8 as an NGFF 0.4 OME-Zarr in micrometres, level i downsampled 2^i."""
    import zarr

    group = zarr.open_group(str(path), mode="w")
    for i in range(levels):
        level = np.ascontiguousarray(image[::2 ** i, ::2 ** i].transpose(2, 0, 1))  # (c, y, x)
        make = group.create_array if hasattr(group, "create_array") else group.create_dataset
        make(str(i), shape=level.shape, chunks=(level.shape[0], 64, 64), dtype="uint8")[:] = level
    group.attrs["multiscales"] = [{
        "version": "0.4",
        "axes": [{"name": "c", "type": "channel"}, {"name": "y", "type": "space", "unit": "micrometer"},
                 {"name": "x", "type": "space", "unit": "micrometer"}],
        "datasets": [{"path": str(i), "coordinateTransformations": [
            {"type": "scale", "scale": [1.0, mpp * 2 ** i, mpp * 2 ** i]}]} for i in range(levels)]}]


def physical_extent(multiscales: dict, shape: tuple[int, ...]) -> np.ndarray:
    """[[y0, y1], [x0, x1]]: the outer edges of level 0's first and last pixels (NGFF: index i at i * scale
    + translation, the pixel's centre), in the axes' unit."""
    transforms = multiscales["datasets"][0]["coordinateTransformations"]
    scale = next(t["scale"] for t in transforms if t["type"] == "scale")
    shift = next((t["translation"] for t in transforms if t["type"] == "translation"), [0.0] * len(scale))
    return np.array([[shift[a] - scale[a] / 2, shift[a] + (shape[a] - 0.5) * scale[a]] for a in (1, 2)])


# ----------------------------------------------------------------------------- 5. units of the score map

def test_score_map_lies_over_an_ome_zarr_in_micrometres(tmp_path, caplog):
    import zarr

    from hrsel.inference import predict_sources

    image = np.random.default_rng(0).integers(0, 256, (192, 256, 3), dtype=np.uint8)
    write_ome_zarr_image(tmp_path / "slide.ome.zarr", image, mpp=0.25)
    model = tiny_model(tmp_path, target_mpp=0.5)  # reads level 1 (0.5 um/px): 4 x 3 patches of 32 px
    with caplog.at_level(logging.INFO, logger="hrsel"):
        predict_sources(model, [tmp_path / "slide.ome.zarr"], out_dir=tmp_path / "out", pictures=False)
    assert "score map in micrometres (0.25 um per level-0 pixel)" in caplog.text

    slide = zarr.open_group(str(tmp_path / "slide.ome.zarr"), mode="r")
    scores = zarr.open_group(str(tmp_path / "out" / "slide_scores.zarr"), mode="r")
    ms_slide, ms_scores = slide.attrs["multiscales"][0], scores.attrs["multiscales"][0]
    assert [a.get("unit") for a in ms_scores["axes"]] == [None, "micrometer", "micrometer"]
    assert scores["0"].shape == (2, 3, 4)
    np.testing.assert_allclose(physical_extent(ms_scores, scores["0"].shape),
                               physical_extent(ms_slide, slide["0"].shape), atol=1e-9)  # 0..48 um x 0..64 um
    cell = ms_scores["datasets"][0]["coordinateTransformations"][0]["scale"]
    assert cell == [1.0, 16.0, 16.0]  # 32 px at 0.5 um/px = 64 level-0 px at 0.25 um/px = 16 um


def test_score_map_without_mpp_stays_in_pixels_and_says_so(tmp_path, caplog):
    import zarr
    from PIL import Image

    from hrsel.inference import predict_sources

    Image.fromarray(np.random.default_rng(1).integers(0, 256, (64, 96, 3), dtype=np.uint8)).save(tmp_path / "a.png")
    with caplog.at_level(logging.INFO, logger="hrsel"):
        predict_sources(tiny_model(tmp_path), [tmp_path / "a.png"], out_dir=tmp_path / "out", pictures=False)
    assert "a.png: score map in level-0 pixels: the image has no microns-per-pixel metadata" in caplog.text
    multiscales = zarr.open_group(str(tmp_path / "out" / "a_scores.zarr"), mode="r").attrs["multiscales"][0]
    assert all("unit" not in axis for axis in multiscales["axes"])
    np.testing.assert_allclose(physical_extent(multiscales, (2, 2, 3)), [[-0.5, 63.5], [-0.5, 95.5]])


# ----------------------------------------------------------------------------- 9. GeoJSON of what matters

def blank_reference(thumbnail: np.ndarray, image_wh, coords, size) -> np.ndarray:
    """Patch by patch: the std of its thumbnail box per band, at most BLANK_STD in all."""
    th, tw = thumbnail.shape[:2]
    sx, sy = tw / image_wh[0], th / image_wh[1]
    out = []
    for x, y in coords:
        c0, r0 = min(int(np.floor(x * sx)), tw - 1), min(int(np.floor(y * sy)), th - 1)
        c1, r1 = max(min(int(np.ceil((x + size) * sx)), tw), c0 + 1), max(min(int(np.ceil((y + size) * sy)), th), r0 + 1)
        box = thumbnail[r0:r1, c0:c1].reshape(-1, thumbnail.shape[-1]).astype(np.float64)
        out.append(bool((box.std(axis=0) <= BLANK_STD).all()))
    return np.array(out)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_blank_patches_match_a_patch_by_patch_reference(seed):
    rng = np.random.default_rng(seed)
    thumbnail = np.zeros((37, 53, 2), dtype=np.uint8)
    for _ in range(4):  # a few blobs of content; the rest blank
        y, x = rng.integers(0, 30), rng.integers(0, 45)
        thumbnail[y:y + 5, x:x + 6] = rng.integers(0, 256, (min(5, 37 - y), min(6, 53 - x), 2))
    thumbnail[0:3, 50:53, 1] = 1  # a step of 1: std 0.47, still blank
    image_wh, size = (530, 370), 40
    coords = np.array([(x, y) for y in range(0, 370, 20) for x in range(0, 530, 20)], dtype=np.float64)
    got = blank_patches(thumbnail, image_wh=image_wh, coords=coords, patch_size=size)
    np.testing.assert_array_equal(got, blank_reference(thumbnail, image_wh, coords, size))
    assert 0 < got.sum() < len(got)


def test_informative_keeps_content_top_scores_and_selected_only():
    scores = np.array([0.1, 0.9, np.nan, 0.5, 0.2, 0.3])
    blank = np.array([False, True, False, True, True, True])
    keep = informative(scores, [5, -1, 99], blank=blank, top=1)
    np.testing.assert_array_equal(keep, [True, True, False, False, False, True])  # content, top 1, -, -, -, selected


def mostly_blank_png(path: Path) -> tuple[int, int, int, int]:
    """512 x 512 black with one textured 40 x 40 square at x 300, y 200; returns the square's box."""
    from PIL import Image

    image = np.zeros((512, 512, 3), dtype=np.uint8)
    image[200:240, 300:340] = np.random.default_rng(0).integers(60, 256, (40, 40, 3), dtype=np.uint8)
    Image.fromarray(image).save(path)
    return 300, 200, 340, 240


def test_geojson_of_a_mostly_blank_image_holds_few_features_and_all_patches_writes_all(tmp_path, caplog):
    from hrsel.inference import predict_sources

    x0, y0, x1, y1 = mostly_blank_png(tmp_path / "canvas.png")
    model = tiny_model(tmp_path, patch=16)  # 32 x 32 = 1024 patches
    with caplog.at_level(logging.INFO, logger="hrsel"):
        predict_sources(model, [tmp_path / "canvas.png"], out_dir=tmp_path / "few", pictures=False, top_patches=5)
    features = json.loads((tmp_path / "few" / "canvas.geojson").read_text())["features"]
    corners = {tuple(f["geometry"]["coordinates"][0][0]) for f in features}
    on_square = {(float(x), float(y)) for y in range(0, 512, 16) for x in range(0, 512, 16)
                 if x < x1 and x + 16 > x0 and y < y1 and y + 16 > y0}
    assert on_square <= corners  # every patch touching the square, and
    assert len(features) <= len(on_square) + 5 + 2 + 20  # the top 5, the selected 2, blank edges of the thumbnail
    assert sum(f["properties"]["classification"]["name"] == "selected" for f in features) == 2
    size = (tmp_path / "few" / "canvas.geojson").stat().st_size
    assert f"canvas.geojson: {len(features)} features" in caplog.text and "kB" in caplog.text and size < 30_000
    assert f"canvas.png: the GeoJSON holds the {len(features)} of 1,024 patches" in caplog.text

    predict_sources(model, [tmp_path / "canvas.png"], out_dir=tmp_path / "all", pictures=False, all_patches=True)
    assert len(json.loads((tmp_path / "all" / "canvas.geojson").read_text())["features"]) == 1024


def test_predict_cli_takes_the_map_flags(tmp_path):
    from hrsel.predict import parse_args

    args = parse_args(["run", "x.png", "--out", "o", "--all-patches", "--top-patches", "7", "--color-scale", "rank"])
    assert args.all_patches and args.top_patches == 7 and args.color_scale == "rank"
    with pytest.raises(SystemExit):
        parse_args(["run", "x.png", "--out", "o", "--color-scale", "loud"])


# ----------------------------------------------------------------------------- 8. readable heatmaps

def test_near_identical_probabilities_are_not_stretched_into_a_confident_map():
    scores = np.array([0.500, 0.501, 0.502, 0.503, np.nan])
    colors = score_colors(scores)  # auto: in [0, 1] -> fixed
    drawn = (colors.values[:4] - colors.vmin) / (colors.vmax - colors.vmin)
    assert colors.scale == "fixed" and np.ptp(drawn) < 0.01 and np.isnan(colors.values[4])
    assert "scores 0.5 to 0.503" in colors.label
    ranked = score_colors(scores, "rank")
    np.testing.assert_allclose(ranked.values[:4], [0, 1 / 3, 2 / 3, 1])
    logits = score_colors(np.array([-3.0, 0.0, 5.0]))  # not probabilities: their range
    assert logits.scale == "range" and (logits.vmin, logits.vmax) == (-3.0, 5.0) and "stretched" in logits.label
    attention = score_colors(np.array([1e-9, 2e-6, 1e-4]), "log")  # more than 4 decades below the top: clipped
    assert attention.vmax == pytest.approx(-4) and attention.vmin == pytest.approx(-8)
    np.testing.assert_allclose(attention.values, [-8, np.log10(2e-6), -4])
    assert score_colors(np.array([-1.0, 0.0]), "log").scale == "rank"  # nothing positive to take a log of
    np.testing.assert_allclose(percentile_ranks(np.array([2.0, 1.0, 2.0, np.nan]))[:3], [0.75, 0.0, 0.75])
    with pytest.raises(ConfigError, match="auto, fixed, range, rank, log"):
        check_scale("loud")


def test_crop_box_holds_the_kept_patches_with_a_margin():
    from hrsel.engine.visualize import PatchLayout, crop_box

    coords = np.array([(x, y) for y in range(0, 4096, 64) for x in range(0, 4096, 64)], dtype=np.float64)
    layout = PatchLayout(coords=coords, width=64, height=64)
    keep = (coords[:, 0] >= 3000) & (coords[:, 0] < 3128) & (coords[:, 1] >= 1000) & (coords[:, 1] < 1128)
    x0, y0, x1, y1 = crop_box(layout, keep, (4096, 4096))
    kept = coords[keep]
    assert x0 < kept[:, 0].min() and y0 < kept[:, 1].min() and x1 > kept[:, 0].max() + 64 and y1 > kept[:, 1].max() + 64
    assert max(x1 - x0, y1 - y0) <= 3 * 192
    assert crop_box(layout, np.zeros(len(coords), bool), (4096, 4096)) == (0.0, 0.0, 4096.0, 4096.0)
    assert crop_box(layout, np.ones(len(coords), bool), (4096, 4096)) == (0.0, 0.0, 4096.0, 4096.0)


def picture_pixels(path: Path) -> np.ndarray:
    from PIL import Image

    return np.asarray(Image.open(path).convert("RGB")).astype(np.int64)


def test_heatmap_of_a_speck_of_tissue_fills_the_picture(tmp_path):
    from hrsel.inference.heatmap import save_heatmap_picture
    from hrsel.io.array import ArraySource

    image = np.full((4096, 4096, 3), 255, dtype=np.uint8)
    image[1000:1128, 3000:3128] = (0, 255, 0)  # the tissue: 0.1% of the slide
    coords = np.array([(x, y) for y in range(0, 4096, 64) for x in range(0, 4096, 64)], dtype=np.float64)
    on = (coords[:, 0] >= 3000) & (coords[:, 0] < 3128) & (coords[:, 1] >= 1000) & (coords[:, 1] < 1128)
    scores = np.where(on, 0.0, np.nan)  # off tissue: no score, as with data.tissue
    path = save_heatmap_picture(tmp_path / "h.png", ArraySource(image), image_wh=(4096, 4096), coords=coords,
                                patch_size=64, scores=scores, selected=np.flatnonzero(on)[:1], gallery=0)
    pixels = picture_pixels(path)
    green = (pixels[..., 1] > 100) & (pixels[..., 0] < 40) & (pixels[..., 2] < 40)  # the tissue under the overlay
    assert green.mean() > 0.05


def test_multispectral_gallery_shows_the_bands(tmp_path):
    from hrsel.engine.visualize import display_pixels
    from hrsel.inference.heatmap import save_heatmap_picture
    from hrsel.io.array import ArraySource

    rng = np.random.default_rng(0)
    image = rng.integers(0, 4096, (128, 128, 4), dtype=np.uint16)  # 12-bit values in uint16, 4 bands
    coords = np.array([(x, y) for y in range(0, 128, 32) for x in range(0, 128, 32)], dtype=np.float64)
    path = save_heatmap_picture(tmp_path / "ms.png", ArraySource(image), image_wh=(128, 128), coords=coords,
                                patch_size=32, scores=np.linspace(0, 1, 16), selected=[15, 14, 13, 12])
    gallery = picture_pixels(path)[-150:]  # the bottom row: four patches at full resolution
    painted = (np.abs(gallery - 255).sum(axis=-1) > 30).mean()
    assert painted > 0.2 and gallery.std() > 30
    patch, limits = display_pixels(image[:32, :32])
    assert patch.shape == (32, 32, 3) and patch.dtype == np.uint8 and patch.std() > 40 and len(limits[0]) == 4


def test_training_pictures_name_classes_and_measure_in_micrometres(tmp_path, monkeypatch):
    from hrsel.engine import visualize
    from hrsel.io.array import ArraySource
    from hrsel.models.pipeline import PipelineOutput
    from hrsel.tasks import TaskSpec

    titles, bars = [], []
    monkeypatch.setattr(visualize, "draw_scale_bar", lambda ax, width, mpp: bars.append(mpp))
    source = ArraySource(np.full((64, 64, 3), 200, dtype=np.uint8), mpp=0.25)
    tasks = {"tumor": TaskSpec("binary", 1), "grade": TaskSpec("multiclass", 3)}
    out = PipelineOutput(logits={"tumor": torch.tensor([[2.0]]), "grade": torch.tensor([[0.0, 3.0, 1.0]])},
                         indices=torch.tensor([[0]]), scores=torch.tensor([[0.9, 0.1, 0.0, 0.0]]))
    batch = {"images": [source], "ids": ["case_1"],
             "targets": {"tumor": torch.tensor([[0.0]]), "grade": torch.tensor([2])}}
    pipeline = types.SimpleNamespace(patch_size=32, stride=32)
    real = visualize.save_selection_picture

    def keep_title(path, image, **kwargs):
        titles.append(kwargs["title"])
        return real(path, image, **kwargs)

    monkeypatch.setattr(visualize, "save_selection_picture", keep_title)
    visualize.draw_batch(tmp_path, "val_", pipeline=pipeline, batch=batch, out=out, tasks=tasks, limit=1,
                         class_names={"tumor": ["normal", "tumor"], "grade": ["G1", "G2", "G3"]})
    assert titles == ["case_1\ntumor: predicted tumor, true normal\ngrade: predicted G2, true G3"]
    assert bars == [0.25] and (tmp_path / "val_case_1.png").is_file()
    assert visualize.class_label([0, 2], ["a", "b", "c"]) == "a|c" and visualize.class_label(4, None) == "4"


# ----------------------------------------------------------------------------- the log lines reach the user

def test_command_logs_follow_the_current_stderr(capsys):
    """`hrsel.features` / `hrsel.predict` run in-process after another command whose stderr is gone (a test's
    capture, a notebook cell): the feature counts and units must still reach stderr, not a closed stream."""
    import io
    import sys

    from hrsel.cli import log_to_stderr

    root = logging.getLogger()
    saved = list(root.handlers), root.level
    for handler in saved[0]:
        root.removeHandler(handler)
    try:
        earlier, sys.stderr = sys.stderr, io.StringIO()
        log_to_stderr("%(message)s")  # an earlier command, whose stderr is then closed
        sys.stderr.close()
        sys.stderr = earlier
        logging.getLogger("hrsel.inference.geojson").info("a.geojson: 6 features, 2.1 kB")
        err = capsys.readouterr().err
        assert "a.geojson: 6 features, 2.1 kB" in err and "Logging error" not in err
        log_to_stderr("%(message)s")  # a second command: still one handler
        assert len(root.handlers) == 1
        from hrsel.engine.logbook import setup_logging

        for handler in list(root.handlers):
            root.removeHandler(handler)
        earlier, sys.stderr = sys.stderr, io.StringIO()
        setup_logging(None, is_main=True)  # a training run in the same process, as hrsel.train main does
        sys.stderr.close()
        sys.stderr = earlier
        logging.getLogger("hrsel.inference.predict").info("a.png: score map in micrometres")
        err = capsys.readouterr().err
        assert "a.png: score map in micrometres" in err and "Logging error" not in err
    finally:
        for handler in list(root.handlers):
            root.removeHandler(handler)
        for handler in saved[0]:
            root.addHandler(handler)
        root.setLevel(saved[1])

"""`python -m hrsel.predict`: a tiny IPS run trained through the CLI, then predictions, GeoJSON,
OME-Zarr score maps and heatmaps on images written in the test (PNG, TIFF, zarr) and on a
feature cache in the exact HDF5 layout; probabilities must equal the trainer's evaluation."""
from __future__ import annotations

import csv
import json
import types
from pathlib import Path

import numpy as np
import pytest
import torch

from hrsel.predict import main as predict_main
from hrsel.train import main as train_main

from fixtures_data import write_mnist_idx
from inference_fixtures import train_tiny_slides_run

SMALL_CNN = "{width: 8, strides: [2, 2, 2, 2], blocks: [1, 1, 1, 1]}"
IPS = ["model.patch_size=32", "model.num_selected=3", "model.chunk_size=4", "model.pos_encoding=sincos",
       "model.num_positions=16"]


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    """(run folder, data root): Megapixel MNIST 128 x 128 (4 x 4 patches of 32), IPS, one epoch via the CLI."""
    from hrsel.engine.datagen import generate_megapixel_mnist

    base = tmp_path_factory.mktemp("predict")
    root = base / "megapixel"
    generate_megapixel_mnist(str(root), width=128, height=128, n_train=8, n_test=4, n_noise=1, digits="mnist",
                             mnist_dir=str(write_mnist_idx(base / "idx")), download=False)
    config = base / "tiny.yaml"
    config.write_text(f"""
experiment: tiny_predict
device: cpu
data: {{name: megapixel_mnist, root: {root}, batch_size: 4, eval_batch_size: 3, tasks: [majority, multi]}}
model: {{name: ips, in_chans: 1, backbone: narrow_resnet, backbone_options: {SMALL_CNN}}}
optim: {{lr: 0.002, warmup_epochs: 0.5}}
train: {{epochs: 1, progress_bar: false}}
eval: {{pictures: 0}}
""")
    assert train_main([str(config), *IPS, f"--output-dir={base / 'runs'}", "--seed", "1"]) == 0
    return base / "runs" / "tiny_predict", root


def _test_image(root: Path, index: int) -> np.ndarray:
    import zarr

    return np.asarray(zarr.open_array(store=str(root / "test" / "images.zarr" / f"{index:05d}"), mode="r")[...])


def _rows(out: Path) -> list[dict[str, str]]:
    with open(out / "predictions.csv", newline="") as f:
        return list(csv.DictReader(f))


def test_predict_folder_writes_csv_geojson_zarr_and_pictures(tiny_run, tmp_path, capsys):
    from PIL import Image

    run, root = tiny_run
    images = tmp_path / "images"
    images.mkdir()
    Image.fromarray(_test_image(root, 0)[..., 0]).save(images / "a.png")
    Image.fromarray(_test_image(root, 1)[..., 0]).save(images / "b.tif")
    (images / "notes.txt").write_text("not an image")
    out = tmp_path / "out"
    code = predict_main([str(run), str(images), "--out", str(out), "--no-progress"])
    assert code == 0, capsys.readouterr().err[-2000:]
    rows = _rows(out)
    assert [Path(r["path"]).name for r in rows] == ["a.png", "b.tif"]  # sorted, the text file skipped
    for row in rows:
        probs = [float(row[f"majority/prob/{c}"]) for c in map(str, range(10))]
        assert abs(sum(probs) - 1) < 1e-4 and row["majority/predicted"] == str(int(np.argmax(probs)))
        assert all(0 <= float(row[f"multi/prob/{c}"]) <= 1 for c in map(str, range(10)))
    assert not (out / "metrics.json").exists()  # no labels

    collection = json.loads((out / "a.geojson").read_text())
    assert collection["type"] == "FeatureCollection" and len(collection["features"]) == 16
    best = max(collection["features"], key=lambda f: f["properties"]["measurements"]["score"])
    assert best["properties"]["classification"]["name"] == "selected"
    assert best["properties"]["measurements"]["rank"] == 1
    assert sum(f["properties"]["classification"]["name"] == "selected" for f in collection["features"]) == 3
    for feature in collection["features"]:
        assert feature["type"] == "Feature" and feature["geometry"]["type"] == "Polygon"
        assert feature["properties"]["objectType"] == "tile"
        ring = np.array(feature["geometry"]["coordinates"][0])
        assert ring.shape == (5, 2) and (ring[0] == ring[-1]).all()
        assert ring.min() >= 0 and ring.max() <= 128
        assert len(feature["properties"]["classification"]["color"]) == 3

    import zarr

    group = zarr.open(str(out / "a_scores.zarr"), mode="r")
    multiscales = group.attrs["multiscales"][0]
    assert multiscales["version"] == "0.4" and [a["name"] for a in multiscales["axes"]] == ["c", "y", "x"]
    dataset = multiscales["datasets"][0]
    assert group[dataset["path"]].shape == (2, 4, 4)
    assert dataset["coordinateTransformations"][0] == {"type": "scale", "scale": [1.0, 32.0, 32.0]}
    scores = np.asarray(group[dataset["path"]][0])
    measured = {tuple(f["geometry"]["coordinates"][0][0]): f["properties"]["measurements"]["score"]
                for f in collection["features"]}
    assert scores[1, 2] == pytest.approx(measured[(64.0, 32.0)], rel=1e-5)  # cell (row 1, col 2) = patch at x 64, y 32
    assert np.asarray(group[dataset["path"]][1]).sum() == 3  # the selected channel
    assert (out / "a_heatmap.png").stat().st_size > 10_000 and (out / "b_heatmap.png").exists()


def test_same_probabilities_and_accuracy_as_the_trainers_evaluation(tiny_run, tmp_path, capsys):
    from hrsel.data import build_dataset
    from hrsel.data.collate import collate
    from hrsel.inference import load_model

    run, root = tiny_run
    dataset = build_dataset("megapixel_mnist", split="test", root=str(root), tasks=["majority", "multi"])
    manifest = tmp_path / "test.csv"
    lines = ["path,majority,multi"]
    for i in range(len(dataset)):
        targets = dataset[i]["targets"]
        multi = "|".join(str(c) for c in torch.nonzero(targets["multi"] > 0.5).flatten().tolist())
        lines.append(f"{root / 'test' / 'images.zarr' / f'{i:05d}'},{int(targets['majority'])},{multi}")
    manifest.write_text("\n".join(lines) + "\n")
    out = tmp_path / "out"
    code = predict_main([str(run), str(manifest), "--out", str(out), "--no-pictures", "--batch-size", "3",
                         "--no-progress"])
    assert code == 0, capsys.readouterr().err[-2000:]
    metrics = json.loads((out / "metrics.json").read_text())["metrics"]["unsplit"]  # a CSV without a split column
    trained = json.loads((run / "test_metrics.json").read_text())["metrics"]
    for key in ("majority/accuracy", "multi/exact_match", "multi/accuracy"):
        assert metrics[key] == pytest.approx(trained[key]), key

    model = load_model(run)  # the trainer's evaluation: eval mode, no grad, lazy sources in batches of 3
    batch = collate([dataset[i] for i in range(3)])
    with torch.no_grad():
        logits = model.pipeline(batch["images"]).logits
    rows = _rows(out)
    for i in range(3):
        ours = [float(rows[i][f"majority/prob/{c}"]) for c in map(str, range(10))]
        torch.testing.assert_close(torch.tensor(ours), torch.softmax(logits["majority"][i], -1), atol=1e-5, rtol=0)
        multi = [float(rows[i][f"multi/prob/{c}"]) for c in map(str, range(10))]
        torch.testing.assert_close(torch.tensor(multi), torch.sigmoid(logits["multi"][i]), atol=1e-5, rtol=0)


def test_rgb_image_into_a_gray_model_exits_2_naming_it(tiny_run, tmp_path, capsys):
    from PIL import Image

    run, _ = tiny_run
    Image.fromarray(np.zeros((128, 128, 3), np.uint8)).save(tmp_path / "rgb.png")
    code = predict_main([str(run), str(tmp_path / "rgb.png"), "--out", str(tmp_path / "out"), "--no-progress"])
    err = capsys.readouterr().err
    assert code == 2 and "rgb.png" in err and "3 channel" in err and "in_chans=1" in err


def test_run_folder_without_checkpoint_exits_2(tiny_run, tmp_path, capsys):
    run, root = tiny_run
    empty = tmp_path / "runs" / "never_trained"
    empty.mkdir(parents=True)
    (empty / "config.yaml").write_text("experiment: never_trained\n")
    code = predict_main([str(empty), str(root), "--out", str(tmp_path / "out"), "--no-progress"])
    err = capsys.readouterr().err
    assert code == 2 and "never_trained" in err and "best.pt" in err


def test_feature_cache_bags_give_maps_from_the_stored_coords(tmp_path):
    import h5py
    from PIL import Image

    from hrsel.inference import predict_sources
    from hrsel.inference.load import LoadedModel
    from hrsel.models import build_pipeline
    from hrsel.tasks import TaskSpec

    torch.manual_seed(0)
    tasks = {"tumor": TaskSpec("binary", 1)}
    pipeline = build_pipeline("ips", tasks=tasks, patch_size=32, k=2, score_chunk=4,
                              backbone="feature_projector", backbone_options={"in_dim": 6, "dim": 8},
                              aggregator_options={"heads": 2, "head_dim": 4, "mlp_dim": 8}).eval()
    config = types.SimpleNamespace(seed=0, train=types.SimpleNamespace(precision="fp32"))
    model = LoadedModel(pipeline=pipeline, tasks=tasks, class_names={"tumor": ["normal", "tumor"]}, config=config,
                        checkpoint_path=tmp_path / "none.pt", hrsel_version="test")
    Image.fromarray(np.full((96, 160, 3), 200, np.uint8)).save(tmp_path / "slide.png")
    coords = np.array([[x, y] for y in (0, 64) for x in (0, 32, 96)], dtype=np.int64)  # a lattice with a gap
    with h5py.File(tmp_path / "slide.h5", "w") as f:
        f.create_dataset("features", data=np.random.default_rng(0).normal(size=(6, 6)).astype(np.float16))
        f.create_dataset("coords", data=coords)
        f.attrs.update({"patch_size": 32, "level": 0, "source": str(tmp_path / "slide.png"), "complete": True})
    result = predict_sources(model, [tmp_path / "slide.h5"], out_dir=tmp_path / "out")
    row = result.rows[0]
    assert float(row["tumor/prob/normal"]) + float(row["tumor/prob/tumor"]) == pytest.approx(1, abs=1e-5)
    features = json.loads((tmp_path / "out" / "slide.geojson").read_text())["features"]
    corners = sorted(tuple(f["geometry"]["coordinates"][0][0]) for f in features)
    assert corners == sorted((float(x), float(y)) for x, y in coords)
    import zarr

    group = zarr.open(str(tmp_path / "out" / "slide_scores.zarr"), mode="r")
    score = np.asarray(group["0"][0])
    assert score.shape == (2, 4) and np.isnan(score[:, 2]).all() and np.isnan(score).sum() == 2  # the gap stays NaN
    assert (tmp_path / "out" / "slide_heatmap.png").exists()


# ---- your own slides: a CSV with a split column, a run at data.target_mpp with tissue masks ----------------

@pytest.fixture(scope="module")
def slides_run(tmp_path_factory):
    return train_tiny_slides_run(tmp_path_factory.mktemp("slides_run"))


def test_metrics_json_keeps_the_splits_of_the_manifest_apart(slides_run, tmp_path, capsys, caplog):
    manifest = Path(yaml_data(slides_run)["root"]) / "slides.csv"
    out = tmp_path / "all"
    assert predict_main([str(slides_run), str(manifest), "--out", str(out), "--no-pictures", "--no-progress"]) == 0
    printed = capsys.readouterr()
    record = json.loads((out / "metrics.json").read_text())
    assert set(record["metrics"]) == {"train", "val", "test"} and "never pooled" in record["rows"]
    assert record["num_images"] == {"train": 2, "val": 2, "test": 2}
    trained = json.loads((slides_run / "test_metrics.json").read_text())["metrics"]  # best.pt on the test rows
    for key in ("label/accuracy", "label/auc"):
        assert record["metrics"]["test"][key] == pytest.approx(trained[key], abs=1e-6), key
    assert [row["split"] for row in _rows(out)] == ["train", "train", "val", "val", "test", "test"]
    assert "metrics of the test rows: label/accuracy" in printed.out and "also holds the train and val" in caplog.text

    only = tmp_path / "test"
    code = predict_main([str(slides_run), str(manifest), "--out", str(only), "--split", "test", "--no-pictures",
                         "--no-progress"])
    assert code == 0
    record_test = json.loads((only / "metrics.json").read_text())
    assert record_test["metrics"] == {"test": record["metrics"]["test"]}
    assert record_test["rows"] == "only the rows of split 'test' (--split test)" and len(_rows(only)) == 2

    image = manifest.parent / "slides" / "a.tif"
    code = predict_main([str(slides_run), str(image), "--out", str(tmp_path / "x"), "--split", "test"])
    err = capsys.readouterr().err
    assert code == 2 and "have no split" in err and "a.tif" in err


def test_loaded_model_predict_applies_the_runs_preprocessing_like_hrsel_predict(slides_run, tmp_path):
    from hrsel.inference import load_model, predict_sources
    from hrsel.io import open_image
    from hrsel.io.level_view import LevelView

    model = load_model(slides_run)
    image = Path(yaml_data(slides_run)["root"]) / "slides" / "e.tif"  # 256 x 256 at 0.25 um/px, trained at 0.5
    row = predict_sources(model, [image], out_dir=tmp_path / "out", pictures=False).rows[0]
    for given in (image, str(image), open_image(str(image))):
        result = model.predict(given)
        assert isinstance(result.image, LevelView) and tuple(result.image.dimensions) == (128, 128)
        assert result.tissue is not None and tuple(result.tissue.image_size) == (128, 128)
        assert result.predicted["label"] == row["label/predicted"]
        for name in ("normal", "tumor"):
            assert result.probabilities["label"][name] == pytest.approx(float(row[f"label/prob/{name}"]), abs=2e-6)
    assert result.output.scores.shape == (1, 16)  # 4 x 4 patches of 32 at 0.5 um/px
    with torch.no_grad():  # the bare pipeline on level 0 scores another grid: why predict exists
        raw = model.pipeline([open_image(str(image))])
    assert raw.scores.shape == (1, 64)
    prepared, mask = model.prepare(image)
    with torch.no_grad():
        same = model.pipeline([prepared], tissue=[mask])
    torch.testing.assert_close(same.logits["label"], result.logits["label"])


def yaml_data(run: Path) -> dict:
    import yaml

    return yaml.safe_load((run / "config.yaml").read_text())["data"]


def test_a_top_patch_on_pen_ink_is_reported_and_warned_about(slides_run, tmp_path, caplog):
    """Pen edges under the 10% ink veto stay candidates, and on synthetic slides they made pen-marked normal
    slides tumour: predictions.csv gives the top patch's ink share (0 on clean slides) and the log warns."""
    from hrsel.inference.predict import top_patch_ink
    from hrsel.io.writer import write_pyramid
    from hrsel.tiling.tissue import TissueMask

    image = np.full((256, 256, 3), 235, np.uint8)
    image[32:224, 32:224] = (150, 60, 140)  # tissue over every patch
    for x in (48, 112, 176, 208):  # a 4-px black stroke through each 64-px patch column: 3-6% ink, under the veto
        image[32:224, x:x + 4] = (25, 25, 28)
    inked = tmp_path / "inked.tif"
    write_pyramid(inked, image, levels=2, tile=128, mpp=0.25)
    manifest = Path(yaml_data(slides_run)["root"]) / "slides.csv"
    clean = manifest.parent / "slides" / "a.tif"
    out = tmp_path / "preds"
    assert predict_main([str(slides_run), str(inked), str(clean), "--out", str(out), "--no-pictures",
                         "--no-progress"]) == 0
    rows = {Path(row["path"]).name: row for row in _rows(out)}
    assert 0.01 < float(rows["inked.tif"]["top_patch/ink"]) <= 0.1
    assert float(rows["a.tif"]["top_patch/ink"]) == 0
    assert "inked.tif: its top-ranked patch holds" in caplog.text and "a.tif: its top" not in caplog.text

    mask = TissueMask(np.ones((4, 4), bool), (8, 8), ink=np.eye(4, dtype=bool))
    coords = np.array([[0, 0], [4, 0]], float)
    assert top_patch_ink(mask, coords, (4, 4), np.array([0.1, 0.9])) == 0  # the top patch (x 4-8, y 0-4)
    assert top_patch_ink(mask, coords, (4, 4), np.array([0.9, np.nan])) == pytest.approx(0.5)
    assert top_patch_ink(None, coords, (4, 4), np.array([0.1, 0.9])) is None
    assert top_patch_ink(mask, coords, (4, 4), np.array([np.nan, -np.inf])) is None

"""`make demo`'s big canvas (one Megapixel MNIST image as a tiled TIFF, O(tile) memory) and `python -m hrsel.demo`."""
from __future__ import annotations

import json
import tracemalloc
from pathlib import Path

import numpy as np
import pytest
import yaml

from fixtures_data import write_mnist_idx

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def pools(tmp_path_factory):
    from hrsel.data.digits import load_digit_pools

    idx = write_mnist_idx(tmp_path_factory.mktemp("idx"))
    return load_digit_pools(digits="mnist", mnist_dir=idx, download=False, progress=False)


def test_big_canvas_holds_the_digits_where_its_labels_say(pools, tmp_path):
    from hrsel.data.megapixel_mnist_gen import DIGIT, big_canvas_sidecar, paper_noise_count, write_big_canvas
    from hrsel.io import open_image

    path = tmp_path / "big.tif"
    labels = write_big_canvas(path, side=3000, digits=pools, seed=3, tile=64)
    source = open_image(str(path))
    assert source.dimensions == (3000, 3000) and source.channels == 1 and len(source.level_dimensions) > 1
    assert len(labels["positions"]) == 5 and len(labels["digits"]) == 5
    assert labels["digits"][:3] == [labels["majority"]] * 3 and labels["majority"] not in labels["digits"][3:]
    assert labels["max"] == max(labels["digits"])
    assert labels["top"] == labels["digits"][int(np.argmin([y for y, _ in labels["positions"]]))]
    assert labels["multi"] == [int(c in labels["digits"]) for c in range(10)]
    # the pixels of each digit (drawn last, on top of the noise) are those of a test-pool digit of its label
    test_images, test_labels = pools.split("test")
    for (y, x), digit in zip(labels["positions"], labels["digits"]):
        patch = source.read_region(x, y, DIGIT, DIGIT)[:, :, 0]
        candidates = test_images[test_labels == digit]
        assert patch.any() and any(np.array_equal(patch, c) for c in candidates), (y, x, digit)
    # noise at IPS's density outside the digits, and a black background
    level = len(source.level_dimensions) - 1
    w, h = source.level_dimensions[level]
    thumb = source.read_region(0, 0, w, h, level=level)[:, :, 0]
    assert (thumb > 0).mean() < 0.2
    whole = source.read_region(0, 0, 3000, 3000)[:, :, 0]
    for y, x in labels["positions"]:
        whole[y:y + DIGIT, x:x + DIGIT] = 0
    lit = np.count_nonzero(whole)
    n_noise = paper_noise_count(3000, 3000)
    assert n_noise == 200 and 20 * n_noise < lit < 80 * n_noise  # ~66 lit pixels per pattern, some overlap
    assert set(np.unique(whole)) <= {0} | set(range(204, 255))  # IPS's noise intensities
    meta = json.loads(big_canvas_sidecar(path).read_text())
    assert meta["labels"] == labels and meta["side"] == 3000 and meta["n_noise"] == n_noise


def test_big_canvas_memory_does_not_grow_with_the_canvas(pools, tmp_path):
    from hrsel.data.megapixel_mnist_gen import write_big_canvas

    tracemalloc.start()
    try:
        write_big_canvas(tmp_path / "big.tif", side=8000, digits=pools, tile=256)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 8000 * 8000 / 8, f"peak {peak / 1e6:.1f} MB: the canvas was materialised"


def test_big_canvas_rejects_a_tile_tiff_cannot_hold(pools, tmp_path):
    from hrsel.data.megapixel_mnist_gen import write_big_canvas
    from hrsel.errors import DataError

    with pytest.raises(DataError, match="multiple of 16"):
        write_big_canvas(tmp_path / "big.tif", side=1000, digits=pools, tile=100)
    assert not list(tmp_path.iterdir())


def tiny_demo_config(tmp_path: Path) -> Path:
    """configs/demo.yaml shrunk: 128x128 canvases, 16 patches of 32, one epoch, from IDX files made here."""
    cfg = yaml.safe_load((REPO / "configs" / "demo.yaml").read_text())
    idx = write_mnist_idx(tmp_path / "idx")
    cfg["output_dir"] = str(tmp_path / "runs")
    cfg["data"].update(root=str(tmp_path / "mnist"), batch_size=4, eval_batch_size=4, generate_if_missing=True)
    cfg["data"]["generate"].update(width=128, height=128, n_train=8, n_test=4, n_noise=1, digits="mnist",
                                   mnist_dir=str(idx))
    cfg["model"].update(patch_size=32, stride=32, k=2, score_chunk=16, pos_encoding="none",
                        backbone_options={"width": 8, "strides": [2, 2, 2, 2], "blocks": [1, 1, 1, 1],
                                          "weights_path": str(tmp_path / "warm" / "enc.pt")})
    cfg["train"].update(epochs=1, eval_every=1, progress_bar=False)
    cfg["eval"]["pictures"] = 1
    path = tmp_path / "demo.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


def test_demo_trains_then_classifies_a_big_canvas(tmp_path, capsys, monkeypatch):
    from hrsel.demo import main

    config = tiny_demo_config(tmp_path)
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    assert main([str(config), "--big-side", "1000", "--warm-steps", "3"]) == 0
    out = capsys.readouterr().out
    run = tmp_path / "runs" / "demo"
    warm = tmp_path / "warm" / "enc.pt"
    assert "patches of held-out digits named right after" in out and str(warm) in out
    assert json.loads((tmp_path / "warm" / "enc.pt.json").read_text())["steps"] == 3
    assert warm.is_file() and out.index("warm start:") < out.index("test majority/accuracy:")
    assert "test majority/accuracy:" in out  # hrsel.train's own report
    canvas = tmp_path / "mnist" / "big_canvas_1000.tif"
    assert canvas.is_file() and f"big canvas: {canvas} (1000x1000 px" in out
    meta = json.loads(canvas.with_suffix(".json").read_text())
    lines = out.splitlines()
    true_row = next(line for line in lines if line.strip().startswith("true"))
    assert true_row.split()[1:] == [str(meta["labels"][t]) for t in ("majority", "max", "top")]
    predicted = next(line for line in lines if line.strip().startswith("big canvas predicted")).split()[3:]
    assert len(predicted) == 3 and all(p in [str(c) for c in range(10)] for p in predicted)
    memory = next(line for line in lines if line.startswith("peak memory classifying:"))
    assert "MB for the 1000x1000 canvas" in memory and "MB for a 128x128 training image" in memory
    assert "61x the pixels" in memory  # 1000^2 / 128^2
    assert any(line.startswith("time:") and "961 patches" in line for line in lines)  # 31 x 31 of 32 px
    folder = run / "demo" / "big_canvas_1000"
    assert f"heatmap, GeoJSON, score map of the big canvas: {folder}" in out
    assert f"selected patches of the training run: {run / 'pictures'}" in out
    for name in ("predictions.csv", "big_canvas_1000.geojson", "big_canvas_1000_heatmap.png"):
        assert (folder / name).is_file(), name
    assert (run / "demo" / "test_00000" / "predictions.csv").is_file()

    # a second demo reuses the finished run and the canvas (classification stubbed: it was checked above)
    import hrsel.demo
    import hrsel.train

    monkeypatch.setattr(hrsel.train, "train_command", lambda args: pytest.fail("trained again"))
    monkeypatch.setattr(hrsel.demo, "classify", lambda run, image, out: {
        "row": {"majority/predicted": "1", "max/predicted": "2", "top/predicted": "3"}, "size": [10, 10],
        "seconds": 1.0, "peak_mb": 100.0, "patches": 1})
    assert main([str(config), "--big-side", "1000"]) == 0
    again = capsys.readouterr().out
    assert "holds a finished run of this config: reusing it" in again and "; reused)" in again
    assert "test majority/accuracy:" not in again and "warm start:" not in again

    # the run of another config (an earlier hrsel's demo) is moved aside, not deleted, and the demo trains again
    monkeypatch.undo()
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    monkeypatch.setattr(hrsel.demo, "show_big_canvas", lambda cfg, run_dir, side: None)
    assert main([str(config), "optim.lr=0.003"]) == 0
    third = capsys.readouterr().out
    assert "holds an unfinished run or a run of another config" in third and "test majority/accuracy:" in third
    moved = list(run.parent.glob("demo.replaced-*"))
    assert len(moved) == 1 and (moved[0] / "best.pt").is_file() and (run / "best.pt").is_file()


def test_demo_config_warm_starts_outside_the_data_folder():
    """The generator refuses a data folder holding files it did not write: the warm start lives beside it."""
    from hrsel.config import load_config

    cfg = load_config(str(REPO / "configs" / "demo.yaml"))
    weights = Path(cfg.model.options["backbone_options"]["weights_path"])
    assert Path(cfg.data.root) not in weights.parents and weights.suffix == ".pt"


def test_demo_rejects_a_config_of_another_data_set(tmp_path, capsys):
    from hrsel.demo import main

    assert main([str(REPO / "configs" / "billiard_max.yaml"), "--skip-train"]) == 2
    assert "megapixel_mnist" in capsys.readouterr().err


def test_demo_refuses_a_positional_table_before_training(tmp_path, capsys):
    from hrsel.demo import main

    config = tiny_demo_config(tmp_path)
    assert main([str(config), "model.pos_encoding=sincos", "model.num_positions=16"]) == 2
    err = capsys.readouterr().err
    assert "model.pos_encoding" in err and "20000x20000" in err
    assert not (tmp_path / "runs").exists() and not (tmp_path / "mnist").exists()

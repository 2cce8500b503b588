"""Smoke runs of the benchmark scripts' quick paths at tiny sizes on the CPU."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


def run(script: str, *args: str) -> str:
    done = subprocess.run([sys.executable, str(REPO / "benchmarks" / script), *args], capture_output=True,
                          text=True, timeout=120, cwd=REPO)
    assert done.returncode == 0, f"{script} failed:\n{done.stderr[-3000:]}"
    return done.stdout


def test_speed_study_quick(tmp_path):
    out = tmp_path / "speed.json"
    run("speed_study.py", "--quick", "--device", "cpu", "--threads", "1", "--image-size", "96", "--downscale", "2",
        "--num-samples", "20", "--warmup", "0", "--json", str(out))
    result = json.loads(out.read_text())
    rows = result["rows"]
    assert {r["method"] for r in rows} == {"resnet50_full", "resnet18_full", "select_hard", "select_perturbed",
                                           "score_only"}
    assert sorted(r["k"] for r in rows if r["method"] == "select_hard") == [3, 10]
    assert all(r["images_per_s"] > 0 and r["best_batch"] == 1 for r in rows)
    k3 = next(r for r in rows if r["method"] == "select_hard" and r["k"] == 3)
    assert k3["pixels_pct"] == round(100 * 3 * 50**2 / 96**2, 3)
    assert "speedup_hard_k10_p50_vs_resnet50" in result["summary"]
    assert 0 < (tmp_path / "speed.png").stat().st_size < 300_000


def test_memory_plot_marks_oom(tmp_path):
    # rows as benchmarks/memory.py writes them, plus another spelling of the size
    rows = [dict(method="ips", pixels=side * side, side=side, peak_mb=500.0 + side / 1000, base_mb=400.0,
                 status="ok") for side in (1000, 4000, 16000)]
    rows += [dict(method="cnn", image_size=side, peak_mb=3000.0 * (side / 1000) ** 2, status="ok")
             for side in (1000, 4000)]
    rows += [dict(method="cnn", pixels=16000**2, status="oom", error="CUDA out of memory"),
             dict(method="dps", pixels=16000**2, status="skipped")]
    src = tmp_path / "memory.json"
    src.write_text(json.dumps({"device": "test", "memory_limit_mb": 80000, "rows": rows}))
    stdout = run("memory_plot.py", str(src))
    assert "256 MP: 516 MB" in stdout and "256 MP: OOM" in stdout and "16 MP: 48000 MB" in stdout
    assert "256 MP: SKIPPED" in stdout
    assert 0 < src.with_suffix(".png").stat().st_size < 300_000
    stdout = run("memory_plot.py", str(src), "--above-base", "--out", str(tmp_path / "above.png"))
    assert "256 MP: 116 MB" in stdout


def test_stream_throughput_quick(tmp_path):
    out = tmp_path / "stream.json"
    run("stream_throughput.py", "--quick", "--device", "cpu", "--threads", "1", "--patch", "64",
        "--max-patches", "24", "--chunk", "8", "--m", "4", "--last-stage", "layer1", "--workers", "1", "--repeats", "1",
        "--cache", str(tmp_path), "--json", str(out))
    result = json.loads(out.read_text())
    phases = [(r["phase"], r["workers"]) for r in result["rows"]]
    assert phases == [("score", None), ("read", 1), ("stream", 1)]
    assert result["patches"] == 24 and all(r["patches_per_s"] > 0 for r in result["rows"])
    assert result["rows"][2]["limiter"] in ("reading", "scoring")


def test_io_stream_tiny(tmp_path):
    out = tmp_path / "io.json"
    stdout = run("io_stream.py", "--sizes", "2048", "--memory-size", "1024", "--rounds", "1", "--repeats", "1",
                 "--naive-max-patches", "20", "--cache", str(tmp_path / "cache"), "--json", str(out))
    rows = {(r["case"], r["method"]): r for r in json.loads(out.read_text())}
    assert set(rows) == {("pyramid 2k^2", m) for m in ("stream", "naive", "stream_capped", "unfold")} | {
        ("in-memory 1k^2", m) for m in ("numba", "unfold", "numpy_loop")}
    assert rows["pyramid 2k^2", "stream"]["patches"] == 64 and rows["pyramid 2k^2", "naive"]["patches"] == 20
    assert rows["pyramid 2k^2", "stream_capped"]["patches"] == 20  # the ratio compares the same patches
    assert all(len(r["patches_per_s_rounds"]) == 1 and r["patches_per_s"] > 0 and r["peak_rss_mb"] > 0
               for r in rows.values())
    assert "pyramid 2k^2: stream_capped / naive" in stdout and "numba / unfold" in stdout


def test_memory_ips_tissue_quick(tmp_path):
    out = tmp_path / "memory.json"
    stdout = run("memory.py", "--quick", "--methods", "ips_tissue", "--tissue-sides", "1024,2048", "--cache",
                 str(tmp_path / "slides"), "--json", str(out))
    rows = json.loads(out.read_text())["rows"]
    assert [(r["method"], r["side"], r["status"]) for r in rows] == [("ips_tissue", 1024, "ok"),
                                                                     ("ips_tissue", 2048, "ok")]
    # 64-pixel patches: 6 of the 16 tiles of 1024^2 and 9 of the 64 tiles of 2048^2 are tissue (16 cells each);
    # the glass and the pen strokes are never scored
    assert [r["patches_scored"] for r in rows] == [96.0, 144.0]
    assert all(r["peak_mb"] > 0 for r in rows) and "ips_tissue: peak grows" in stdout
    assert sorted(p.name for p in (tmp_path / "slides").iterdir()) == ["tissue_1024.tif", "tissue_2048.tif"]


def test_gpu_campaign_dry_run(tmp_path):
    """benchmarks/gpu_campaign.sh --dry-run: every step at tiny sizes on the CPU, every JSON file written."""
    import os

    env = {k: v for k, v in os.environ.items() if k not in ("HRSEL_MNIST_DIR", "PYTHONPATH")}
    env.update(OUT=str(tmp_path / "out"), PYTHON=sys.executable, TMPDIR=str(tmp_path))
    done = subprocess.run(["bash", str(REPO / "benchmarks" / "gpu_campaign.sh"), "--dry-run"], capture_output=True,
                          text=True, timeout=240, cwd=REPO, env=env)
    log = (tmp_path / "out" / "campaign.log").read_text() if (tmp_path / "out" / "campaign.log").exists() else ""
    assert done.returncode == 0, done.stderr[-2000:] + log[-3000:]
    out = tmp_path / "out"
    results = {name: json.loads((out / f"{name}.json").read_text())
               for name in ("env", "status", "learning_h200", "memory_h200", "topk_op_h200", "speed_study_h200",
                            "train_step_h200")}
    steps = results["status"]["steps"]
    assert list(steps) == ["setup", "data", "probe", "train", "memory", "train_step", "topk_op", "speed_study"]
    assert all(s["status"] == "ok" for s in steps.values()), (steps, log[-3000:])
    assert results["status"]["dry_run"] and results["env"]["dry_run"] and "torch" in results["env"]["modules"]
    learning = results["learning_h200"]
    assert learning["plan"]["steps"] == 2 and learning["plan"]["step_s"] > 0
    assert [r["step"] for r in learning["epochs"]] == [2] and "test/majority/accuracy" in learning["epochs"][0]
    assert learning["test_metrics"]["items"] == 4
    assert [(r["method"], r["side"], r["status"]) for r in results["memory_h200"]["rows"]] == [
        ("ips", 1000, "ok"), ("dps_candidates", 1000, "ok")]
    assert [r["case"] for r in results["topk_op_h200"]] == ["tiny"]
    assert results["speed_study_h200"]["rows"]
    assert [(r["case"], r["impl"], r["status"]) for r in results["train_step_h200"]["rows"]] == [
        ("ips_b16_n900", "hrsel", "ok"), ("ips_b16_n900", "plain", "ok")]
    assert sorted(p.name for p in out.iterdir()) == sorted([f"{n}.json" for n in results] + ["campaign.log"])
    assert not list(tmp_path.glob("gpu_campaign.*"))  # the work folder is removed



def test_own_slides_dry_run(tmp_path):
    out = tmp_path / "own.json"
    printed = run("own_slides.py", "--dry-run", "--k", "6", "--workdir", str(tmp_path / "work"), "--json", str(out))
    record = json.loads(out.read_text())
    assert record["dry_run"] and record["size"] == 512 and record["patch_size"] == 32 and record["machine"]["cpu_model"]
    assert record["k"] == 6 and "K=6" in printed  # --k replaces 10% of the tissue patches ...
    trained = (tmp_path / "work" / "seed0" / "runs" / "my_slides" / "config.yaml").read_text()
    assert "\n  k: 6\n" in trained  # ... in the run the README's command trained
    (seed,) = record["runs"]
    assert len(seed["slides"]) == 4 and {s["split"] for s in seed["slides"]} == {"test"}
    assert sum(s["top_on_lesion"] is not None for s in seed["slides"]) == 2  # the tumour slides are judged
    assert seed["weights"].startswith("best.pt") and seed["train_s"] > 0 and "top patch on the lesion" in printed


def test_own_slides_refuses_a_k_below_one(tmp_path):
    done = subprocess.run([sys.executable, str(REPO / "benchmarks" / "own_slides.py"), "--k", "0", "--workdir",
                           str(tmp_path)], capture_output=True, text=True, timeout=60, cwd=REPO)
    assert done.returncode == 2 and "--k 0: M must be at least 1" in done.stderr
    assert not list(tmp_path.iterdir())  # refused before any slide is written


def test_ips_probe_dry_run(tmp_path):
    out = tmp_path / "probe.json"
    out.write_text(json.dumps({"earlier": {"relapse": None}}))  # probes accumulate by label
    printed = run("ips_probe.py", "--dry-run", "--label", "tiny", "--json", str(out))
    record = json.loads(out.read_text())
    assert set(record) == {"earlier", "tiny"} and "tiny: " in printed
    probe = record["tiny"]
    assert probe["dry_run"] and probe["machine"]["cpu_model"] and probe["probe_images"] == 8
    assert [p["step"] for p in probe["curve"]] == [0, 3, 6]
    for point in probe["curve"]:
        assert all(0.0 <= point[k] <= 1.0 for k in ("inked", "digit", "top_rows", "position_r2", "digits_found",
                                                    "majority_seen"))
        assert 0.0 < point["spread"] <= 1.0
        assert point["bn_var_min"] is None or point["bn_var_min"] >= 0.0
    assert 0.0 < probe["random"]["digit"] < 1.0 and 0.0 < probe["random"]["inked"] < 1.0  # both kinds of patch exist


def load_probe():
    import importlib.util

    spec = importlib.util.spec_from_file_location("ips_probe", REPO / "benchmarks" / "ips_probe.py")
    probe = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(probe)
    return probe


def test_ips_probe_digit_hits_follow_the_boxes():
    import numpy as np
    import torch

    probe = load_probe()
    labels = {"positions": [[[0, 0], [0, 60], [60, 0], [60, 60], [30, 30]]],  # 5 digits on a 100 x 100 canvas
              "digits": [[4, 4, 4, 1, 2]], "majority": [4]}
    data = type("Canvases", (), {"labels": labels, "__getitem__": lambda self, i: {"image": torch.zeros(1, 100, 100)},
                                 "__len__": lambda self: 1})()
    ps = probe.ProbeSet(data, 1, patch=50)  # 2 x 2 grid: digit d < 4 in cell d, digit 4 across all four
    assert ps.boxes[0].int().tolist() == [[1, 0, 0, 0], [0, 1, 0, 0], [0, 0, 1, 0], [0, 0, 0, 1], [1, 1, 1, 1]]
    assert ps.hits(torch.tensor([[3]])).tolist() == [[False, False, False, True, True]]
    assert not ps.majority_seen(torch.tensor([[3]])).item()  # the 1 and the 2 in view, none of the three 4s
    assert not ps.majority_seen(torch.tensor([[0, 3]])).item()  # one 4 only
    assert ps.majority_seen(torch.tensor([[1, 2]])).item()  # two of the three 4s
    assert np.array_equal(ps.hits(torch.tensor([[0]]))[0].numpy(), [True, False, False, False, True])


def test_ips_probe_names_data_without_digit_labels(capsys):
    import torch

    from hrsel.errors import DataError

    probe = load_probe()
    data = type("Slides", (), {"labels": {"majority": [1]}, "root": "/data/slides",
                               "__getitem__": lambda self, i: {"image": torch.zeros(1, 100, 100)},
                               "__len__": lambda self: 1})()
    with pytest.raises(DataError, match=r"/data/slides.*no labels \['positions', 'digits'\].*megapixel_mnist"):
        probe.ProbeSet(data, 1, patch=50)
    with pytest.raises(SystemExit):
        probe.main(["--split", "train"])  # no --checkpoint: refused before anything trains
    assert "--split chooses" in capsys.readouterr().err


def test_ips_probe_measures_a_trained_checkpoint(tmp_path):
    import torch

    from hrsel.data.collate import collate
    from hrsel.inference.load import load_model
    from hrsel.train import main as train_main
    from hrsel.train import open_split

    probe = load_probe()
    overrides = [*probe.DRY, f"data.root={tmp_path / 'data'}", "train.epochs=1", "train.progress_bar=false",
                 "eval.pictures=0", "device=cpu"]
    assert train_main([str(REPO / "configs" / "mnist_s_ips.yaml"), *overrides,
                       f"--output-dir={tmp_path / 'runs'}"]) == 0
    run_dir = next((tmp_path / "runs").iterdir())
    out = tmp_path / "probe.json"
    assert probe.main(["--checkpoint", str(run_dir), "--images", "16", "--label", "trained", "--json", str(out)]) == 0
    entry = json.loads(out.read_text())["trained"]
    point = entry["trained"]
    assert entry["probe_images"] == 16 and entry["machine"]["cpu_model"] and point["step"] >= 1
    assert point["images_seen"] + point["images_unseen"] == 16
    assert 0.0 <= point["digits_found"] <= 1.0
    # the probe sees the images as the trainer does (uint8 scaled by the pipeline; a float copy would be 255x)
    trainer_test = json.loads((run_dir / "test_metrics.json").read_text())
    assert trainer_test["items"] == 16
    assert abs(point["majority_accuracy"] - trainer_test["metrics"]["majority/accuracy"]) < 1e-6
    parts = [(point[f"majority_accuracy_{k}"], point[f"images_{k}"]) for k in ("seen", "unseen")]
    assert abs(sum(acc * n for acc, n in parts if n) / 16 - point["majority_accuracy"]) < 1e-6
    # and its logits are the ones the trainer's collated batch gives
    loaded = load_model(run_dir)
    test = open_split(loaded.config, loaded.config.data.eval_split, for_eval=True)
    with torch.no_grad():
        want = loaded.pipeline(collate([test[i] for i in range(4)])["images"]).logits["majority"]
    got = probe.ProbeSet(test, 4, loaded.pipeline.patch_size).run(loaded.pipeline)[0].logits["majority"]
    assert torch.allclose(got, want, atol=1e-5)


def test_ips_probe_relapse_rule():
    probe = load_probe()
    point = lambda step, inked, top: {"step": step, "inked": inked, "top_rows": top}  # noqa: E731
    assert probe.relapsed([point(100, 0.9, 0.1), point(200, 0.7, 0.1)]) is None
    assert "2/3 of its peak" in probe.relapsed([point(100, 0.9, 0.1), point(200, 0.5, 0.1)])
    assert probe.relapsed([point(100, 0.2, 0.9), point(150, 0.2, 0.9)]) is None  # only after update 150
    assert "top two rows" in probe.relapsed([point(175, 0.9, 0.31)])


def test_ips_probe_sees_batchnorm_variance_collapse_on_blank_picks():
    import torch

    from hrsel.models.backbones import NarrowResNet

    probe = load_probe()
    encoder = NarrowResNet(in_chans=1, width=4, strides=(2,), blocks=(1,))
    assert probe.smallest_running_var(encoder) == 1.0  # BatchNorm starts at variance 1
    encoder.train()
    with torch.no_grad():
        for _ in range(60):  # trained on blank canvas only: the stem's conv output is 0, its variance too
            encoder(torch.zeros(8, 1, 16, 16))
    assert probe.smallest_running_var(encoder) < 0.9 ** 60 * 1.01
    assert probe.smallest_running_var(NarrowResNet(in_chans=1, width=4, strides=(2,), blocks=(1,), norm="group")) is None

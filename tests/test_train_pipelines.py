"""A tiny end-to-end run of every pipeline through the command line, with overrides.

One tiny Megapixel MNIST (128 x 128 canvases, 4 x 4 patches of 32) is generated per module;
each pipeline then trains for two updates, evaluates, draws a picture and checkpoints.
"""
from __future__ import annotations

import csv
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from hrsel.train import main

from fixtures_data import write_mnist_idx
from isa_caps import ISA_CAPS, capped_env

REPO = Path(__file__).resolve().parents[1]
SMALL_CNN = "{width: 8, strides: [2, 2, 2, 2], blocks: [1, 1, 1, 1]}"
PIPELINES = {
    "ips": ["model.patch_size=32", "model.k=3", "model.score_chunk=4", "model.pos_encoding=sincos",
            "model.num_positions=16"],
    "dps": ["model.patch_size=32", "model.k=3", "model.downscale=2", "model.num_samples=8",
            "model.entropy_coef=-0.01"],
    "dps_candidates": ["model.patch_size=32", "model.k=2", "model.num_candidates=4", "model.downscale=2",
                       "model.num_samples=8"],
    "ats": ["model.patch_size=32", "model.k=3", "model.downscale=2"],
    "patchdrop": ["model.patch_size=32", "model.downscale=2"],
    "cnn": ["model.downscale=2"],
}


@pytest.fixture(scope="module")
def tiny_mnist(tmp_path_factory):
    from hrsel.engine.datagen import generate_megapixel_mnist

    base = tmp_path_factory.mktemp("mnist")
    idx = write_mnist_idx(base / "idx")  # tiny IDX files in MNIST's exact format: no real MNIST needed
    root = base / "megapixel"
    generate_megapixel_mnist(str(root), width=128, height=128, n_train=8, n_test=4, n_noise=1, digits="mnist",
                             mnist_dir=str(idx), download=False)
    assert json.loads((root / "parameters.json").read_text())["digits"] == "mnist"  # the IDX files, not a font
    return root


def base_config(tmp_path: Path, root: Path, name: str) -> Path:
    path = tmp_path / "tiny.yaml"
    path.write_text(f"""
experiment: tiny_{name}
device: cpu
data: {{name: megapixel_mnist, root: {root}, batch_size: 4, eval_batch_size: 4, tasks: [majority, multi]}}
model: {{name: {name}, in_chans: 1, backbone: narrow_resnet, backbone_options: {SMALL_CNN}}}
optim: {{lr: 0.001, warmup_epochs: 0.5}}
train: {{epochs: 1, progress_bar: false}}
eval: {{pictures: 1}}
""")
    return path


@pytest.mark.parametrize("name", list(PIPELINES))
def test_tiny_run_of_each_pipeline(name, tiny_mnist, tmp_path, capsys):
    config = base_config(tmp_path, tiny_mnist, name)
    code = main([str(config), *PIPELINES[name], "optim.lr=2e-3", "train.checkpoint_every=1",
                 f"--output-dir={tmp_path / 'runs'}", "--seed", "1"])
    out = capsys.readouterr()
    assert code == 0, out.err[-2000:]
    run = tmp_path / "runs" / f"tiny_{name}"
    with open(run / "metrics.csv", newline="") as f:
        row = list(csv.DictReader(f))[-1]
    assert int(row["step"]) == 2 and 0 <= float(row["test/majority/accuracy"]) <= 1
    assert 0 <= float(row["test/multi/accuracy"]) <= 1 and float(row["ms_per_batch"]) > 0
    assert len(list((run / "pictures").glob("*.png"))) == 1
    state = torch.load(run / "last.pt", weights_only=False)
    assert state["train_state"]["step"] == 2 and all(torch.isfinite(v).all() for v in state["model"].values()
                                                     if v.is_floating_point())
    assert "test majority/accuracy:" in out.out


EACH_PIPELINE = """
import json, sys
from hrsel.train import main
for name, args in json.loads(sys.argv[1]).items():
    print("training", name, flush=True)
    code = main(args)
    print(name, "exited", code, flush=True)
"""


@pytest.mark.parametrize("cap", ISA_CAPS)
def test_a_training_step_of_each_pipeline_survives_every_isa_cap(cap, tiny_mnist, tmp_path):
    """A crash inside oneDNN (as oneDNN#6035 on AVX-512) fails this test, not the whole suite."""
    runs = {}
    for name, overrides in PIPELINES.items():
        (tmp_path / name).mkdir()
        runs[name] = [str(base_config(tmp_path / name, tiny_mnist, name)), *overrides, "train.max_steps=1",
                      "eval.pictures=0", f"--output-dir={tmp_path / name}"]
    try:
        done = subprocess.run([sys.executable, "-c", EACH_PIPELINE, json.dumps(runs)], capture_output=True, text=True,
                              env=capped_env(cap), timeout=300, cwd=REPO)
    except subprocess.TimeoutExpired as hung:
        pytest.fail(f"ONEDNN_MAX_CPU_ISA={cap}: hung; it printed {hung.stdout!r}")
    exits = [line for line in done.stdout.splitlines() if " exited " in line]
    assert done.returncode == 0 and exits == [f"{name} exited 0" for name in PIPELINES], (
        f"ONEDNN_MAX_CPU_ISA={cap}: exit status {done.returncode} after\n{done.stdout}{done.stderr[-2000:]}")


def test_k_larger_than_the_patch_grid_exits_2(tiny_mnist, tmp_path, capsys):
    config = base_config(tmp_path, tiny_mnist, "ips")
    code = main([str(config), *PIPELINES["ips"], "model.k=50", f"--output-dir={tmp_path / 'runs'}"])
    err = capsys.readouterr().err
    assert code == 2 and "model.k" in err and "50" in err and "16 patches" in err


def test_module_entry_point_runs_then_resumes(tiny_mnist, tmp_path, capsys):
    config = base_config(tmp_path, tiny_mnist, "ips")
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    out = subprocess.run([sys.executable, "-m", "hrsel.train", str(config), *PIPELINES["ips"], "train.max_steps=1",
                          f"--output-dir={tmp_path / 'runs'}"], capture_output=True, text=True, env=env,
                         timeout=120, cwd=REPO)
    assert out.returncode == 0, out.stderr[-2000:]
    assert "peak memory:" in out.stdout and "pictures:" in out.stdout
    run = tmp_path / "runs" / "tiny_ips"
    assert main(["--resume", str(run), "train.max_steps=2"]) == 0  # the config comes from the run folder
    assert "resumed at epoch 1, batch 1, step 1" in capsys.readouterr().err
    assert torch.load(run / "last.pt", weights_only=False)["train_state"]["step"] == 2

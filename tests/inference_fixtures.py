"""A tiny trained run for the inference tests: Megapixel MNIST (128 x 128, 4 x 4 patches of 32), IPS,
two updates through the real `python -m hrsel.train` entry point (in process)."""
from __future__ import annotations

import json
from pathlib import Path

from fixtures_data import write_mnist_idx

SMALL_CNN = "{width: 8, strides: [2, 2, 2, 2], blocks: [1, 1, 1, 1]}"
IPS = ["model.patch_size=32", "model.num_selected=3", "model.chunk_size=4", "model.pos_encoding=sincos",
       "model.num_positions=16"]


def tiny_mnist(base: Path) -> Path:
    from hrsel.engine.datagen import generate_megapixel_mnist

    idx = write_mnist_idx(base / "idx")
    root = base / "megapixel"
    generate_megapixel_mnist(str(root), width=128, height=128, n_train=10, n_test=6, n_noise=1, digits="mnist",
                             mnist_dir=str(idx), download=False)
    return root


def train_tiny_run(base: Path, *, experiment: str = "tiny_ips", extra: tuple[str, ...] = ()) -> Path:
    """Train the tiny run under base/runs; returns its run folder (config.yaml, last.pt, best.pt, ...)."""
    from hrsel.train import main

    root = tiny_mnist(base)
    config = base / "tiny.yaml"
    config.write_text(f"""
experiment: {experiment}
device: cpu
data: {{name: megapixel_mnist, root: {root}, batch_size: 4, eval_batch_size: 3, tasks: [majority, multi],
        val_fraction: 0.2}}
model: {{name: ips, in_chans: 1, backbone: narrow_resnet, backbone_options: {SMALL_CNN}}}
optim: {{lr: 0.002, warmup_epochs: 0.5}}
train: {{epochs: 2, progress_bar: false}}
eval: {{pictures: 0}}
""")
    code = main([str(config), *IPS, *extra, f"--output-dir={base / 'runs'}", "--seed", "1"])
    assert code == 0
    run = base / "runs" / experiment
    assert json.loads((run / "test_metrics.json").read_text())["metrics"]
    return run


def train_tiny_slides_run(base: Path, *, experiment: str = "tiny_slides") -> Path:
    """IPS on your own slides: 6 pyramidal TIFFs (256 x 256 at 0.25 um/px, 2 levels) in a CSV with a split
    column (2 train, 2 val, 2 test), read at data.target_mpp 0.5 (level 1: 128 x 128, 16 patches of 32) with
    tissue masks; one epoch through `python -m hrsel.train` (in process). Returns the run folder."""
    from fixtures_data import make_manifest
    from hrsel.train import main

    root = make_manifest(base / "slides")
    config = base / "slides.yaml"
    config.write_text(f"""
experiment: {experiment}
device: cpu
data: {{name: manifest, root: {root}, manifest: slides.csv, target_mpp: 0.5, tissue: true, min_tissue_fraction: 0.25,
        tissue_cache: {base / 'masks'}, batch_size: 1, eval_batch_size: 1}}
model: {{name: ips, in_chans: 3, patch_size: 32, k: 2, score_chunk: 8, backbone: narrow_resnet,
         backbone_options: {SMALL_CNN}, aggregator_options: {{heads: 2, head_dim: 4, mlp_dim: 16, dropout: 0.0}}}}
optim: {{lr: 0.001}}
train: {{epochs: 1, progress_bar: false}}
eval: {{pictures: 0, metric: label/accuracy}}
""")
    assert main([str(config), f"--output-dir={base / 'runs'}", "--seed", "1"]) == 0
    return base / "runs" / experiment

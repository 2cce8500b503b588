"""Warm-start a patch encoder on labelled patches before it learns a task from image labels.

    report = warm_start_digits("data/warm_start/demo.pt", backbone="narrow_resnet",
                               backbone_options={"width": 16}, patch_size=56)
    report = warm_start_balls("data/warm_start/billiard.pt", backbone="narrow_resnet",
                              backbone_options={"width": 32}, patch_size=50, root="data/billiard_500")
    # then: model.backbone_options.weights_path: data/warm_start/demo.pt

The encoder plus a linear head learn to name what one patch shows: the digit (or "none", `NO_DIGIT`)
in patches cut around digits of the Megapixel MNIST generator's *train* pool (`hrsel.data.digit_patches`),
or the ball number (or "none", `NO_BALL`) in patches of billiard *train* images, from their ball
annotations (`hrsel.data.ball_patches`). The head is dropped and the encoder's state dict written
where a backbone's `weights_path` reads it. This plays the part ImageNet weights play for slides:
IPS trains its Megapixel MNIST encoder from scratch (`pretrained: False` in its MNIST config, also
for its DPS comparison) and DPS its billiard ResNet18, so a config that uses it says so. Accuracy is
reported on patches of the *test* pool or split, which no training step sees, beside the share of
the commonest label there. A JSON beside the weights (`<path>.json`) records what was done.
"""
from __future__ import annotations

import json
import logging
import math
import os
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from hrsel.data.digits import DigitPools
from hrsel.errors import ConfigError

log = logging.getLogger(__name__)

TEST_PATCHES = 2000  # held-out patches (test-pool digits, test-split balls) the report's accuracy is measured on
TRAIN_IMAGES = 400  # billiard train images the ball patches are cut from (held in memory: ~0.3 GB at 500x500)
TEST_IMAGES = 200  # billiard test images the held-out ball patches are cut from


def warm_start_digits(path: str | os.PathLike, *, backbone: str, backbone_options: dict[str, Any] | None = None,
                      in_chans: int = 1, patch_size: int, digits: DigitPools | str = "mnist",
                      mnist_dir: str | os.PathLike | None = None, steps: int = 300, batch_size: int = 128,
                      lr: float = 3e-3, seed: int = 0, overwrite: bool = False, progress: bool = False) -> dict:
    """Train backbone `backbone` on digit patches, write its state dict to `path`; returns the report.

    `digits` and `mnist_dir` pick the digit pool as the Megapixel MNIST generator does (or give the
    pools). An existing `path` is kept (ConfigError) unless `overwrite`; the file appears whole or not at all.
    """
    from hrsel.data.digit_patches import NUM_CLASSES, digit_patches
    from hrsel.data.digits import generator_pools
    from hrsel.data.megapixel_mnist_gen import make_noise_patterns

    check_new_run(path, steps=steps, batch_size=batch_size, overwrite=overwrite)
    if in_chans != 1:
        raise ConfigError(f"warm start: digit patches have 1 channel; the model has in_chans={in_chans}")
    pools = digits if isinstance(digits, DigitPools) else generator_pools(digits=digits, mnist_dir=mnist_dir)
    rng = np.random.default_rng(seed)
    noise = make_noise_patterns(rng)
    train_images, train_labels = pools.split("train")
    test_images, test_labels = pools.split("test")

    def batch() -> tuple[np.ndarray, np.ndarray]:
        return digit_patches(rng, train_images, train_labels, noise, patch_size=patch_size, n=batch_size)

    held_out = digit_patches(np.random.default_rng(seed + 1), test_images, test_labels, noise,
                             patch_size=patch_size, n=TEST_PATCHES)
    about = {"patch_size": patch_size, "batch_size": batch_size, "digits": pools.source, "digits_note": pools.note,
             "train_digits": len(train_labels)}
    return train_and_save(path, backbone=backbone, backbone_options=backbone_options, in_chans=in_chans,
                          batches=batch, held_out=held_out, num_classes=NUM_CLASSES, steps=steps, lr=lr, seed=seed,
                          about=about, progress=progress)


def warm_start_balls(path: str | os.PathLike, *, backbone: str, backbone_options: dict[str, Any] | None = None,
                     in_chans: int = 3, patch_size: int, root: str | os.PathLike, n_images: int = TRAIN_IMAGES,
                     steps: int = 300, batch_size: int = 128, lr: float = 3e-3, seed: int = 0,
                     overwrite: bool = False, progress: bool = False) -> dict:
    """Train backbone `backbone` to read ball numbers in patches of `n_images` billiard train images under
    `root` (held out: TEST_IMAGES test images), write its state dict to `path`; returns the report."""
    from hrsel.data.ball_patches import NUM_CLASSES, ball_patches, billiard_pool

    check_new_run(path, steps=steps, batch_size=batch_size, overwrite=overwrite)
    if in_chans != 3:
        raise ConfigError(f"warm start: billiard patches have 3 channels; the model has in_chans={in_chans}")
    train_images, train_tables = billiard_pool(root, "train", n_images=n_images, seed=seed)
    test_images, test_tables = billiard_pool(root, "test", n_images=TEST_IMAGES, seed=seed + 1)
    rng = np.random.default_rng(seed)

    def batch() -> tuple[np.ndarray, np.ndarray]:
        return ball_patches(rng, train_images, train_tables, patch_size=patch_size, n=batch_size)

    held_out = ball_patches(np.random.default_rng(seed + 1), test_images, test_tables, patch_size=patch_size,
                            n=TEST_PATCHES)
    about = {"patch_size": patch_size, "batch_size": batch_size, "billiard_root": str(root),
             "train_images": len(train_images), "test_images": len(test_images)}
    return train_and_save(path, backbone=backbone, backbone_options=backbone_options, in_chans=in_chans,
                          batches=batch, held_out=held_out, num_classes=NUM_CLASSES, steps=steps, lr=lr, seed=seed,
                          about=about, progress=progress)


def check_new_run(path: str | os.PathLike, *, steps: int, batch_size: int, overwrite: bool) -> None:
    if Path(path).exists() and not overwrite:
        raise ConfigError(f"warm start: {path} exists; use it as it is, delete it, or pass overwrite=True")
    if steps < 1 or batch_size < 1:
        raise ConfigError(f"warm start: steps {steps} and batch_size {batch_size} must be at least 1")


def train_and_save(path: str | os.PathLike, *, backbone: str, backbone_options: dict[str, Any] | None,
                   in_chans: int, batches, held_out: tuple[np.ndarray, np.ndarray], num_classes: int, steps: int,
                   lr: float, seed: int, about: dict[str, Any], progress: bool) -> dict:
    """Fit a fresh encoder + head on `batches()`, score it on `held_out`, write weights and report atomically."""
    from hrsel.engine.checkpoint import atomic_save, atomic_write
    from hrsel.models.backbones import build_backbone

    path = Path(path)
    options = {k: v for k, v in (backbone_options or {}).items() if k != "weights_path"}
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        encoder = build_backbone(backbone, in_chans=in_chans, **options)
        start = time.perf_counter()
        head, losses = fit_patch_head(encoder, batches, num_classes=num_classes, steps=steps, lr=lr,
                                      progress=progress)
        seconds = time.perf_counter() - start
        accuracy = patch_accuracy(encoder, head, *held_out)
    labels = held_out[1]
    report = {"backbone": backbone, "backbone_options": options, "steps": steps, "lr": lr, "seed": seed, **about,
              "seconds": round(seconds, 1), "first_loss": round(losses[0], 4),
              "last_loss": round(float(np.mean(losses[-20:])), 4), "test_patch_accuracy": round(accuracy, 4),
              "test_patches": len(labels),
              "test_commonest_label_share": round(float(np.bincount(labels).max() / len(labels)), 4)}
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_save(encoder.state_dict(), path)
    atomic_write(sidecar(path), lambda f: f.write(json.dumps(report, indent=1)), text=True)
    log.info("warm start: %s, %d steps on patches of %d px in %.0f s, %.1f%% of held-out patches right -> %s",
             backbone, steps, about["patch_size"], seconds, 100 * accuracy, path)
    return report


def warm_start_path(cfg: Any) -> Path | None:
    """The warm start a training config starts its backbone from (model.backbone_options.weights_path), if any."""
    path = ((cfg.model.options or {}).get("backbone_options") or {}).get("weights_path")
    return Path(path) if path else None


def ensure_warm_start(cfg: Any, *, steps: int = 300, progress: bool = False) -> dict | None:
    """Build the warm start a config names when its file is missing; the report, or None when there was
    nothing to build. Megapixel MNIST: digits of the pool the config's generator uses; billiard: ball
    numbers of the config's data root."""
    path = warm_start_path(cfg)
    if path is None or path.is_file():
        return None
    options = cfg.model.options
    missing = [key for key in ("backbone", "patch_size") if key not in options]
    if cfg.data.name not in ("megapixel_mnist", "billiard") or missing:
        raise ConfigError(f"model.backbone_options.weights_path {path} does not exist; a warm start can build it "
                          f"for a megapixel_mnist (digits) or billiard (ball numbers) config with model.backbone "
                          f"and model.patch_size (data.name is {cfg.data.name!r}, missing: "
                          f"{', '.join(missing) or 'nothing'}). Give an existing weights file, or drop weights_path "
                          f"for random weights")
    common = {"backbone": options["backbone"], "backbone_options": options.get("backbone_options"),
              "patch_size": options["patch_size"], "steps": steps, "seed": cfg.seed, "progress": progress}
    if cfg.data.name == "billiard":
        return warm_start_balls(path, in_chans=options.get("in_chans", 3), root=cfg.data.root, **common)
    generate = cfg.data.generate or {}
    return warm_start_digits(path, in_chans=options.get("in_chans", 1), digits=generate.get("digits", "mnist"),
                             mnist_dir=generate.get("mnist_dir"), **common)


def sidecar(path: str | os.PathLike) -> Path:
    """The report beside warm-start weights: `enc.pt` -> `enc.pt.json`."""
    path = Path(path)
    return path.with_name(path.name + ".json")


def fit_patch_head(encoder: nn.Module, batches, *, num_classes: int, steps: int, lr: float,
                   progress: bool = False) -> tuple[nn.Linear, list[float]]:
    """Train `encoder` + a new linear head on `batches()` -> (x uint8 (B, C, P, P), y (B,) in 0..num_classes-1).

    AdamW with a cosine decay to zero. Returns the head and the loss of each step.
    """
    head = nn.Linear(encoder.out_dim, num_classes)
    params = [*encoder.parameters(), *head.parameters()]
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.01)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 0.5 * (1 + math.cos(math.pi * s / steps)))
    encoder.train()
    losses = []
    bar = _progress(steps, progress)
    for _ in range(steps):
        x, y = batches()
        logits = head(encoder(torch.from_numpy(x).float().div_(255.0)))  # (B, num_classes)
        loss = nn.functional.cross_entropy(logits, torch.from_numpy(y))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        losses.append(loss.item())
        if bar is not None:
            bar.update(1)
            bar.set_postfix(loss=f"{loss.item():.3f}", refresh=False)
    if bar is not None:
        bar.close()
    return head, losses


@torch.no_grad()
def patch_accuracy(encoder: nn.Module, head: nn.Module, x: np.ndarray, y: np.ndarray) -> float:
    """Share of patches x (n, C, P, P) uint8 whose label (y (n,)) encoder + head name right."""
    encoder.eval()
    logits = torch.cat([head(encoder(torch.from_numpy(x[i:i + 256]).float().div_(255.0)))
                        for i in range(0, len(x), 256)])
    return float((logits.argmax(1).numpy() == y).mean())


def _progress(total: int, enabled: bool):
    if not enabled:
        return None
    from tqdm import tqdm

    return tqdm(total=total, desc="warm start", leave=False, dynamic_ncols=True)

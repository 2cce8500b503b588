"""Warm-start a patch encoder on single digits before it learns Megapixel MNIST from image labels.

    report = warm_start_digits("data/warm_start/demo.pt", backbone="narrow_resnet",
                               backbone_options={"width": 16}, patch_size=56)
    # then: model.backbone_options.weights_path: data/warm_start/demo.pt

The encoder plus a linear head learn to name the digit in a patch (or "none", `NO_DIGIT`) from
patches cut around digits of the generator's *train* pool (`hrsel.data.digit_patches`); the head
is dropped and the encoder's state dict written where a backbone's `weights_path` reads it. This
plays the part ImageNet weights play for slides: IPS trains its Megapixel MNIST encoder from scratch
(`pretrained: False` in its MNIST config, also for its DPS comparison), so a config that uses it says so. Accuracy is reported on patches of the *test* pool,
which no training step sees. A JSON beside the weights (`<path>.json`) records what was done.
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

TEST_PATCHES = 2000  # patches of held-out test-pool digits the report's accuracy is measured on


def warm_start_digits(path: str | os.PathLike, *, backbone: str, backbone_options: dict[str, Any] | None = None,
                      in_chans: int = 1, patch_size: int, digits: DigitPools | str = "mnist",
                      mnist_dir: str | os.PathLike | None = None, steps: int = 300, batch_size: int = 128,
                      lr: float = 3e-3, seed: int = 0, overwrite: bool = False, progress: bool = False) -> dict:
    """Train backbone `backbone` on digit patches, write its state dict to `path`; returns the report.

    `digits` and `mnist_dir` pick the digit pool as the Megapixel MNIST generator does (or give the
    pools). An existing `path` is kept (ConfigError) unless `overwrite`; the file appears whole or not at all.
    """
    from hrsel.data.digit_patches import digit_patches
    from hrsel.data.digits import generator_pools
    from hrsel.data.megapixel_mnist_gen import make_noise_patterns
    from hrsel.engine.checkpoint import atomic_save, atomic_write
    from hrsel.models.backbones import build_backbone

    path = Path(path)
    if path.exists() and not overwrite:
        raise ConfigError(f"warm start: {path} exists; use it as it is, delete it, or pass overwrite=True")
    if steps < 1 or batch_size < 1:
        raise ConfigError(f"warm start: steps {steps} and batch_size {batch_size} must be at least 1")
    if in_chans != 1:
        raise ConfigError(f"warm start: digit patches have 1 channel; the model has in_chans={in_chans}")
    options = {k: v for k, v in (backbone_options or {}).items() if k != "weights_path"}
    pools = digits if isinstance(digits, DigitPools) else generator_pools(digits=digits, mnist_dir=mnist_dir)
    rng = np.random.default_rng(seed)
    noise = make_noise_patterns(rng)
    train_images, train_labels = pools.split("train")
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        encoder = build_backbone(backbone, in_chans=in_chans, **options)
        start = time.perf_counter()
        def batch() -> tuple[np.ndarray, np.ndarray]:
            return digit_patches(rng, train_images, train_labels, noise, patch_size=patch_size, n=batch_size)

        head, losses = fit_digit_head(encoder, batch, steps=steps, lr=lr, progress=progress)
        seconds = time.perf_counter() - start
        test_images, test_labels = pools.split("test")
        held_out = digit_patches(np.random.default_rng(seed + 1), test_images, test_labels, noise,
                                 patch_size=patch_size, n=TEST_PATCHES)
        accuracy = digit_accuracy(encoder, head, *held_out)
    report = {"backbone": backbone, "backbone_options": options, "patch_size": patch_size, "steps": steps,
              "batch_size": batch_size, "lr": lr, "seed": seed, "digits": pools.source, "digits_note": pools.note,
              "train_digits": len(train_labels), "seconds": round(seconds, 1),
              "first_loss": round(losses[0], 4), "last_loss": round(float(np.mean(losses[-20:])), 4),
              "test_patch_accuracy": round(accuracy, 4), "test_patches": TEST_PATCHES}
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_save(encoder.state_dict(), path)
    atomic_write(sidecar(path), lambda f: f.write(json.dumps(report, indent=1)), text=True)
    log.info("warm start: %s on %d digit patches of %d px in %.0f s, %.1f%% right on held-out digits -> %s",
             backbone, steps * batch_size, patch_size, seconds, 100 * accuracy, path)
    return report


def warm_start_path(cfg: Any) -> Path | None:
    """The warm start a training config starts its backbone from (model.backbone_options.weights_path), if any."""
    path = ((cfg.model.options or {}).get("backbone_options") or {}).get("weights_path")
    return Path(path) if path else None


def ensure_warm_start(cfg: Any, *, steps: int = 300, progress: bool = False) -> dict | None:
    """Build the digit warm start a Megapixel MNIST config names when its file is missing; the report, or
    None when there was nothing to build. The digits come from the pool the config's generator uses."""
    path = warm_start_path(cfg)
    if path is None or path.is_file():
        return None
    options = cfg.model.options
    missing = [key for key in ("backbone", "patch_size") if key not in options]
    if cfg.data.name != "megapixel_mnist" or missing:
        raise ConfigError(f"model.backbone_options.weights_path {path} does not exist; a digit warm start can "
                          f"build it for a megapixel_mnist config with model.backbone and model.patch_size "
                          f"(data.name is {cfg.data.name!r}, missing: {', '.join(missing) or 'nothing'}). "
                          f"Give an existing weights file, or drop weights_path for random weights")
    generate = cfg.data.generate or {}
    return warm_start_digits(path, backbone=options["backbone"], backbone_options=options.get("backbone_options"),
                             in_chans=options.get("in_chans", 1), patch_size=options["patch_size"],
                             digits=generate.get("digits", "mnist"), mnist_dir=generate.get("mnist_dir"),
                             steps=steps, seed=cfg.seed, progress=progress)


def sidecar(path: str | os.PathLike) -> Path:
    """The report beside warm-start weights: `enc.pt` -> `enc.pt.json`."""
    path = Path(path)
    return path.with_name(path.name + ".json")


def fit_digit_head(encoder: nn.Module, batches, *, steps: int, lr: float,
                   progress: bool = False) -> tuple[nn.Linear, list[float]]:
    """Train `encoder` + a new linear head on `batches()` -> (x uint8 (B, 1, P, P), y (B,)).

    AdamW with a cosine decay to zero. Returns the head and the loss of each step.
    """
    from hrsel.data.digit_patches import NUM_CLASSES

    head = nn.Linear(encoder.out_dim, NUM_CLASSES)
    params = [*encoder.parameters(), *head.parameters()]
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.01)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 0.5 * (1 + math.cos(math.pi * s / steps)))
    encoder.train()
    losses = []
    bar = _progress(steps, progress)
    for _ in range(steps):
        x, y = batches()
        logits = head(encoder(torch.from_numpy(x).float().div_(255.0)))  # (B, NUM_CLASSES)
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
def digit_accuracy(encoder: nn.Module, head: nn.Module, x: np.ndarray, y: np.ndarray) -> float:
    """Share of patches x (n, 1, P, P) uint8 whose digit (or none) encoder + head name right."""
    encoder.eval()
    logits = torch.cat([head(encoder(torch.from_numpy(x[i:i + 256]).float().div_(255.0)))
                        for i in range(0, len(x), 256)])
    return float((logits.argmax(1).numpy() == y).mean())


def _progress(total: int, enabled: bool):
    if not enabled:
        return None
    from tqdm import tqdm

    return tqdm(total=total, desc="warm start", leave=False, dynamic_ncols=True)

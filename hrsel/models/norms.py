"""Normalisation layers of the patch backbones, and why a batch of one slide needs a choice.

    norm = norm_layer("group")            # (C) -> nn.Module, for torchvision's `norm_layer`
    freeze_batch_norms(backbone)          # after .train(): BatchNorm keeps its running statistics

A selection pipeline trains its backbone on the K selected patches of each image in the batch.
With `data.batch_size: 1` (slides of different sizes) BatchNorm then normalises over the K
patches of one slide in training, but over running statistics of all slides in evaluation:
the model learns features relative to the slide, and predicts on other features. On synthetic
slides (`hrsel.data.synthetic_slides`, 32 train slides, K = 32) that gap left a run that fit
its training slides (loss 0.07) at validation AUC 0.06 and training-slide accuracy 0.66 in
evaluation mode, where runs with 8 slides per batch, or with GroupNorm at batch 1 (K = 16),
reached 1.0 validation and test accuracy. So:

- "batch": BatchNorm in training mode (the papers' nets; fine when batch x K is large);
- "group": GroupNorm, the same in training and evaluation (from scratch at batch size 1);
- "frozen": BatchNorm always in evaluation mode, its running statistics those of the loaded
  weights (ImageNet); its scale and shift still train (a pretrained backbone at batch size 1).
"""
from __future__ import annotations

import math
from typing import Callable

from torch import nn

from hrsel.errors import ConfigError

NORMS = ("batch", "group", "frozen")


def check_norm(norm: str) -> str:
    if norm not in NORMS:
        raise ConfigError(f"backbone norm {norm!r} is unknown; valid: {', '.join(NORMS)} (see hrsel.models.norms)")
    return norm


def group_count(channels: int) -> int:
    """GroupNorm groups for `channels`: 32 as in Wu & He (2018) where it divides, never one channel per group."""
    return max(1, min(math.gcd(channels, 32), channels // 2))


def norm_layer(norm: str) -> Callable[[int], nn.Module]:
    """(channels) -> a normalisation module; "frozen" builds BatchNorm (`freeze_batch_norms` keeps it in eval)."""
    if check_norm(norm) == "group":
        return lambda channels: nn.GroupNorm(group_count(channels), channels)
    return nn.BatchNorm2d


def freeze_batch_norms(module: nn.Module) -> nn.Module:
    """Put every BatchNorm of `module` in evaluation mode (running statistics used, never updated)."""
    for m in module.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            m.eval()
    return module


class NormChoice:
    """Mixin of a backbone with a `norm` attribute: "frozen" keeps its BatchNorms in eval mode."""

    norm: str = "batch"

    def train(self, mode: bool = True):
        super().train(mode)  # type: ignore[misc]
        if self.norm == "frozen":
            freeze_batch_norms(self)  # type: ignore[arg-type]
        return self


def batch_statistics_warning(pipeline: nn.Module, *, batch_size: int, model: str) -> str | None:
    """The warning for a selection pipeline trained at batch size 1 with BatchNorm in training mode."""
    if batch_size != 1 or model == "cnn":
        return None
    was_training = pipeline.training
    pipeline.train()
    live = [name for name, m in pipeline.named_modules()
            if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.training]
    pipeline.train(was_training)
    if not live:
        return None
    return (f"data.batch_size=1 and the model has {len(live)} BatchNorm layer(s) in training mode ({live[0]}, ...): "
            f"in training they normalise over the K patches of one image, in evaluation over running statistics, "
            f"so validation and predictions can be far from what training saw (hrsel.models.norms). Set "
            f"model.backbone_options.norm=group (training from scratch) or norm=frozen (with pretrained weights), "
            f"or batch images of one size (data.batch_size > 1)")

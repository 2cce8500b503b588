"""The contract every pipeline (IPS, DPS, DPS with candidates, ATS, PatchDrop, CNN) keeps.

The trainer only knows this interface:

    out = pipeline(images)                   # PipelineOutput
    loss = task_losses(out.logits, targets) + pipeline.auxiliary_loss(out, targets)
    pipeline.set_progress(step, total_steps) # e.g. the sigma schedule of DPS

`images` is either a tensor (B, C, H, W), uint8 in [0, 255] or float in [0, 1],
or a list of B lazy `hrsel.io` image sources (read chunk by chunk, never whole).
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn


@dataclass
class PipelineOutput:
    logits: dict[str, torch.Tensor]  # task -> (B, num_classes)
    indices: torch.Tensor | None = None  # (B, K) selected patch indices into the patch grid, raster order
    scores: torch.Tensor | None = None  # (B, N) detached per-patch scores over the whole grid, for pictures
    aux_loss: torch.Tensor | None = None  # scalar regulariser already weighted (entropy bonus, ...)
    stats: dict[str, float] = field(default_factory=dict)  # e.g. {"patches_scored": 900.0}
    extras: dict[str, torch.Tensor] = field(default_factory=dict)  # pipeline-private tensors for auxiliary_loss


class Pipeline(nn.Module):
    """Base class: subclasses implement `forward(images) -> PipelineOutput`."""

    def set_progress(self, step: int, total_steps: int) -> None:
        """Called by the trainer before every training step; default: nothing depends on it."""

    def auxiliary_loss(self, out: PipelineOutput, targets: dict[str, torch.Tensor]) -> torch.Tensor:
        """Extra loss terms; policy-gradient selectors override this to use the targets."""
        if out.aux_loss is None:
            return next(iter(out.logits.values())).new_zeros(())
        return out.aux_loss

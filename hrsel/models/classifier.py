"""Backbone -> aggregator -> heads: what every pipeline runs on its chosen patches."""
from __future__ import annotations

from typing import Any

import torch
from torch import nn

from hrsel.models.aggregators import build_aggregator
from hrsel.models.backbones import build_backbone
from hrsel.models.heads import TaskHeads
from hrsel.tasks import TaskSpec


class PatchClassifier(nn.Module):
    """Patches (B, K, C, p, p) float -> {task: (B, classes)} logits.

    Args:
        tasks: task name -> TaskSpec.
        in_chans: image channels.
        backbone / backbone_options: name in BACKBONES and its keyword options.
        aggregator / aggregator_options: name in AGGREGATORS and its options (in_dim and
            num_tokens are filled in: one query per task for "attention").
        head_hidden: width of the Dense + swish layer before each classifier (None: none).
        pos_encoding / num_positions: positional table of the aggregator (none | learned | sincos)
            over `num_positions` grid cells.
    """

    def __init__(self, *, tasks: dict[str, TaskSpec], in_chans: int = 3, backbone: str = "resnet18",
                 backbone_options: dict[str, Any] | None = None, aggregator: str = "mean",
                 aggregator_options: dict[str, Any] | None = None, head_hidden: int | None = None,
                 pos_encoding: str = "none", num_positions: int = 0):
        super().__init__()
        self.backbone = build_backbone(backbone, in_chans=in_chans, **(backbone_options or {}))
        agg_options = dict(aggregator_options or {})
        if pos_encoding != "none":
            agg_options.update(pos_encoding=pos_encoding, num_positions=num_positions)
        if aggregator == "attention":
            agg_options.setdefault("num_tokens", len(tasks))
        self.aggregator = build_aggregator(aggregator, in_dim=self.backbone.out_dim, **agg_options)
        self.heads = TaskHeads(tasks=tasks, in_dim=self.aggregator.out_dim, hidden_dim=head_hidden)

    def encode(self, patches: torch.Tensor) -> torch.Tensor:
        """(B, K, C, p, p) -> (B, K, D)."""
        b, k = patches.shape[:2]
        return self.backbone(patches.flatten(0, 1)).view(b, k, -1)

    def classify(self, features: torch.Tensor, *, mask: torch.Tensor | None = None,
                 positions: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
        """(B, K, D) embeddings -> logits."""
        return self.heads(self.aggregator(features, mask=mask, positions=positions))

    def forward(self, patches: torch.Tensor, *, mask: torch.Tensor | None = None,
                positions: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
        return self.classify(self.encode(patches), mask=mask, positions=positions)

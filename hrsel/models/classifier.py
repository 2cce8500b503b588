"""Backbone -> aggregator -> heads: what every pipeline runs on its chosen patches."""
from __future__ import annotations

from typing import Any

import torch
from torch import nn

from hrsel.errors import ConfigError
from hrsel.models.aggregators import build_aggregator
from hrsel.models.backbones import build_backbone
from hrsel.models.fastpath import encode_eval
from hrsel.models.heads import TaskHeads
from hrsel.tasks import TaskSpec

GLOBAL_MERGES = ("add", "concat")


class PatchClassifier(nn.Module):
    """Patches (B, K, C, p, p) float -> {task: (B, classes)} logits.

    Args:
        tasks: task name -> TaskSpec.
        in_chans: image channels.
        backbone / backbone_options: name in BACKBONES and its keyword options.
        aggregator / aggregator_options: name in AGGREGATORS and its options (in_dim and
            num_tokens are filled in: one query per task for "attention"; num_patches for
            "concat" when `num_patches` is given).
        head_hidden: width of the Dense + swish layer before each classifier; "same": the
            width of what the heads read; None: none.
        pos_encoding / num_positions: positional encoding of the aggregator
            (none | learned | sincos | dense) over `num_positions` grid cells.
        num_patches: patches per image, when fixed (DPS: k).
        feature_dropout: dropout on every backbone feature (DPS CUB / NTS-Net: 0.5).
        global_merge: None, or how a whole-image feature (B, D) joins the aggregated one
            (`classify(..., whole=...)`): "add" (DPS "[Mean]": mean of parts + whole) or
            "concat" (NTS-Net / DPS "[Concat]": [aggregated, whole]).
    """

    def __init__(self, *, tasks: dict[str, TaskSpec], in_chans: int = 3, backbone: str = "resnet18",
                 backbone_options: dict[str, Any] | None = None, aggregator: str = "mean",
                 aggregator_options: dict[str, Any] | None = None, head_hidden: int | str | None = None,
                 pos_encoding: str = "none", num_positions: int = 0, num_patches: int | None = None,
                 feature_dropout: float = 0.0, global_merge: str | None = None):
        super().__init__()
        self.backbone = build_backbone(backbone, in_chans=in_chans, **(backbone_options or {}))
        agg_options = dict(aggregator_options or {})
        if pos_encoding != "none":
            agg_options.update(pos_encoding=pos_encoding, num_positions=num_positions)
        if aggregator == "attention":
            agg_options.setdefault("num_tokens", len(tasks))
        if aggregator == "concat" and num_patches:
            agg_options.setdefault("num_patches", num_patches)
        self.aggregator = build_aggregator(aggregator, in_dim=self.backbone.out_dim, **agg_options)
        self.drop = nn.Dropout(feature_dropout)
        self.global_merge = global_merge
        self.heads = TaskHeads(tasks=tasks, in_dim=self._head_width(), hidden_dim=head_hidden)

    def _head_width(self) -> int:
        width, whole = self.aggregator.out_dim, self.backbone.out_dim
        if self.global_merge is None:
            return width
        if self.global_merge not in GLOBAL_MERGES:
            raise ConfigError(f"global_merge {self.global_merge!r} is unknown; valid: {', '.join(GLOBAL_MERGES)}")
        if self.global_merge == "concat":
            return width + whole
        if width != whole:
            raise ConfigError(f"global_merge 'add' needs the aggregated width ({width}) to equal the whole-image "
                              f"feature width ({whole}); use model.global_merge=concat or a width-keeping aggregator")
        return width

    def encode(self, patches: torch.Tensor) -> torch.Tensor:
        """(B, K, C, p, p) -> (B, K, D)."""
        b, k = patches.shape[:2]
        return self.drop(self.backbone(patches.flatten(0, 1)).view(b, k, -1))

    def encode_for_scoring(self, patches: torch.Tensor, *, part: int | None = None, backbone: nn.Module | None = None,
                           constant: tuple[torch.Tensor, torch.Tensor] | None = None) -> torch.Tensor:
        """`encode` for a no-grad pass in eval mode, faster (`hrsel.models.fastpath.encode_eval`);
        `backbone`: the same network in another form (e.g. compiled); `constant`: (B, K, C) fills and
        (B, K) flags of `hrsel.models.fastpath.constant_patches`, when known."""
        b, k = patches.shape[:2]
        flat = None if constant is None else (constant[0].flatten(0, 1), constant[1].flatten(0, 1))
        backbone = self.backbone if backbone is None else backbone
        return encode_eval(backbone, patches.flatten(0, 1), part, flat).view(b, k, -1)

    def classify(self, features: torch.Tensor, *, mask: torch.Tensor | None = None,
                 positions: torch.Tensor | None = None, whole: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
        """(B, K, D) embeddings (and the (B, D) whole-image feature with global_merge) -> logits."""
        tokens = self.aggregator(features, mask=mask, positions=positions)  # (B, T, D')
        if (whole is None) != (self.global_merge is None):
            raise ValueError("pass `whole` exactly when the classifier was built with a global_merge")
        if self.global_merge == "add":
            tokens = tokens + whole[:, None]
        elif self.global_merge == "concat":
            tokens = torch.cat([tokens, whole[:, None].expand(-1, tokens.shape[1], -1)], dim=-1)
        return self.heads(tokens)

    def forward(self, patches: torch.Tensor, *, mask: torch.Tensor | None = None,
                positions: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
        return self.classify(self.encode(patches), mask=mask, positions=positions)

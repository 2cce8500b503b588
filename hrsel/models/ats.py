"""ATS baseline (Katharopoulos & Fleuret, ICML 2019): attention sampling without replacement.

The scorer's smoothed softmax over the grid of a downscaled image is an attention
distribution; K patches are drawn without replacement, encoded at full resolution, and
averaged with the unbiased estimator weights (`hrsel.select.ats`). As in ATS's code, the
draws happen at test time too (`sample_at_inference`); the K most attended patches are
the deterministic alternative.
"""
from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F

from hrsel.errors import ConfigError
from hrsel.models.candidates import candidate_masks, nan_outside, restrict_attention
from hrsel.models.backbones import build_backbone
from hrsel.models.heads import TaskHeads
from hrsel.models.patches import ImageBatch, check_channels, with_coordinate_channels
from hrsel.models.pipeline import Pipeline, PipelineOutput
from hrsel.models.scorers import build_scorer
from hrsel.select.ats import (attention_entropy, expectation_without_replacement, sample_without_replacement,
                              smoothed_attention)
from hrsel.select.extract import GridGeometry
from hrsel.tasks import TaskSpec


class ATSPipeline(Pipeline):
    """Attention sampling: smoothed softmax attention, K draws without replacement, unbiased mean.

    Keyword-only options:
        tasks: task name -> TaskSpec.
        in_chans: image channels.
        patch_size: full-resolution patch centred on each attention cell (100).
        k: patches sampled (5). downscale: integer factor of the attention network's input (3).
        scorer, scorer_options: the attention network (SCORERS; "dps" is the ATS one).
        backbone, backbone_options: feature network (ATS traffic: "ats_resnet").
        head_hidden: optional Dense + swish before each classifier: a width or "same" (ATS: none).
        attention_smoothing: attention = (1 - s) softmax + s / N (ATS: 1e-4).
        entropy_strength: ATS's convention, the loss gets -strength * H(attention): a positive
            strength rewards entropy (ATS speed limits: 1e-4). Not DPS's `entropy_coef`.
        attention_l2: the loss gets attention_l2 * sum(w^2) over the kernels of the attention
            network's convolutions but the last (no biases), as Keras's kernel_regularizer=l2(...)
            on ATS's speed-limits attention net (1e-5); a term of the loss, so Adam and the
            gradient clipping see it, unlike decoupled weight decay.
        sample_at_inference: draw K patches at eval too, as ATS does; False takes the top-K.
        normalize_features: L2-normalise each patch feature before the expectation (ATS's
            feature nets end with L2Normalize).
        coord_channels: append x and y coordinate channels to the image, seen by both the
            attention and the feature network (DPS "ATS + concat. position").
    """

    def __init__(self, *, tasks: dict[str, TaskSpec], in_chans: int = 3, patch_size: int = 100, k: int = 5,
                 downscale: int = 3, scorer: str = "dps", scorer_options: dict[str, Any] | None = None,
                 backbone: str = "ats_resnet", backbone_options: dict[str, Any] | None = None,
                 head_hidden: int | str | None = None, attention_smoothing: float = 1e-4, entropy_strength: float = 0.0,
                 attention_l2: float = 0.0, sample_at_inference: bool = True, normalize_features: bool = False,
                 coord_channels: bool = False):
        super().__init__()
        self.in_chans = in_chans  # every batch is checked against it (ImageBatch)
        if not 0.0 <= attention_smoothing < 1.0:
            raise ConfigError(f"ats: attention_smoothing={attention_smoothing!r} must be in [0, 1) (ATS: 1e-4)")
        if not 0.0 <= attention_l2 < float("inf"):
            raise ConfigError(f"ats: attention_l2={attention_l2!r} must be a finite number >= 0 (ATS speed limits: "
                              f"1e-5; 0 = off)")
        self.coord_channels = coord_channels
        in_chans = in_chans + 2 * coord_channels
        self.patch_size, self.k, self.downscale = patch_size, k, downscale
        self.attention_smoothing, self.entropy_strength, self.attention_l2 = (attention_smoothing, entropy_strength,
                                                                               attention_l2)
        self.sample_at_inference, self.normalize_features = sample_at_inference, normalize_features
        self.scorer = build_scorer(scorer, in_chans=in_chans, **(scorer_options or {}))
        self.backbone = build_backbone(backbone, in_chans=in_chans, **(backbone_options or {}))
        self.heads = TaskHeads(tasks=tasks, in_dim=self.backbone.out_dim, hidden_dim=head_hidden)

    def forward(self, images, tissue=None) -> PipelineOutput:
        """`tissue`: None or one mask per image; the attention is zero (never drawn) off tissue."""
        if self.coord_channels:
            check_channels(images, in_chans=self.in_chans)  # named before the 2 position channels join
            images = with_coordinate_channels(images)
        batch = ImageBatch(images, device=next(self.parameters()).device,
                           in_chans=self.in_chans + 2 * self.coord_channels)
        grid = self.scorer(batch.downscaled(self.downscale))  # (B, rows, cols)
        geometry = GridGeometry.centred(batch.image_hw, tuple(grid.shape[1:]), patch_size=self.patch_size)
        attention = smoothed_attention(grid.flatten(1), self.attention_smoothing)  # (B, N)
        candidates = candidate_masks(tissue, geometry, batch_size=batch.batch_size, image_wh=batch.image_hw[::-1],
                                     min_count=self.k, device=attention.device)
        attention = restrict_attention(attention, candidates)
        if self.training or self.sample_at_inference:
            drawn = sample_without_replacement(attention, self.k)  # (B, K), draw order
        else:
            drawn = attention.detach().topk(self.k, dim=1).indices
        patches = batch.gather(geometry, drawn)  # (B, K, C, p, p)
        b, k = drawn.shape
        features = self.backbone(patches.flatten(0, 1)).view(b, k, -1)  # (B, K, D)
        if self.normalize_features:
            features = F.normalize(features, dim=-1)
        pooled = expectation_without_replacement(attention, features, drawn)  # (B, D)
        return PipelineOutput(logits=self.heads(pooled[:, None]), indices=drawn.sort(dim=1).values,
                              scores=nan_outside(attention.detach(), candidates),
                              aux_loss=_sum_or_none(self.entropy_loss(attention), self.l2_loss()),
                              stats={"patches_scored": float(geometry.num_patches)})

    def entropy_loss(self, attention: torch.Tensor) -> torch.Tensor | None:
        """ATS's regulariser -strength * H(attention) while training; None otherwise."""
        if not (self.training and self.entropy_strength):
            return None
        return -self.entropy_strength * attention_entropy(attention)

    def l2_loss(self) -> torch.Tensor | None:
        """ATS's l2 on the attention network's hidden kernels, attention_l2 * sum(w^2), while training; or None."""
        if not (self.training and self.attention_l2):
            return None
        return self.attention_l2 * sum(w.pow(2).sum() for w in self.scorer.hidden_kernels())


def _sum_or_none(*terms: torch.Tensor | None) -> torch.Tensor | None:
    present = [t for t in terms if t is not None]
    return sum(present[1:], present[0]) if present else None

"""ATS baseline (Katharopoulos & Fleuret, ICML 2019): attention sampling without replacement.

The scorer's softmax over the grid of a downscaled image is an attention distribution;
K patches are drawn without replacement, encoded at full resolution, and averaged with
the unbiased estimator weights (`hrsel.select.ats`). Inference takes the K most attended
patches, in order of attention, through the same estimator.
"""
from __future__ import annotations

from typing import Any

import torch

from hrsel.models.backbones import build_backbone
from hrsel.models.heads import TaskHeads
from hrsel.models.patches import ImageBatch, with_coordinate_channels
from hrsel.models.pipeline import Pipeline, PipelineOutput
from hrsel.models.scorers import build_scorer
from hrsel.select import entropy_regularizer
from hrsel.select.ats import expectation_without_replacement, sample_without_replacement
from hrsel.select.extract import GridGeometry
from hrsel.tasks import TaskSpec


class ATSPipeline(Pipeline):
    """Attention sampling: softmax attention, K draws without replacement, unbiased mean.

    Keyword-only options:
        tasks: task name -> TaskSpec.
        in_chans: image channels.
        patch_size: full-resolution patch centred on each attention cell (100).
        k: patches sampled (5). downscale: integer factor of the attention network's input (3).
        scorer, scorer_options: the attention network (SCORERS; "dps" is the ATS one).
        backbone, backbone_options: feature network (ATS traffic: "narrow_resnet").
        head_hidden: optional Dense + swish before each classifier.
        entropy_coef: coef * H(attention) added to the loss (ATS regularises the entropy).
        sample_at_inference: draw at eval too instead of taking the top-K.
        coord_channels: append x and y coordinate channels to the image, seen by both the
            attention and the feature network (DPS "ATS + concat. position").
    """

    def __init__(self, *, tasks: dict[str, TaskSpec], in_chans: int = 3, patch_size: int = 100, k: int = 5,
                 downscale: int = 3, scorer: str = "dps", scorer_options: dict[str, Any] | None = None,
                 backbone: str = "narrow_resnet", backbone_options: dict[str, Any] | None = None,
                 head_hidden: int | None = None, entropy_coef: float = 0.0, sample_at_inference: bool = False,
                 coord_channels: bool = False):
        super().__init__()
        self.coord_channels = coord_channels
        in_chans = in_chans + 2 * coord_channels
        self.patch_size, self.k, self.downscale = patch_size, k, downscale
        self.entropy_coef, self.sample_at_inference = entropy_coef, sample_at_inference
        self.scorer = build_scorer(scorer, in_chans=in_chans, **(scorer_options or {}))
        self.backbone = build_backbone(backbone, in_chans=in_chans, **(backbone_options or {}))
        self.heads = TaskHeads(tasks=tasks, in_dim=self.backbone.out_dim, hidden_dim=head_hidden)

    def forward(self, images) -> PipelineOutput:
        if self.coord_channels:
            images = with_coordinate_channels(images)
        batch = ImageBatch(images, device=next(self.parameters()).device)
        grid = self.scorer(batch.downscaled(self.downscale))  # (B, rows, cols)
        geometry = GridGeometry.centred(batch.image_hw, tuple(grid.shape[1:]), patch_size=self.patch_size)
        logits_a = grid.flatten(1)
        attention = torch.softmax(logits_a, dim=1)  # (B, N)
        if self.training or self.sample_at_inference:
            drawn = sample_without_replacement(attention, self.k)  # (B, K), draw order
        else:
            drawn = attention.detach().topk(self.k, dim=1).indices
        patches = batch.gather(geometry, drawn)  # (B, K, C, p, p)
        b, k = drawn.shape
        features = self.backbone(patches.flatten(0, 1)).view(b, k, -1)
        pooled = expectation_without_replacement(attention, features, drawn)  # (B, D)
        aux = self.entropy_coef * entropy_regularizer(logits_a) if self.training and self.entropy_coef else None
        return PipelineOutput(logits=self.heads(pooled[:, None]), indices=drawn.sort(dim=1).values,
                              scores=attention.detach(), aux_loss=aux,
                              stats={"patches_scored": float(geometry.num_patches)})

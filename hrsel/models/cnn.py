"""The full-image CNN baseline: the backbone on the whole (optionally downscaled) image."""
from __future__ import annotations

from typing import Any

from hrsel.models.backbones import build_backbone
from hrsel.models.heads import TaskHeads
from hrsel.models.patches import ImageBatch, check_channels, with_coordinate_channels
from hrsel.models.pipeline import Pipeline, PipelineOutput
from hrsel.tasks import TaskSpec


class CNNPipeline(Pipeline):
    """Backbone on the whole image, global pooling, one head per task. Memory grows with the image.

    Keyword-only options:
        tasks: task name -> TaskSpec.
        in_chans: image channels.
        downscale: integer block-mean factor applied first (1 = full resolution).
        backbone, backbone_options: name in BACKBONES and options.
        head_hidden: optional Dense + swish before each classifier.
        coord_channels: append x and y coordinate channels to the image (DPS "concat. position").
    """

    def __init__(self, *, tasks: dict[str, TaskSpec], in_chans: int = 3, downscale: int = 1,
                 backbone: str = "resnet18", backbone_options: dict[str, Any] | None = None,
                 head_hidden: int | None = None, coord_channels: bool = False):
        super().__init__()
        self.in_chans = in_chans  # every batch is checked against it (ImageBatch)
        self.downscale, self.coord_channels = downscale, coord_channels
        self.backbone = build_backbone(backbone, in_chans=in_chans + 2 * coord_channels, **(backbone_options or {}))
        self.heads = TaskHeads(tasks=tasks, in_dim=self.backbone.out_dim, hidden_dim=head_hidden)

    def forward(self, images, tissue=None) -> PipelineOutput:
        """`tissue` is accepted for a uniform interface and ignored: the CNN sees the whole image."""
        if self.coord_channels:
            check_channels(images, in_chans=self.in_chans)  # named before the 2 position channels join
            images = with_coordinate_channels(images)
        batch = ImageBatch(images, device=next(self.parameters()).device,
                           in_chans=self.in_chans + 2 * self.coord_channels)
        features = self.backbone(batch.full(downscale=self.downscale))  # (B, D)
        return PipelineOutput(logits=self.heads(features[:, None]))

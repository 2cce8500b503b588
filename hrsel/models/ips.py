"""IPS (Bergner et al., ICLR 2023): iterative top-M patch selection by attention, then learn on M.

1. No grad, eval mode: stream the grid in chunks of I patches, encode them, score buffer
   + chunk with the cross-attention MIL aggregator, keep the top M (`iterative_topm`).
2. With grad, train mode: re-read the M chosen patches, encode and aggregate them.
Peak memory depends on M, I and the patch size, not on the image size.

With `tissue=` (one mask per image, see `hrsel.models.candidates`) only the candidate cells
on tissue are streamed, image by image (each has its own list); the others are never read.

Images may also be bags of pre-extracted patch features ((B, N, D) or a list of (N_i, D),
the IPS CAMELYON16 setup): the "backbone" is then a projector of the features
(`feature_projector`), and bags of different lengths go through the selection one by one.
"""
from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F

from hrsel.errors import ConfigError
from hrsel.models.bags import FeatureBags, is_feature_bags
from hrsel.models.candidates import candidate_masks
from hrsel.models.classifier import PatchClassifier
from hrsel.models.patches import ImageBatch
from hrsel.models.pipeline import Pipeline, PipelineOutput
from hrsel.select.extract import GridGeometry
from hrsel.select.ips import iterative_topm
from hrsel.tasks import TaskSpec

MODES = ("eager", "eager_sequential", "lazy")


class IPSPipeline(Pipeline):
    """Iterative patch selection with a cross-attention MIL aggregator.

    Keyword-only options:
        tasks: task name -> TaskSpec (one attention query per task).
        in_chans: image channels.
        patch_size, stride: the regular patch grid (stride defaults to patch_size).
        num_selected: M, patches kept for the gradient pass (100 MNIST, 10 traffic).
        chunk_size: I, patches encoded per selection step (100 MNIST, 32 traffic).
        backbone, backbone_options: see `PatchClassifier` (IPS MNIST: resnet18 with in_chans=1,
            last_stage="layer2").
        aggregator_options: for "attention": heads (8), head_dim (16), mlp_dim (512), dropout.
        pos_encoding: none | sincos | learned over the raster patch index; num_positions = grid cells.
        head_hidden: optional Dense + swish before each classifier.
        shuffle: break attention ties randomly (IPS shuffles its patches).
        mode: eager (whole batch on the model's device) | eager_sequential (one image at a time
            in the selection pass) | lazy (images stay where they are; chunks move to the device).
    """

    def __init__(self, *, tasks: dict[str, TaskSpec], in_chans: int = 3, patch_size: int = 50,
                 stride: int | None = None, num_selected: int = 100, chunk_size: int = 100,
                 backbone: str = "resnet18", backbone_options: dict[str, Any] | None = None,
                 aggregator_options: dict[str, Any] | None = None, pos_encoding: str = "none",
                 num_positions: int = 0, head_hidden: int | None = None, shuffle: bool = True,
                 mode: str = "lazy"):
        super().__init__()
        self.in_chans = in_chans  # every batch is checked against it (ImageBatch)
        if mode not in MODES:
            raise ConfigError(f"IPS mode {mode!r} is unknown; valid: {', '.join(MODES)}")
        self.patch_size, self.stride = patch_size, stride
        self.num_selected, self.chunk_size, self.shuffle, self.mode = num_selected, chunk_size, shuffle, mode
        self.classifier = PatchClassifier(tasks=tasks, in_chans=in_chans, backbone=backbone,
                                          backbone_options=backbone_options, aggregator="attention",
                                          aggregator_options=aggregator_options, head_hidden=head_hidden,
                                          pos_encoding=pos_encoding, num_positions=num_positions)

    def _score(self, items: torch.Tensor, mask: torch.Tensor, indices: torch.Tensor) -> torch.Tensor:
        return self.classifier.aggregator.attention_scores(items, mask=mask, positions=indices)

    def _logits(self, items: torch.Tensor, mask: torch.Tensor, indices: torch.Tensor) -> torch.Tensor:
        # kept on the host: N x heads x tasks floats would otherwise grow device memory with the image
        return self.classifier.aggregator.attention_logits(items, mask=mask, positions=indices).float().cpu()

    @torch.no_grad()
    def select(self, batch: ImageBatch | FeatureBags, geometry: GridGeometry | None = None,
               cells: torch.Tensor | None = None):
        """The no-grad pass -> TopMResult with indices (B, M) in raster order.

        `all_scores` (B, N) is every patch's attention as if all N were scored in one round:
        the attention logits of a patch do not depend on the set, so they are recorded as each
        chunk arrives (N x heads x tasks floats, on the host) and normalised over all N
        at the end. The selection itself uses the attention over buffer + chunk, as IPS does.
        `cells` (n,): stream only those grid cells (their scores; NaN elsewhere).
        """
        if isinstance(batch, FeatureBags):
            chunks, num_items = batch.chunks(self.chunk_size), batch.sizes[0]
        else:
            chunks = batch.chunks(geometry, self.chunk_size, cells)
            num_items = geometry.num_patches if cells is None else len(cells)
        was_training = self.training
        self.eval()
        try:
            encoded = ((idx, self.classifier.encode(items)) for idx, items in chunks)
            result = iterative_topm(encoded, m=min(self.num_selected, num_items), score_fn=self._score,
                                    record_fn=self._logits, random_ties=self.shuffle and was_training)
            if cells is not None:  # logits (B, n' <= N, H*T) at the cells seen: NaN up to N
                logits = result.all_scores
                result.all_scores = F.pad(logits, (0, 0, 0, geometry.num_patches - logits.shape[1]),
                                          value=float("nan"))
            result.all_scores = self.classifier.aggregator.scores_from_logits(result.all_scores)
            return result
        finally:
            self.train(was_training)

    def _select_one_by_one(self, parts: list[ImageBatch | FeatureBags], geometry: GridGeometry | None = None,
                           cells: list[torch.Tensor] | None = None):
        """Selection image by image -> indices (B, M), mask (B, M), scores (B, max N) NaN-padded."""
        results = [self.select(part, geometry, None if cells is None else cells[i]) for i, part in enumerate(parts)]
        m = max(r.indices.shape[1] for r in results)
        n = max(r.all_scores.shape[1] for r in results)
        indices = torch.cat([F.pad(r.indices, (0, m - r.indices.shape[1]), value=-1) for r in results])
        mask = torch.cat([F.pad(r.mask, (0, m - r.mask.shape[1]), value=False) for r in results])
        scores = torch.cat([F.pad(r.all_scores, (0, n - r.all_scores.shape[1]), value=float("nan"))
                            for r in results])
        return indices, mask, scores

    def _forward_bags(self, bags: FeatureBags) -> PipelineOutput:
        if self.mode == "eager_sequential" or not bags.equal_sizes:
            indices, mask, scores = self._select_one_by_one(bags.split())
        else:
            result = self.select(bags)
            indices, mask, scores = result.indices, result.mask, result.all_scores
        features = bags.gather(indices)  # (B, M, D), with grad from here on
        logits = self.classifier(features, mask=mask, positions=indices)
        return PipelineOutput(logits=logits, indices=indices, scores=scores,
                              stats={"patches_scored": float(sum(bags.sizes)) / bags.batch_size})

    def forward(self, images, tissue=None) -> PipelineOutput:
        """`images`: (B, C, H, W), B lazy sources or feature bags; `tissue`: None or one mask per image."""
        device = next(self.parameters()).device
        if is_feature_bags(images):
            return self._forward_bags(FeatureBags(images, device=device))
        if self.mode == "eager" and isinstance(images, torch.Tensor):
            images = images.to(device)
        batch = ImageBatch(images, device=device, in_chans=self.in_chans)
        geometry = GridGeometry.regular(batch.image_hw, patch_size=self.patch_size, stride=self.stride)
        candidates = candidate_masks(tissue, geometry, batch_size=batch.batch_size, image_wh=batch.image_hw[::-1])
        if candidates is not None or self.mode == "eager_sequential":  # one image at a time through selection
            parts = [ImageBatch(images[i:i + 1], device=device) for i in range(len(images))]
            cells = None if candidates is None else [row.nonzero()[:, 0] for row in candidates]
            indices, mask, scores = self._select_one_by_one(parts, geometry, cells)
        else:
            result = self.select(batch, geometry)
            indices, mask, scores = result.indices, result.mask, result.all_scores
        patches = batch.gather(geometry, indices)  # (B, M, C, p, p), with grad from here on
        logits = self.classifier(patches, mask=mask, positions=indices)
        scored = geometry.num_patches if candidates is None else float(candidates.sum()) / batch.batch_size
        return PipelineOutput(logits=logits, indices=indices, scores=scores,
                              stats={"patches_scored": float(scored)})

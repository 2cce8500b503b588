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

import logging
from typing import Any

import torch
import torch.nn.functional as F

from hrsel.errors import ConfigError
from hrsel.models.bags import FeatureBags, is_feature_bags
from hrsel.models.candidates import candidate_masks
from hrsel.models.classifier import PatchClassifier
from hrsel.models.fastpath import FoldedBackbone, check_score_batch, constant_patches, resolve_score_batch
from hrsel.models.patches import ImageBatch
from hrsel.models.pipeline import Pipeline, PipelineOutput
from hrsel.select.extract import GridGeometry
from hrsel.select.ips import iterative_topm
from hrsel.tasks import TaskSpec

log = logging.getLogger(__name__)

MODES = ("eager", "eager_sequential", "lazy")


class IPSPipeline(Pipeline):
    """Iterative patch selection with a cross-attention MIL aggregator.

    Keyword-only options:
        tasks: task name -> TaskSpec (one attention query per task).
        in_chans: image channels.
        patch_size, stride: the regular patch grid (stride defaults to patch_size).
        k: M, patches kept for the gradient pass (100 MNIST, 10 traffic; formerly num_selected).
        score_chunk: I, patches encoded per selection step (100 MNIST, 32 traffic; formerly chunk_size).
        backbone, backbone_options: see `PatchClassifier` (IPS MNIST: resnet18 with in_chans=1,
            last_stage="layer2").
        aggregator_options: for "attention": heads (8), head_dim (16), mlp_dim (512), dropout.
        pos_encoding: none | sincos | learned over the raster patch index; num_positions = grid cells.
        head_hidden: optional Dense + swish before each classifier.
        shuffle: break attention ties randomly (IPS shuffles its patches).
        mode: eager (whole batch on the model's device) | eager_sequential (one image at a time
            in the selection pass) | lazy (images stay where they are; chunks move to the device).
        score_batch: patches per encoder call in the no-grad pass ("auto": 64 on a CPU, the whole
            chunk on a GPU; see `hrsel.models.fastpath`). Changes the speed, not the selection.
        compile_scorer: `torch.compile` the backbone of the no-grad pass (compiled at the first
            step; the gradient pass runs the plain module, with the same weights).
        skip_blank: a patch of one colour (empty canvas, blank glass) is never selected ahead of
            one with content, as off-tissue cells are not; an image with fewer than M patches with
            content is classified from those alone (from its blank ones only when it has no content
            at all). Off by default: IPS selects among all patches.
    """

    def __init__(self, *, tasks: dict[str, TaskSpec], in_chans: int = 3, patch_size: int = 50,
                 stride: int | None = None, k: int = 100, score_chunk: int = 100,
                 backbone: str = "resnet18", backbone_options: dict[str, Any] | None = None,
                 aggregator_options: dict[str, Any] | None = None, pos_encoding: str = "none",
                 num_positions: int = 0, head_hidden: int | None = None, shuffle: bool = True,
                 mode: str = "lazy", score_batch: int | str | None = "auto", compile_scorer: bool = False,
                 skip_blank: bool = False):
        super().__init__()
        check_score_batch(score_batch)
        self.in_chans = in_chans  # every batch is checked against it (ImageBatch)
        if mode not in MODES:
            raise ConfigError(f"IPS mode {mode!r} is unknown; valid: {', '.join(MODES)}")
        self.patch_size, self.stride = patch_size, stride
        self.k, self.score_chunk, self.shuffle, self.mode = k, score_chunk, shuffle, mode
        self.score_batch, self.compile_scorer, self.skip_blank = score_batch, compile_scorer, skip_blank
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
            chunks, num_items = batch.chunks(self.score_chunk), batch.sizes[0]
        else:
            chunks = batch.chunks(geometry, self.score_chunk, cells)
            num_items = geometry.num_patches if cells is None else len(cells)
        was_training = self.training
        self.eval()
        part = resolve_score_batch(self.score_batch, next(self.parameters()).device)
        try:
            backbone = self._scoring_backbone()
            encoded = ((idx, *self._encode_chunk(items, part, backbone)) for idx, items in chunks)
            result = iterative_topm(encoded, m=min(self.k, num_items), score_fn=self._score,
                                    record_fn=self._logits, random_ties=self.shuffle and was_training)
            if cells is not None:  # logits (B, n' <= N, H*T) at the cells seen: NaN up to N
                logits = result.all_scores
                result.all_scores = F.pad(logits, (0, 0, 0, geometry.num_patches - logits.shape[1]),
                                          value=float("nan"))
            result.all_scores = self.classifier.aggregator.scores_from_logits(result.all_scores)
            return result
        finally:
            self.train(was_training)

    def _encode_chunk(self, items: torch.Tensor, part: int | None,
                      backbone: torch.nn.Module) -> tuple[torch.Tensor, torch.Tensor]:
        """(B, n, C, p, p) patches or (B, n, D) features -> (embeddings (B, n, D'), may be selected (B, n))."""
        if items.dim() != 5:
            encoded = self.classifier.encode_for_scoring(items, part=part, backbone=backbone)
            return encoded, torch.ones(items.shape[:2], dtype=torch.bool, device=items.device)
        fill, constant = constant_patches(items)  # (B, n, C), (B, n): once for both uses
        encoded = self.classifier.encode_for_scoring(items, part=part, backbone=backbone, constant=(fill, constant))
        return encoded, ~constant if self.skip_blank else torch.ones_like(constant)

    def _scoring_backbone(self) -> torch.nn.Module:
        """The backbone for the no-grad pass: BatchNorm folded in (`FoldedBackbone`), maybe compiled.

        Cached outside the module tree (`__dict__`): no second copy in the state dict."""
        backbone = self.classifier.backbone
        cached = self.__dict__.get("_scoring")  # (FoldedBackbone or None, module to call, the backbone)
        if cached is not None and cached[2] is backbone and (cached[0] is None or cached[0].matches(backbone)):
            if cached[0] is not None:
                cached[0].refresh()
            return cached[1]
        try:
            folded = FoldedBackbone(backbone)
        except Exception as error:  # a network torch.fx cannot trace: score with the live one
            log.debug("no BatchNorm folding for %s: %s", type(backbone).__name__, error)
            folded = None
        module = backbone if folded is None else folded.module
        self.__dict__["_scoring"] = (folded, torch.compile(module) if self.compile_scorer else module, backbone)
        return self.__dict__["_scoring"][1]

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
        candidates = candidate_masks(tissue, geometry, batch_size=batch.batch_size, image_wh=batch.image_hw[::-1],
                                     min_count=self.k)
        if candidates is not None or self.mode == "eager_sequential":  # one image at a time through selection
            parts = [ImageBatch(images[i:i + 1], device=device) for i in range(len(images))]
            cells = None if candidates is None else [row.nonzero()[:, 0] for row in candidates]
            indices, mask, scores = self._select_one_by_one(parts, geometry, cells)
        else:
            result = self.select(batch, geometry)
            indices, mask, scores = result.indices, result.mask, result.all_scores
        if self.skip_blank:  # an image without content: its blank patches after all
            mask = mask | (~mask.any(dim=1, keepdim=True) & (indices >= 0))
        patches = batch.gather(geometry, indices)  # (B, M, C, p, p), with grad from here on
        logits = self.classifier(patches, mask=mask, positions=indices)
        scored = geometry.num_patches if candidates is None else float(candidates.sum()) / batch.batch_size
        return PipelineOutput(logits=logits, indices=indices, scores=scores,
                              stats={"patches_scored": float(scored)})

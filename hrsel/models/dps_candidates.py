"""DPS with IPS-style candidates: memory independent of the image size.

1. No grad: stream the patch grid in chunks, score every patch with the scorer (on the
   patch downscaled by `downscale`), keep the top C candidates (`iterative_topm`).
2. With grad: re-read the C candidates, re-score them, run perturbed top-K over the C
   candidates only, and mix the K soft patches from the C candidate patches. The
   positional encoding reads the same soft indicators over the candidates' grid cells
   (`SoftCells`), so positions pass gradient to the scores as in `hrsel.models.dps`.

With `tissue=` (one mask per image) step 1 streams only the cells on tissue, image by image
(each image has its own list, so each keeps its own C <= its tissue cells; shorter lists are
padded with absent candidates that the selector never picks).
"""
from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F

from hrsel.models.aggregators import SoftCells
from hrsel.models.candidates import candidate_masks
from hrsel.models.classifier import PatchClassifier
from hrsel.models.dps import SoftTopK
from hrsel.models.patches import ImageBatch, host_to_device
from hrsel.models.pipeline import Pipeline, PipelineOutput
from hrsel.models.scorers import build_scorer
from hrsel.select import entropy_regularizer
from hrsel.select.extract import GridGeometry, grid_chunk
from hrsel.select.ips import TopMResult, iterative_topm
from hrsel.tasks import TaskSpec


class DPSCandidatesPipeline(Pipeline):
    """DPS whose perturbed top-K runs over C streamed candidates instead of the whole grid.

    Keyword-only options:
        tasks: task name -> TaskSpec.
        in_chans: image channels.
        patch_size, stride: the regular patch grid (stride defaults to patch_size).
        k: patches selected; num_candidates: C >= k kept by the no-grad pass (4k by default).
        score_chunk: patches scored per no-grad step (256).
        downscale: integer factor applied to each patch before the scorer (4; formerly score_downscale).
        scorer, scorer_options: name in SCORERS and options (each patch gets one score,
            the max of its score map).
        selector, num_samples, sigma, sigma_schedule, sigma_final, sinkhorn_epsilon,
        sinkhorn_iterations, inference_selector: see `hrsel.models.dps.SoftTopK`.
        entropy_coef: coef * H(softmax(candidate scores)) added to the loss.
        backbone, backbone_options, aggregator, aggregator_options, head_hidden: see `PatchClassifier`.
        pos_encoding, num_positions: positional table over grid cells: while training (soft
            selection) the K indicators over the C candidates weight their cells' rows, as DPS
            weights the table by its (B, K, N) indicators; with hard selection, each patch's cell.
    """

    def __init__(self, *, tasks: dict[str, TaskSpec], in_chans: int = 3, patch_size: int = 100,
                 stride: int | None = None, k: int = 10, num_candidates: int | None = None, score_chunk: int = 256,
                 downscale: int = 4, scorer: str = "dps", scorer_options: dict[str, Any] | None = None,
                 selector: str = "perturbed", num_samples: int = 500, sigma: float = 0.05,
                 sigma_schedule: str = "linear", sigma_final: float = 0.0, sinkhorn_epsilon: float = 1e-1,
                 sinkhorn_iterations: int = 200, inference_selector: str = "hard", entropy_coef: float = 0.0,
                 backbone: str = "resnet18",
                 backbone_options: dict[str, Any] | None = None, aggregator: str = "mean",
                 aggregator_options: dict[str, Any] | None = None, head_hidden: int | None = None,
                 pos_encoding: str = "none", num_positions: int = 0):
        super().__init__()
        self.in_chans = in_chans  # every batch is checked against it (ImageBatch)
        self.patch_size, self.stride, self.k = patch_size, stride, k
        self.num_candidates = num_candidates if num_candidates is not None else 4 * k
        if self.num_candidates < k:
            raise ValueError(f"num_candidates={self.num_candidates} must be >= k={k}")
        self.score_chunk, self.downscale, self.entropy_coef = score_chunk, downscale, entropy_coef
        self.scorer = build_scorer(scorer, in_chans=in_chans, **(scorer_options or {}))
        self.select = SoftTopK(k=k, selector=selector, num_samples=num_samples, sigma=sigma,
                               sigma_schedule=sigma_schedule, sigma_final=sigma_final,
                               sinkhorn_epsilon=sinkhorn_epsilon, sinkhorn_iterations=sinkhorn_iterations,
                               inference_selector=inference_selector)
        self.classifier = PatchClassifier(tasks=tasks, in_chans=in_chans, backbone=backbone,
                                          backbone_options=backbone_options, aggregator=aggregator,
                                          aggregator_options=aggregator_options, head_hidden=head_hidden,
                                          pos_encoding=pos_encoding, num_positions=num_positions)

    def set_progress(self, step: int, total_steps: int) -> None:
        self.select.set_progress(step, total_steps)

    def score_patches(self, patches: torch.Tensor) -> torch.Tensor:
        """(B, n, C, p, p) -> (B, n) one raw score per patch."""
        b, n = patches.shape[:2]
        small = F.avg_pool2d(patches.flatten(0, 1), self.downscale)  # (B*n, C, p/d, p/d)
        return self.scorer(small, grid_shape=(1, 1)).view(b, n)

    def score_small(self, small: torch.Tensor) -> torch.Tensor:
        """(B, n, C, p/d, p/d) patches already downscaled -> (B, n) raw scores."""
        b, n = small.shape[:2]
        return self.scorer(small.flatten(0, 1), grid_shape=(1, 1)).view(b, n)

    @torch.no_grad()
    def _stream(self, batch: ImageBatch, geometry: GridGeometry, cells: torch.Tensor | None = None) -> TopMResult:
        """The no-grad pass over the grid (or only `cells`) -> the top C, all_scores (B, N) NaN where unseen."""
        c = min(self.num_candidates, geometry.num_patches if cells is None else len(cells))
        pooled = None if cells is not None else pooled_grid(batch, geometry, self.downscale)
        if pooled is None:
            chunks = ((idx, self.score_patches(p)) for idx, p in batch.chunks(geometry, self.score_chunk, cells))
        else:  # each patch's downscaled view sliced from the image downscaled once
            chunks = ((idx, self.score_small(p)) for idx, p in pooled_chunks(*pooled, self.score_chunk, batch))
        found = iterative_topm(chunks, m=c, score_fn=lambda items, mask, idx: items, record_scores=True)
        found.all_scores = F.pad(found.all_scores, (0, geometry.num_patches - found.all_scores.shape[1]),
                                 value=float("nan"))
        return found

    def _stream_one_by_one(self, images, geometry: GridGeometry, on_tissue: torch.Tensor) -> TopMResult:
        """`_stream` image by image over its own (B, N) candidate cells; C padded with absent slots (-1)."""
        device = next(self.parameters()).device
        parts = [self._stream(ImageBatch(images[i:i + 1], device=device), geometry, row.nonzero()[:, 0])
                 for i, row in enumerate(on_tissue)]
        c = max(part.indices.shape[1] for part in parts)
        pad = [c - part.indices.shape[1] for part in parts]
        return TopMResult(indices=torch.cat([F.pad(r.indices, (0, n), value=-1) for r, n in zip(parts, pad)]),
                          items=torch.cat([F.pad(r.items, (0, n)) for r, n in zip(parts, pad)]),
                          scores=torch.cat([F.pad(r.scores, (0, n), value=float("-inf")) for r, n in zip(parts, pad)]),
                          mask=torch.cat([F.pad(r.mask, (0, n), value=False) for r, n in zip(parts, pad)]),
                          all_scores=torch.cat([r.all_scores for r in parts]))

    def forward(self, images, tissue=None) -> PipelineOutput:
        """`tissue`: None or one mask per image; only cells on tissue are streamed and selected."""
        batch = ImageBatch(images, device=next(self.parameters()).device, in_chans=self.in_chans)
        geometry = GridGeometry.regular(batch.image_hw, patch_size=self.patch_size, stride=self.stride)
        on_tissue = candidate_masks(tissue, geometry, batch_size=batch.batch_size, image_wh=batch.image_hw[::-1],
                                    min_count=self.k)
        found = self._stream(batch, geometry) if on_tissue is None else self._stream_one_by_one(images, geometry,
                                                                                              on_tissue)
        candidates = batch.gather(geometry, found.indices)  # (B, C, ch, p, p)
        scores = self.score_patches(candidates)  # (B, C), with grad
        real = None if bool(found.mask.all()) else found.mask  # padded slots (-1) are never selected
        indicators, picked = self.select(scores, real)
        if indicators is None:
            patches = candidates.gather(1, picked[:, :, None, None, None].expand(-1, -1, *candidates.shape[2:]))
        else:
            patches = torch.einsum("bkc,bcxyz->bkxyz", indicators.to(candidates.dtype), candidates)
        indices = found.indices.gather(1, picked)  # (B, K) grid indices of the (arg-max) selection
        positions = indices if indicators is None else SoftCells(cells=found.indices, weights=indicators)
        logits = self.classifier(patches, positions=positions)
        aux = None
        if self.training and self.entropy_coef:
            aux = self.entropy_coef * entropy_regularizer(scores)
        return PipelineOutput(logits=logits, indices=indices, scores=found.all_scores, aux_loss=aux,
                              stats={"sigma": self.select.sigma, "patches_scored": float(
                                  geometry.num_patches if on_tissue is None else on_tissue.sum() / batch.batch_size)})


def pooled_grid(batch: ImageBatch, geometry: GridGeometry, factor: int):
    """(the in-memory images downscaled once (B, C, H'/d, W'/d), the grid on them, its offset), or None.

    Exact when every patch starts on the pooling grid (stride, padding and offset multiples of
    `factor`): a patch's d x d blocks are then blocks of the downscaled image, and overlapping
    patches (DPS with candidates: stride 24, patch 100) are not pooled again for each overlap.
    Lazy sources and other grids: None (patches are pooled one by one).
    """
    if batch.is_lazy:
        return None
    top = [geometry.padding[i] if geometry.padding[i] >= 0 else -geometry.padding[i] for i in (0, 1)]
    if any(v % factor for v in (*geometry.stride, *top)):
        return None
    padded, (oy, ox) = geometry.pad_image(batch.tensor)
    height, band = padded.shape[2] // factor * factor, 64 * factor  # float in bands: O(band) beside the image
    small = torch.cat([F.avg_pool2d(batch._to_float(host_to_device(padded[:, :, y:min(y + band, height)],
                                                                    batch.device)), factor)
                       for y in range(0, height, band)], dim=2)  # (B, C, H'/d, W'/d)
    grid = GridGeometry(geometry.patch_size // factor, (geometry.stride[0] // factor, geometry.stride[1] // factor),
                        (geometry.padding[0] // factor, geometry.padding[1] // factor), geometry.shape)
    return small, grid, (oy // factor, ox // factor)


def pooled_chunks(small: torch.Tensor, grid: GridGeometry, offset: tuple[int, int], chunk_size: int,
                  batch: ImageBatch):
    """Yields (indices (B, n), downscaled patches (B, n, C, p/d, p/d)) in raster order, as `ImageBatch.chunks`."""
    for start in range(0, grid.num_patches, chunk_size):
        stop = min(start + chunk_size, grid.num_patches)
        idx = torch.arange(start, stop, device=small.device).expand(batch.batch_size, -1)
        yield idx, grid_chunk(small, grid, offset, start, stop)

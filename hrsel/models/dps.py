"""DPS (Cordonnier et al., CVPR 2021): score a downscaled image, select K patches differentiably.

Training: perturbed top-K (or Sinkhorn) over all grid cells gives (B, K, N) indicators;
the K soft patches are indicator-weighted sums of all full-resolution patches, computed
by streaming extraction (memory O(K x patch + chunk x patch), not O(N x patch)).
Inference (and selector "hard"): hard top-K and plain gathers.
"""
from __future__ import annotations

from typing import Any

import torch

from hrsel.errors import ConfigError
from hrsel.models.candidates import candidate_masks, exclude, nan_outside, restrict_below, restrict_normalized
from hrsel.models.classifier import PatchClassifier
from hrsel.models.heads import TaskHeads, task_loss
from hrsel.models.patches import ImageBatch
from hrsel.models.pipeline import Pipeline, PipelineOutput
from hrsel.models.scorers import build_scorer
from hrsel.select import (build_sigma_schedule, entropy_regularizer, hard_topk, normalize_scores,
                          perturbed_topk, sinkhorn_topk)
from hrsel.select.extract import GridGeometry, streaming_soft_extract
from hrsel.tasks import TaskSpec

SELECTORS = ("perturbed", "sinkhorn", "hard")


class SoftTopK(torch.nn.Module):
    """The differentiable selector of DPS, its sigma schedule and its settings.

    Args:
        k: patches to select.
        selector: perturbed | sinkhorn | hard (hard: no gradient to the scorer).
        num_samples: perturbations S (500). sigma: initial noise (0.05).
        sigma_schedule: constant | linear | cosine (DPS: linear to sigma_final = 0).
        sigma_final: sigma at the end of training.
        sinkhorn_epsilon, sinkhorn_iterations: for selector "sinkhorn"; epsilon in the DPS JAX
            convention (anchors 0..k; JAX traffic: 1e-4, 2000). Default 0.1 = the former 1e-2 with
            anchors at j/k, at k = 10.
        inference_selector: "hard" (DPS: hard top-K at inference) or "soft" (keep the
            training selector at inference, as in the supplement's ablations).
    """

    def __init__(self, *, k: int, selector: str = "perturbed", num_samples: int = 500, sigma: float = 0.05,
                 sigma_schedule: str = "linear", sigma_final: float = 0.0, sinkhorn_epsilon: float = 1e-1,
                 sinkhorn_iterations: int = 200, inference_selector: str = "hard"):
        super().__init__()
        if selector not in SELECTORS:
            raise ConfigError(f"selector {selector!r} is unknown; valid: {', '.join(SELECTORS)}")
        if inference_selector not in ("hard", "soft"):
            raise ConfigError(f"inference_selector {inference_selector!r} is unknown; valid: hard, soft")
        self.inference_selector = inference_selector
        self.k, self.selector, self.num_samples = k, selector, num_samples
        self.sigma0, self.sigma, self.sigma_final, self.schedule_kind = sigma, sigma, sigma_final, sigma_schedule
        self.epsilon, self.iterations = sinkhorn_epsilon, sinkhorn_iterations
        build_sigma_schedule(sigma_schedule, sigma=sigma, total_steps=1, final=sigma_final)  # validate early

    def set_progress(self, step: int, total_steps: int) -> None:
        schedule = build_sigma_schedule(self.schedule_kind, sigma=self.sigma0, total_steps=max(1, total_steps),
                                        final=self.sigma_final)
        self.sigma = float(schedule(step))

    def forward(self, scores: torch.Tensor,
                candidates: torch.Tensor | None = None) -> tuple[torch.Tensor | None, torch.Tensor]:
        """(B, N) raw scores -> (indicators (B, K, N) or None when hard, indices (B, K) in raster order).

        `candidates` (B, N) bool: only those cells can be selected (each row needs >= K of them);
        the perturbed selector normalises over the candidates, Sinkhorn puts the others one
        candidate range below (`hrsel.models.candidates`).
        """
        if self.selector == "hard" or (not self.training and self.inference_selector == "hard"):
            return None, hard_topk(exclude(scores.detach(), candidates), self.k)
        if self.selector == "sinkhorn":
            y = sinkhorn_topk(scores if candidates is None else restrict_below(scores, candidates), self.k,
                              self.epsilon, self.iterations)
        else:
            normalized = normalize_scores(scores) if candidates is None else restrict_normalized(scores, candidates)
            y = perturbed_topk(normalized, self.k, self.sigma, self.num_samples)
        return y, y.detach().argmax(dim=-1)


class DPSPipeline(Pipeline):
    """DPS, exact: perturbed top-K over every cell of the scorer's grid.

    Keyword-only options:
        tasks: task name -> TaskSpec.
        in_chans: image channels (3).
        patch_size: full-resolution patch side, centred on each score cell (100).
        k: patches selected (10). downscale: integer factor of the scorer's input (4).
        scorer, scorer_options: name in SCORERS ("dps", "se", "resnet_stem") and options.
        selector, num_samples, sigma, sigma_schedule, sigma_final, sinkhorn_epsilon,
        sinkhorn_iterations, inference_selector: see `SoftTopK`.
        entropy_coef: adds coef * H(softmax(scores)) to the loss; DPS configs use -0.01 (a bonus).
        backbone, backbone_options, aggregator, aggregator_options, head_hidden: see `PatchClassifier`
            ("concat" gets num_patches = k; head_hidden "same" = Dense(D) + swish, DPS).
        pos_encoding: none | learned | sincos | dense (DPS: Dense(indicators) with bias); the soft
            indicators weight the table, needs num_positions = number of score cells.
        num_positions: grid cells, for the positional table.
        extract_chunk: grid patches read per step of the streaming extraction (64).
        feature_dropout: dropout on the patch (and whole-image) features (DPS CUB: 0.5).
        global_branch: also encode the whole image (downscaled by `global_downscale`) with the
            same backbone and merge its feature with the aggregated one (`global_merge`: add =
            DPS "[Mean]", mean of parts + whole; concat = NTS-Net / DPS "[Concat]").
        global_aux_loss: with global_branch, add NTS-Net's cross-entropies of a linear head on
            the whole-image feature and of one on each part feature (DPS JAX CUB loss).
    """

    def __init__(self, *, tasks: dict[str, TaskSpec], in_chans: int = 3, patch_size: int = 100, k: int = 10,
                 downscale: int = 4, scorer: str = "dps", scorer_options: dict[str, Any] | None = None,
                 selector: str = "perturbed", num_samples: int = 500, sigma: float = 0.05,
                 sigma_schedule: str = "linear", sigma_final: float = 0.0, sinkhorn_epsilon: float = 1e-1,
                 sinkhorn_iterations: int = 200, inference_selector: str = "hard", entropy_coef: float = 0.0,
                 backbone: str = "resnet18",
                 backbone_options: dict[str, Any] | None = None, aggregator: str = "mean",
                 aggregator_options: dict[str, Any] | None = None, head_hidden: int | str | None = None,
                 pos_encoding: str = "none", num_positions: int = 0, extract_chunk: int = 64,
                 feature_dropout: float = 0.0, global_branch: bool = False, global_merge: str = "add",
                 global_downscale: int = 1, global_aux_loss: bool = False):
        super().__init__()
        self.in_chans = in_chans  # every batch is checked against it (ImageBatch)
        self.patch_size, self.downscale, self.entropy_coef = patch_size, downscale, entropy_coef
        self.extract_chunk, self.global_downscale = extract_chunk, global_downscale
        if global_aux_loss and not global_branch:
            raise ConfigError("global_aux_loss needs the whole-image branch: set model.global_branch=true "
                              "or model.global_aux_loss=false")
        self.scorer = build_scorer(scorer, in_chans=in_chans, **(scorer_options or {}))
        self.select = SoftTopK(k=k, selector=selector, num_samples=num_samples, sigma=sigma,
                               sigma_schedule=sigma_schedule, sigma_final=sigma_final,
                               sinkhorn_epsilon=sinkhorn_epsilon, sinkhorn_iterations=sinkhorn_iterations,
                               inference_selector=inference_selector)
        self.classifier = PatchClassifier(tasks=tasks, in_chans=in_chans, backbone=backbone,
                                          backbone_options=backbone_options, aggregator=aggregator,
                                          aggregator_options=aggregator_options, head_hidden=head_hidden,
                                          pos_encoding=pos_encoding, num_positions=num_positions, num_patches=k,
                                          feature_dropout=feature_dropout,
                                          global_merge=global_merge if global_branch else None)
        self.global_branch = global_branch
        self.aux_heads = None
        if global_aux_loss:  # NTS-Net's raw (whole-image) and part heads, linear as in the JAX code
            width = self.classifier.backbone.out_dim
            self.aux_heads = torch.nn.ModuleDict({"whole": TaskHeads(tasks=tasks, in_dim=width),
                                                  "part": TaskHeads(tasks=tasks, in_dim=width)})

    def set_progress(self, step: int, total_steps: int) -> None:
        self.select.set_progress(step, total_steps)

    def score(self, batch: ImageBatch) -> tuple[torch.Tensor, GridGeometry]:
        """Raw scores (B, N) over the scorer's grid and the full-resolution geometry of that grid."""
        grid = self.scorer(batch.downscaled(self.downscale))  # (B, rows, cols)
        geometry = GridGeometry.centred(batch.image_hw, tuple(grid.shape[1:]), patch_size=self.patch_size)
        return grid.flatten(1), geometry

    def forward(self, images, tissue=None) -> PipelineOutput:
        """`tissue`: None or one mask per image; cells off tissue are scored but never selected."""
        batch = ImageBatch(images, device=next(self.parameters()).device, in_chans=self.in_chans)
        scores, geometry = self.score(batch)
        candidates = candidate_masks(tissue, geometry, batch_size=batch.batch_size, image_wh=batch.image_hw[::-1],
                                     min_count=self.select.k, device=scores.device)
        indicators, indices = self.select(scores, candidates)
        if indicators is None:
            patches, positions = batch.gather(geometry, indices), indices
        else:
            def read_chunk(_image, start: int, stop: int) -> torch.Tensor:
                return batch.chunk(geometry, start, stop)

            patches = streaming_soft_extract(indicators, read_chunk, num_patches=geometry.num_patches,
                                             chunk_size=self.extract_chunk)
            positions = indicators
        logits, extras = self.classify(batch, patches, positions)
        aux = None
        if self.training and self.entropy_coef:
            aux = self.entropy_coef * entropy_regularizer(scores)
        return PipelineOutput(logits=logits, indices=indices, scores=nan_outside(scores.detach(), candidates),
                              aux_loss=aux, extras=extras,
                              stats={"sigma": self.select.sigma, "patches_scored": float(geometry.num_patches)})

    def classify(self, batch: ImageBatch, patches: torch.Tensor,
                 positions: torch.Tensor) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
        """Patches (B, K, C, p, p) -> (logits, extras: the NTS-Net auxiliary logits when trained with them)."""
        if not self.global_branch:
            return self.classifier(patches, positions=positions), {}
        features = self.classifier.encode(patches)  # (B, K, D)
        whole = self.classifier.encode(batch.full(downscale=self.global_downscale)[:, None])[:, 0]  # (B, D)
        logits = self.classifier.classify(features, positions=positions, whole=whole)
        extras = {}
        if self.aux_heads is not None and self.training:
            b, k = features.shape[:2]
            parts = self.aux_heads["part"](features.flatten(0, 1)[:, None])  # task -> (B * K, C)
            for name, raw in self.aux_heads["whole"](whole[:, None]).items():
                extras[f"whole_logits/{name}"] = raw  # (B, C)
                extras[f"part_logits/{name}"] = parts[name].view(b, k, -1)  # (B, K, C)
        return logits, extras

    def auxiliary_loss(self, out: PipelineOutput, targets: dict[str, torch.Tensor]) -> torch.Tensor:
        """The entropy term, plus NTS-Net's whole-image and per-part cross-entropies (global_aux_loss)."""
        loss = super().auxiliary_loss(out, targets)
        if self.aux_heads is None or not out.extras:
            return loss
        for name, spec in self.aux_heads["whole"].tasks.items():
            parts = out.extras[f"part_logits/{name}"]  # (B, K, C)
            target = targets[name]
            loss = loss + task_loss(out.extras[f"whole_logits/{name}"], target, spec).mean()
            loss = loss + task_loss(parts.flatten(0, 1), target.repeat_interleave(parts.shape[1], dim=0), spec).mean()
        return loss

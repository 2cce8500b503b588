"""Candidate cells: the grid cells a pipeline may score and select, from per-image tissue masks.

Pipelines do not compute masks: they receive one mask per image (`tissue=[TissueMask, ...]`,
e.g. `hrsel.tiling.tissue.TissueMask` attached by a data set with `data.tissue: true`), ask it
which cells of their grid are candidates (tissue fraction >= the mask's `min_fraction`, i.e.
`data.min_tissue_fraction`) and then

- stream only those cells (IPS, DPS with candidates; images one at a time, since each has its
  own list), or
- keep scoring the whole (downscaled) grid but never select a non-candidate cell (DPS, ATS,
  PatchDrop: `exclude` / `restrict_*`).

The recorded score map is NaN outside the candidates. An image with fewer candidates than a
pipeline must select (K) falls back to every cell, with a warning naming it.
"""
from __future__ import annotations

import logging
from typing import Any, Sequence

import numpy as np
import torch

from hrsel.errors import SelectionError
from hrsel.select.extract import GridGeometry

log = logging.getLogger(__name__)

FAR = 1e3  # below every min-max normalised score by far more than any perturbation noise


def cell_corners(geometry: GridGeometry) -> np.ndarray:
    """(N, 2) int64 (x, y) top-left corners of every cell's patch, in image pixels."""
    return geometry.top_left(torch.arange(geometry.num_patches)).flip(-1).numpy()


def candidate_masks(tissue: Sequence[Any] | None, geometry: GridGeometry, *, batch_size: int,
                    image_wh: tuple[int, int] | None = None, min_count: int = 1,
                    device: torch.device | str = "cpu") -> torch.Tensor | None:
    """(B, N) bool candidate cells, or None when there are no masks (every cell is a candidate).

    `tissue`: one mask per image (None entries: every cell). `image_wh` (width, height) is checked
    against each mask's `image_size`. Rows with fewer than `min_count` candidates keep every cell.
    """
    if tissue is None or all(t is None for t in tissue):
        return None
    tissue = list(tissue)
    if len(tissue) != batch_size:
        raise SelectionError(f"tissue= holds {len(tissue)} mask(s) for a batch of {batch_size} image(s); "
                             "pass one mask (or None) per image")
    corners = cell_corners(geometry)
    rows = []
    for i, mask in enumerate(tissue):
        if mask is None:
            rows.append(np.ones(geometry.num_patches, dtype=bool))
            continue
        if image_wh is not None and tuple(mask.image_size) != tuple(image_wh):
            raise SelectionError(f"the tissue mask of image {i} of the batch covers an image of (width, height) "
                                 f"{tuple(mask.image_size)}, the image is {tuple(image_wh)}: the mask was made for "
                                 "another image or level; recompute it (delete its cache file)")
        keep = mask.candidates(corners, geometry.patch_size)
        if int(keep.sum()) < min_count:
            log.warning("image %d of the batch has %d candidate cell(s) on tissue, fewer than the %d to select: "
                        "every cell stays a candidate (lower data.min_tissue_fraction or the patch size)",
                        i, int(keep.sum()), min_count)
            keep = np.ones_like(keep)
        rows.append(keep)
    return torch.from_numpy(np.stack(rows)).to(device)


def exclude(scores: torch.Tensor, candidates: torch.Tensor | None) -> torch.Tensor:
    """(B, N) scores with non-candidates at the lowest finite value (never in a hard top-K)."""
    if candidates is None:
        return scores
    return scores.masked_fill(~candidates, torch.finfo(scores.dtype).min)


def restrict_normalized(scores: torch.Tensor, candidates: torch.Tensor, eps: float = 1e-5) -> torch.Tensor:
    """Min-max normalise each row over its candidates (as DPS normalises over all cells); the others -> -FAR.

    Differentiable in the candidate scores; non-candidates are constants, so no gradient reaches them.
    """
    big = torch.finfo(scores.dtype).max
    lo = scores.masked_fill(~candidates, big).amin(dim=-1, keepdim=True)
    hi = scores.masked_fill(~candidates, -big).amax(dim=-1, keepdim=True)
    return ((scores - lo) / (hi - lo + eps)).masked_fill(~candidates, -FAR)


def restrict_attention(attention: torch.Tensor, candidates: torch.Tensor | None) -> torch.Tensor:
    """(B, N) attention (rows sum to 1) set to 0 outside the candidates and renormalised."""
    if candidates is None:
        return attention
    kept = attention * candidates.to(attention.dtype)
    return kept / kept.sum(dim=-1, keepdim=True).clamp_min(torch.finfo(attention.dtype).tiny)


def nan_outside(scores: torch.Tensor | None, candidates: torch.Tensor | None) -> torch.Tensor | None:
    """The recorded score map: NaN outside the candidates."""
    if scores is None or candidates is None:
        return scores
    return scores.float().masked_fill(~candidates.to(scores.device), float("nan"))


def restrict_below(scores: torch.Tensor, candidates: torch.Tensor) -> torch.Tensor:
    """Non-candidates one candidate range (+1e-3) below the lowest candidate: after a row's min-max
    normalisation (Sinkhorn top-K) the candidates span [~0.5, 1] and the others sit at 0."""
    big = torch.finfo(scores.dtype).max
    lo = scores.masked_fill(~candidates, big).amin(dim=-1, keepdim=True).detach()
    hi = scores.masked_fill(~candidates, -big).amax(dim=-1, keepdim=True).detach()
    return scores.masked_fill(~candidates, 0.0) + (~candidates) * (2 * lo - hi - 1e-3)


def pipeline_inputs(pipeline: Any, batch: dict[str, Any]) -> dict[str, Any]:
    """The keyword inputs besides the images that `pipeline` takes from a collated batch: `tissue=`
    (the masks of `data.tissue`) when the batch has them and the pipeline's forward accepts it."""
    import inspect

    tissue = batch.get("tissue")
    if tissue is None or all(t is None for t in tissue):
        return {}
    module = getattr(pipeline, "module", pipeline)  # DDP
    module = getattr(module, "_orig_mod", module)  # torch.compile
    if "tissue" not in inspect.signature(module.forward).parameters:
        return {}
    return {"tissue": list(tissue)}

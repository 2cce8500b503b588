"""How patch scores become colours, without making near-identical scores look like a confident map.

    colors = score_colors(scores, "auto")         # ScoreColors: values to draw, vmin, vmax, label
    ax.imshow(raster_of(colors.values), vmin=colors.vmin, vmax=colors.vmax)
    fig.colorbar(..., label=colors.label)          # always states the scores' actual range

Scales (`SCALES`):
- "fixed": 0 to 1, for probabilities and attention weights: scores of 0.500 and 0.503 get the
  same colour, whatever else the image holds.
- "range": the scores' own minimum to maximum. Near-identical scores then span the whole
  colour map, which reads as certainty: pick it knowingly.
- "rank": each score's rank among the image's scores, 0 (lowest) to 1 (highest): the order
  the selection follows, not the size of the differences.
- "log": log10 of the scores, from the top score down `LOG_DECADES` decades (or to the smallest
  positive score): attention spread over 10^5 patches (each ~1e-5) still shows where it is
  higher. Scores <= 0 are drawn at the bottom; without a positive score it falls back to "rank".
- "auto" (the default): "fixed" when every score lies in [0, 1], else "range" (raw scorer
  logits have no fixed scale).
"""
from __future__ import annotations

import logging
from dataclasses import dataclass

import numpy as np

from hrsel.errors import ConfigError

log = logging.getLogger(__name__)

SCALES = ("auto", "fixed", "range", "rank", "log")
LOG_DECADES = 4


@dataclass(frozen=True)
class ScoreColors:
    values: np.ndarray  # (N,) what is drawn per patch (NaN where the score is NaN)
    vmin: float
    vmax: float
    scale: str  # the scale used ("auto" resolved)
    label: str  # the colour bar's label, with the scores' actual range


def check_scale(scale: str) -> str:
    if scale not in SCALES:
        raise ConfigError(f"colour scale {scale!r} is not one of {', '.join(SCALES)}; e.g. --color-scale rank")
    return scale


def score_colors(scores: np.ndarray, scale: str = "auto") -> ScoreColors:
    """The values, colour range and colour bar label of (N,) patch scores under `scale` (module docstring)."""
    check_scale(scale)
    scores = np.asarray(scores, dtype=np.float64).reshape(-1)
    finite = scores[np.isfinite(scores)]
    low, high = (float(finite.min()), float(finite.max())) if len(finite) else (0.0, 1.0)
    actual = f"scores {low:.3g} to {high:.3g}"
    if scale == "auto":
        scale = "fixed" if len(finite) and low >= 0 and high <= 1 else "range"
    if scale == "log" and not (finite > 0).any():
        log.warning("colour scale 'log' needs positive scores (%s); drawing ranks instead", actual)
        scale = "rank"
    if scale == "fixed":
        return ScoreColors(scores, 0.0, 1.0, scale, f"patch score, 0 to 1 ({actual})")
    if scale == "range":
        return ScoreColors(scores, low, high if high > low else low + 1e-9, scale,
                           f"patch score, stretched to its range ({actual})")
    if scale == "rank":
        return ScoreColors(percentile_ranks(scores), 0.0, 1.0, scale, f"rank of the patch score, 0 to 1 ({actual})")
    top = high
    floor = min(max(float(finite[finite > 0].min()), top * 10.0 ** -LOG_DECADES), top / 10)
    with np.errstate(divide="ignore", invalid="ignore"):
        values = np.where(np.isfinite(scores), np.log10(np.clip(scores, floor, None)), np.nan)
    return ScoreColors(values, float(np.log10(floor)), float(np.log10(top)), scale,
                       f"log10 patch score ({actual})")


def percentile_ranks(scores: np.ndarray) -> np.ndarray:
    """(N,) scores -> (N,) ranks in [0, 1] (0 = lowest, ties share their mean rank); NaN stays NaN."""
    scores = np.asarray(scores, dtype=np.float64).reshape(-1)
    finite = np.isfinite(scores)
    out = np.full(len(scores), np.nan)
    n = int(finite.sum())
    if n == 0:
        return out
    values = scores[finite]
    order = np.argsort(values, kind="stable")
    ranks = np.empty(n)
    ranks[order] = np.arange(n, dtype=np.float64)
    unique, inverse = np.unique(values, return_inverse=True)
    mean_rank = np.bincount(inverse, weights=ranks) / np.bincount(inverse)  # ties: their mean rank
    out[finite] = mean_rank[inverse] / max(n - 1, 1)
    return out

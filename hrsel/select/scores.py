"""Score transforms used around the selectors."""
from __future__ import annotations

import torch

from hrsel.errors import SelectionError
from hrsel.select._checks import check_finite


def normalize_scores(scores: torch.Tensor, eps: float = 1e-5) -> torch.Tensor:
    """Min-max normalise each row of (B, N) scores to [0, 1), as DPS does before perturbing.

    The eps keeps a constant row finite (it maps to zeros). Non-finite scores are rejected
    (SelectionError naming the batch row): one inf would flatten its whole row to 0.
    """
    if scores.dim() == 0 or scores.numel() == 0:
        raise SelectionError(f"scores to normalise must be (B, N) with B, N >= 1, got shape {tuple(scores.shape)}")
    check_finite(scores, "scores")
    lo = scores.amin(dim=-1, keepdim=True)
    hi = scores.amax(dim=-1, keepdim=True)
    return (scores - lo) / (hi - lo + eps)


def entropy_regularizer(scores: torch.Tensor) -> torch.Tensor:
    """Mean over the batch of H(softmax(scores)) for (B, N) raw scores.

    DPS adds `coefficient * H` to the loss; its configs use negative
    coefficients, i.e. an entropy bonus that keeps the scorer exploring.
    """
    log_p = torch.log_softmax(scores.float(), dim=-1)
    return -(log_p.exp() * log_p).sum(dim=-1).mean()

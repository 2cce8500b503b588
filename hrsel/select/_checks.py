"""Input checks shared by the selection operators; messages name the argument."""
from __future__ import annotations

import torch


def check_scores(scores: torch.Tensor, name: str = "scores") -> None:
    if not isinstance(scores, torch.Tensor):
        raise ValueError(f"{name} must be a torch.Tensor of shape (batch, n), got {type(scores).__name__}")
    if scores.dim() != 2:
        raise ValueError(f"{name} must be 2-D (batch, n), got shape {tuple(scores.shape)}")
    if not scores.is_floating_point():
        raise ValueError(f"{name} must be floating point, got dtype {scores.dtype}")
    if torch.isnan(scores).any():
        raise ValueError(f"{name} contains NaN; check the scorer's output (e.g. a division by zero upstream)")


def check_k(k: int, n: int) -> None:
    if isinstance(k, bool) or not isinstance(k, int):
        raise ValueError(f"k must be an int, got {k!r}")
    if k <= 0:
        raise ValueError(f"k must be >= 1, got k={k}")
    if k > n:
        raise ValueError(f"k={k} is larger than the number of patches n={n}; choose k <= {n}")


def check_positive_int(value: int, name: str) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
        raise ValueError(f"{name} must be a positive int, got {value!r}")


def check_non_negative(value: float, name: str) -> None:
    if not (value >= 0):  # also rejects NaN
        raise ValueError(f"{name} must be >= 0, got {value!r}")

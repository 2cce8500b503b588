"""Sigma schedules for perturbed top-K: small callables of the training step."""
from __future__ import annotations

import math
from dataclasses import dataclass

from hrsel.errors import SelectionError


@dataclass(frozen=True)
class ConstantSigma:
    sigma: float

    def __call__(self, step: int) -> float:
        return self.sigma


@dataclass(frozen=True)
class LinearSigma:
    """Linear decay from `sigma` at step 0 to `final` at `total_steps` (DPS: final = 0)."""

    sigma: float
    total_steps: int
    final: float = 0.0

    def __call__(self, step: int) -> float:
        t = min(max(step / self.total_steps, 0.0), 1.0)
        return self.sigma + (self.final - self.sigma) * t


@dataclass(frozen=True)
class CosineSigma:
    """Half-cosine from `sigma` to `final` (benbergner/dps: 0.05 -> 1e-5)."""

    sigma: float
    total_steps: int
    final: float = 0.0

    def __call__(self, step: int) -> float:
        t = min(max(step / self.total_steps, 0.0), 1.0)
        return self.final + 0.5 * (self.sigma - self.final) * (1.0 + math.cos(math.pi * t))


SCHEDULES = {"constant": ConstantSigma, "linear": LinearSigma, "cosine": CosineSigma}


def build_sigma_schedule(kind: str, *, sigma: float, total_steps: int = 1, final: float = 0.0):
    """A callable step -> sigma. kind: constant | linear | cosine."""
    if kind not in SCHEDULES:
        raise SelectionError(f"sigma schedule {kind!r} is unknown; valid: {', '.join(SCHEDULES)}")
    if not (0 <= sigma < math.inf and 0 <= final < math.inf):
        raise SelectionError(f"sigma schedule needs sigma >= 0 and final >= 0, got sigma={sigma}, final={final}")
    if kind == "constant":
        return ConstantSigma(sigma)
    if total_steps <= 0:
        raise SelectionError(f"sigma schedule {kind!r} needs total_steps >= 1, got {total_steps}")
    return SCHEDULES[kind](sigma, total_steps, final)

"""Layer 3: selection operators (plain functions and autograd Functions)."""
from hrsel.select.perturbed import perturbed_topk, sample_noise
from hrsel.select.schedules import build_sigma_schedule
from hrsel.select.scores import entropy_regularizer, normalize_scores
from hrsel.select.sinkhorn import sinkhorn_topk
from hrsel.select.topk import hard_topk, hard_topk_indicators, indices_to_onehot

__all__ = [
    "build_sigma_schedule",
    "entropy_regularizer",
    "hard_topk",
    "hard_topk_indicators",
    "indices_to_onehot",
    "normalize_scores",
    "perturbed_topk",
    "sample_noise",
    "sinkhorn_topk",
]

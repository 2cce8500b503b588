"""Layer 3: selection operators (plain functions and autograd Functions)."""
from hrsel.select.ats import estimator_weights, expectation_without_replacement, sample_without_replacement
from hrsel.select.extract import GridGeometry, soft_extract, streaming_soft_extract
from hrsel.select.ips import TopMResult, iterative_topm
from hrsel.select.perturbed import perturbed_topk, sample_noise
from hrsel.select.policy import patchdrop_reward, reinforce_loss, sample_actions
from hrsel.select.schedules import build_sigma_schedule
from hrsel.select.scores import entropy_regularizer, normalize_scores
from hrsel.select.sinkhorn import sinkhorn_topk
from hrsel.select.topk import hard_topk, hard_topk_indicators, indices_to_onehot

__all__ = [
    "GridGeometry",
    "TopMResult",
    "build_sigma_schedule",
    "entropy_regularizer",
    "estimator_weights",
    "expectation_without_replacement",
    "hard_topk",
    "hard_topk_indicators",
    "indices_to_onehot",
    "iterative_topm",
    "normalize_scores",
    "patchdrop_reward",
    "perturbed_topk",
    "reinforce_loss",
    "sample_actions",
    "sample_noise",
    "sample_without_replacement",
    "sinkhorn_topk",
    "soft_extract",
    "streaming_soft_extract",
]

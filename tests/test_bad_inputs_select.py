"""Bad inputs to the selection operators: each raises SelectionError naming the batch row and item.

Non-finite scores (NaN, +-inf) used to flow through: `sinkhorn_topk` returned NaN rows for an
inf, `iterative_topm` kept NaN-scored items. Empty batches reached torch's reshape errors.
"""
from __future__ import annotations

import re

import numpy as np
import pytest
import torch

from hrsel.errors import HrselError, SelectionError
from hrsel.select import (build_sigma_schedule, expectation_without_replacement, hard_topk, hard_topk_indicators,
                          iterative_topm, normalize_scores, perturbed_topk, sample_actions,
                          sample_without_replacement, sinkhorn_topk)
from hrsel.select.ats import smoothed_attention
from hrsel.select.policy import bound_probs, greedy_actions

NAN, INF = float("nan"), float("inf")


def scores_with(value: float, *, row: int = 1, item: int = 3, batch: int = 3, n: int = 8) -> torch.Tensor:
    """(batch, n) finite scores with `value` at (row, item)."""
    s = torch.rand(batch, n, generator=torch.Generator().manual_seed(0))
    s[row, item] = value
    return s


def probs_with(value: float, *, row: int = 1, item: int = 3) -> torch.Tensor:
    p = torch.full((3, 8), 1 / 8)
    p[row, item] = value
    return p


def raises_naming(call, *patterns: str) -> SelectionError:
    """`call()` raises SelectionError (an HrselError and a ValueError) whose message matches every pattern."""
    with pytest.raises(SelectionError) as info:
        call()
    assert isinstance(info.value, HrselError) and isinstance(info.value, ValueError)
    for pattern in patterns:
        assert re.search(pattern, str(info.value)), f"{pattern!r} not in: {info.value}"
    return info.value


def stream(values: torch.Tensor, size: int):
    """(B, N) pointwise scores as chunks (indices, items (B, n, 1))."""
    for start in range(0, values.shape[1], size):
        idx = torch.arange(start, min(start + size, values.shape[1])).expand(values.shape[0], -1)
        yield idx, values[:, start:start + size, None]


def pointwise(items, mask, indices):
    return items[..., 0]


# ---- non-finite scores: every operator names the batch row and the item --------------------------

OPERATORS = {
    "hard_topk": lambda s: hard_topk(s, 2),
    "hard_topk_indicators": lambda s: hard_topk_indicators(s, 2),
    "perturbed_topk": lambda s: perturbed_topk(s, 2, 0.1, 5, torch.Generator().manual_seed(0)),
    "sinkhorn_topk": lambda s: sinkhorn_topk(s, 2),
    "normalize_scores": normalize_scores,
    "smoothed_attention": smoothed_attention,
}
VALUES = {"inf": (INF, r"\binf\b"), "-inf": (-INF, r"-inf"), "nan": (NAN, r"NaN")}


@pytest.mark.parametrize("value", sorted(VALUES))
@pytest.mark.parametrize("operator", sorted(OPERATORS))
def test_nonfinite_scores_name_batch_row_and_item(operator, value):
    number, word = VALUES[value]
    raises_naming(lambda: OPERATORS[operator](scores_with(number, row=2, item=5)),
                  word, r"batch row 2\b", r"item 5\b", r"shape \(3, 8\)")
    OPERATORS[operator](scores_with(0.5, row=2, item=5))  # the same call with finite scores passes


def test_sinkhorn_inf_no_longer_returns_nan_rows():
    """The reported case: one inf in row 1 made that row of the plan NaN, silently."""
    raises_naming(lambda: sinkhorn_topk(scores_with(INF, row=1, item=0), 3, 1e-2, 50), "batch row 1", "item 0")


def test_several_bad_rows_are_all_listed():
    s = scores_with(NAN, row=0, item=1)
    s[2, 6] = INF
    raises_naming(lambda: hard_topk(s, 2), r"batch rows \[0, 2\]", "NaN and inf", "row 0, item 1")


# ---- empty batches -------------------------------------------------------------------------------

@pytest.mark.parametrize("shape,word", [((0, 8), "empty batch"), ((3, 0), "no items")])
@pytest.mark.parametrize("operator", ["hard_topk", "perturbed_topk", "sinkhorn_topk"])
def test_empty_batch_is_named(operator, shape, word):
    raises_naming(lambda: OPERATORS[operator](torch.zeros(shape)), word, re.escape(str(shape)))


def test_normalize_scores_empty_is_named():
    raises_naming(lambda: normalize_scores(torch.zeros(0, 5)), r"\(0, 5\)")


PIPELINES = {
    "ips": dict(patch_size=20, k=3, score_chunk=5, aggregator_options={"heads": 2, "head_dim": 4,
                                                                                   "mlp_dim": 16}),
    "dps": dict(patch_size=20, k=3, downscale=2, num_samples=10),
    "ats": dict(patch_size=20, k=3, downscale=2),
    "patchdrop": dict(patch_size=20, downscale=2),
}


@pytest.mark.parametrize("name", sorted(PIPELINES))
def test_empty_batch_into_a_pipeline_is_named(name):
    from hrsel.models import build_pipeline
    from hrsel.tasks import TaskSpec

    light = dict(in_chans=1, backbone="narrow_resnet", backbone_options={"width": 4, "strides": (2,), "blocks": (1,)})
    model = build_pipeline(name, tasks={"y": TaskSpec("multiclass", 3)}, **light, **PIPELINES[name])
    raises_naming(lambda: model(torch.zeros(0, 1, 80, 80, dtype=torch.uint8)), "empty batch", r"\(0, 1, 80, 80\)")


# ---- ATS sampling and the policy: probabilities ----------------------------------------------------

@pytest.mark.parametrize("value,word", [(NAN, "NaN"), (INF, r"\binf"), (-0.2, r"\[0, 1\].*-0\.2")])
def test_ats_sampling_rejects_bad_attention(value, word):
    raises_naming(lambda: sample_without_replacement(probs_with(value, row=1, item=4), 2), word,
                  r"batch row 1\b", r"item 4\b")


def test_ats_expectation_rejects_nonfinite_attention():
    attention = probs_with(NAN, row=2, item=0)
    features, indices = torch.ones(3, 2, 4), torch.tensor([[0, 1]] * 3)
    raises_naming(lambda: expectation_without_replacement(attention, features, indices), "attention", "batch row 2")


POLICY = {"sample_actions": sample_actions, "greedy_actions": greedy_actions,
          "bound_probs": lambda p: bound_probs(p, 0.8)}


@pytest.mark.parametrize("value,word", [(NAN, "NaN"), (1.5, r"\[0, 1\].*1\.5"), (-INF, "-inf")])
@pytest.mark.parametrize("function", sorted(POLICY))
def test_policy_rejects_bad_keep_probabilities(function, value, word):
    raises_naming(lambda: POLICY[function](probs_with(value, row=0, item=6)), "keep probabilities", word,
                  r"batch row 0\b", r"item 6\b")


# ---- iterative top-M: the score_fn's output ---------------------------------------------------------

@pytest.mark.parametrize("value,word", [(NAN, "NaN"), (INF, r"\binf"), (-INF, "-inf")])
def test_iterative_topm_rejects_nonfinite_scores_with_row_and_item(value, word):
    values = torch.randn(3, 20, generator=torch.Generator().manual_seed(1))
    values[1, 13] = value  # arrives in the third chunk of 5
    raises_naming(lambda: iterative_topm(stream(values, 5), m=4, score_fn=pointwise), "score_fn", word,
                  r"batch row 1\b", r"item 13\b", "20 items")


def test_iterative_topm_no_longer_keeps_a_nan_item():
    values = torch.zeros(1, 10)
    values[0, 2] = NAN  # with a stable descending sort, NaN sorted first and was kept
    raises_naming(lambda: iterative_topm(stream(values, 4), m=3, score_fn=pointwise, record_scores=True),
                  "item 2")


def test_iterative_topm_empty_batch():
    chunks = iter([(torch.zeros(0, 4, dtype=torch.int64), torch.zeros(0, 4, 1))])
    raises_naming(lambda: iterative_topm(chunks, m=2, score_fn=pointwise), "empty batch", r"\(0, 4\)")


# ---- non-finite settings ------------------------------------------------------------------------------

@pytest.mark.parametrize("call,word", [
    (lambda: sinkhorn_topk(torch.rand(2, 6), 2, epsilon=INF), "epsilon"),
    (lambda: sinkhorn_topk(torch.rand(2, 6), 2, epsilon=NAN), "epsilon"),
    (lambda: sinkhorn_topk(torch.rand(2, 6), 2, tol=-1.0), "tol"),
    (lambda: perturbed_topk(torch.rand(2, 6), 2, INF, 5), "sigma"),
    (lambda: build_sigma_schedule("linear", sigma=NAN, total_steps=3), "sigma"),
], ids=["sinkhorn-eps-inf", "sinkhorn-eps-nan", "sinkhorn-tol-negative", "perturbed-sigma-inf", "schedule-nan"])
def test_nonfinite_settings_are_named(call, word):
    raises_naming(call, word)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_sinkhorn_epsilon_too_small_for_the_dtype_is_named_not_inf(dtype):
    scores = torch.rand(2, 16, generator=torch.Generator().manual_seed(0), dtype=dtype)
    epsilon = 1e-9 if dtype == torch.float32 else 1e-30
    raises_naming(lambda: sinkhorn_topk(scores, 4, epsilon=epsilon), f"epsilon={epsilon!r}", "too small",
                  str(dtype).replace("torch.", ""))
    assert torch.isfinite(sinkhorn_topk(scores, 4, epsilon=1e-4, iterations=2000)).all()  # the JAX setting


class _NotTorch:
    """Stands for numpy's Generator or random.Random handed to a torch sampler."""


@pytest.mark.parametrize("call", [
    lambda g: perturbed_topk(scores_with(0.5), 2, 0.1, 8, g),
    lambda g: sample_without_replacement(probs_with(1 / 8), 2, generator=g),
    lambda g: sample_actions(probs_with(0.5), generator=g),
    lambda g: iterative_topm(stream(scores_with(0.5), 4), m=2, score_fn=pointwise, random_ties=True, generator=g),
], ids=["perturbed_topk", "sample_without_replacement", "sample_actions", "iterative_topm"])
@pytest.mark.parametrize("generator", [_NotTorch(), np.random.default_rng(0)], ids=["object", "numpy"])
def test_a_generator_that_is_not_torch_is_named(call, generator):
    raises_naming(lambda: call(generator), "generator must be a torch.Generator", type(generator).__name__)

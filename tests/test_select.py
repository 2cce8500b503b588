import math

import pytest
import torch

from hrsel.select import (
    build_sigma_schedule,
    entropy_regularizer,
    hard_topk,
    hard_topk_indicators,
    normalize_scores,
    perturbed_topk,
    sample_noise,
)
from hrsel.select.reference import dense_perturbed_topk


def _pair(b, n, k, sigma, samples, seed=0, **kwargs):
    """Our operator and the dense reference on the same noise, with the same upstream gradient."""
    torch.manual_seed(seed)
    scores = torch.rand(b, n)
    upstream = torch.randn(b, k, n)
    ours_in = scores.clone().requires_grad_()
    ref_in = scores.clone().requires_grad_()
    ours = perturbed_topk(ours_in, k, sigma, samples, generator=torch.Generator().manual_seed(seed + 1), **kwargs)
    noise = sample_noise(b, samples, n, generator=torch.Generator().manual_seed(seed + 1))
    ref = dense_perturbed_topk(ref_in, k, sigma, noise)
    (ours * upstream).sum().backward()
    (ref * upstream).sum().backward()
    return ours, ref, ours_in.grad, ref_in.grad


@pytest.mark.parametrize("b,n,k,samples", [(2, 12, 3, 50), (3, 40, 5, 300), (1, 7, 7, 20)])
def test_perturbed_matches_dense_reference(b, n, k, samples):
    ours, ref, grad, ref_grad = _pair(b, n, k, 0.3, samples)
    torch.testing.assert_close(ours, ref, atol=1e-6, rtol=0)
    torch.testing.assert_close(grad, ref_grad, atol=1e-5, rtol=1e-5)


def test_perturbed_matches_reference_when_noise_needs_several_chunks(monkeypatch):
    import hrsel.select.perturbed as perturbed

    monkeypatch.setattr(perturbed, "_CHUNK_ELEMENTS", 64)  # 64 // (2 * 10) = 3 samples a chunk
    ours, ref, grad, ref_grad = _pair(2, 10, 3, 0.2, 31)
    torch.testing.assert_close(ours, ref, atol=1e-6, rtol=0)
    torch.testing.assert_close(grad, ref_grad, atol=1e-5, rtol=1e-5)


def test_rows_are_distributions_and_columns_bounded():
    ours, *_ = _pair(4, 30, 6, 0.1, 100)
    torch.testing.assert_close(ours.sum(-1), torch.ones(4, 6))
    assert (ours.sum(1) <= 1 + 1e-6).all()


def test_backward_matches_finite_differences_of_smoothed_expectation():
    # F(s) = <G, E[Y*(s + sigma Z)]>, estimated with common random numbers; central
    # differences with step h carry O(h^2) bias and Monte-Carlo noise of a few 1e-3:
    # tolerance 0.03 against gradients of size ~0.5.
    n, k, sigma, samples, h = 6, 2, 0.5, 200_000, 0.05
    torch.manual_seed(3)
    scores = torch.rand(1, n, dtype=torch.float64)
    upstream = torch.randn(1, k, n, dtype=torch.float64)

    def smoothed(s):
        y = perturbed_topk(s, k, sigma, samples, generator=torch.Generator().manual_seed(7))
        return (y.double() * upstream).sum()

    s = scores.clone().requires_grad_()
    smoothed(s).backward()
    fd = torch.zeros(n, dtype=torch.float64)
    for i in range(n):
        e = torch.zeros(1, n, dtype=torch.float64)
        e[0, i] = h
        fd[i] = (smoothed(scores + e) - smoothed(scores - e)) / (2 * h)
    assert fd.abs().max() > 0.1  # the comparison is not vacuous
    torch.testing.assert_close(s.grad[0], fd, atol=0.03, rtol=0)


def test_variance_reduction_same_expectation_lower_variance():
    torch.manual_seed(0)
    scores = torch.rand(1, 8)
    upstream = torch.randn(1, 3, 8)

    def grads(vr):
        out = []
        for seed in range(40):
            s = scores.clone().requires_grad_()
            y = perturbed_topk(s, 3, 0.3, 50, generator=torch.Generator().manual_seed(seed), variance_reduction=vr)
            (y * upstream).sum().backward()
            out.append(s.grad[0])
        return torch.stack(out)

    plain, reduced = grads(False), grads(True)
    assert reduced.var(0).sum() < plain.var(0).sum()
    torch.testing.assert_close(reduced.mean(0), plain.mean(0), atol=0.5 * plain.std(0).max().item(), rtol=0)


def test_sigma_zero_is_hard_topk_with_zero_gradient():
    torch.manual_seed(1)
    scores = torch.randn(3, 20, requires_grad=True)
    y = perturbed_topk(scores, 4, 0.0, 10)
    torch.testing.assert_close(y, hard_topk_indicators(scores.detach(), 4))
    (y * torch.randn_like(y)).sum().backward()
    assert scores.grad is None or torch.count_nonzero(scores.grad) == 0


def test_small_sigma_gives_one_hot_rows_in_raster_order():
    scores = torch.tensor([[0.1, 0.9, 0.2, 0.8, 0.5, 0.7]])
    y = perturbed_topk(scores, 3, 1e-6, 20)
    torch.testing.assert_close(y, torch.nn.functional.one_hot(torch.tensor([[1, 3, 5]]), 6).float())


def test_hard_topk_indices_are_sorted_by_position():
    torch.manual_seed(0)
    scores = torch.randn(5, 50)
    idx = hard_topk(scores, 7)
    assert idx.shape == (5, 7)
    assert (idx[:, 1:] > idx[:, :-1]).all()
    expected = torch.topk(scores, 7).indices.sort(-1).values
    assert torch.equal(idx, expected)


def test_deterministic_given_generator_and_global_seed():
    scores = torch.rand(2, 30)
    a = perturbed_topk(scores, 4, 0.2, 64, generator=torch.Generator().manual_seed(5))
    b = perturbed_topk(scores, 4, 0.2, 64, generator=torch.Generator().manual_seed(5))
    assert torch.equal(a, b)
    torch.manual_seed(9)
    c = perturbed_topk(scores, 4, 0.2, 64)
    torch.manual_seed(9)
    d = perturbed_topk(scores, 4, 0.2, 64)
    assert torch.equal(c, d)
    assert not torch.equal(a, c)


def test_bfloat16_scores():
    torch.manual_seed(0)
    scores = torch.rand(2, 40).bfloat16().requires_grad_()
    y = perturbed_topk(scores, 5, 0.1, 100, generator=torch.Generator().manual_seed(0))
    assert y.dtype == torch.bfloat16 and y.shape == (2, 5, 40)
    (y.float() * torch.randn(2, 5, 40)).sum().backward()
    assert scores.grad.dtype == torch.bfloat16 and torch.isfinite(scores.grad.float()).all()


@pytest.mark.parametrize(
    "kwargs,word",
    [
        (dict(k=11), "k"),
        (dict(k=0), "k"),
        (dict(sigma=-0.1), "sigma"),
        (dict(num_samples=0), "num_samples"),
        (dict(scores=torch.rand(10)), "scores"),
        (dict(scores=torch.tensor([[0.1, float("nan"), 0.3] + [0.0] * 7])), "NaN"),
    ],
)
def test_bad_input_names_the_argument(kwargs, word):
    args = dict(scores=torch.rand(2, 10), k=3, sigma=0.1, num_samples=5) | kwargs
    with pytest.raises(ValueError, match=word):
        perturbed_topk(**args)


def test_hard_topk_bad_input():
    with pytest.raises(ValueError, match="k=5 is larger"):
        hard_topk(torch.rand(1, 4), 5)
    with pytest.raises(ValueError, match="2-D"):
        hard_topk(torch.rand(2, 3, 4), 1)


# Sinkhorn top-K: tests/test_select_sinkhorn.py


# Score helpers and schedules


def test_normalize_scores_range_and_constant_rows():
    s = torch.tensor([[1.0, 3.0, 2.0], [5.0, 5.0, 5.0]])
    out = normalize_scores(s)
    assert out[0].min() == 0 and 0.999 < out[0].max() < 1
    assert torch.equal(out[1], torch.zeros(3))


def test_entropy_regularizer_bounds():
    uniform = entropy_regularizer(torch.zeros(2, 16))
    assert math.isclose(uniform.item(), math.log(16), rel_tol=1e-6)
    peaked = entropy_regularizer(torch.tensor([[100.0] + [0.0] * 15]))
    assert peaked.item() < 1e-3


def test_sigma_schedules():
    lin = build_sigma_schedule("linear", sigma=0.05, total_steps=100)
    assert lin(0) == 0.05 and math.isclose(lin(50), 0.025) and lin(100) == 0.0 and lin(200) == 0.0
    cos = build_sigma_schedule("cosine", sigma=0.05, total_steps=100, final=1e-5)
    assert math.isclose(cos(0), 0.05) and math.isclose(cos(100), 1e-5)
    assert cos(25) > lin(25)  # cosine stays high longer
    assert build_sigma_schedule("constant", sigma=0.3)(10_000) == 0.3
    with pytest.raises(ValueError, match="valid: constant"):
        build_sigma_schedule("exp", sigma=0.1, total_steps=10)

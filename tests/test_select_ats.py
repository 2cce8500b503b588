"""ATS: the estimator and its attention gradient are unbiased; smoothed attention and its entropy."""
import itertools

import numpy as np
import pytest
import torch

from hrsel.select.ats import (attention_entropy, estimator_weights, expectation_without_replacement,
                              sample_without_replacement, smoothed_attention)


def ordered_draws(a: torch.Tensor, k: int):
    """Every ordered draw without replacement and its probability under sequential sampling."""
    for draw in itertools.permutations(range(a.shape[0]), k):
        prob, left = 1.0, 1.0
        for i in draw:
            prob *= float(a[i]) / left
            left -= float(a[i])
        yield torch.tensor(draw), prob


@pytest.mark.parametrize("k", [1, 2, 3])
def test_estimate_and_attention_gradient_are_unbiased(k):
    torch.manual_seed(k)
    n, d = 5, 3
    a = torch.softmax(torch.randn(n, dtype=torch.float64), 0)
    f = torch.randn(n, d, dtype=torch.float64)
    g = torch.randn(d, dtype=torch.float64)
    mean_out = torch.zeros(d, dtype=torch.float64)
    mean_grad_a = torch.zeros(n, dtype=torch.float64)
    mean_grad_f = torch.zeros(n, d, dtype=torch.float64)
    total = 0.0
    for draw, prob in ordered_draws(a, k):
        att = a[None].clone().requires_grad_()
        feats = f[draw][None].clone().requires_grad_()
        out = expectation_without_replacement(att, feats, draw[None])
        ga, gf = torch.autograd.grad((out * g).sum(), (att, feats))
        mean_out += prob * out[0].detach()
        mean_grad_a += prob * ga[0]
        mean_grad_f.index_add_(0, draw, prob * gf[0])
        total += prob
    assert total == pytest.approx(1.0)
    torch.testing.assert_close(mean_out, a @ f)  # E[estimate] = sum_n a_n f_n
    torch.testing.assert_close(mean_grad_a, f @ g)  # E[d/da] = <f_n, G>
    torch.testing.assert_close(mean_grad_f, a[:, None] * g)  # E[d/df_n] = a_n G


def test_estimate_by_hand_and_weights_sum_to_one():
    a = torch.tensor([[0.5, 0.3, 0.2]])
    f_drawn = torch.tensor([[[4.0], [1.0], [2.0]]])  # features of patches 2, 0, 1 in draw order
    out = expectation_without_replacement(a, f_drawn, torch.tensor([[2, 0, 1]]))
    # terms: 1 * 4; 0.2 * 4 + 0.8 * 1; 0.2 * 4 + 0.5 * 1 + 0.3 * 2 -> mean 7.5 / 3
    torch.testing.assert_close(out, torch.tensor([[2.5]]))
    w = estimator_weights(torch.rand(4, 6) / 6)
    torch.testing.assert_close(w.sum(1), torch.ones(4))


def test_sampling_is_without_replacement_and_follows_attention():
    a = torch.tensor([[0.7, 0.2, 0.05, 0.05]])
    g = torch.Generator().manual_seed(0)
    first = torch.zeros(4)
    for _ in range(2000):
        draw = sample_without_replacement(a, 3, generator=g)[0]
        assert len(set(draw.tolist())) == 3
        first[draw[0]] += 1
    torch.testing.assert_close(first / 2000, a[0], atol=0.04, rtol=0)


def test_shape_errors():
    with pytest.raises(ValueError, match="disagree"):
        expectation_without_replacement(torch.rand(2, 5), torch.rand(2, 3, 4), torch.zeros(2, 2, dtype=torch.long))


def test_smoothed_attention_sums_to_one_with_a_floor():
    logits = torch.tensor([[30.0, 0.0, -30.0, -30.0, 5.0], [0.0, 0.0, 0.0, 0.0, 0.0]])
    att = smoothed_attention(logits, 1e-4)
    torch.testing.assert_close(att.sum(1), torch.ones(2))
    assert att.min() >= 1e-4 / 5 and att[0, 2] < 1e-4 / 5 * 1.001  # near-zero softmax mass -> the floor
    x = logits.double().numpy()
    soft = np.exp(x - x.max(1, keepdims=True))
    soft /= soft.sum(1, keepdims=True)
    torch.testing.assert_close(att.double(), torch.from_numpy((1 - 1e-4) * soft + 1e-4 / 5))
    torch.testing.assert_close(smoothed_attention(logits, 0.0), torch.softmax(logits, 1))
    with pytest.raises(ValueError, match="smoothing"):
        smoothed_attention(logits, 1.0)


def test_attention_entropy_matches_numpy_and_finite_differences():
    torch.manual_seed(0)
    logits = torch.randn(3, 7, dtype=torch.float64)
    a = smoothed_attention(logits, 1e-4).numpy()
    expected = -(a * np.log(a + 1e-6)).sum(1).mean()
    assert attention_entropy(smoothed_attention(logits, 1e-4)).item() == pytest.approx(expected, rel=1e-12)
    uniform = torch.full((1, 8), 1 / 8, dtype=torch.float64)
    assert attention_entropy(uniform, eps=0.0).item() == pytest.approx(np.log(8))
    torch.autograd.gradcheck(lambda z: attention_entropy(smoothed_attention(z, 1e-4)), (logits.requires_grad_(),))

"""Attention sampling without replacement and its unbiased estimator (ATS, Katharopoulos & Fleuret 2019).

Given attention a (B, N) over patches (a distribution) and features f_n, ATS estimates

    E_a[f] = sum_n a_n f_n

from K patches drawn without replacement. Draws i_1..i_K come in the order sampled
(Gumbel top-K gives exactly the sequential distribution). Term k of the estimator,
sum_{j<k} a_{i_j} f_{i_j} + (1 - sum_{j<k} a_{i_j}) f_{i_k}, is unbiased on its own
(known mass plus a draw from the rest); their mean is the estimator, i.e. weights

    w_k = a_{i_k} (K - k) / K + (1 - sum_{j<k} a_{i_j}) / K        (k = 1..K).

Gradients: d/df_k = w_k; for the attention, sum_n a_n f_n grad(log a_n) is estimated
by the same weights, giving w_k <G, f_k> / a_{i_k} at the sampled patches.

ATS smooths the attention so that every patch keeps a floor of probability
(`smoothed_attention`) and regularises its entropy (`attention_entropy`): the ATS loss
term is strength * sum_n a_n log(a_n + eps) = -strength * H(a), so a positive strength
rewards entropy (the opposite sign of DPS's `entropy_coef * H`).
"""
from __future__ import annotations

import torch

from hrsel.errors import SelectionError
from hrsel.select._checks import check_finite, check_generator, check_k, check_probabilities, check_scores


def smoothed_attention(logits: torch.Tensor, smooth: float = 1e-4) -> torch.Tensor:
    """(B, N) attention logits -> (1 - smooth) softmax + smooth / N (ATS `SampleSoftmax`).

    Rows sum to 1 and every patch keeps at least smooth / N; ATS uses 1e-4 on the
    speed limits (1e-5 on megapixel MNIST); 0 is the plain softmax.
    """
    if not 0.0 <= smooth < 1.0:
        raise SelectionError(f"attention smoothing must be in [0, 1), got {smooth!r}")
    check_scores(logits, "attention logits")
    return (1.0 - smooth) * torch.softmax(logits, dim=1) + smooth / logits.shape[1]


def attention_entropy(attention: torch.Tensor, *, eps: float = 1e-6) -> torch.Tensor:
    """Mean over the batch of H(a) = -sum_n a_n log(a_n + eps) for (B, N) attention.

    ATS's `multinomial_entropy(strength)` adds -strength * this to the loss.
    """
    return -(attention * torch.log(attention + eps)).sum(dim=1).mean()


def sample_without_replacement(attention: torch.Tensor, k: int, *,
                               generator: torch.Generator | None = None) -> torch.Tensor:
    """(B, N) probabilities -> (B, K) indices in the order drawn (Gumbel top-K)."""
    check_probabilities(attention, "attention", hint="pass a distribution, e.g. `smoothed_attention(logits)`")
    check_k(k, attention.shape[1])
    check_generator(generator)
    u = torch.rand(attention.shape, generator=generator, device=attention.device, dtype=torch.float64)
    gumbel = -torch.log(-torch.log(u.clamp_min(1e-300)))
    keys = attention.detach().double().clamp_min(1e-300).log() + gumbel
    return keys.topk(k, dim=1, sorted=True).indices


def estimator_weights(sampled_attention: torch.Tensor) -> torch.Tensor:
    """(B, K) attention of the draws, in draw order -> (B, K) estimator weights w_k."""
    k = sampled_attention.shape[1]
    mass_before = torch.cumsum(sampled_attention, dim=1) - sampled_attention  # sum_{j<k} a_{i_j}
    remaining = torch.arange(k - 1, -1, -1, device=sampled_attention.device, dtype=sampled_attention.dtype)
    return sampled_attention * remaining / k + (1.0 - mass_before) / k


class ExpectationWithoutReplacement(torch.autograd.Function):
    """(attention (B, N), features (B, K, D), indices (B, K) in draw order) -> (B, D) estimate."""

    @staticmethod
    def forward(ctx, attention, features, indices):
        a_k = attention.gather(1, indices)  # (B, K)
        w = estimator_weights(a_k)
        ctx.save_for_backward(attention, features, indices, a_k, w)
        return torch.einsum("bk,bkd->bd", w.to(features.dtype), features)

    @staticmethod
    def backward(ctx, grad_out):
        attention, features, indices, a_k, w = ctx.saved_tensors
        grad_a = grad_f = None
        if ctx.needs_input_grad[1]:
            grad_f = torch.einsum("bk,bd->bkd", w.to(grad_out.dtype), grad_out)
        if ctx.needs_input_grad[0]:
            per_draw = torch.einsum("bkd,bd->bk", features, grad_out) * w / a_k.clamp_min(1e-12)
            grad_a = torch.zeros_like(attention).scatter_add_(1, indices, per_draw.to(attention.dtype))
        return grad_a, grad_f, None


def expectation_without_replacement(attention: torch.Tensor, features: torch.Tensor,
                                    indices: torch.Tensor) -> torch.Tensor:
    """Unbiased estimate of sum_n a_n f_n from K patches drawn without replacement.

    attention: (B, N) probabilities (rows sum to 1); features: (B, K, D) of the drawn
    patches; indices: (B, K) the draws in the order sampled. Returns (B, D).
    """
    if features.shape[:2] != indices.shape or attention.shape[0] != indices.shape[0]:
        raise SelectionError(
            f"attention (B, N), features (B, K, D) and indices (B, K) disagree: {tuple(attention.shape)}, "
            f"{tuple(features.shape)}, {tuple(indices.shape)}"
        )
    check_finite(attention, "attention")
    check_finite(features, "features", hint="check the feature network's output")
    return ExpectationWithoutReplacement.apply(attention, features, indices)

"""Sinkhorn top-K (Xie et al. 2020): top-K as entropic optimal transport.

The n scores are transported onto k + 1 anchors: one bin for "not selected"
holding (n - k)/n of the mass and one bin per rank holding 1/n each. With a
squared-distance cost in 1-D the optimal plan is monotone, so as epsilon -> 0
the rank bins receive exactly the k largest scores, largest in row 0.

The plan is solved in log space (stable for epsilon down to 1e-4 and below)
and differentiated implicitly at the fixed point (the backward of Xie et al.,
Alg. 3): memory O(B n k), however many iterations the forward took.
"""
from __future__ import annotations

import torch

from hrsel.select._checks import check_k, check_positive_int, check_scores
from hrsel.select.scores import normalize_scores

_CHECK_EVERY = 10


def _plan(f: torch.Tensor, g: torch.Tensor, cost: torch.Tensor, epsilon: float) -> torch.Tensor:
    return torch.exp((f.unsqueeze(2) + g.unsqueeze(1) - cost) / epsilon)


class SinkhornPlan(torch.autograd.Function):
    """cost (B, n, m), log marginals (B, n) and (B, m) -> transport plan (B, n, m)."""

    @staticmethod
    def forward(ctx, cost, log_mu, log_nu, epsilon, iterations, tol):
        f = torch.zeros_like(log_mu)
        g = torch.zeros_like(log_nu)
        for it in range(iterations):
            f = epsilon * (log_mu - torch.logsumexp((g.unsqueeze(1) - cost) / epsilon, dim=2))
            g = epsilon * (log_nu - torch.logsumexp((f.unsqueeze(2) - cost) / epsilon, dim=1))
            if tol > 0 and (it + 1) % _CHECK_EVERY == 0:
                rows = _plan(f, g, cost, epsilon).sum(dim=2)
                if (rows - log_mu.exp()).abs().max() <= tol * log_mu.exp().max():
                    break
        plan = _plan(f, g, cost, epsilon)
        ctx.epsilon = epsilon
        ctx.save_for_backward(plan)
        return plan

    @staticmethod
    def backward(ctx, grad_plan):
        (plan,) = ctx.saved_tensors
        eps = ctx.epsilon
        mu = plan.sum(dim=2)  # (B, n)
        nu = plan.sum(dim=1)  # (B, m)
        weighted = grad_plan * plan / eps  # P
        p_over_mu = weighted.sum(dim=2) / mu  # (B, n)
        w = weighted.sum(dim=1) - torch.einsum("bnm,bn->bm", plan, p_over_mu)  # (B, m)
        # Schur complement of the marginal constraints; the last dual is fixed (gauge).
        hessian = torch.diag_embed(nu) - torch.einsum("bnm,bn,bnl->bml", plan, 1.0 / mu, plan)
        z = torch.linalg.solve(hessian[:, :-1, :-1], w[:, :-1].unsqueeze(-1)).squeeze(-1)
        z = torch.cat([z, z.new_zeros(z.shape[0], 1)], dim=1)  # (B, m)
        gz_over_mu = torch.einsum("bnm,bm->bn", plan, z) / mu
        grad_cost = plan * (p_over_mu.unsqueeze(2) + z.unsqueeze(1) - gz_over_mu.unsqueeze(2)) - weighted
        return grad_cost, None, None, None, None, None


def sinkhorn_topk(
    scores: torch.Tensor,
    k: int,
    epsilon: float = 1e-2,
    iterations: int = 200,
    *,
    tol: float = 1e-6,
) -> torch.Tensor:
    """Soft top-K indicators (B, k, N) by entropic optimal transport, differentiable.

    Row j is the soft one-hot of the patch of rank j (largest score first); rows
    sum to 1, columns to at most 1. Scores are min-max normalised per row first.
    DPS's traffic experiment used epsilon = 1e-4 and 2000 iterations. Iterations
    stop early once the row marginals are within `tol` (relative); tol = 0 runs all.
    """
    check_scores(scores)
    n = scores.shape[1]
    check_k(k, n)
    check_positive_int(iterations, "iterations")
    if not epsilon > 0:
        raise ValueError(f"epsilon must be > 0, got {epsilon!r}")
    x = normalize_scores(scores).to(torch.float64 if scores.dtype == torch.float64 else torch.float32)
    b = x.shape[0]
    # anchors: value 0 for "not selected", then ranks k..1 at values 1/k..1
    anchors = torch.arange(k + 1, device=x.device, dtype=x.dtype) / k
    mass = torch.full((k + 1,), 1.0 / n, device=x.device, dtype=x.dtype)
    mass[0] = (n - k) / n
    if k == n:  # nothing is left out: drop the empty bin
        anchors, mass = anchors[1:], mass[1:]
    cost = (x.unsqueeze(2) - anchors.view(1, 1, -1)) ** 2  # (B, n, m)
    log_mu = torch.full((b, n), -torch.log(torch.tensor(float(n))).item(), device=x.device, dtype=x.dtype)
    log_nu = mass.log().expand(b, -1).contiguous()
    plan = SinkhornPlan.apply(cost, log_mu, log_nu, float(epsilon), iterations, float(tol))
    ranks = plan[:, :, -k:].flip(dims=(2,)) * n  # (B, n, k), rank 1 first
    return ranks.transpose(1, 2).to(scores.dtype)

"""Sinkhorn top-K (Xie et al. 2020): top-K as entropic optimal transport.

The n scores (min-max normalised to [0, 1)) are transported onto k + 1 anchors at
0, 1, ..., k, as in the DPS JAX code (`lib/ops/topk.py`, `smooth_sorted_top_k`):
anchor 0 is "not selected" and holds (n - k)/n of the mass, anchors 1..k hold 1/n
each, with the squared-distance cost (x - j)^2. In 1-D the optimal plan is monotone,
so as epsilon -> 0 anchor k receives the largest score, anchor k-1 the next, and so on.
`epsilon` is in that convention: the JAX config's 1e-4 (with 2000 iterations) means
the same here.

Internally the plan is solved for anchors at j/k with epsilon/k: the two costs divided
by their epsilons differ only by a term per score and a term per anchor, which the dual
potentials absorb, so the plans are identical; the smaller costs lose less float32
precision at epsilon 1e-4. Starting the anchor potential at -(k - 1) j^2 / k^2 instead
of 0 makes every iterate equal to the JAX iterate, so a run with tol = 0 and the same
number of iterations gives the JAX plan even before convergence.

The plan is solved in log space and differentiated implicitly at the fixed point (the
backward of Xie et al., Alg. 3): memory O(B n k), however many iterations the forward took.
That backward matches the JAX one at convergence only (see `SinkhornPlan`).
"""
from __future__ import annotations

import torch

from hrsel.errors import SelectionError
from hrsel.select._checks import check_finite, check_k, check_positive_int, check_scores
from hrsel.select.scores import normalize_scores

_CHECK_EVERY = 10


def _plan(f: torch.Tensor, g: torch.Tensor, cost: torch.Tensor, epsilon: float) -> torch.Tensor:
    return torch.exp((f.unsqueeze(2) + g.unsqueeze(1) - cost) / epsilon)


def _solve_psd(matrix: torch.Tensor, rhs: torch.Tensor) -> torch.Tensor:
    """(B, m, m) symmetric PSD with entries O(1), (B, m) -> (B, m): least-norm solution.

    Near the hard limit (small epsilon) a rank bin is fed by a single score and its row of
    the Schur complement vanishes: the system is singular (JAX's `inv` returns inf there).
    Directions with eigenvalues below sqrt(machine epsilon) are dropped; along them the plan
    does not move, so the gradient they would carry is zero up to rounding.
    """
    cutoff = torch.finfo(matrix.dtype).eps ** 0.5
    inverse = torch.linalg.pinv(matrix, atol=cutoff, rtol=0.0, hermitian=True)
    return torch.einsum("bij,bj->bi", inverse, rhs)


class SinkhornPlan(torch.autograd.Function):
    """cost (B, n, m), log marginals (B, n) and (B, m), initial column potential (B, m) -> plan (B, n, m).

    The backward differentiates the fixed point implicitly (Xie et al. 2020, Alg. 3), and it
    differs from the DPS JAX `sinkhorn_backward` (lib/ops/topk.py) in two ways:

    - it uses the returned plan's own marginals, mu = plan.sum(2) and nu = plan.sum(1), where
      JAX uses the target marginals it was given. After the last iteration (g updated last)
      the columns match the targets but the rows do not until the iterations converge, so
      the two gradients agree only at convergence; before it, this one is the exact gradient
      of the transport problem whose solution the returned plan is, JAX's mixes the plan
      with the targets. tests/test_select_sinkhorn.py checks both against finite differences.
    - it solves the Schur-complement system with a pseudo-inverse (`_solve_psd`) where JAX
      calls `inv`: the same where the system is well conditioned; near the hard limit
      (small epsilon) the system is singular, JAX's gradient is inf/NaN and this one
      drops the flat directions. The gauge (one dual potential fixed) is the last anchor
      here, the first in JAX: at the fixed point the gradient does not depend on it.
    """

    @staticmethod
    def forward(ctx, cost, log_mu, log_nu, g_init, epsilon, iterations, tol):
        g = g_init.clone()
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
        z = _solve_psd(hessian[:, :-1, :-1] * plan.shape[1], w[:, :-1] * plan.shape[1])
        z = torch.cat([z, z.new_zeros(z.shape[0], 1)], dim=1)  # (B, m)
        gz_over_mu = torch.einsum("bnm,bm->bn", plan, z) / mu
        grad_cost = plan * (p_over_mu.unsqueeze(2) + z.unsqueeze(1) - gz_over_mu.unsqueeze(2)) - weighted
        return grad_cost, None, None, None, None, None, None


def _check_epsilon(epsilon: float, k: int, dtype: torch.dtype) -> None:
    """The plan is solved at epsilon / k: below the dtype's resolution its entries are rounding noise."""
    resolution = torch.finfo(dtype).eps
    if epsilon / k < resolution:
        raise SelectionError(
            f"epsilon={epsilon!r} is too small for {str(dtype).replace('torch.', '')} scores at k={k}: the plan is "
            f"solved at epsilon / k = {epsilon / k:.3g}, below the dtype's resolution {resolution:.3g}, so it "
            f"would be rounding noise (inf, or rows that do not sum to 1). Use epsilon >= {k * resolution:.3g} "
            f"(the DPS JAX config: 1e-4 with 2000 iterations) or float64 scores")


def sinkhorn_topk(
    scores: torch.Tensor,
    k: int,
    epsilon: float = 1e-1,
    iterations: int = 200,
    *,
    tol: float = 1e-6,
) -> torch.Tensor:
    """Soft top-K indicators (B, k, N) by entropic optimal transport, differentiable.

    Row j is the soft one-hot of the patch of rank j (largest score first); rows
    sum to 1, columns to at most 1. Scores are min-max normalised per row first.
    `epsilon` uses the DPS JAX convention (anchors 0, 1, ..., k): its traffic config,
    epsilon = 1e-4 with 2000 iterations, is `sinkhorn_topk(s, k, 1e-4, 2000)`. The default
    0.1 is the former default (1e-2 with anchors at j/k) at k = 10. Iterations stop early
    once the row marginals are within `tol` (relative); tol = 0 runs all of them, as JAX does.
    The JAX code returns the columns anchor 1 first (rank k first); here rank 1 comes first.
    Scores must be finite and the batch non-empty (SelectionError naming the batch row); an
    epsilon below k times the dtype's resolution (float32: k * 1.2e-7), where the plan is rounding
    noise, is a SelectionError naming it.
    """
    check_scores(scores)
    n = scores.shape[1]
    check_k(k, n)
    check_positive_int(iterations, "iterations")
    if not 0 < epsilon < float("inf"):
        raise SelectionError(f"epsilon must be a finite number > 0, got {epsilon!r}")
    if not 0 <= tol < float("inf"):
        raise SelectionError(f"tol must be a finite number >= 0, got {tol!r}")
    x = normalize_scores(scores).to(torch.float64 if scores.dtype == torch.float64 else torch.float32)
    _check_epsilon(epsilon, k, x.dtype)
    b = x.shape[0]
    j = torch.arange(k + 1, device=x.device, dtype=x.dtype)  # anchor 0: "not selected"; anchor j: rank k + 1 - j
    mass = torch.full((k + 1,), 1.0 / n, device=x.device, dtype=x.dtype)
    mass[0] = (n - k) / n
    if k == n:  # nothing is left out: drop the empty bin
        j, mass = j[1:], mass[1:]
    # the JAX problem, cost (x - j)^2 at epsilon, solved as cost (x - j/k)^2 at epsilon / k (see the module doc)
    cost = (x.unsqueeze(2) - (j / k).view(1, 1, -1)) ** 2  # (B, n, m)
    g_init = (-(k - 1) / k**2 * j**2).expand(b, -1).contiguous()  # (B, m): iterates equal to the JAX ones
    log_mu = torch.full((b, n), -torch.log(torch.tensor(float(n))).item(), device=x.device, dtype=x.dtype)
    log_nu = mass.log().expand(b, -1).contiguous()
    plan = SinkhornPlan.apply(cost, log_mu, log_nu, g_init, float(epsilon) / k, iterations, float(tol))
    check_finite(plan, "the Sinkhorn transport plan", hint=(
        f"epsilon={epsilon!r} is too small for these scores: exp((f + g - cost) / (epsilon / k)) overflows. "
        f"Raise epsilon (the DPS JAX config uses 1e-4 with 2000 iterations) or pass float64 scores"))
    ranks = plan[:, :, -k:].flip(dims=(2,)) * n  # (B, n, k), rank 1 first
    return ranks.transpose(1, 2).to(scores.dtype)

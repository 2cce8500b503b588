"""Sinkhorn top-K against a plain float64 Sinkhorn in the DPS JAX convention (anchors 0, 1, ..., k), and its
backward against finite differences and against the JAX backward's formula (equal at convergence only).

The reference below is the textbook log-domain iteration on the JAX problem itself:
cost (x - j)^2 for anchors j = 0..k, marginals 1/n per score and ((n - k)/n, 1/n, ..., 1/n)
per anchor, potentials started at zero, f updated before g. `sinkhorn_topk` solves an
equivalent rescaled problem; these tests check that it returns the same numbers.
"""
import pytest
import torch

from hrsel.select import sinkhorn_topk
from hrsel.select.sinkhorn import SinkhornPlan


def reference(scores: torch.Tensor, k: int, epsilon: float, iterations: int) -> torch.Tensor:
    """(B, n) raw scores -> (B, k, n), rank 1 first, by plain Sinkhorn iterations in float64."""
    s = scores.double()
    lo, hi = s.min(1, keepdim=True).values, s.max(1, keepdim=True).values
    x = (s - lo) / (hi - lo + 1e-5)
    b, n = x.shape
    anchors = torch.arange(k + 1, dtype=torch.float64)
    cost = (x[:, :, None] - anchors) ** 2  # (B, n, k + 1)
    log_mu = torch.full((n, 1), 1.0 / n, dtype=torch.float64).log()
    log_nu = torch.tensor([(n - k) / n] + [1.0 / n] * k, dtype=torch.float64).log()
    f = torch.zeros(b, n, 1, dtype=torch.float64)
    g = torch.zeros(b, 1, k + 1, dtype=torch.float64)
    for _ in range(iterations):
        f = epsilon * log_mu - epsilon * torch.logsumexp((g - cost) / epsilon, dim=2, keepdim=True)
        g = epsilon * log_nu - epsilon * torch.logsumexp((f - cost) / epsilon, dim=1, keepdim=True)
    plan = torch.exp((f + g - cost) / epsilon)
    jax_output = n * plan[:, :, 1:]  # (B, n, k): column 0 = anchor 1 = rank k, as the JAX code returns it
    return jax_output.flip(2).transpose(1, 2)


def _distinct(b: int, n: int, seed: int) -> torch.Tensor:
    """Rows that are permutations of n evenly spaced values: no near-ties, so small epsilon is hard."""
    g = torch.Generator().manual_seed(seed)
    return torch.stack([torch.linspace(-1, 2, n, dtype=torch.float64)[torch.randperm(n, generator=g)]
                        for _ in range(b)])


@pytest.mark.parametrize("epsilon,iterations", [(0.3, 5), (0.05, 40), (1e-4, 300)])
def test_every_iterate_equals_the_jax_problem(epsilon, iterations):
    # tol = 0 runs exactly `iterations` steps; even unconverged (1e-4 after 300 steps) the plans agree
    torch.manual_seed(0)
    scores = torch.randn(3, 20, dtype=torch.float64)
    ours = sinkhorn_topk(scores, 4, epsilon, iterations, tol=0)
    torch.testing.assert_close(ours, reference(scores, 4, epsilon, iterations), atol=1e-9, rtol=0)


def test_k_equal_n_drops_the_empty_anchor():
    torch.manual_seed(1)
    scores = torch.randn(2, 5, dtype=torch.float64)
    ours = sinkhorn_topk(scores, 5, 0.2, 2000, tol=1e-12)
    torch.testing.assert_close(ours, reference(scores, 5, 0.2, 4000), atol=1e-8, rtol=0)


def test_float32_stays_close_to_the_float64_reference_at_the_jax_epsilon():
    torch.manual_seed(2)
    scores = torch.randn(2, 40, dtype=torch.float64)
    ours = sinkhorn_topk(scores.float(), 6, 1e-4, 300, tol=0)
    torch.testing.assert_close(ours.double(), reference(scores, 6, 1e-4, 300), atol=2e-2, rtol=0)


def test_marginals():
    torch.manual_seed(0)
    y = sinkhorn_topk(torch.randn(3, 25), 4, epsilon=0.2, iterations=500)
    assert y.shape == (3, 4, 25)
    torch.testing.assert_close(y.sum(-1), torch.ones(3, 4), atol=1e-4, rtol=0)
    assert (y.sum(1) <= 1 + 1e-3).all()
    assert (y >= 0).all()


def test_small_epsilon_is_hard_topk_ranked_by_score_and_large_epsilon_is_soft():
    scores = _distinct(3, 12, seed=0)
    hard = torch.nn.functional.one_hot(torch.topk(scores, 3).indices, 12).double()  # largest first
    sharp = sinkhorn_topk(scores, 3, epsilon=1e-3, iterations=3000, tol=1e-10)
    torch.testing.assert_close(sharp, hard, atol=5e-3, rtol=0)
    soft = sinkhorn_topk(scores, 3, epsilon=0.1, iterations=3000, tol=1e-10)
    assert (soft - hard).abs().max() > 0.3


def test_gradient_matches_finite_differences_of_the_reference():
    torch.manual_seed(3)
    scores = torch.randn(2, 7, dtype=torch.float64)
    upstream = torch.randn(2, 3, 7, dtype=torch.float64)
    leaf = scores.clone().requires_grad_()
    (sinkhorn_topk(leaf, 3, 0.3, 5000, tol=1e-13) * upstream).sum().backward()
    h = 1e-6
    numeric = torch.zeros_like(scores)
    for i in range(2):
        for j in range(7):
            plus, minus = scores.clone(), scores.clone()
            plus[i, j] += h
            minus[i, j] -= h
            diff = (reference(plus, 3, 0.3, 200) - reference(minus, 3, 0.3, 200)) * upstream  # converged
            numeric[i, j] = diff.sum() / (2 * h)
    torch.testing.assert_close(leaf.grad, numeric, atol=1e-6, rtol=1e-5)


def test_backward_at_the_hard_limit_is_finite_and_flat():
    # at the JAX setting a rank bin is fed by one score and the implicit system is singular
    # (a plain solve raises in float32); the plan no longer moves, so the gradient is ~0
    upstream = torch.randn(2, 3, 12, generator=torch.Generator().manual_seed(0))
    for dtype, epsilon in ((torch.float32, 1e-4), (torch.float64, 1e-3)):
        scores = _distinct(2, 12, seed=0).to(dtype).requires_grad_()
        (sinkhorn_topk(scores, 3, epsilon, 2000) * upstream.to(dtype)).sum().backward()
        assert torch.isfinite(scores.grad).all() and scores.grad.abs().max() < 1e-3
    soft = _distinct(2, 12, seed=0).requires_grad_()
    (sinkhorn_topk(soft, 3, 0.3, 2000) * upstream.double()).sum().backward()
    assert soft.grad.abs().max() > 0.05  # the same scores at a soft epsilon do move the plan


def jax_backward(plan, mu, nu, epsilon, upstream):
    """dL/dcost of one (n, m) plan as the DPS JAX `sinkhorn_backward` (lib/ops/topk.py) forms it: the target
    marginals mu (n,) and nu (m,), an explicit inverse, the first anchor's dual potential held fixed."""
    n, m = plan.shape
    rest = plan[:, 1:]  # (n, m - 1)
    d = torch.diag(1.0 / mu)
    kappa_inv = torch.linalg.inv(torch.diag(nu[1:]) - rest.T @ d @ rest)  # (m - 1, m - 1)
    h1 = d + d @ rest @ kappa_inv @ rest.T @ d  # (n, n)
    h2 = torch.cat([plan.new_zeros(n, 1), -d @ rest @ kappa_inv], dim=1)  # (n, m)
    h3 = (-d @ rest @ kappa_inv).T  # (m - 1, n)
    h4 = torch.cat([plan.new_zeros(m - 1, 1), kappa_inv], dim=1)  # (m - 1, m)
    weighted = upstream * plan
    rows, cols = weighted.sum(dim=1), weighted.sum(dim=0)[1:]  # (n,), (m - 1,)
    through_f = (rows @ h1)[:, None] * plan + (rows @ h2)[None, :] * plan
    through_g = (cols @ h3)[:, None] * plan + (cols @ h4)[None, :] * plan
    return (-weighted + through_f + through_g) / epsilon


def _transport(seed=4, n=6):
    """A small problem in the Sinkhorn top-2 shape: cost (n, 3), marginals 1/n and ((n - 2)/n, 1/n, 1/n)."""
    g = torch.Generator().manual_seed(seed)
    x = torch.rand(n, generator=g, dtype=torch.float64)
    cost = (x[:, None] - torch.arange(3, dtype=torch.float64) / 2) ** 2
    mu = torch.full((n,), 1.0 / n, dtype=torch.float64)
    nu = torch.tensor([(n - 2) / n, 1 / n, 1 / n], dtype=torch.float64)
    return cost, mu, nu, torch.randn(n, 3, generator=g, dtype=torch.float64)


def _plan_and_grad(cost, mu, nu, epsilon, iterations, upstream, tol=0.0):
    leaf = cost[None].clone().requires_grad_()
    plan = SinkhornPlan.apply(leaf, mu.log()[None], nu.log()[None], torch.zeros_like(nu)[None], epsilon,
                              iterations, tol)
    (plan[0] * upstream).sum().backward()
    return plan[0].detach(), leaf.grad[0]


def _converged_finite_differences(cost, mu, nu, epsilon, upstream, h=1e-6):
    numeric = torch.zeros_like(cost)
    for i in range(cost.shape[0]):
        for j in range(cost.shape[1]):
            shifted = []
            for step in (h, -h):
                c = cost.clone()
                c[i, j] += step
                shifted.append(_plan_and_grad(c, mu, nu, epsilon, 5000, upstream, tol=1e-13)[0])
            numeric[i, j] = ((shifted[0] - shifted[1]) * upstream).sum() / (2 * h)
    return numeric


def test_backward_agrees_with_the_jax_backward_at_convergence_only():
    cost, mu, nu, upstream = _transport()
    epsilon = 0.1
    plan, ours = _plan_and_grad(cost, mu, nu, epsilon, 5000, upstream, tol=1e-13)
    torch.testing.assert_close(ours, jax_backward(plan, mu, nu, epsilon, upstream), atol=1e-9, rtol=1e-7)
    torch.testing.assert_close(ours, _converged_finite_differences(cost, mu, nu, epsilon, upstream),
                               atol=1e-6, rtol=1e-5)
    # two iterations: the columns meet their targets (g is updated last), the rows do not yet
    early, ours_early = _plan_and_grad(cost, mu, nu, epsilon, 2, upstream)
    rows = early.sum(dim=1)
    torch.testing.assert_close(early.sum(dim=0), nu, atol=1e-12, rtol=0)
    assert (rows - mu).abs().max() > 1e-3
    # this backward is the exact gradient of the problem the returned plan solves (its own row marginals) ...
    torch.testing.assert_close(ours_early, _converged_finite_differences(cost, rows, nu, epsilon, upstream),
                               atol=1e-6, rtol=1e-5)
    # ... and JAX's, built on the targets, is another number before convergence
    jax_early = jax_backward(early, mu, nu, epsilon, upstream)
    assert (jax_early - ours_early).abs().max() > 0.01 * ours_early.abs().max()


def test_bad_input():
    with pytest.raises(ValueError, match="epsilon"):
        sinkhorn_topk(torch.rand(1, 5), 2, epsilon=0.0)
    with pytest.raises(ValueError, match="k=6"):
        sinkhorn_topk(torch.rand(1, 5), 6)

"""A Bernoulli keep/drop policy over patches trained with REINFORCE (PatchDrop, Uzkent & Ermon 2020).

A policy network gives a keep probability p_n per patch. Training samples actions
a_n ~ Bernoulli(p_n); inference keeps p_n > 0.5 (greedy). The reward is
1 - (kept fraction)^2 for a correct prediction and `-penalty` otherwise, and the policy
loss is -(R - baseline) * log pi(a), with a baseline to reduce the variance.
"""
from __future__ import annotations

import torch


def sample_actions(probs: torch.Tensor, *, greedy: bool, min_keep: int = 1,
                   generator: torch.Generator | None = None) -> torch.Tensor:
    """(B, N) keep probabilities -> (B, N) float actions in {0, 1}.

    At least `min_keep` patches are kept per row (the most probable ones) so that the
    classifier never sees an empty set.
    """
    if greedy:
        actions = (probs > 0.5).to(probs.dtype)
    else:
        u = torch.rand(probs.shape, generator=generator, device=probs.device, dtype=probs.dtype)
        actions = (u < probs).to(probs.dtype)
    if min_keep > 0:
        top = probs.topk(min(min_keep, probs.shape[1]), dim=1).indices
        actions = actions.scatter(1, top, 1.0)
    return actions.detach()


def log_prob(probs: torch.Tensor, actions: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    """Log-probability of Bernoulli actions, summed over patches: (B, N), (B, N) -> (B,)."""
    probs = probs.clamp(eps, 1.0 - eps)
    return (actions * probs.log() + (1.0 - actions) * (1.0 - probs).log()).sum(dim=1)


def patchdrop_reward(correct: torch.Tensor, kept_fraction: torch.Tensor, *, penalty: float) -> torch.Tensor:
    """PatchDrop's reward: 1 - kept_fraction^2 when correct, -penalty otherwise. (B,), (B,) -> (B,)."""
    return torch.where(correct.bool(), 1.0 - kept_fraction.float() ** 2,
                       torch.full_like(kept_fraction.float(), -float(penalty)))


def reinforce_loss(log_probs: torch.Tensor, reward: torch.Tensor, baseline: torch.Tensor | float) -> torch.Tensor:
    """Policy-gradient surrogate: mean over the batch of -(reward - baseline) * log pi(actions)."""
    advantage = (reward - baseline).detach()
    return -(advantage * log_probs).mean()

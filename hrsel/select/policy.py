"""A Bernoulli keep/drop policy over patches trained with REINFORCE (PatchDrop, Uzkent & Ermon 2020).

A policy network gives a keep probability p_n per patch. PatchDrop's released code
(ermongroup/PatchDrop pretrain.py, finetune.py, commit 9e9d9fa) trains it as follows, and
these functions are its pieces:

- exploration bound: actions are sampled from p' = alpha p + (1 - alpha)(1 - p), alpha = 0.8,
  so no patch is ever kept or dropped with certainty while training;
- reward: 1 - (kept / N)^2 for a correct prediction, -penalty otherwise (PatchDrop's
  `--penalty` is the negative reward itself: -0.5 pre-training, -5 to -20 fine-tuning;
  here `penalty` is its magnitude);
- self-critical baseline: the reward of the greedy policy (keep p >= 0.5) on the same
  image; loss -(R(sampled) - R(greedy)) * log pi(sampled);
- curriculum (pre-training; PatchDrop's first commit, 1df48e5, not the released code):
  at stage e only patches 0..e are the policy's to choose, the others are kept and left
  out of the loss, until all N are free.

Inference keeps p >= 0.5.
"""
from __future__ import annotations

import torch

from hrsel.errors import SelectionError
from hrsel.select._checks import check_generator, check_probabilities

_PROBS_HINT = "the policy must output keep probabilities, e.g. a sigmoid of its logits"


def bound_probs(probs: torch.Tensor, alpha: float) -> torch.Tensor:
    """PatchDrop's exploration bound: alpha * p + (1 - alpha) * (1 - p); alpha = 1 leaves p as it is."""
    if not 0.5 <= alpha <= 1.0:
        raise SelectionError(f"alpha must be in [0.5, 1] (PatchDrop: 0.8), got {alpha!r}")
    check_probabilities(probs, "keep probabilities", hint=_PROBS_HINT, matrix=False)
    return alpha * probs + (1.0 - alpha) * (1.0 - probs)


def greedy_actions(probs: torch.Tensor) -> torch.Tensor:
    """(B, N) keep probabilities -> (B, N) float actions: keep where p >= 0.5 (PatchDrop's test policy)."""
    check_probabilities(probs, "keep probabilities", hint=_PROBS_HINT, matrix=False)
    return (probs >= 0.5).to(probs.dtype).detach()


def sample_actions(probs: torch.Tensor, *, generator: torch.Generator | None = None) -> torch.Tensor:
    """(B, N) keep probabilities -> (B, N) float actions ~ Bernoulli(p), no gradient."""
    check_probabilities(probs, "keep probabilities", hint=_PROBS_HINT, matrix=False)
    check_generator(generator)
    u = torch.rand(probs.shape, generator=generator, device=probs.device, dtype=probs.dtype)
    return (u < probs.detach()).to(probs.dtype)


def curriculum_free(step: int, *, num_patches: int, steps: int) -> int:
    """Patches the policy decides at training step `step` of a curriculum over `steps` steps.

    PatchDrop frees one more patch per epoch over the first N epochs (patch e + 1 at epoch e);
    here the N stages are spread evenly over `steps` (0: no curriculum, all N free).
    """
    if steps <= 0 or step >= steps:
        return num_patches
    return min(num_patches, 1 + step * num_patches // steps)


def apply_curriculum(actions: torch.Tensor, free: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Keep every patch from raster index `free` on -> (actions (B, N), loss mask (B, N), 1 = free)."""
    mask = torch.zeros_like(actions)
    mask[:, :free] = 1.0
    return torch.where(mask > 0, actions, torch.ones_like(actions)), mask


def with_one_kept(actions: torch.Tensor, probs: torch.Tensor) -> torch.Tensor:
    """Rows that keep nothing keep their most probable patch instead, so the classifier sees a patch.

    PatchDrop shows an all-black image then; a set-based classifier needs at least one patch.
    """
    empty = actions.sum(dim=1, keepdim=True) == 0  # (B, 1)
    top = torch.zeros_like(actions).scatter(1, probs.detach().argmax(dim=1, keepdim=True), 1.0)
    return torch.where(empty, top, actions)


def log_prob(probs: torch.Tensor, actions: torch.Tensor, *, mask: torch.Tensor | None = None,
             eps: float = 1e-6) -> torch.Tensor:
    """Log-probability of Bernoulli actions, summed over the (masked) patches: (B, N), (B, N) -> (B,)."""
    probs = probs.clamp(eps, 1.0 - eps)
    per_patch = actions * probs.log() + (1.0 - actions) * (1.0 - probs).log()
    return (per_patch if mask is None else per_patch * mask).sum(dim=1)


def patchdrop_reward(correct: torch.Tensor, kept_fraction: torch.Tensor, *, penalty: float) -> torch.Tensor:
    """PatchDrop's reward: 1 - kept_fraction^2 when correct, -penalty otherwise. (B,), (B,) -> (B,)."""
    if not 0 <= penalty < float("inf"):
        raise SelectionError(f"penalty is the magnitude of the negative reward (PatchDrop's --penalty -0.5 is "
                         f"penalty 0.5), got {penalty!r}")
    return torch.where(correct.bool(), 1.0 - kept_fraction.float() ** 2,
                       torch.full_like(kept_fraction.float(), -float(penalty)))


def self_critical_advantage(reward: torch.Tensor, greedy_reward: torch.Tensor) -> torch.Tensor:
    """R(sampled actions) - R(greedy actions) on the same image, no gradient: (B,), (B,) -> (B,)."""
    return (reward - greedy_reward).detach()


def reinforce_loss(log_probs: torch.Tensor, reward: torch.Tensor, baseline: torch.Tensor | float) -> torch.Tensor:
    """Policy-gradient surrogate: mean over the batch of -(reward - baseline) * log pi(actions)."""
    advantage = (reward - baseline).detach()
    return -(advantage * log_probs).mean()

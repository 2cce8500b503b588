"""Optimisers and learning-rate schedules.

The schedule is a pure function of the update step, so resuming needs only the
step: `set_lr(optimizer, base_lr * lr_factor(step, ...))` before every update.
"""
from __future__ import annotations

import math
from typing import Iterable

import torch
from torch import nn


WEIGHT_DECAY_MODES = ("lr_scaled", "absolute", "jax_coupled")
WEIGHT_DECAY_ON = ("matrices", "all")


def build_optimizer(model: nn.Module, *, name: str, lr: float, weight_decay: float,
                    betas: Iterable[float] = (0.9, 0.999), momentum: float = 0.9,
                    weight_decay_mode: str = "lr_scaled", weight_decay_on: str = "matrices") -> torch.optim.Optimizer:
    """AdamW (decoupled decay) or SGD with momentum.

    weight_decay_mode:
        lr_scaled: torch's convention, per step theta -= lr(t) * wd * theta (AdamW) or L2 (SGD).
        absolute: the DPS JAX convention, theta -= wd * s(t) * theta with s(t) = lr(t) / lr, i.e. the
            schedule factor but not the learning rate itself. With lr 1e-4 this decays 1e4 times more
            than lr_scaled; it is AdamW with weight_decay = wd / lr, since the loop sets lr(t) = lr * s(t).
        jax_coupled: the DPS JAX CUB code's `weight_decay_coupled` (ntsnet.py `create_optimizer`): its
            `decoupled_weight_decay` transform (update - wd * theta, written for the optimiser's output)
            runs before SGD there, so every gradient becomes g - wd * theta before the momentum. That is
            an L2 term of the opposite sign: the weights grow by lr(t) * wd * theta per step instead of
            shrinking. Reproduces the code behind DPS table 3; lr_scaled is the decay the paper describes.
    weight_decay_on: matrices (no decay on biases and norm weights) | all (JAX: every parameter).
    """
    if weight_decay_mode not in WEIGHT_DECAY_MODES:
        raise ValueError(f"weight_decay_mode {weight_decay_mode!r} is not one of {', '.join(WEIGHT_DECAY_MODES)}")
    if weight_decay_on not in WEIGHT_DECAY_ON:
        raise ValueError(f"weight_decay_on {weight_decay_on!r} is not one of {', '.join(WEIGHT_DECAY_ON)}")
    if weight_decay_mode == "absolute":
        if name != "adamw":
            raise ValueError(f"weight_decay_mode 'absolute' needs decoupled decay: use optimizer adamw, not {name!r}")
        weight_decay = weight_decay / lr
    coupled = -weight_decay if weight_decay_mode == "jax_coupled" else 0.0
    decay, no_decay = [], []
    for p in model.parameters():
        if p.requires_grad:
            (decay if p.ndim >= 2 or weight_decay_on == "all" else no_decay).append(p)
    groups = [{"params": decay, "weight_decay": 0.0 if coupled else weight_decay},
              {"params": no_decay, "weight_decay": 0.0}]
    groups = [g for g in groups if g["params"]]
    if coupled and decay:
        groups[0]["gradient_l2"] = coupled
    if name == "adamw":
        optimizer = torch.optim.AdamW(groups, lr=lr, betas=tuple(betas))
    elif name == "sgd":
        optimizer = torch.optim.SGD(groups, lr=lr, momentum=momentum)
    else:
        raise ValueError(f"optimizer {name!r} is not one of adamw, sgd")
    if coupled:
        optimizer.register_step_pre_hook(_add_gradient_l2)
    return optimizer


def _add_gradient_l2(optimizer: torch.optim.Optimizer, args, kwargs) -> None:
    """Before each step: grad += c * theta per group (c = `gradient_l2`; torch's own weight_decay must be >= 0)."""
    with torch.no_grad():
        for group in optimizer.param_groups:
            if group.get("gradient_l2"):
                for p in group["params"]:
                    if p.grad is not None:
                        p.grad.add_(p, alpha=group["gradient_l2"])


def lr_factor(step: int, *, total_steps: int, warmup_steps: int = 0, schedule: str = "cosine",
              min_lr_ratio: float = 0.0, milestones: Iterable[int] = (), gamma: float = 0.1) -> float:
    """Multiplier of the base lr at update `step` (0-based).

    Linear warm-up from 1/(warmup+1) to 1 over `warmup_steps`, then:
    cosine: half a cosine from 1 to `min_lr_ratio` at `total_steps`;
    piecewise: x gamma at each milestone step (CUB: epochs 60 and 80);
    constant: 1.
    """
    if step < warmup_steps:
        return (step + 1) / (warmup_steps + 1)
    if schedule == "constant":
        return 1.0
    if schedule == "piecewise":
        return gamma ** sum(step >= m for m in milestones)
    if schedule == "cosine":
        span = max(total_steps - warmup_steps, 1)
        progress = min((step - warmup_steps) / span, 1.0)
        return min_lr_ratio + (1 - min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress))
    raise ValueError(f"schedule {schedule!r} is not one of cosine, piecewise, constant")


def planned_steps(*, epochs: int, updates_per_epoch: int, max_steps: int = 0) -> int:
    """Updates the schedule (warm-up, milestones, cosine, sigma decay) is planned over.

    train.max_steps when set: the run length is then a number of updates, whatever an epoch holds
    (DPS CUB: 31,300, milestones at 18,780 and 25,040 with or without a validation hold-out);
    train.epochs only bounds the run. Else epochs x updates per epoch.
    """
    return max_steps if max_steps else epochs * updates_per_epoch


def schedule_steps(*, updates_per_epoch: int, total_steps: int, warmup_epochs: float = 0.0,
                   warmup_ratio: float = 0.0, milestones: Iterable[float] = (),
                   milestone_ratios: Iterable[float] = ()) -> tuple[int, list[int]]:
    """Warm-up length and piecewise milestones in updates, from epochs or from fractions of all updates."""
    warmup = round(warmup_ratio * total_steps) if warmup_ratio else round(warmup_epochs * updates_per_epoch)
    steps = [round(r * total_steps) for r in milestone_ratios] or [round(m * updates_per_epoch) for m in milestones]
    return warmup, steps


def set_lr(optimizer: torch.optim.Optimizer, lr: float) -> None:
    for group in optimizer.param_groups:
        group["lr"] = lr


def clip_gradients(parameters: Iterable[torch.Tensor], *, clip_value: float = 0.0, clip_norm: float = 0.0) -> float | None:
    """Clip by value and/or global norm (0 disables either); returns the norm before clipping."""
    params = [p for p in parameters if p.grad is not None]
    if clip_value > 0:
        torch.nn.utils.clip_grad_value_(params, clip_value)
    if clip_norm > 0:
        return float(torch.nn.utils.clip_grad_norm_(params, clip_norm))
    return None

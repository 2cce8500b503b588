"""Prediction heads, one per task, and the per-sample losses that go with them.

Multi-class heads give logits for a softmax (loss: log-softmax cross-entropy);
multi-label and binary heads give logits for sigmoids (loss: BCE on the logits).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from hrsel.tasks import TaskSpec


class TaskHeads(nn.Module):
    """Pooled tokens (B, T, D) -> {task: (B, num_classes)} logits.

    With one token per task (cross-attention MIL), task i reads token i; otherwise
    every task reads token 0.

    Args:
        tasks: task name -> TaskSpec.
        in_dim: token width D.
        hidden_dim: DPS puts Dense(hidden) + swish before each classifier; None: linear only.
    """

    def __init__(self, *, tasks: dict[str, TaskSpec], in_dim: int, hidden_dim: int | None = None):
        super().__init__()
        if not tasks:
            raise ValueError("TaskHeads needs at least one task")
        self.tasks = dict(tasks)
        self.heads = nn.ModuleDict()
        for name, spec in self.tasks.items():
            layers: list[nn.Module] = []
            width = in_dim
            if hidden_dim:
                layers += [nn.Linear(in_dim, hidden_dim), nn.SiLU()]
                width = hidden_dim
            layers.append(nn.Linear(width, spec.num_classes))
            self.heads[name] = nn.Sequential(*layers)

    def forward(self, tokens: torch.Tensor) -> dict[str, torch.Tensor]:
        per_task = tokens.shape[1] == len(self.tasks)
        return {name: head(tokens[:, i if per_task else 0]) for i, (name, head) in enumerate(self.heads.items())}


def task_loss(logits: torch.Tensor, target: torch.Tensor, spec: TaskSpec) -> torch.Tensor:
    """Per-sample loss (B,) from logits (B, C): cross-entropy on log-softmax, or BCE on logits."""
    if spec.kind == "multiclass":
        return F.cross_entropy(logits, target.long(), reduction="none")
    if spec.kind == "binary":
        return F.binary_cross_entropy_with_logits(logits[:, 0], target.float().view(-1), reduction="none")
    return F.binary_cross_entropy_with_logits(logits, target.float(), reduction="none").mean(dim=1)


def is_correct(logits: torch.Tensor, target: torch.Tensor, spec: TaskSpec) -> torch.Tensor:
    """(B,) bool: arg-max matches (multi-class) or every sigmoid decision matches (multi-label, binary)."""
    if spec.kind == "multiclass":
        return logits.argmax(dim=1) == target.long()
    decision = logits > 0
    target = target.float().view(decision.shape) > 0.5
    return (decision == target).all(dim=1)

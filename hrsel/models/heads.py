"""Prediction heads, one per task, and the per-sample losses that go with them.

Multi-class heads give logits for a softmax (loss: log-softmax cross-entropy);
multi-label and binary heads give logits for sigmoids (loss: BCE on the logits).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from hrsel.errors import ConfigError
from hrsel.tasks import TaskSpec


class TaskHeads(nn.Module):
    """Pooled tokens (B, T, D) -> {task: (B, num_classes)} logits.

    With one token per task (cross-attention MIL), task i reads token i; otherwise
    every task reads token 0.

    Args:
        tasks: task name -> TaskSpec.
        in_dim: token width D.
        hidden_dim: DPS puts Dense(hidden) + swish before each classifier; "same": hidden = D
            (DPS JAX: Dense(D) + swish, D the aggregated width); None: linear only.
    """

    def __init__(self, *, tasks: dict[str, TaskSpec], in_dim: int, hidden_dim: int | str | None = None):
        super().__init__()
        if not tasks:
            raise ValueError("TaskHeads needs at least one task")
        hidden_dim = resolve_hidden(hidden_dim, in_dim)
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


def resolve_hidden(hidden_dim: int | str | None, in_dim: int) -> int | None:
    """head_hidden: an int, "same" (= in_dim) or None / 0 (no hidden layer)."""
    if hidden_dim == "same":
        return in_dim
    if hidden_dim is None or (isinstance(hidden_dim, int) and not isinstance(hidden_dim, bool) and hidden_dim >= 0):
        return hidden_dim or None
    raise ConfigError(f"head_hidden {hidden_dim!r} is invalid; valid: a width >= 1, 'same' (the aggregated "
                      "feature width) or null (no hidden layer); e.g. model.head_hidden=same")


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

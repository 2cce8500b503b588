"""Task losses and metrics for multi-task heads (multiclass, multilabel, binary).

Losses use log_softmax / BCE-with-logits on raw logits (never softmax then log).
Metrics are computed from concatenated logits and targets of a whole split.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from hrsel.tasks import TaskSpec


def task_loss(logits: torch.Tensor, target: torch.Tensor, spec: TaskSpec,
              weight: torch.Tensor | None = None) -> torch.Tensor:
    """Mean loss of one task. logits (B, C); target (B,) int64 | (B, C) float | (B,) float.

    `weight`: per-class weights (C,) for multiclass; for multilabel / binary the
    positive-class weight (C,) / (1,) of BCE-with-logits.
    """
    logits = logits.float()
    if spec.kind == "multiclass":
        log_p = F.log_softmax(logits, dim=-1)  # (B, C)
        return F.nll_loss(log_p, target.long(), weight=weight)
    if spec.kind == "binary":
        logits = logits.reshape(-1)  # (B, 1) -> (B,)
        target = target.reshape(-1)
    return F.binary_cross_entropy_with_logits(logits, target.float(), pos_weight=weight)


def multitask_loss(logits: dict[str, torch.Tensor], targets: dict[str, torch.Tensor],
                   tasks: dict[str, TaskSpec], *, task_weights: dict[str, float] | None = None,
                   class_weights: dict[str, torch.Tensor] | None = None) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Weighted sum of the task losses; returns (total, {task: loss})."""
    task_weights = task_weights or {}
    class_weights = class_weights or {}
    parts = {}
    for name, spec in tasks.items():
        w = class_weights.get(name)
        parts[name] = task_loss(logits[name], targets[name], spec,
                                weight=None if w is None else w.to(logits[name].device))
    total = sum(task_weights.get(n, 1.0) * loss for n, loss in parts.items())
    return total, parts


def class_balanced_weights(counts: torch.Tensor, spec: TaskSpec, num_items: int) -> torch.Tensor:
    """Inverse-frequency weights from class counts (C,).

    multiclass: w_c = N / (C * n_c) (mean weight 1 on a balanced set);
    multilabel / binary: the BCE positive weight n_neg / n_pos per class.
    """
    counts = counts.double().clamp(min=1)
    if spec.kind == "multiclass":
        return (num_items / (len(counts) * counts)).float()
    negatives = (num_items - counts).clamp(min=1)
    return (negatives / counts).float()


def accuracy(logits: torch.Tensor, target: torch.Tensor) -> float:
    """Multiclass accuracy. logits (B, C), target (B,)."""
    return (logits.argmax(-1) == target.long()).float().mean().item()


def multilabel_accuracy(logits: torch.Tensor, target: torch.Tensor) -> float:
    """Fraction of correct labels over all (item, class) pairs; logits (B, C), target (B, C).

    Not the IPS `multi` metric (that is `exact_match`): predicting all-absent already scores
    0.7 to 0.8 on Megapixel MNIST's 10 labels (2 or 3 digit classes per image).
    """
    return ((logits > 0) == (target > 0.5)).float().mean().item()


def exact_match(logits: torch.Tensor, target: torch.Tensor) -> float:
    """Fraction of items whose every label is right."""
    return ((logits > 0) == (target > 0.5)).all(dim=-1).float().mean().item()


def auc(scores: torch.Tensor, target: torch.Tensor) -> float:
    """Area under the ROC curve (Mann-Whitney U, ties count half); nan with one class only."""
    scores = scores.reshape(-1).double()
    target = target.reshape(-1) > 0.5
    n_pos, n_neg = int(target.sum()), int((~target).sum())
    if n_pos == 0 or n_neg == 0:
        return float("nan")
    ranks = _average_ranks(scores)
    u = ranks[target].sum() - n_pos * (n_pos + 1) / 2
    return (u / (n_pos * n_neg)).item()


def _average_ranks(x: torch.Tensor) -> torch.Tensor:
    """1-based ranks of x (N,), tied values sharing their mean rank."""
    order = torch.argsort(x)
    sorted_x = x[order]
    ranks = torch.empty_like(x)
    _, inverse, counts = torch.unique_consecutive(sorted_x, return_inverse=True, return_counts=True)
    ends = torch.cumsum(counts, 0).to(x.dtype)  # last rank of each tie group
    mean_rank = ends - (counts.to(x.dtype) - 1) / 2
    ranks[order] = mean_rank[inverse]
    return ranks


def task_metrics(logits: torch.Tensor, target: torch.Tensor, spec: TaskSpec) -> dict[str, float]:
    """The metrics reported for one task over a whole split, the headline metric first.

    multiclass: accuracy (+ auc with 2 classes); multilabel: exact_match (every label of an
    item right; what IPS reports for Megapixel MNIST's `multi`), then accuracy (per label,
    inflated by the many easy negatives); binary: accuracy, auc.
    """
    logits = logits.float()
    if spec.kind == "multiclass":
        out = {"accuracy": accuracy(logits, target)}
        if spec.num_classes == 2:
            out["auc"] = auc(logits[:, 1] - logits[:, 0], target)
        return out
    if spec.kind == "multilabel":  # exact match first: the task's headline (IPS's Megapixel MNIST `multi`)
        return {"exact_match": exact_match(logits, target), "accuracy": multilabel_accuracy(logits, target)}
    scores = logits.reshape(-1)
    target = target.reshape(-1)
    return {"accuracy": ((scores > 0) == (target > 0.5)).float().mean().item(), "auc": auc(scores, target)}


def chance_levels(targets: dict[str, torch.Tensor], tasks: dict[str, TaskSpec]) -> dict[str, float]:
    """{"task/metric": value} that a model blind to its input reaches on these targets: the commonest
    class's share for accuracy, 0.5 for AUC. Multilabel tasks have none here."""
    out = {}
    for name, spec in tasks.items():
        target = targets[name].reshape(-1) if spec.kind != "multiclass" else targets[name].long()
        if spec.kind == "multilabel" or target.numel() == 0:
            continue
        if spec.kind == "multiclass":
            share = torch.bincount(target, minlength=spec.num_classes).max().item() / target.numel()
        else:
            positive = (target > 0.5).double().mean().item()
            share = max(positive, 1.0 - positive)
        out[f"{name}/accuracy"] = share
        if spec.kind == "binary" or spec.num_classes == 2:
            out[f"{name}/auc"] = 0.5
    return out


def all_metrics(logits: dict[str, torch.Tensor], targets: dict[str, torch.Tensor],
                tasks: dict[str, TaskSpec]) -> dict[str, float]:
    """{"task/metric": value} over every task."""
    out = {}
    for name, spec in tasks.items():
        for metric, value in task_metrics(logits[name], targets[name], spec).items():
            out[f"{name}/{metric}"] = value
    return out


def predictions(logits: torch.Tensor, spec: TaskSpec) -> list:
    """Readable predictions per item: class index, list of labels, or 0/1."""
    if spec.kind == "multiclass":
        return logits.argmax(-1).tolist()
    if spec.kind == "multilabel":
        return [torch.nonzero(row > 0).flatten().tolist() for row in logits]
    return (logits.reshape(-1) > 0).long().tolist()

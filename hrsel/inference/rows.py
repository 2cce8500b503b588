"""Rows of predictions.csv and the labels of a manifest, as the trainer's metrics see them.

Probabilities: softmax (multiclass), one sigmoid per class (multilabel), [1 - p, p] (binary);
columns `path`, `id`, `split` (with manifest splits), `<task>/predicted`, `<task>/true` (with
labels) and `<task>/prob/<class>`.
"""
from __future__ import annotations

from typing import Any

import numpy as np
import torch

from hrsel.data.manifest_table import canonical_label
from hrsel.errors import DataError
from hrsel.inference.inputs import PredictInput
from hrsel.tasks import TaskSpec


def probabilities(logits: torch.Tensor, spec: TaskSpec) -> np.ndarray:
    """(B, C) logits -> (B, C') probabilities: softmax (multiclass), sigmoid per class (multilabel),
    [1 - p, p] (binary)."""
    logits = logits.float()
    if spec.kind == "multiclass":
        return torch.softmax(logits, dim=-1).numpy()
    p = torch.sigmoid(logits)
    if spec.kind == "binary":
        p = p.reshape(-1, 1)
        return torch.cat([1 - p, p], dim=1).numpy()
    return p.numpy()


def predicted_names(probs: np.ndarray, spec: TaskSpec, names: list[str]) -> str:
    """The predicted class name of one row of `probabilities` (multilabel: the names over 0.5, `|`-joined)."""
    if spec.kind == "multilabel":
        return "|".join(n for n, p in zip(names, probs) if p > 0.5)
    return names[int(np.argmax(probs))]


def class_names_for(spec: TaskSpec, names: list[str]) -> list[str]:
    width = 2 if spec.kind == "binary" else spec.num_classes
    names = list(names)[:width]
    return names + [str(i) for i in range(len(names), width)]


def csv_columns(model: Any, *, labelled: bool, split: bool = False) -> list[str]:
    columns = ["path", "id"] + (["split"] if split else [])
    for task, spec in model.tasks.items():
        columns.append(f"{task}/predicted")
        if labelled:
            columns.append(f"{task}/true")
        columns += [f"{task}/prob/{name}" for name in class_names_for(spec, model.class_names[task])]
    return columns


def prediction_row(item: PredictInput, logits: dict[str, torch.Tensor], tasks: dict[str, TaskSpec],
                   class_names: dict[str, list[str]]) -> dict[str, Any]:
    row: dict[str, Any] = {"path": str(item.path), "id": item.id}
    if item.split:
        row["split"] = item.split
    for task, spec in tasks.items():
        predicted, probs = task_prediction(logits[task], spec, class_names[task])
        row[f"{task}/predicted"] = predicted
        if item.labels:
            row[f"{task}/true"] = item.labels.get(task, "")
        for name, p in probs.items():
            row[f"{task}/prob/{name}"] = f"{p:.6g}"
    return row


def task_prediction(logits: torch.Tensor, spec: TaskSpec, class_names: list[str]) -> tuple[str, dict[str, float]]:
    """(the predicted class name, {class name: probability}) of one task from logits (1, C)."""
    names = class_names_for(spec, class_names)
    probs = probabilities(logits, spec)[0]
    return predicted_names(probs, spec, names), {name: float(p) for name, p in zip(names, probs)}


def encode_labels(item: PredictInput, tasks: dict[str, TaskSpec], class_names: dict[str, list[str]]
                  ) -> dict[str, torch.Tensor]:
    """{task: target (1,) or (1, C)} for the tasks whose label the item carries; DataError on an unknown class."""
    out = {}
    for task, spec in tasks.items():
        text = (item.labels.get(task) or "").strip()
        if not text:
            continue
        names = class_names_for(spec, class_names[task])
        parts = [p.strip() for p in text.split("|") if p.strip()] if spec.kind == "multilabel" else [text]
        ids = []
        for part in parts:
            if part not in names and canonical_label(part) in names:  # 1.0 names class 1
                part = canonical_label(part)
            if part in names:
                ids.append(names.index(part))
            elif part.lstrip("-").isdigit() and 0 <= int(part) < len(names):
                ids.append(int(part))
            else:
                raise DataError(f"{item.id}: label {part!r} of task {task!r} is not a class of the model "
                                f"({', '.join(names)}); fix the manifest or predict without labels")
        if spec.kind == "multiclass":
            out[task] = torch.tensor([ids[0]])
        elif spec.kind == "binary":
            out[task] = torch.tensor([float(ids[0])])
        else:
            hot = torch.zeros(1, spec.num_classes)
            hot[0, ids] = 1.0
            out[task] = hot
    return out


def split_metrics(logits: dict[str, list], targets: dict[str, list], tasks: dict[str, TaskSpec]) -> dict | None:
    from hrsel.engine.metrics import task_metrics

    out = {}
    for task, spec in tasks.items():
        if targets[task]:
            for name, value in task_metrics(torch.cat(logits[task]), torch.cat(targets[task]), spec).items():
                out[f"{task}/{name}"] = value
    return out or None

"""Hold out a validation part of a training split: seeded, class-stratified, reproducible.

    task, labels = class_labels(train) or (None, None)
    train_idx, val_idx = holdout_indices(len(train), fraction=0.1, seed=cfg.seed, labels=labels)
    train, val = subset(train, train_idx), subset(train_for_eval, val_idx)

Item i gets the key blake2b(f"{seed}:{i}"); within each class the items with the smallest keys
are held out, each class giving its largest-remainder share of round(fraction * n) items. The
indices are a pure function of (seed, n, labels) -- no RNG state, no torch or numpy version --
so a resumed run and every DDP rank hold out the same items.
"""
from __future__ import annotations

import hashlib
import math
import numbers
from typing import Any, Sequence

from torch.utils.data import Subset

from hrsel.errors import DataError


def holdout_indices(n: int, *, fraction: float, seed: int, labels: Sequence[int] | None = None,
                    names: Sequence[str] | None = None) -> tuple[list[int], list[int]]:
    """(kept, held_out): sorted, disjoint index lists covering range(n); held_out has round(fraction * n) items
    (at least 1, at most n - 1), stratified on `labels` (one class id per item) when given.

    With `names` (one unique string per item, e.g. its path) item i is keyed by blake2b(f"{seed}:{names[i]}")
    instead of its index, so reordering the items does not change which are held out."""
    if not 0 < fraction < 1:
        raise DataError(f"validation fraction must be in (0, 1), got {fraction!r}; e.g. data.val_fraction=0.1")
    if n < 2:
        raise DataError(f"cannot hold out a validation set from {n} training item(s); give data.val_split a "
                        f"split of its own or data.val_split=none")
    if labels is not None and len(labels) != n:
        raise DataError(f"{len(labels)} labels for {n} items: stratified hold-out needs one label per item")
    total = min(max(round(fraction * n), 1), n - 1)
    groups = _groups(n, labels)
    quotas = _largest_remainder([len(g) * total / n for g in groups.values()], total)
    held = []
    for members, quota in zip(groups.values(), quotas):
        held += sorted(members, key=lambda i: _key(seed, i if names is None else names[i]))[:quota]
    held_set = set(held)
    return [i for i in range(n) if i not in held_set], sorted(held)


def class_labels(dataset: Any) -> tuple[str, list[int]] | None:
    """(task, one class id per item) when the data set lists its labels cheaply, else None (no stratification).

    `dataset.labels` may be a list of class ids of its first task (traffic, cub200, camelyon16) or a
    mapping task -> list (megapixel_mnist); the first multiclass or binary task of `dataset.tasks` is used.
    """
    labels, tasks = getattr(dataset, "labels", None), getattr(dataset, "tasks", None) or {}
    single = [t for t, spec in tasks.items() if spec.kind in ("multiclass", "binary")]
    if isinstance(labels, dict):
        task = next((t for t in single if t in labels), None)
        labels = labels.get(task)
    else:
        task = single[0] if single and single[0] == next(iter(tasks)) else None  # a list is the first task's
    if task is None or not isinstance(labels, (list, tuple)) or len(labels) != len(dataset):
        return None
    if not all(isinstance(v, numbers.Integral) and not isinstance(v, bool) for v in labels):
        return None
    return task, [int(v) for v in labels]


def subset(dataset: Any, indices: Sequence[int]) -> Subset:
    """`Subset` that keeps the data set's `tasks` and `class_names` (the trainer reads them)."""
    part = Subset(dataset, list(indices))
    part.tasks = getattr(dataset, "tasks", None)
    if hasattr(dataset, "class_names"):
        part.class_names = dataset.class_names
    return part


def _groups(n: int, labels: Sequence[int] | None) -> dict[int, list[int]]:
    if labels is None:
        return {0: list(range(n))}
    groups: dict[int, list[int]] = {}
    for i, label in enumerate(labels):
        groups.setdefault(int(label), []).append(i)
    return dict(sorted(groups.items()))


def _largest_remainder(shares: list[float], total: int) -> list[int]:
    """Integers summing to `total`, each the floor of its share plus one for the largest remainders."""
    quotas = [math.floor(s + 1e-9) for s in shares]
    order = sorted(range(len(shares)), key=lambda c: (-(shares[c] - quotas[c]), c))
    for c in order[:total - sum(quotas)]:
        quotas[c] += 1
    return quotas


def _key(seed: int, index: int | str) -> int:
    return int.from_bytes(hashlib.blake2b(f"{seed}:{index}".encode(), digest_size=8).digest(), "big")

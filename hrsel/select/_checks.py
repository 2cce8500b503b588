"""Input checks shared by the selection operators; messages name the argument, batch row and item.

Every failure is a `SelectionError` (a `ValueError` too). Non-finite values are reported
by the batch rows that hold them and the first offending item of the first such row, so
a NaN from a division by zero upstream is traced to the image that produced it.
"""
from __future__ import annotations

import torch

from hrsel.errors import SelectionError

_ROWS_SHOWN = 8


def describe_rows(rows: list[int]) -> str:
    """'batch row 3' / 'batch rows [0, 2, ...] (12 rows)' for a message."""
    if len(rows) == 1:
        return f"batch row {rows[0]}"
    shown = ", ".join(str(r) for r in rows[:_ROWS_SHOWN]) + (", ..." if len(rows) > _ROWS_SHOWN else "")
    return f"batch rows [{shown}] ({len(rows)} rows)"


def nonfinite_message(values: torch.Tensor, bad: torch.Tensor, name: str, *, hint: str,
                      items: torch.Tensor | None = None, where: str | None = None) -> str:
    """The message for `bad` (B, ...) bool entries of `values` (B, ...).

    `items` (same shape) names the entries (default: their column); `where` describes the
    input (default: its shape).
    """
    where = f"shape {tuple(values.shape)}" if where is None else where
    if values.dim() < 2:  # one row of items
        values, bad = values.reshape(1, -1), bad.reshape(1, -1)
        items = items.reshape(1, -1) if items is not None else None
    flat_bad = bad.reshape(bad.shape[0], -1)
    rows = flat_bad.any(dim=1).nonzero().flatten().tolist()
    row = rows[0]
    col = int(flat_bad[row].nonzero()[0])
    value = float(values.reshape(values.shape[0], -1)[row, col])
    kinds = sorted({"NaN" if v != v else ("inf" if v > 0 else "-inf")
                    for v in values[bad].float().unique().tolist()})
    item = int(items.reshape(items.shape[0], -1)[row, col]) if items is not None else col
    return (f"{name} contains {' and '.join(kinds)} at {describe_rows(rows)} (first: row {row}, item {item}, "
            f"value {value}; {where}); {hint}")


def check_finite(values: torch.Tensor, name: str, *, hint: str = "check the scorer's output "
                 "(e.g. a division by zero or an overflow upstream)") -> None:
    """Raise SelectionError naming the batch rows of `values` (B, ...) that hold NaN or +-inf."""
    bad = ~torch.isfinite(values)
    if bool(bad.any()):
        raise SelectionError(nonfinite_message(values, bad, name, hint=hint))


def check_batch(values: torch.Tensor, name: str) -> None:
    """A (B, N, ...) tensor needs at least one row and one item."""
    if values.shape[0] == 0:
        raise SelectionError(f"{name} is an empty batch (shape {tuple(values.shape)}); pass at least one image")
    if values.dim() > 1 and values.shape[1] == 0:
        raise SelectionError(f"{name} has no items to select from (shape {tuple(values.shape)}); "
                             "each image needs at least one patch")


def check_scores(scores: torch.Tensor, name: str = "scores") -> None:
    """(B, N) floating-point, non-empty, finite."""
    if not isinstance(scores, torch.Tensor):
        raise SelectionError(f"{name} must be a torch.Tensor of shape (batch, n), got {type(scores).__name__}")
    if scores.dim() != 2:
        raise SelectionError(f"{name} must be 2-D (batch, n), got shape {tuple(scores.shape)}")
    if not scores.is_floating_point():
        raise SelectionError(f"{name} must be floating point, got dtype {scores.dtype}")
    check_batch(scores, name)
    check_finite(scores, name)


def check_probabilities(probs: torch.Tensor, name: str, *, hint: str, matrix: bool = True) -> None:
    """Finite, every entry in [0, 1]; with `matrix`, also (B, N) floating point and non-empty.

    Without `matrix` any shape is accepted (elementwise functions); dim 0 is the batch row.
    """
    if matrix:
        check_scores(probs, name)
    else:
        check_finite(probs, name, hint=hint)
    flat = probs.reshape(probs.shape[0] if probs.dim() > 1 else 1, -1)
    outside = (flat < 0) | (flat > 1)
    if bool(outside.any()):
        rows = outside.any(dim=1).nonzero().flatten().tolist()
        col = int(outside[rows[0]].nonzero()[0])
        raise SelectionError(f"{name} must lie in [0, 1], got values outside at {describe_rows(rows)} (first: row "
                             f"{rows[0]}, item {col}, value {float(flat[rows[0], col])}; shape "
                             f"{tuple(probs.shape)}); {hint}")


def check_k(k: int, n: int) -> None:
    if isinstance(k, bool) or not isinstance(k, int):
        raise SelectionError(f"k must be an int, got {k!r}")
    if k <= 0:
        raise SelectionError(f"k must be >= 1, got k={k}")
    if k > n:
        raise SelectionError(f"k={k} is larger than the number of patches n={n}; choose k <= {n}")


def check_positive_int(value: int, name: str) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
        raise SelectionError(f"{name} must be a positive int, got {value!r}")


def check_non_negative(value: float, name: str) -> None:
    if not (0 <= value < float("inf")):  # also rejects NaN
        raise SelectionError(f"{name} must be a finite number >= 0, got {value!r}")


def check_generator(generator: object, name: str = "generator") -> None:
    """None (the global RNG) or a torch.Generator; anything else (numpy's, random.Random) is named."""
    if generator is not None and not isinstance(generator, torch.Generator):
        raise SelectionError(f"{name} must be a torch.Generator or None, got {type(generator).__module__}."
                             f"{type(generator).__qualname__}; make one with torch.Generator().manual_seed(seed) "
                             "(numpy and random generators do not drive torch's sampling)")

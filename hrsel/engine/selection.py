"""Model selection: which evaluated epoch best.pt keeps, and when that choice is weak.

best.pt keeps the epoch with the best `eval.metric` on the selection set (the validation set;
the test split with data.val_split=none). On a small set the metric moves in coarse steps
(accuracy on 2 slides is 0, 0.5 or 1), so epochs tie; a tie goes to the epoch with the lower
loss on the same set, not to the earlier one (which is the least trained). Warnings say
when the choice is weak, with what to do: a selection set of fewer than `FEW_ITEMS` items, a
best.pt that is the first evaluated epoch of a run that went on (nothing later beat it, so it
may be barely trained), and a best.pt no better than chance on the selection set (always the
commonest class; AUC 0.5): a model that has not learnt, whatever its test figures say.
"""
from __future__ import annotations

import math

FEW_ITEMS = 10  # below this, accuracy moves in steps of more than 10% and epochs tie
FIX = ("validate on more images (more `val` rows in the CSV, or a larger data.val_fraction), select on the "
       "validation loss (eval.metric=loss), or use last.pt instead (--checkpoint last in hrsel.predict and "
       "hrsel.evaluate; hrsel.load_model(run, checkpoint='last'))")


def lower_is_better(metric: str) -> bool:
    return metric.endswith("loss")


def improves(value: float, loss: float | None, *, metric: str, best: float | None,
             best_loss: float | None) -> bool:
    """`value` of `metric` beats `best`, or ties it with a lower loss `loss` than `best_loss`."""
    if not math.isfinite(value):
        return False
    if best is None:
        return True
    if not math.isclose(value, best, rel_tol=1e-9, abs_tol=1e-12):
        return value < best if lower_is_better(metric) else value > best
    if lower_is_better(metric) or loss is None or best_loss is None:
        return False
    return math.isfinite(loss) and loss < best_loss


def few_items_warning(items: int, *, set_name: str, metric: str) -> str | None:
    """The warning for a selection set too small to select on (None when it is large enough, or
    when the selection is on the loss, which does not tie)."""
    if items >= FEW_ITEMS or lower_is_better(metric):
        return None
    what = metric or "eval.metric"
    return (f"the {set_name} set that selects best.pt has only {items} item(s): {what} moves in steps of "
            f"1/{items} there, so epochs tie (ties go to the lower {set_name} loss) and best.pt may be a barely "
            f"trained epoch. With fewer than {FEW_ITEMS} items, {FIX}")


def first_epoch_warning(*, best_epoch: int, first_epoch: int, last_epoch: int, set_name: str, metric: str,
                        value: float) -> str | None:
    """The warning for a best.pt that is the first evaluated epoch of a run that trained on after it."""
    if best_epoch != first_epoch or last_epoch <= first_epoch:
        return None
    return (f"best.pt is epoch {best_epoch}, the first evaluated one: none of the epochs up to {last_epoch} beat "
            f"its {set_name} {metric} {value:.4g}, so the test metrics describe a barely trained model. Compare "
            f"last.pt (python -m hrsel.evaluate RUN_DIR --split {set_name} --checkpoint last); {FIX}")


def chance_warning(*, value: float, chance: float | None, set_name: str, metric: str) -> str | None:
    """The warning for a best.pt whose selection metric is no better than a model blind to its input."""
    if chance is None or lower_is_better(metric) or value > chance + 1e-9:
        return None
    blind = "AUC 0.5" if metric.endswith("auc") else f"always predicting the commonest class ({chance:.4g})"
    return (f"best.pt's {set_name} {metric} {value:.4g} is no better than {blind}: the model has not learnt to "
            f"tell the classes apart on the {set_name} set, and its test metrics do not describe a trained model. "
            f"Look at the training pictures (pictures/: do the selected patches reach what decides the label?), "
            f"then train longer or at a higher optim.lr, or size model.k, model.patch_size and data.target_mpp "
            f"against what must be found (README, 'Sizing resolution, patch and M')")

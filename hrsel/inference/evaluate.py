"""Evaluate a run's checkpoint on its test or validation split: metrics JSON and confusion matrices.

    report = evaluate_run("runs/mnist", split="test", checkpoint="best")
    report.metrics["majority/accuracy"], report.json_path, report.pictures

The split is built exactly as the trainer builds it (hrsel.train.open_split / build_datasets,
data.limit_eval included) and scored exactly as the trainer scores it (batch size
data.eval_batch_size, RNG seeded with seed + 1, autocast as train.precision), so the metrics
the trainer reported (test_metrics.json, the `val/...` columns) are reproduced. Per task:

    multiclass  accuracy, balanced_accuracy (mean recall over the classes in the targets), macro_f1,
                auc (2 classes), confusion matrix (rows: truth, columns: prediction)
    binary      accuracy, balanced_accuracy, macro_f1 (over the two classes), auc, confusion matrix
    multilabel  exact_match (every label right), accuracy (per label), macro_f1 (over labels)

and `loss`, the trainer's weighted multi-task loss. Metrics come from torchmetrics.
"""
from __future__ import annotations

import json
import logging
import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import torch

from hrsel.errors import CheckpointError, ConfigError
from hrsel.tasks import TaskSpec

log = logging.getLogger(__name__)

__all__ = ["EvalReport", "evaluate_run", "score_dataset", "task_metrics", "confusion_matrix",
           "save_confusion_picture"]

SPLITS = ("test", "val")


@dataclass
class EvalReport:
    """What `evaluate_run` measured and where it wrote it."""

    metrics: dict[str, float]  # "task/metric" -> value (nan where undefined), and "loss"
    confusion: dict[str, list[list[int]]]  # multiclass / binary task -> (C, C) counts, rows truth
    record: dict[str, Any]  # what the JSON holds
    json_path: Path
    pictures: dict[str, Path] = field(default_factory=dict)  # task -> confusion matrix PNG


def evaluate_run(run_dir: str | os.PathLike, *, split: str = "test", checkpoint: str = "best", device: str = "cpu",
                 batch_size: int | None = None, out_dir: str | os.PathLike | None = None,
                 pictures: bool = True, overrides: Sequence[str] = ()) -> EvalReport:
    """Score `checkpoint` ("best", "last" or a path) of the run in `run_dir` on its `split` ("test" or "val").

    Writes `eval_<split>_<checkpoint>.json` and one `eval_<split>_<checkpoint>_confusion_<task>.png`
    per multiclass / binary task into `out_dir` (default: the run folder). `overrides`: `data.*`
    keys of the run's config, as `key=value` (e.g. "data.root=/mnt/data" when the data moved).
    """
    from hrsel.engine.checkpoint import plain
    from hrsel.data.band_norm import with_band_norm
    from hrsel.inference.load import load_model, resolve_checkpoint
    from hrsel.inference.preprocess import run_band_norm

    if split not in SPLITS:
        raise ConfigError(f"split {split!r} is not one of {', '.join(SPLITS)}: 'test' is the run's test split "
                          f"(data.eval_split), 'val' the validation set best.pt was selected on")
    if batch_size is not None and batch_size < 1:
        raise ConfigError(f"batch size {batch_size} must be >= 1 (default: the run's data.eval_batch_size)")
    run_dir = Path(run_dir)
    file = resolve_checkpoint(run_dir, checkpoint)
    run_dir = run_dir if run_dir.is_dir() else file.parent
    model = load_model(file, device=device)
    cfg = model.config = with_data_overrides(model.config, overrides)
    dataset, split_name = split_dataset(cfg, split, run_dir=run_dir)
    dataset = with_band_norm(dataset, run_band_norm(model))  # the run's data.band_norm, as in training
    size = batch_size or cfg.data.eval_batch_size or cfg.data.batch_size
    logits, targets = score_dataset(model.pipeline, dataset, cfg=cfg, tasks=model.tasks, batch_size=size)
    metrics, confusion = {}, {}
    for name, spec in model.tasks.items():
        values, matrix = task_metrics(logits[name], targets[name], spec)
        metrics.update({f"{name}/{k}": v for k, v in values.items()})
        if matrix is not None:
            confusion[name] = matrix.tolist()
    from hrsel.engine.metrics import multitask_loss

    metrics["loss"] = multitask_loss(logits, targets, model.tasks, task_weights=cfg.train.task_weights)[0].item()

    label = checkpoint_label(checkpoint, file, run_dir)
    out = Path(out_dir) if out_dir is not None else run_dir
    out.mkdir(parents=True, exist_ok=True)
    stem = f"eval_{split}_{label}"
    drawn: dict[str, Path] = {}
    if pictures:
        for name, matrix in confusion.items():
            title = (f"{cfg.experiment} | {name} | {split} split ({len(dataset)} items) | {file.name} step "
                     f"{model.train_state.get('step', '?')}\naccuracy {metrics[f'{name}/accuracy']:.4f}, balanced "
                     f"{metrics[f'{name}/balanced_accuracy']:.4f}")
            drawn[name] = save_confusion_picture(out / f"{stem}_confusion_{_safe(name)}.png", matrix,
                                                 model.class_names[name], title=title)
    record = {
        "run_dir": str(run_dir), "checkpoint": str(file), "checkpoint_step": model.train_state.get("step"),
        "checkpoint_epoch": model.train_state.get("epoch"), "split": split, "split_name": split_name,
        "items": len(dataset), "batch_size": size, "device": str(model.device),
        "hrsel_version": _version(), "checkpoint_hrsel_version": model.hrsel_version,
        "metrics": {k: v if math.isfinite(v) else None for k, v in metrics.items()},  # JSON has no nan
        "confusion_matrices": {t: {"rows": "truth", "columns": "prediction", "class_names": model.class_names[t],
                                   "counts": m} for t, m in confusion.items()},
        "pictures": {t: str(p) for t, p in drawn.items()},
    }
    json_path = out / f"{stem}.json"
    from hrsel.engine.checkpoint import atomic_write

    text = json.dumps(plain(record), indent=1) + "\n"
    atomic_write(json_path, lambda f: f.write(text), text=True)
    log.info("%s on %s split %r (%d items): %s -> %s", file, split, split_name, len(dataset),
             ", ".join(f"{k} {v:.4g}" for k, v in metrics.items()), json_path)
    return EvalReport(metrics=metrics, confusion=confusion, record=record, json_path=json_path, pictures=drawn)


def with_data_overrides(cfg: Any, overrides: Sequence[str]) -> Any:
    """The run's config with `data.*` overrides applied (typed and checked as hrsel.train does)."""
    from hrsel.config import apply_override, from_dict, to_dict, validate

    if not overrides:
        return cfg
    other = [o for o in overrides if not o.partition("=")[0].strip().startswith("data.")]
    if other:
        raise ConfigError(f"hrsel.evaluate takes only data.* overrides (where and how the data is read), got "
                          f"{other}: the model, training and seed keys are the run's own. Evaluate another run, "
                          f"or train one with those settings")
    raw = to_dict(cfg)
    for item in overrides:
        apply_override(raw, item)
    changed = from_dict(raw)
    validate(changed)
    for item in overrides:
        log.info("evaluating with %s (the run had %s)", item.strip(), _get(cfg, item.partition("=")[0].strip()))
    return changed


def _get(cfg: Any, key: str) -> Any:
    section, _, leaf = key.partition(".")
    part = getattr(cfg, section)
    return getattr(part, leaf) if hasattr(part, leaf) else (getattr(part, "options", None) or {}).get(leaf)


def split_dataset(cfg: Any, split: str, *, run_dir: Path) -> tuple[Any, str]:
    """The run's test split or validation set, as the trainer builds it (data.limit_eval applied)."""
    from hrsel.config import check_data_root
    from hrsel.engine.loop import _limit
    from hrsel.train import build_datasets, open_split, record_validation, validation_mode

    check_data_root(cfg)
    if split == "test":
        dataset, name = open_split(cfg, cfg.data.eval_split, for_eval=True), cfg.data.eval_split
    else:
        mode = validation_mode(cfg)
        if mode == "none":
            raise ConfigError(f"the run in {run_dir} has no validation set (data.val_split: none: best.pt was "
                              f"selected on the test split {cfg.data.eval_split!r}); evaluate --split test")
        if mode == "holdout":  # or the data set's own validation rows, known once train is open (a manifest)
            splits = build_datasets(cfg)
            # the items the run validated on (validation.json), or a DataError naming what changed
            record_validation(splits, run_dir / "validation.json", resuming=True, write=False)
            held_out = splits.record["val_split"] == "holdout"
            dataset = splits.val
            name = f"holdout of {cfg.data.train_split!r}" if held_out else splits.record["val_split"]
        else:
            dataset, name = open_split(cfg, mode, for_eval=True), mode
    limited = _limit(dataset, cfg.data.limit_eval)
    if limited is not dataset:
        log.info("data.limit_eval = %d: scoring the first %d of %d items, as the run did", cfg.data.limit_eval,
                 len(limited), len(dataset))
    return limited, name


@torch.no_grad()
def score_dataset(pipeline: torch.nn.Module, dataset: Any, *, cfg: Any, tasks: dict[str, TaskSpec],
                  batch_size: int) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """Logits and targets of every item of `dataset`, computed as the trainer's evaluation does."""
    from torch.utils.data import DataLoader

    from hrsel.models.candidates import pipeline_inputs
    from hrsel.train import load_collate

    device = next(iter(pipeline.parameters())).device
    loader = DataLoader(dataset, batch_size=batch_size, shuffle=False, collate_fn=load_collate(),
                        num_workers=cfg.data.num_workers)
    logits: dict[str, list] = {t: [] for t in tasks}
    targets: dict[str, list] = {t: [] for t in tasks}
    cuda = device.type == "cuda"
    dtype = None if not cuda or cfg.train.precision == "fp32" else (
        torch.bfloat16 if cfg.train.precision == "bf16" else torch.float16)
    pipeline.eval()
    with torch.random.fork_rng(devices=[device] if cuda else [], device_type="cuda" if cuda else "cpu"):
        torch.manual_seed(cfg.seed + 1)  # as the trainer's evaluation
        for batch in loader:
            images = batch["images"]
            if isinstance(images, torch.Tensor) and cfg.data.images_to_device:
                images = images.to(device, non_blocking=True)
            missing = [t for t in tasks if t not in batch["targets"]]
            if missing:
                raise CheckpointError(f"the checkpoint predicts tasks {', '.join(missing)} that the data set "
                                      f"{cfg.data.name!r} does not label (it labels "
                                      f"{', '.join(batch['targets'])}); check data.tasks of the run's config")
            inputs = pipeline_inputs(pipeline, batch)  # the tissue masks of data.tissue, as in training
            if dtype is not None:
                with torch.autocast("cuda", dtype=dtype):
                    out = pipeline(images, **inputs)
            else:
                out = pipeline(images, **inputs)
            for t in tasks:
                logits[t].append(out.logits[t].float().cpu())
                targets[t].append(batch["targets"][t].cpu())
    if not any(logits.values()) or not logits[next(iter(tasks))]:
        raise ConfigError(f"the split holds no items (data set {cfg.data.name!r}, root {cfg.data.root!r})")
    return {t: torch.cat(v) for t, v in logits.items()}, {t: torch.cat(v) for t, v in targets.items()}


def task_metrics(logits: torch.Tensor, target: torch.Tensor,
                 spec: TaskSpec) -> tuple[dict[str, float], torch.Tensor | None]:
    """One task's metrics over a whole split (headline first, as the trainer orders them) and its
    confusion matrix (C, C) int64, rows truth (None for multilabel). Predictions are the trainer's:
    argmax for multiclass, logit > 0 for binary and multilabel."""
    from torchmetrics.functional.classification import (binary_auroc, multiclass_accuracy,
                                                        multiclass_confusion_matrix, multiclass_f1_score,
                                                        multilabel_accuracy, multilabel_exact_match,
                                                        multilabel_f1_score)

    logits = logits.float()
    if spec.kind == "multilabel":
        preds, truth = (logits > 0).long(), (target > 0.5).long()
        c = spec.num_classes
        return {"exact_match": multilabel_exact_match(preds, truth, num_labels=c).item(),
                "accuracy": multilabel_accuracy(preds, truth, num_labels=c, average="micro").item(),
                "macro_f1": multilabel_f1_score(preds, truth, num_labels=c, average="macro").item()}, None
    if spec.kind == "binary":
        scores = logits.reshape(-1)
        truth = (target.reshape(-1) > 0.5).long()
        preds, c = (scores > 0).long(), 2
    else:
        preds, truth, c = logits.argmax(-1), target.reshape(-1).long(), spec.num_classes
    matrix = multiclass_confusion_matrix(preds, truth, num_classes=c)
    out = {"accuracy": multiclass_accuracy(preds, truth, num_classes=c, average="micro").item(),
           "balanced_accuracy": balanced_accuracy(matrix),
           "macro_f1": multiclass_f1_score(preds, truth, num_classes=c, average="macro").item()}
    if c == 2:
        score = scores if spec.kind == "binary" else logits[:, 1] - logits[:, 0]
        present = truth.unique().numel() == 2
        out["auc"] = binary_auroc(_unit_interval(score), truth).item() if present else float("nan")
    return out, matrix


def _unit_interval(score: torch.Tensor) -> torch.Tensor:
    """Scores mapped into [0, 1] keeping their order and ties (torchmetrics would squash logits with a sigmoid,
    which saturates and ties large logits: the AUC would differ from the trainer's)."""
    score = score.double()
    low, span = score.min(), score.max() - score.min()
    return (score - low) / span if span > 0 else torch.full_like(score, 0.5)


def balanced_accuracy(matrix: torch.Tensor) -> float:
    """Mean recall over the classes present in the targets (rows of the confusion matrix with counts)."""
    support = matrix.sum(1)
    present = support > 0
    if not present.any():
        return float("nan")
    return (matrix.diag()[present].double() / support[present]).mean().item()


def confusion_matrix(logits: torch.Tensor, target: torch.Tensor, spec: TaskSpec) -> torch.Tensor | None:
    return task_metrics(logits, target, spec)[1]


def save_confusion_picture(path: Path, matrix: list[list[int]] | torch.Tensor, class_names: list[str], *,
                           title: str = "") -> Path:
    """Draw a confusion matrix (rows truth, columns prediction) with its counts, row-normalised colours."""
    import numpy as np
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    counts = np.asarray(matrix.tolist() if isinstance(matrix, torch.Tensor) else matrix, dtype=np.int64)
    c = counts.shape[0]
    rates = counts / np.maximum(counts.sum(1, keepdims=True), 1)
    side = min(max(4.0, 0.45 * c + 2.5), 16.0)
    fig = Figure(figsize=(side, side + 0.4), dpi=100)
    FigureCanvasAgg(fig)
    ax = fig.add_subplot(1, 1, 1)
    ax.imshow(rates, cmap="Blues", vmin=0, vmax=1)
    names = [n if len(n) <= 14 else n[:13] + "…" for n in class_names]
    ax.set_xticks(range(c), names, rotation=90 if c > 6 else 0, fontsize=8)
    ax.set_yticks(range(c), names, fontsize=8)
    ax.set_xlabel("prediction")
    ax.set_ylabel("truth")
    if c <= 30:
        for i in range(c):
            for j in range(c):
                if counts[i, j]:
                    ax.text(j, i, str(counts[i, j]), ha="center", va="center", fontsize=7,
                            color="white" if rates[i, j] > 0.5 else "black")
    if title:
        ax.set_title(title, fontsize=8)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)
    return path


def checkpoint_label(checkpoint: str, file: Path, run_dir: Path) -> str:
    """"best", "last" or the checkpoint file's stem: the name of the output files."""
    if checkpoint in ("best", "last") and file.parent == run_dir and file.name == f"{checkpoint}.pt":
        return checkpoint
    return _safe(file.stem)


def _safe(name: str) -> str:
    return "".join(ch if ch.isalnum() or ch in "-_." else "_" for ch in str(name))


def _version() -> str:
    from hrsel import __version__

    return __version__

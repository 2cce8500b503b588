"""The training loop: any `Pipeline`, any data set of `{"image", "targets", "id"}` items.

    trainer = Trainer(cfg=cfg, pipeline=pipeline, tasks=tasks, train_set=train, val_set=val, test_set=test,
                      device=device, info=info, run_dir=run_dir)
    trainer.resume(load_checkpoint(run_dir))   # optional
    result = trainer.fit()

Each evaluation epoch scores the validation set (`val/...` in metrics.csv) and best.pt keeps
the weights with the best `eval.metric` on it, a tie going to the lower validation loss
(selection.py; a warning says when the set is too small to select on, or when best.pt is the
first evaluated epoch). When training ends, the test set is evaluated
once, with best.pt's weights: `test/...` in the last metrics.csv row and `test_metrics.json`.
Without a validation set (`data.val_split: none`) the test set is scored every evaluation
epoch (`test/...`) and best.pt is selected on it, the optimistic pre-validation behaviour.

Data order is a function of (seed, epoch) and the RNG states are checkpointed, so a
run killed at any point and resumed from its last checkpoint retraces the
uninterrupted run exactly on the CPU (with `data.num_workers: 0`). SIGINT/SIGTERM stop
the run before the next batch's forward pass (training or evaluation) at a checkpoint
that resumes just as exactly; the epoch's training is checkpointed before it is
evaluated, so a crash or a stop while evaluating loses no training (see guards.py).
"""
from __future__ import annotations

import json
import logging
import math
import signal
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any, Callable

import torch
from torch.utils.data import DataLoader, Subset

from hrsel.config import Config
from hrsel.engine import checkpoint as ckpt
from hrsel.engine import distributed as dist
from hrsel.engine import metrics as M
from hrsel.engine import selection
from hrsel.engine.guards import (Interrupted, NonFiniteLossError, batches_on_every_rank, copy_buffers,
                                 first_non_finite, restore_buffers)
from hrsel.engine.logbook import (FILE_ONLY, RunLog, Throughput, epoch_line, peak_memory_mb, progress,
                                  reset_peak_memory)
from hrsel.engine.optim import build_optimizer, clip_gradients, lr_factor, planned_steps, schedule_steps, set_lr
from hrsel.engine.visualize import draw_batch
from hrsel.errors import HrselError
from hrsel.models.candidates import pipeline_inputs
from hrsel.models.pipeline import Pipeline, PipelineOutput
from hrsel.tasks import TaskSpec

log = logging.getLogger(__name__)

__all__ = ["Interrupted", "NonFiniteLossError", "TrainState", "Trainer"]


@dataclass
class TrainState:
    step: int = 0  # optimiser updates done
    epoch: int = 0  # the epoch in progress (0-based)
    batch_in_epoch: int = 0  # batches of that epoch already consumed
    best: float | None = None  # the best eval.metric on the selection set (validation), kept in best.pt
    best_metric: str = ""  # its name, e.g. "majority/accuracy"
    best_loss: float | None = None  # the selection set's loss at best.pt: breaks ties of eval.metric
    best_epoch: int = 0  # the epoch (1-based, as in metrics.csv) and the step of best.pt
    best_step: int = 0
    nan_skips: int = 0
    nan_streak: int = 0  # batches in a row whose loss was non-finite (train.max_nan_skips bounds it)
    eval_pending: bool = False  # the epoch's training is done and checkpointed, its evaluation is not


class Trainer:
    def __init__(self, *, cfg: Config, pipeline: Pipeline, tasks: dict[str, TaskSpec], train_set, val_set, test_set,
                 device: torch.device, info: dist.DistInfo, run_dir: Path, collate_fn: Callable | None = None):
        self.cfg, self.tasks, self.device, self.info, self.run_dir = cfg, tasks, device, info, Path(run_dir)
        self.module = pipeline.to(device)  # the plain pipeline: state_dict, set_progress, auxiliary_loss
        self.model = self._wrap(self.module)  # what is called: maybe DDP and/or compiled
        self.metadata = ckpt.run_metadata(cfg, tasks, train_set)  # config, tasks, class names: in every checkpoint
        self.train_set = _limit(train_set, cfg.data.limit_train)
        self.val_set = _limit(val_set, cfg.data.limit_eval)  # None: select on the test set (data.val_split=none)
        self.test_set = _limit(test_set, cfg.data.limit_eval)
        self.selection = "test" if val_set is None else "val"  # the set best.pt is selected on
        self.chance: dict[str, float] = {}  # the selection set's chance levels (metrics.chance_levels)
        self.collate = collate_fn or _default_collate()
        self.optimizer = build_optimizer(self.module, name=cfg.optim.name, lr=cfg.optim.lr,
                                         weight_decay=cfg.optim.weight_decay, betas=cfg.optim.betas,
                                         momentum=cfg.optim.momentum, weight_decay_mode=cfg.optim.weight_decay_mode,
                                         weight_decay_on=cfg.optim.weight_decay_on)
        self.scaler = torch.amp.GradScaler("cuda", enabled=self._amp_dtype() is torch.float16)
        self.sampler = dist.TrainSampler(self.train_set, info, seed=cfg.seed)
        self.state = TrainState()
        self.class_weights = _class_weights(self.train_set, tasks) if cfg.train.class_balanced else {}
        self.runlog = RunLog(self.run_dir, enabled=info.is_main)
        self.throughput = Throughput(device)
        self._stop_signal = 0
        self._boundary_rng = ckpt.rng_state()
        self._boundary: tuple | None = None  # (buffers, sums, state) at the last update, with grad_accum > 1
        self._saved_step: int | None = None  # the step of the last.pt this run wrote or resumed from
        self.sums: dict[str, float] = {}

    # ------------------------------------------------------------------ sizes
    @property
    def batches_per_epoch(self) -> int:
        return math.ceil(self.sampler.num_samples / self.cfg.data.batch_size)  # per rank

    @property
    def updates_per_epoch(self) -> int:
        return math.ceil(self.batches_per_epoch / self.cfg.train.grad_accum)

    @property
    def total_steps(self) -> int:
        """The updates the schedule is planned over: train.max_steps when set (train.epochs only bounds the run)."""
        return planned_steps(epochs=self.cfg.train.epochs, updates_per_epoch=self.updates_per_epoch,
                             max_steps=self.cfg.train.max_steps)

    # ------------------------------------------------------------------ the run
    def fit(self) -> dict[str, Any]:
        previous = {s: signal.signal(s, self._on_signal) for s in (signal.SIGINT, signal.SIGTERM)}
        self._warn_if_epochs_end_the_schedule()
        try:
            self._warn_if_few_to_select_on()
            while self.state.eval_pending or (self.state.epoch < self.cfg.train.epochs and not self._done()):
                self.run_epoch()
            self._check_updated()
            weights = self._load_best()
            warnings = self._selection_warnings()
            metrics = self.final_test(weights, warnings=warnings)
            return {"metrics": metrics, "best": self._best_summary(), "last": self._last_summary(),
                    "warnings": warnings, "test_weights": weights,
                    "peak_memory_mb": peak_memory_mb(self.device), "device": str(self.device),
                    "step": self.state.step,
                    "run_dir": str(self.run_dir), "pictures": str(self.run_dir / "pictures")}
        except Exception as e:
            self._log_failure(e)
            raise
        finally:
            for s, handler in previous.items():
                signal.signal(s, handler)
            self.runlog.close()

    def run_epoch(self) -> dict[str, float]:
        epoch, started = self.state.epoch, time.perf_counter()
        self.model.train()
        reset_peak_memory(self.device)
        if self.state.batch_in_epoch == 0:
            self.sums = {}  # per-epoch sums of the logged values (kept in checkpoints for a resumed epoch)
            self.throughput.reset()
        if not self.state.eval_pending:  # else resumed between the epoch's training and its evaluation
            for batch in progress(self._train_loader(), total=self._batches_left(),
                                  desc=f"epoch {epoch + 1}", enabled=self._bar()):
                self.train_batch(batch)
                if self._done():
                    break
        row = {"epoch": epoch + 1, "step": self.state.step, "lr": self.optimizer.param_groups[0]["lr"]}
        row.update(self._reduce_means(self.sums))
        row.update(self.throughput.summary())
        row["peak_memory_mb"] = peak_memory_mb(self.device)
        row["nan_skips"] = self.state.nan_skips
        metrics: dict[str, float] = {}
        if (epoch + 1) % self.cfg.train.eval_every == 0 or epoch + 1 == self.cfg.train.epochs or self._done():
            metrics = self._evaluate_epoch()
            row.update({f"{self.selection}/{k}": v for k, v in metrics.items()})
        row["epoch_s"] = time.perf_counter() - started
        if self.state.batch_in_epoch >= self.batches_per_epoch:  # else stopped by train.max_steps mid-epoch
            self.state.epoch, self.state.batch_in_epoch = epoch + 1, 0
        self._boundary_rng = ckpt.rng_state()
        is_best = self._is_best(metrics, epoch=epoch + 1)
        if self.info.is_main:  # the row first: if last.pt cannot be written, --resume redoes this epoch's row
            self.runlog.epoch(row)
            log.info(epoch_line(epoch + 1, self.cfg.train.epochs, row))
        self.save(is_best=is_best)
        return metrics

    def _evaluate_epoch(self) -> dict[str, float]:
        """Checkpoint the epoch's training, then evaluate: a crash or a stop while evaluating loses no
        training, and --resume evaluates the epoch again."""
        self.state.eval_pending = True
        self._boundary_rng = ckpt.rng_state()
        self.save()
        metrics = self.evaluate(self.test_set if self.val_set is None else self.val_set)
        self.state.eval_pending = False
        return metrics

    def train_batch(self, batch: dict[str, Any]) -> dict[str, float]:
        """One micro-batch: forward, loss, backward; an optimiser update every grad_accum batches.

        A stop asked for by a signal is honoured before the forward pass (which would move
        BatchNorm statistics), at the last update: the resumed run redoes the rest exactly.
        """
        accum, done = self.cfg.train.grad_accum, self.state.batch_in_epoch + 1
        if self._any_rank(self._stop_signal != 0):
            self._stop()
        if accum > 1 and self.state.batch_in_epoch % accum == 0:  # what a stop before the next update restores
            self._boundary = (copy_buffers(self.module), dict(self.sums), replace(self.state))
        boundary = done % accum == 0 or done == self.batches_per_epoch  # an epoch ends with a (partial) update
        self.module.set_progress(self.state.step, max(self.total_steps, 1))
        images, targets = self._to_device(batch)
        self.throughput.start()
        before = copy_buffers(self.module) if self.cfg.train.skip_nan_updates else None
        with self._maybe_no_sync(not boundary), self._autocast():
            out: PipelineOutput = self.model(images, **pipeline_inputs(self.model, batch))
            loss, parts = M.multitask_loss(out.logits, targets, self.tasks, task_weights=self.cfg.train.task_weights,
                                           class_weights=self.class_weights)
            loss = loss + self.module.auxiliary_loss(out, targets)
            if self._any_rank(not torch.isfinite(loss).item()):
                return self._non_finite(loss, buffers=before)
            self.scaler.scale(loss / accum).backward()
        self.state.batch_in_epoch += 1
        self.state.nan_streak = 0
        if boundary:
            self._update()
        n = len(batch["ids"])  # stats["patches_scored"] counts the patches scored per image
        self.throughput.stop(images=n, patches=n * float(out.stats.get("patches_scored", 0.0)))
        logs = {"train_loss": loss.item(), **{f"train_loss/{k}": v.item() for k, v in parts.items()}}
        logs.update({k: float(v) for k, v in out.stats.items() if isinstance(v, (int, float))})
        self._accumulate(self.sums, logs)
        if boundary:
            self.runlog.scalars({"train/loss": logs["train_loss"], "train/lr": self.optimizer.param_groups[0]["lr"]},
                                self.state.step)
        every = self.cfg.train.checkpoint_every
        if boundary and every and self.state.step % every == 0:
            self.save()
        return logs

    def _update(self) -> None:
        cfg = self.cfg.optim
        warmup, milestones = schedule_steps(updates_per_epoch=self.updates_per_epoch, total_steps=self.total_steps,
                                            warmup_epochs=cfg.warmup_epochs, warmup_ratio=cfg.warmup_ratio,
                                            milestones=cfg.milestones, milestone_ratios=cfg.milestone_ratios)
        set_lr(self.optimizer, cfg.lr * lr_factor(self.state.step, total_steps=self.total_steps, warmup_steps=warmup,
                                                  schedule=cfg.schedule, min_lr_ratio=cfg.min_lr_ratio,
                                                  milestones=milestones, gamma=cfg.gamma))
        self.scaler.unscale_(self.optimizer)
        clip_gradients(self.module.parameters(), clip_value=cfg.clip_value, clip_norm=cfg.clip_norm)
        self.scaler.step(self.optimizer)
        self.scaler.update()
        self.optimizer.zero_grad(set_to_none=True)
        self.state.step += 1
        self._boundary_rng = ckpt.rng_state()

    # ------------------------------------------------------------------ evaluation
    @torch.no_grad()
    def evaluate(self, dataset, *, pictures: str | None = None) -> dict[str, float]:
        """Metrics over all of `dataset` (hard top-K: pipelines select hard in eval mode).

        The first eval.pictures items are drawn to pictures/<pictures><id>.png (default
        `epochNNN_`, the epoch in progress).
        """
        self.model.eval()
        prefix = f"epoch{self.state.epoch + 1:03d}_" if pictures is None else pictures
        loader = DataLoader(dataset, batch_size=self.cfg.data.eval_batch_size or self.cfg.data.batch_size,
                            sampler=dist.ShardSampler(len(dataset), self.info), collate_fn=self.collate,
                            num_workers=self.cfg.data.num_workers)
        logits: dict[str, list] = {t: [] for t in self.tasks}
        targets: dict[str, list] = {t: [] for t in self.tasks}
        drawn = 0
        cuda = self.device.type == "cuda"
        common = batches_on_every_rank(len(dataset), batch_size=loader.batch_size, info=self.info)
        with torch.random.fork_rng(devices=[self.device] if cuda else [], device_type="cuda" if cuda else "cpu"):
            torch.manual_seed(self.cfg.seed + 1)  # evaluation does not disturb the training RNG
            for i, batch in enumerate(progress(loader, total=len(loader), desc="eval", enabled=self._bar())):
                if i < common and self._any_rank(self._stop_signal != 0):
                    self._stop_evaluating(final=pictures == "test/")
                images, y = self._to_device(batch)
                with self._autocast():
                    out = self.model(images, **pipeline_inputs(self.model, batch))
                for t in self.tasks:
                    logits[t].append(out.logits[t].float().cpu())
                    targets[t].append(y[t].cpu())
                if self.info.is_main and drawn < self.cfg.eval.pictures:
                    drawn += self._draw(batch, out, self.cfg.eval.pictures - drawn, prefix)
        self.model.train()
        gathered = dist.gather_objects(({t: torch.cat(v) for t, v in logits.items()},
                                        {t: torch.cat(v) for t, v in targets.items()}), self.info)
        all_logits = {t: torch.cat([g[0][t] for g in gathered]) for t in self.tasks}
        all_targets = {t: torch.cat([g[1][t] for g in gathered]) for t in self.tasks}
        if dataset is (self.test_set if self.val_set is None else self.val_set):
            self.chance = M.chance_levels(all_targets, self.tasks)  # what best.pt must beat to have learnt
        result = M.all_metrics(all_logits, all_targets, self.tasks)
        result["loss"] = M.multitask_loss(all_logits, all_targets, self.tasks,
                                          task_weights=self.cfg.train.task_weights)[0].item()
        return result

    def _draw(self, batch: dict[str, Any], out: PipelineOutput, limit: int, prefix: str) -> int:
        return draw_batch(self.run_dir / "pictures", prefix, pipeline=self.module, batch=batch, out=out,
                          tasks=self.tasks, limit=limit, class_names=self.metadata.get("class_names"))

    # ------------------------------------------------------------------ checkpoints
    def save(self, *, is_best: bool = False) -> None:
        if not self.info.is_main:
            return
        state = {"model": self.module.state_dict(), "optimizer": self.optimizer.state_dict(),
                 "scaler": self.scaler.state_dict(), "train_state": asdict(self.state), "rng": self._boundary_rng,
                 "epoch_sums": dict(self.sums), "total_steps": self.total_steps,
                 "throughput": self.throughput.state_dict(), **self.metadata}
        ckpt.save_checkpoint(self.run_dir, state, is_best=is_best)
        self._saved_step = self.state.step

    def resume(self, state: dict[str, Any]) -> None:
        self.module.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.scaler.load_state_dict(state["scaler"])
        self.state = TrainState(**state["train_state"])
        self._saved_step = self.state.step
        self.sums = dict(state.get("epoch_sums", {})) if self.state.batch_in_epoch else {}
        if self.state.batch_in_epoch and "throughput" in state:
            self.throughput.load_state_dict(state["throughput"])
        ckpt.set_rng_state(state["rng"])
        self._boundary_rng = state["rng"]
        self.runlog.resume(self.state.epoch)
        log.info("resumed at epoch %d, batch %d, step %d", self.state.epoch + 1, self.state.batch_in_epoch,
                 self.state.step)

    # ------------------------------------------------------------------ helpers
    def _train_loader(self) -> DataLoader:
        self.sampler.set_epoch(self.state.epoch)
        self.sampler.skip = self.state.batch_in_epoch * self.cfg.data.batch_size
        generator = torch.Generator().manual_seed(self.cfg.seed * 100003 + self.state.epoch)
        return DataLoader(self.train_set, batch_size=self.cfg.data.batch_size, sampler=self.sampler,
                          collate_fn=self.collate, num_workers=self.cfg.data.num_workers, generator=generator,
                          pin_memory=self.device.type == "cuda", persistent_workers=False)

    def _batches_left(self) -> int:
        return math.ceil(len(self.sampler) / self.cfg.data.batch_size)

    def _warn_if_epochs_end_the_schedule(self) -> None:
        epochs, per_epoch, steps = self.cfg.train.epochs, self.updates_per_epoch, self.cfg.train.max_steps
        if steps and epochs * per_epoch < steps and self.info.is_main:
            log.warning("train.epochs=%d x %d updates per epoch = %d ends the run before train.max_steps=%d, "
                        "which the schedule is planned over; raise train.epochs to at least %d to run it all",
                        epochs, per_epoch, epochs * per_epoch, steps, math.ceil(steps / per_epoch))

    def _done(self) -> bool:
        return bool(self.cfg.train.max_steps) and self.state.step >= self.cfg.train.max_steps

    def _bar(self) -> bool:
        return self.info.is_main and self.cfg.train.progress_bar

    def _wrap(self, module: Pipeline) -> torch.nn.Module:
        model: torch.nn.Module = module
        if self.info.enabled:
            from torch.nn.parallel import DistributedDataParallel

            ids = [self.device.index] if self.device.type == "cuda" else None
            model = DistributedDataParallel(module, device_ids=ids,
                                            find_unused_parameters=self.cfg.train.find_unused_parameters)
        if self.cfg.train.compile:
            model = torch.compile(model)
        return model

    def _amp_dtype(self) -> torch.dtype | None:
        if self.device.type != "cuda" or self.cfg.train.precision == "fp32":
            return None
        return torch.bfloat16 if self.cfg.train.precision == "bf16" else torch.float16

    def _autocast(self):
        dtype = self._amp_dtype()
        return torch.autocast("cuda", dtype=dtype) if dtype is not None else _null()

    def _maybe_no_sync(self, skip_sync: bool):
        no_sync = getattr(self.model, "no_sync", None)
        return no_sync() if skip_sync and no_sync is not None else _null()

    def _to_device(self, batch: dict[str, Any]) -> tuple[Any, dict[str, torch.Tensor]]:
        images = batch["images"]
        if isinstance(images, torch.Tensor) and self.cfg.data.images_to_device:
            images = images.to(self.device, non_blocking=True)
        targets = {t: v.to(self.device, non_blocking=True) for t, v in batch["targets"].items()}
        return images, targets

    def _any_rank(self, flag: bool) -> bool:
        """`flag` on any rank (every rank calls this at the same point)."""
        return bool(dist.all_reduce_sum(torch.tensor([float(flag)]), self.info)[0] > 0)

    def _non_finite(self, loss: torch.Tensor, *, buffers: dict[str, torch.Tensor] | None) -> dict[str, float]:
        """Stop, or (train.skip_nan_updates) skip the batch without a trace, up to train.max_nan_skips in a row."""
        where = f"epoch {self.state.epoch + 1}, step {self.state.step}"
        if not self.cfg.train.skip_nan_updates:
            raise NonFiniteLossError(
                f"loss is {loss.item()} at {where}; the last good checkpoint is kept in {self.run_dir}. Lower "
                f"optim.lr, set optim.clip_norm, or set train.skip_nan_updates=true to skip such updates")
        if buffers is not None:
            restore_buffers(self.module, buffers)  # the skipped batch leaves no nan in BatchNorm statistics
        self.optimizer.zero_grad(set_to_none=True)
        self.state.nan_skips += 1
        self.state.nan_streak += 1
        self.state.batch_in_epoch += 1
        limit = self.cfg.train.max_nan_skips
        if self.state.nan_streak >= limit:
            raise NonFiniteLossError(
                f"the loss was non-finite ({loss.item()}) for {self.state.nan_streak} batches in a row, up to "
                f"{where} ({self.state.nan_skips} skipped in all): the model is not recovering, so the run stops "
                f"at train.max_nan_skips = {limit}. {self.run_dir / ckpt.LAST} keeps the last checkpoint. Lower "
                f"optim.lr or set optim.clip_norm (or raise train.max_nan_skips)")
        log.warning("non-finite loss at step %d: update skipped (%d so far)", self.state.step, self.state.nan_skips)
        return {}

    def _check_updated(self) -> None:
        """A run whose every batch was skipped for a non-finite loss trained nothing: it fails, even when
        train.max_nan_skips (a streak) is larger than the whole run."""
        if self.state.step == 0 and self.state.nan_skips > 0:
            raise NonFiniteLossError(
                f"the loss was non-finite in every one of the {self.state.nan_skips} training batches, and each was "
                f"skipped (train.skip_nan_updates): the model was never updated, so the run stops without "
                f"scoring the test split. Lower optim.lr, set optim.clip_norm, or check the data for NaN "
                f"({self.run_dir})")

    def _on_signal(self, signum: int, frame: Any) -> None:
        self._stop_signal = signum  # only a flag: the loop checks it between batches (no I/O in a handler)

    def _stop(self) -> None:
        """Save the state at the last update and leave (the resumed run redoes the rest)."""
        if self.state.batch_in_epoch % self.cfg.train.grad_accum and self._boundary is not None:
            buffers, self.sums, self.state = self._boundary  # between updates: back to the last one
            restore_buffers(self.module, buffers)
        self.save()
        raise Interrupted(self._stop_signal or signal.SIGTERM,
                          where=f"after {self.state.batch_in_epoch} batches of epoch {self.state.epoch + 1}",
                          kept=f"{self.run_dir / ckpt.LAST} holds step {self.state.step}")

    def _stop_evaluating(self, *, final: bool) -> None:
        """A signal during evaluation: leave now; last.pt (written before evaluating) is kept as it is."""
        if final:
            where, kept = "while scoring the test split", "last.pt holds the finished training"
        else:
            where = f"while evaluating epoch {self.state.epoch + 1}"
            kept = "last.pt holds that epoch's training, and the resumed run evaluates it again"
        raise Interrupted(self._stop_signal or signal.SIGTERM, where=where, kept=f"{kept} ({self.run_dir})")

    def _log_failure(self, error: Exception) -> None:
        """Put what stopped the run into train.log (the CLI prints the message; a crash's traceback too)."""
        where = f"epoch {self.state.epoch + 1}, step {self.state.step}"
        if isinstance(error, HrselError):
            level = logging.WARNING if isinstance(error, Interrupted) else logging.ERROR
            log.log(level, "run stopped at %s: %s", where, error, extra=FILE_ONLY)
            return
        last = self.run_dir / ckpt.LAST
        kept = f"{last} holds step {self._saved_step}" if self._saved_step is not None else "no checkpoint yet"
        log.error("run crashed at %s%s (%s); fix the cause, then continue with --resume", where,
                  ", evaluating" if self.state.eval_pending else "", kept, exc_info=error, extra=FILE_ONLY)

    def _is_best(self, metrics: dict[str, float], *, epoch: int) -> bool:
        """Better on eval.metric than best.pt, or tied with a lower loss (and a finite model): the new best."""
        if not metrics:
            return False
        key = self._selection_metric(metrics)
        value, loss = metrics[key], metrics.get("loss")
        if not selection.improves(value, loss, metric=key, best=self.state.best, best_loss=self.state.best_loss):
            return False
        if self._unfit_for_best(key, value):
            return False
        self.state.best, self.state.best_metric, self.state.best_loss = value, key, loss
        self.state.best_epoch, self.state.best_step = epoch, self.state.step
        return True

    def _warn_if_few_to_select_on(self) -> None:
        chosen = self.test_set if self.val_set is None else self.val_set
        warning = selection.few_items_warning(len(chosen), set_name=self.selection, metric=self.cfg.eval.metric)
        if warning and self.info.is_main:
            log.warning(warning)

    def _selection_warnings(self) -> list[str]:
        """What makes best.pt a weak choice, logged and kept for the summary and test_metrics.json."""
        if self.state.best is None:
            return []
        first = min(self.cfg.train.eval_every, self.cfg.train.epochs)
        warnings = [selection.first_epoch_warning(best_epoch=self.state.best_epoch, first_epoch=first,
                                                  last_epoch=self.state.epoch, set_name=self.selection,
                                                  metric=self.state.best_metric, value=self.state.best),
                    selection.chance_warning(value=self.state.best, chance=self.chance.get(self.state.best_metric),
                                             set_name=self.selection, metric=self.state.best_metric)]
        warnings = [w for w in warnings if w is not None]
        if self.info.is_main:
            for warning in warnings:
                log.warning(warning)
        return warnings

    def _unfit_for_best(self, key: str, value: float) -> bool:
        """A model whose last batches were skipped for a non-finite loss, or that holds nan/inf, is no best.pt."""
        bad = first_non_finite(self.module)
        if self.state.nan_streak:
            why = f"its last {self.state.nan_streak} batches had a non-finite loss and were skipped"
        elif bad is not None:
            why = f"its {bad} holds nan/inf"
        else:
            return False
        log.warning("%s %s = %.4g would be the best so far, but %s: best.pt is not written from this model",
                    self.selection, key, value, why)
        return True

    def _selection_metric(self, metrics: dict[str, float]) -> str:
        key = self.cfg.eval.metric or next(k for k in metrics if k != "loss")
        if key not in metrics:
            raise HrselError(f"eval.metric {key!r} is not among the metrics {', '.join(metrics)}")
        return key

    # ------------------------------------------------------------------ the test set, once
    def _load_best(self) -> str:
        """Put best.pt's weights into the model; returns which weights the test set is scored with."""
        dist.barrier(self.info)  # rank 0 has written best.pt
        if self.state.best is None:
            log.warning("no finite %s metric of a finite model was seen, so there is no best.pt of this run: the "
                        "test set is scored with the last weights", self.selection)
            return f"the last weights (step {self.state.step})"
        best = ckpt.load_checkpoint(self.run_dir / ckpt.BEST)
        if self.state.best_epoch and best["train_state"]["step"] != self.state.best_step:
            raise HrselError(f"{self.run_dir / ckpt.BEST} holds step {best['train_state']['step']}, the run's best "
                             f"is step {self.state.best_step}: the file is not this run's; rerun to rewrite it")
        self.module.load_state_dict(best["model"])
        return f"best.pt (epoch {self.state.best_epoch}, step {self.state.best_step})"

    def final_test(self, weights: str, *, warnings: list[str] = ()) -> dict[str, float]:
        """Score the test set once; rank 0 writes test_metrics.json and the `test/...` of the last CSV row."""
        metrics = self.evaluate(self.test_set, pictures="test/")
        log.info("test split (%d items) scored once with %s: %s", len(self.test_set), weights,
                 ", ".join(f"{k} {v:.4g}" for k, v in metrics.items()))
        if not self.info.is_main:
            return metrics
        finite = {k: v if math.isfinite(v) else None for k, v in metrics.items()}  # JSON has no nan
        record = {"weights": weights, "best": self._best_summary(), "last": self._last_summary(),
                  "items": len(self.test_set), "metrics": finite, "warnings": list(warnings)}
        (self.run_dir / "test_metrics.json").write_text(json.dumps(record, indent=1) + "\n")
        if self.selection == "val" and self.runlog.rows:  # with val_split=none the rows hold test/... already
            self.runlog.epoch({**self.runlog.rows[-1], **{f"test/{k}": v for k, v in metrics.items()}})
        return metrics

    def _best_summary(self) -> dict[str, Any] | None:
        if self.state.best is None:
            return None
        return {"selected_on": self.selection, "metric": self.state.best_metric, "value": self.state.best,
                "loss": self.state.best_loss, "epoch": self.state.best_epoch, "step": self.state.best_step}

    def _last_summary(self) -> dict[str, Any] | None:
        """last.pt's epoch and its selection metric and loss (the last evaluated row of metrics.csv), to set
        beside best.pt's."""
        metric = self.state.best_metric
        rows = [r for r in self.runlog.rows if f"{self.selection}/{metric}" in r]
        if not metric or not rows:
            return None
        row = rows[-1]
        return {"metric": metric, "value": _finite(row[f"{self.selection}/{metric}"]),
                "loss": _finite(row.get(f"{self.selection}/loss")), "epoch": int(float(row["epoch"])),
                "step": int(float(row["step"]))}

    @staticmethod
    def _accumulate(sums: dict[str, float], logs: dict[str, float]) -> None:
        sums["_n"] = sums.get("_n", 0) + (1 if logs else 0)
        for k, v in logs.items():
            sums[k] = sums.get(k, 0.0) + v

    def _reduce_means(self, sums: dict[str, float]) -> dict[str, float]:
        keys = sorted(k for k in sums if k != "_n")
        totals = dist.all_reduce_sum(torch.tensor([sums.get("_n", 0.0)] + [sums[k] for k in keys],
                                                  dtype=torch.float64), self.info)
        n = max(totals[0].item(), 1.0)
        return {k: totals[i + 1].item() / n for i, k in enumerate(keys)}


def _finite(value: Any) -> float | None:
    """A metrics.csv cell (a float, or its text on a resumed run) as a float; None when empty or not finite."""
    try:
        number = float(value)
    except (TypeError, ValueError):
        return None
    return number if math.isfinite(number) else None


class _null:
    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False


def _default_collate() -> Callable:
    from hrsel.data.collate import collate

    return collate


def _limit(dataset, n: int):
    if dataset is None or not n or n >= len(dataset):
        return dataset
    subset = Subset(dataset, range(n))
    subset.tasks = getattr(dataset, "tasks", None)
    return subset


def _class_weights(dataset, tasks: dict[str, TaskSpec]) -> dict[str, torch.Tensor]:
    """Inverse-frequency class weights from the training targets (reads every item's targets once)."""
    counts = {t: torch.zeros(spec.num_classes, dtype=torch.float64) for t, spec in tasks.items()}
    for i in range(len(dataset)):
        for t, spec in tasks.items():
            y = torch.as_tensor(dataset[i]["targets"][t])
            if spec.kind == "multiclass":
                counts[t][int(y)] += 1
            else:
                counts[t] += y.double().reshape(-1)
    return {t: M.class_balanced_weights(counts[t], spec, len(dataset)) for t, spec in tasks.items()}

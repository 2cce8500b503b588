"""Impossible values and choices of a built Config, and the data folder, checked before any work.

    validate(cfg)         # ConfigError naming the key, the value and what is valid
    check_data_root(cfg)  # the data folder exists, or a generator may build it

Ranges of the free keys (model and data options) follow their names (`hrsel.config.values`);
names of data sets, pipelines and metrics are checked by `hrsel.config.checks`. No torch.
"""
from __future__ import annotations

import difflib
import re
from pathlib import Path
from typing import Any

from hrsel.config.schema import Config
from hrsel.config.values import check_option_values
from hrsel.errors import ConfigError

_CHOICES = {
    "optim.name": ("adamw", "sgd"),
    "optim.schedule": ("cosine", "piecewise", "constant"),
    "optim.weight_decay_mode": ("lr_scaled", "absolute", "jax_coupled"),
    "optim.weight_decay_on": ("matrices", "all"),
    "train.precision": ("fp32", "bf16", "fp16"),
}


def validate(cfg: Config) -> None:
    """Impossible values and choices; the data folder is checked by `check_data_root`."""
    for key, choices in _CHOICES.items():
        value = _get(cfg, key)
        if value not in choices:
            close = difflib.get_close_matches(str(value), choices, n=1)
            hint = f" Did you mean {close[0]!r}?" if close else ""
            raise ConfigError(f"config key {key!r} = {value!r} is not one of {', '.join(choices)}.{hint}")
    positive = ["data.batch_size", "train.epochs", "train.grad_accum", "train.eval_every", "train.max_nan_skips"]
    non_negative = ["data.eval_batch_size", "data.num_workers", "data.limit_train", "data.limit_eval",
                    "train.max_steps", "train.checkpoint_every", "optim.weight_decay", "optim.warmup_epochs",
                    "optim.clip_value", "optim.clip_norm", "eval.pictures"]
    for key in positive:
        if _get(cfg, key) <= 0:
            raise ConfigError(f"config key {key!r} = {_get(cfg, key)!r} must be > 0")
    for key in non_negative:
        if _get(cfg, key) < 0:
            raise ConfigError(f"config key {key!r} = {_get(cfg, key)!r} must be >= 0")
    if not cfg.optim.lr > 0:
        raise ConfigError(f"config key 'optim.lr' = {cfg.optim.lr!r} must be > 0")
    if len(cfg.optim.betas) != 2:
        raise ConfigError(f"config key 'optim.betas' = {cfg.optim.betas!r} must hold two numbers, e.g. [0.9, 0.999]")
    if not 0 <= cfg.optim.warmup_ratio < 1:
        raise ConfigError(f"config key 'optim.warmup_ratio' = {cfg.optim.warmup_ratio!r} must be in [0, 1)")
    if cfg.optim.warmup_ratio and cfg.optim.warmup_epochs:
        raise ConfigError("config keys 'optim.warmup_ratio' and 'optim.warmup_epochs' are both set; keep one")
    if cfg.optim.milestone_ratios and cfg.optim.milestones:
        raise ConfigError("config keys 'optim.milestone_ratios' and 'optim.milestones' are both set; keep one")
    if any(not 0 < r < 1 for r in cfg.optim.milestone_ratios):
        raise ConfigError(f"config key 'optim.milestone_ratios' = {cfg.optim.milestone_ratios!r}: each must be "
                          f"in (0, 1), e.g. [0.6, 0.8]")
    if not 0 <= cfg.optim.min_lr_ratio <= 1:
        raise ConfigError(f"config key 'optim.min_lr_ratio' = {cfg.optim.min_lr_ratio!r} must be in [0, 1]")
    if cfg.optim.weight_decay_mode == "absolute" and cfg.optim.name != "adamw":
        raise ConfigError(f"config key 'optim.weight_decay_mode' = 'absolute' needs optim.name=adamw (decoupled "
                          f"decay), got optim.name={cfg.optim.name!r}; use weight_decay_mode=lr_scaled with sgd")
    _validate_val_split(cfg)
    if not cfg.data.root:
        raise ConfigError("config key 'data.root' is empty; set it to the data folder, e.g. data.root=data/mnist")
    _validate_ranges(cfg)
    check_option_values("model", cfg.model.options)  # K, M, I, sizes, probabilities, nested options too
    check_option_values("data", cfg.data.options)
    check_option_values("data.generate", cfg.data.generate)
    from hrsel.io.bands import check_spec  # numpy only: config errors stay fast

    check_spec(cfg.data.band_norm)


def _validate_val_split(cfg: Config) -> None:
    data = cfg.data
    if not 0 < data.val_fraction < 1:
        raise ConfigError(f"config key 'data.val_fraction' = {data.val_fraction!r} must be in (0, 1), e.g. 0.1")
    if data.val_split == data.eval_split:
        raise ConfigError(f"config key 'data.val_split' = {data.val_split!r} is the test split (data.eval_split): "
                          f"best.pt would be selected on test data; use data.val_split=auto, or none to do so "
                          f"knowingly")
    if data.val_split == data.train_split:
        raise ConfigError(f"config key 'data.val_split' = {data.val_split!r} is the training split; use "
                          f"data.val_split=holdout to hold out data.val_fraction of it")
    if not data.val_split:
        raise ConfigError("config key 'data.val_split' is empty; use auto, holdout, none or a split name")


_DEVICE = re.compile(r"(auto|cpu|mps|xpu|cuda(:\d+)?)")
_METRIC = re.compile(r"loss|[^/\s]+/[^/\s]+")


def _validate_ranges(cfg: Config) -> None:
    """Probabilities, the device and the form of eval.metric; its task and metric are checked later."""
    if not all(0 <= b < 1 for b in cfg.optim.betas):
        raise ConfigError(f"config key 'optim.betas' = {cfg.optim.betas!r}: each must be in [0, 1), e.g. [0.9, 0.999]")
    if not 0 <= cfg.optim.momentum <= 1:
        raise ConfigError(f"config key 'optim.momentum' = {cfg.optim.momentum!r} must be in [0, 1], e.g. 0.9")
    if not cfg.optim.gamma > 0:
        raise ConfigError(f"config key 'optim.gamma' = {cfg.optim.gamma!r} must be > 0, e.g. 0.1")
    if any(m < 0 for m in cfg.optim.milestones):
        raise ConfigError(f"config key 'optim.milestones' = {cfg.optim.milestones!r}: epochs must be >= 0")
    for task, weight in cfg.train.task_weights.items():
        if not weight >= 0:
            raise ConfigError(f"config key 'train.task_weights.{task}' = {weight!r} must be >= 0")
    if not _DEVICE.fullmatch(cfg.device):
        raise ConfigError(f"config key 'device' = {cfg.device!r} is not a device; use auto, cpu, cuda, cuda:N or mps")
    if cfg.eval.metric and not _METRIC.fullmatch(cfg.eval.metric):
        raise ConfigError(f"config key 'eval.metric' = {cfg.eval.metric!r} must look like task/metric (e.g. "
                          f"majority/accuracy), be loss, or be empty for the first task's first metric")


def check_data_root(cfg: Config) -> None:
    root = Path(cfg.data.root)
    if not root.exists() and not cfg.data.generate_if_missing:
        raise ConfigError(
            f"config key 'data.root': data folder {str(root)!r} does not exist; download or generate the "
            f"data set there, point data.root=PATH at it, or set data.generate_if_missing=true where a "
            f"generator exists"
        )


def _get(cfg: Any, key: str) -> Any:
    for part in key.split("."):
        cfg = getattr(cfg, part)
    return cfg

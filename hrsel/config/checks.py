"""Config checks that need the registries or the data set's tasks, run before any training.

    check_components(cfg)              # names and nested options: before any file is written
    check_eval_metric(cfg, tasks)      # eval.metric, once the data set's tasks are known

`check_components` resolves every name the config gives (data set, generator, pipeline and
its parts) and checks every options mapping against the keywords of what it builds, so a
typo anywhere fails with the key, the value and the closest valid choice. The registries
(and torch) are imported here, on first use, never by `hrsel.config`.
"""
from __future__ import annotations

import difflib
from typing import Any

from hrsel.config import Config, check_builder_options
from hrsel.errors import ConfigError

# The generator keywords that take one of a few words (hrsel.data.digits.load_digit_pools).
GENERATE_CHOICES = {"digits": ("mnist", "rendered")}


def check_components(cfg: Config) -> None:
    """Data set, generator and pipeline names and their options; typed options replace the raw ones."""
    from hrsel import data
    from hrsel.models.build import check_pipeline_options, lookup

    lookup(data.DATASETS, cfg.data.name, key="data.name")
    cfg.model.options = check_pipeline_options(cfg.model.name, cfg.model.options)
    _check_generator(cfg)
    if cfg.eval.metric and cfg.eval.metric != "loss":
        _check_metric_name(cfg.eval.metric.partition("/")[2], known=sorted(all_metric_names()))


def _check_generator(cfg: Config) -> None:
    from hrsel.engine.datagen import GENERATORS

    if not (cfg.data.generate_if_missing or cfg.data.generate):
        return
    if cfg.data.name not in GENERATORS:
        key = "data.generate_if_missing" if cfg.data.generate_if_missing else "data.generate"
        raise ConfigError(f"config key {key!r} is set, but data set {cfg.data.name!r} (data.name) has no "
                          f"generator; generators exist for: {', '.join(sorted(GENERATORS))}. Download the data "
                          f"into data.root and remove {key}")
    cfg.data.generate = check_builder_options("data.generate", cfg.data.name, cfg.data.generate,
                                              GENERATORS[cfg.data.name], supplied=("root",))
    for option, choices in GENERATE_CHOICES.items():
        value = cfg.data.generate.get(option, choices[0])
        if value not in choices:
            raise ConfigError(f"config key 'data.generate.{option}' = {value!r} is not one of "
                              f"{', '.join(choices)}{_did_you_mean(value, choices)}")


def check_eval_metric(cfg: Config, tasks: dict[str, Any]) -> None:
    """eval.metric must be `loss` or `task/metric` of one of `tasks` (name -> TaskSpec)."""
    metric = cfg.eval.metric
    if not metric or metric == "loss":
        return
    valid = metric_names(tasks)
    if metric in valid:
        return
    task, _, name = metric.partition("/")
    if task not in tasks:
        raise ConfigError(f"config key 'eval.metric' = {metric!r}: the data set {cfg.data.name!r} has no task "
                          f"{task!r}{_did_you_mean(task, list(tasks))} Its tasks: {', '.join(tasks)}. Valid "
                          f"values: {', '.join(valid)}")
    raise ConfigError(f"config key 'eval.metric' = {metric!r}: task {task!r} ({tasks[task].kind}) has no metric "
                      f"{name!r}{_did_you_mean(f'{task}/{name}', valid)} Valid values: {', '.join(valid)}")


def metric_names(tasks: dict[str, Any]) -> list[str]:
    """'loss' and every `task/metric` the trainer reports for `tasks`, as `task_metrics` names them."""
    return ["loss"] + [f"{task}/{name}" for task, spec in tasks.items() for name in _task_metric_names(spec)]


def all_metric_names() -> set[str]:
    """Every metric name of any task kind (accuracy, auc, exact_match, ...)."""
    from hrsel.tasks import TaskSpec

    kinds = [TaskSpec("multiclass", 2), TaskSpec("multilabel", 2), TaskSpec("binary", 1)]
    return {name for spec in kinds for name in _task_metric_names(spec)}


def _task_metric_names(spec: Any) -> list[str]:
    """The keys `hrsel.engine.metrics.task_metrics` returns for this kind of task (two dummy items)."""
    import torch

    from hrsel.engine.metrics import task_metrics

    logits = torch.zeros(2, spec.num_classes)
    target = {"multiclass": torch.tensor([0, 1]) % spec.num_classes, "multilabel": torch.zeros(2, spec.num_classes),
              "binary": torch.tensor([0.0, 1.0])}[spec.kind]
    return list(task_metrics(logits, target, spec))


def _check_metric_name(name: str, *, known: list[str]) -> None:
    if name not in known:
        raise ConfigError(f"config key 'eval.metric': metric {name!r} is not one of {', '.join(known)}"
                          f"{_did_you_mean(name, known)} Use task/metric, e.g. majority/accuracy")


def _did_you_mean(value: Any, choices: list[str] | tuple[str, ...]) -> str:
    text = str(value)
    prefixed = [c for c in choices if text and c.startswith(text)]  # acc -> accuracy
    close = prefixed or difflib.get_close_matches(text, list(choices), n=1, cutoff=0.5)
    return f"; did you mean {close[0]!r}?" if close else "."

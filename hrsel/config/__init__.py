"""Experiment configs: YAML -> typed dataclasses, dotted overrides, strict keys.

    cfg = load_config("configs/demo.yaml", ["optim.lr=3e-4", "train.epochs=2"])
    save_config(cfg, run_dir / "config.yaml")

Every key is checked before any work starts: an unknown or misspelt key, a value
of the wrong type or an impossible value raises `ConfigError` naming the key, the
bad value and the closest valid key. `data` and `model` take free keys besides
their own fields: those are keyword arguments of the data set / pipeline builder
and are checked against the builder's signature by `check_builder_options`;
`hrsel.config.checks` resolves the names (data set, pipeline, its backbone, aggregator,
scorer) and checks the nested `*_options` and eval.metric. "Did you mean" comes from
`hrsel.config.keys`, value types from `hrsel.config.coerce`, ranges of free keys from
`hrsel.config.values`. No torch import here: config errors stay fast.
"""
from __future__ import annotations

import dataclasses
import difflib
import functools
import inspect
import os
import re
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import yaml

from hrsel.config.keys import closest_key
from hrsel.config.coerce import coerce, coerce_option
from hrsel.config.values import check_option_values
from hrsel.errors import ConfigError


@dataclass
class DataConfig:
    name: str = "megapixel_mnist"  # a name of hrsel.data.build_dataset
    root: str = ""  # the data folder
    train_split: str = "train"
    eval_split: str = "test"  # the test split: evaluated once, at the end, with best.pt's weights
    # What best.pt is selected on: auto (the data set's own validation split where it has one, e.g.
    # billiard "valid", else holdout) | holdout (a seeded, class-stratified val_fraction of train_split,
    # not trained on) | a split name | none (select on eval_split, the pre-validation behaviour: optimistic).
    val_split: str = "auto"
    val_fraction: float = 0.1  # holdout: the share of train_split held out for validation
    batch_size: int = 16
    eval_batch_size: int = 0  # 0: same as batch_size
    num_workers: int = 0
    images_to_device: bool = True  # move image tensors to the device (False: the pipeline moves chunks)
    limit_train: int = 0  # use only the first n training items (0: all), for smoke runs
    limit_eval: int = 0  # use only the first n validation and n test items (0: all)
    generate_if_missing: bool = False  # build the data set into `root` when it is absent
    generate: dict[str, Any] = field(default_factory=dict)  # options of the generator
    # How pixels become float (hrsel.io.bands): {} = uint8 / 255, uint16 / 65535, float as is; or
    # {mean: [...], std: [...]}, {offset: ..., scale: ...}, {percentiles: [1, 99]}, {mean: auto, std: auto}
    # (computed over `sample` training images once, saved as band_norm.json in the run folder).
    band_norm: dict[str, Any] = field(default_factory=dict)
    options: dict[str, Any] = field(default_factory=dict)  # free keys: build_dataset(**options)


@dataclass
class ModelConfig:
    name: str = "ips"  # a name of hrsel.models.build_pipeline
    options: dict[str, Any] = field(default_factory=dict)  # free keys: build_pipeline(**options)


@dataclass
class OptimConfig:
    name: str = "adamw"  # adamw | sgd
    lr: float = 1e-3
    weight_decay: float = 0.0
    weight_decay_mode: str = "lr_scaled"  # lr_scaled (torch: decay x lr) | absolute (DPS JAX: decay x schedule only)
    weight_decay_on: str = "matrices"  # matrices (no decay on biases and norms) | all (DPS JAX)
    betas: list[float] = field(default_factory=lambda: [0.9, 0.999])
    momentum: float = 0.9  # sgd only
    schedule: str = "cosine"  # cosine | piecewise | constant
    warmup_epochs: float = 0.0  # linear warm-up from 0, in epochs (fractions allowed)
    warmup_ratio: float = 0.0  # or as a fraction of all updates (the DPS JAX configs' warmup_ratio)
    min_lr_ratio: float = 0.0  # cosine ends at min_lr_ratio * lr
    milestones: list[float] = field(default_factory=list)  # piecewise: epochs where lr *= gamma
    milestone_ratios: list[float] = field(default_factory=list)  # or fractions of all updates (DPS CUB: 0.6, 0.8)
    gamma: float = 0.1
    clip_value: float = 0.0  # 0: off
    clip_norm: float = 0.0  # 0: off


@dataclass
class TrainConfig:
    epochs: int = 1
    max_steps: int = 0  # 0: epochs * steps per epoch; else stop after this many updates
    grad_accum: int = 1  # batches per optimiser update
    precision: str = "fp32"  # fp32 | bf16 | fp16 (autocast, GPU only; fp32 on CPU)
    compile: bool = False  # torch.compile the pipeline
    channels_last: bool = True  # convolutions in NHWC (hrsel.models.fastpath): faster on CPU and GPU, same results
    skip_nan_updates: bool = False  # skip an update with a non-finite loss instead of stopping
    max_nan_skips: int = 20  # with skip_nan_updates: stop after this many non-finite losses in a row
    checkpoint_every: int = 0  # also checkpoint every n updates (0: only at epoch ends)
    eval_every: int = 1  # evaluate every n epochs (and always after the last)
    class_balanced: bool = False  # weight task losses by inverse class frequency
    task_weights: dict[str, float] = field(default_factory=dict)  # task -> loss weight (default 1)
    find_unused_parameters: bool = True  # DDP: let a probe step decide (hrsel.engine.probe); false: never
    progress_bar: bool = True


@dataclass
class EvalConfig:
    metric: str = ""  # "task/metric" that picks best.pt on the validation set; "": first task's first metric
    pictures: int = 4  # validation images drawn per evaluation (and test images, in pictures/test/, at the end)


@dataclass
class Config:
    experiment: str = "run"
    seed: int = 0
    device: str = "auto"  # auto | cpu | cuda | cuda:1 ...
    output_dir: str = "runs"  # run directory = output_dir / experiment
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)

    @property
    def run_dir(self) -> Path:
        return Path(self.output_dir) / self.experiment


_FREE_KEYS = "options"  # the field of a section that collects its free keys
_CHOICES = {
    "optim.name": ("adamw", "sgd"),
    "optim.schedule": ("cosine", "piecewise", "constant"),
    "optim.weight_decay_mode": ("lr_scaled", "absolute"),
    "optim.weight_decay_on": ("matrices", "all"),
    "train.precision": ("fp32", "bf16", "fp16"),
}


# ----------------------------------------------------------------------------- loading

def load_config(path: str | os.PathLike, overrides: list[str] = ()) -> Config:
    """Read a YAML file, apply `key.sub=value` overrides and validate everything."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file {str(path)!r} does not exist; configs live in configs/*.yaml")
    try:
        raw = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as e:
        raise ConfigError(f"config file {str(path)!r} is not valid YAML: {e}") from None
    if not isinstance(raw, dict):
        raise ConfigError(f"config file {str(path)!r} must hold a mapping of keys, got {type(raw).__name__}")
    raw.setdefault("experiment", path.stem)
    for item in overrides:
        apply_override(raw, item)
    cfg = from_dict(raw)
    validate(cfg)
    return cfg


def from_dict(raw: dict[str, Any]) -> Config:
    return _build(Config, raw, prefix="")


def to_dict(cfg: Config) -> dict[str, Any]:
    """Plain nested dict, free keys flattened back into their section (as in the YAML)."""
    out: dict[str, Any] = {}
    for f in dataclasses.fields(cfg):
        value = getattr(cfg, f.name)
        if dataclasses.is_dataclass(value):
            section = {k: v for k, v in dataclasses.asdict(value).items() if k != _FREE_KEYS}
            section.update(getattr(value, _FREE_KEYS, {}) or {})
            out[f.name] = section
        else:
            out[f.name] = value
    return out


def save_config(cfg: Config, path: str | os.PathLike) -> None:
    Path(path).write_text(yaml.safe_dump(to_dict(cfg), sort_keys=False))


def dump_config(cfg: Config) -> str:
    return yaml.safe_dump(to_dict(cfg), sort_keys=False)


def _build(cls: type, raw: dict[str, Any], prefix: str) -> Any:
    if not isinstance(raw, dict):
        raise ConfigError(f"config key {prefix.rstrip('.') or '<top>'!r} must be a mapping, got {raw!r}")
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    free = _FREE_KEYS in names
    kwargs: dict[str, Any] = {}
    extras: dict[str, Any] = dict(raw.get(_FREE_KEYS) or {}) if free else {}
    for key, value in raw.items():
        full = prefix + str(key)
        if key == _FREE_KEYS and free:
            continue
        if key not in names:
            if free:
                extras[key] = value
                continue
            raise ConfigError(_unknown_key_message(full, value))
        hint = hints[key]
        if dataclasses.is_dataclass(hint):
            kwargs[key] = _build(hint, value or {}, full + ".")
        else:
            kwargs[key] = coerce(value, hint, full)
    if free:
        kwargs[_FREE_KEYS] = extras
    return cls(**kwargs)


# ----------------------------------------------------------------------------- overrides

def apply_override(raw: dict[str, Any], item: str) -> None:
    """`a.b.c=value`: the value is parsed as YAML and typed like the value it replaces."""
    key, sep, text = item.partition("=")
    key = key.strip().lstrip("-")
    if not sep or not key:
        raise ConfigError(f"override {item!r} must look like key.sub=value, e.g. optim.lr=3e-4")
    parts = key.split(".")
    node = raw
    for depth, part in enumerate(parts[:-1]):
        child = node.get(part)
        if child is None:
            child = node[part] = {}
        if not isinstance(child, dict):
            raise ConfigError(f"override {item!r}: {'.'.join(parts[:depth + 1])!r} is a value, not a section")
        node = child
    value = _parse_scalar(text)
    leaf = parts[-1]
    hint = _field_type(parts)
    if leaf in node and node[leaf] is not None:
        value = coerce(value, _type_of(node[leaf]) if hint is None else hint, key, text)
    elif hint is not None:
        value = coerce(value, hint, key, text)
    elif not _is_free_key(parts):
        raise ConfigError(_unknown_key_message(key, text))
    node[leaf] = value


def _parse_scalar(text: str) -> Any:
    try:
        return yaml.safe_load(text) if text.strip() else ""
    except yaml.YAMLError:
        return text


def _type_of(value: Any) -> Any:
    if isinstance(value, bool):
        return bool
    if isinstance(value, (int, float, str)):
        return type(value)
    if isinstance(value, list):
        return list
    if isinstance(value, dict):
        return dict
    return Any


def _field_type(parts: list[str]) -> Any | None:
    """The declared type of a dotted key, or None when it is not a dataclass field.

    A key inside a typed mapping has the mapping's value type: `train.task_weights.majority` is a float,
    `data.generate.n_train` is Any (checked against the generator later).
    """
    cls: Any = Config
    for part in parts:
        if typing.get_origin(cls) is dict:
            cls = (typing.get_args(cls) or (str, Any))[-1]
            continue
        if not dataclasses.is_dataclass(cls):
            return None
        hints = typing.get_type_hints(cls)
        if part not in hints:
            return None
        cls = hints[part]
    return cls


def _is_free_key(parts: list[str]) -> bool:
    """True for `model.foo` / `data.options.foo`: keys checked later against a builder."""
    if len(parts) < 2:
        return False
    section = _field_type(parts[:1])
    if not dataclasses.is_dataclass(section):
        return False
    names = {f.name for f in dataclasses.fields(section)}
    return _FREE_KEYS in names and (parts[1] not in names or parts[1] == _FREE_KEYS)


# ----------------------------------------------------------------------------- validation

def all_keys(cls: type = Config, prefix: str = "") -> list[str]:
    """Every fixed dotted key of the schema, e.g. ['experiment', ..., 'optim.lr', ...]."""
    keys = []
    for f in dataclasses.fields(cls):
        hint = typing.get_type_hints(cls)[f.name]
        if dataclasses.is_dataclass(hint):
            keys += all_keys(hint, prefix + f.name + ".")
        elif f.name != _FREE_KEYS:
            keys.append(prefix + f.name)
    return keys


def _unknown_key_message(key: str, value: Any, valid: list[str] | None = None) -> str:
    valid = all_keys() if valid is None else valid
    close = closest_key(key, valid)
    hint = f" Did you mean {close!r}?" if close else ""
    section = key.rpartition(".")[0]
    listed = [k for k in valid if k.rpartition(".")[0] == section] or valid
    return f"unknown config key {key!r} (value {value!r}).{hint} Valid keys here: {', '.join(listed)}"


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


def check_builder_options(section: str, name: str, options: dict[str, Any], builder: Callable[..., Any],
                          *, supplied: tuple[str, ...] = ()) -> dict[str, Any]:
    """Check free keys against a builder's keyword arguments; returns them typed.

    An unknown key names the closest keyword of `builder` (or of the section's own keys:
    `data.bach_size` -> `data.batch_size`); values are coerced to the keyword's annotation
    (plain types, optional, unions, fixed-length tuples, Literals). `supplied` lists keywords
    hrsel passes itself (e.g. `tasks`); the keywords a `functools.partial` binds count as supplied.
    """
    if not isinstance(options, dict):
        raise ConfigError(f"config key {section!r} must be a mapping of options, got {options!r}")
    if isinstance(builder, functools.partial):
        supplied, builder = (*supplied, *builder.keywords), builder.func
    try:
        sig = inspect.signature(builder)
    except (TypeError, ValueError):
        return dict(options)
    params = {p.name: p for p in sig.parameters.values()
              if p.kind in (p.KEYWORD_ONLY, p.POSITIONAL_OR_KEYWORD) and p.name not in supplied}
    takes_any = any(p.kind is p.VAR_KEYWORD for p in sig.parameters.values())
    hints = _type_hints(builder)
    out = {}
    for key, value in options.items():
        full = f"{section}.{key}"
        if key in params:
            out[key] = coerce_option(value, hints.get(key, Any), full)
        elif takes_any:
            out[key] = value
        else:
            raise ConfigError(_unknown_option_message(section, name, key, value, list(params), supplied))
    return out


def _type_hints(builder: Callable[..., Any]) -> dict[str, Any]:
    try:
        return typing.get_type_hints(builder.__init__ if inspect.isclass(builder) else builder)
    except Exception:  # unresolvable annotations: check names only
        return {}


def _unknown_option_message(section: str, name: str, key: str, value: Any, params: list[str],
                            supplied: tuple[str, ...]) -> str:
    full = f"{section}.{key}"
    valid = [f"{section}.{p}" for p in params]
    if key in supplied:
        return (f"config key {full!r} (value {value!r}) is filled in by hrsel for {section} {name!r}; remove it. "
                f"Valid keys: {', '.join(valid) or '(none)'}")
    own = [k for k in all_keys() if k.rpartition(".")[0] == section]  # data.batch_size beside the data set's
    close = closest_key(full, valid + own)
    hint = f" Did you mean {close!r}?" if close else ""
    return (f"unknown config key {full!r} (value {value!r}) for {section} {name!r}.{hint} "
            f"Valid keys: {', '.join(valid) or '(none)'}")

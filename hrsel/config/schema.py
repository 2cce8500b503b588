"""The config schema: one dataclass per section, and the conversions raw mapping <-> Config.

    cfg = from_dict({"data": {"root": "data/mnist"}, "model": {"name": "ips", "k": 10}})
    to_dict(cfg)["model"]  # {'name': 'ips', 'k': 10}: free keys back in their section

`data` and `model` take free keys besides their own fields (the `options` field collects
them): keyword arguments of the data set / pipeline builder, checked later against its
signature (`hrsel.config.builders`). An unknown key of any other section raises ConfigError
with the closest valid key. Renamed keys (`hrsel.config.renames`) are translated first, so a
run folder's config.yaml written before a rename still loads. No torch, no YAML.
"""
from __future__ import annotations

import dataclasses
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from hrsel.config.coerce import coerce
from hrsel.config.keys import unknown_key_message
from hrsel.config.renames import rename_keys
from hrsel.errors import ConfigError

FREE_KEYS = "options"  # the field of a section that collects its free keys


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
    # lr_scaled (torch: decay x lr) | absolute (DPS JAX: decay x schedule only) | jax_coupled (DPS JAX CUB:
    # g - wd * theta before the optimiser, an L2 term of the opposite sign; see hrsel.engine.optim)
    weight_decay_mode: str = "lr_scaled"
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
    max_steps: int = 0  # 0: epochs * steps per epoch; else the run length, which the schedule is planned over
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


def from_dict(raw: dict[str, Any], *, source: str = "a config mapping") -> Config:
    """A Config from a plain nested mapping (as YAML reads it); `source` names it in messages."""
    if not isinstance(raw, dict):
        raise ConfigError(f"{source} must hold a mapping of keys, got {type(raw).__name__}")
    return _build(Config, rename_keys(raw, source=source), prefix="")


def to_dict(cfg: Config) -> dict[str, Any]:
    """Plain nested dict, free keys flattened back into their section (as in the YAML)."""
    out: dict[str, Any] = {}
    for f in dataclasses.fields(cfg):
        value = getattr(cfg, f.name)
        if dataclasses.is_dataclass(value):
            section = {k: v for k, v in dataclasses.asdict(value).items() if k != FREE_KEYS}
            section.update(getattr(value, FREE_KEYS, {}) or {})
            out[f.name] = section
        else:
            out[f.name] = value
    return out


def all_keys(cls: type = Config, prefix: str = "") -> list[str]:
    """Every fixed dotted key of the schema, e.g. ['experiment', ..., 'optim.lr', ...]."""
    keys = []
    for f in dataclasses.fields(cls):
        hint = typing.get_type_hints(cls)[f.name]
        if dataclasses.is_dataclass(hint):
            keys += all_keys(hint, prefix + f.name + ".")
        elif f.name != FREE_KEYS:
            keys.append(prefix + f.name)
    return keys


def field_type(parts: list[str]) -> Any | None:
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


def is_free_key(parts: list[str]) -> bool:
    """True for `model.foo` / `data.options.foo`: keys checked later against a builder."""
    if len(parts) < 2:
        return False
    section = field_type(parts[:1])
    if not dataclasses.is_dataclass(section):
        return False
    names = {f.name for f in dataclasses.fields(section)}
    return FREE_KEYS in names and (parts[1] not in names or parts[1] == FREE_KEYS)


def _build(cls: type, raw: dict[str, Any], prefix: str) -> Any:
    if not isinstance(raw, dict):
        raise ConfigError(f"config key {prefix.rstrip('.') or '<top>'!r} must be a mapping, got {raw!r}")
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    free = FREE_KEYS in names
    kwargs: dict[str, Any] = {}
    extras: dict[str, Any] = dict(raw.get(FREE_KEYS) or {}) if free else {}
    for key, value in raw.items():
        full = prefix + str(key)
        if key == FREE_KEYS and free:
            continue
        if key not in names:
            if free:
                extras[key] = value
                continue
            raise ConfigError(unknown_key_message(full, value, all_keys()))
        hint = hints[key]
        if dataclasses.is_dataclass(hint):
            kwargs[key] = _build(hint, value or {}, full + ".")
        else:
            kwargs[key] = coerce(value, hint, full)
    if free:
        kwargs[FREE_KEYS] = extras
    return cls(**kwargs)

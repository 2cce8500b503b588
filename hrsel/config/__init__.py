"""Experiment configs: YAML -> typed dataclasses, `base:` files, dotted overrides, strict keys.

    cfg = load_config("configs/demo.yaml", ["optim.lr=3e-4", "train.epochs=2"])
    save_config(cfg, run_dir / "config.yaml")

Every key is checked before any work starts: an unknown or misspelt key, a value of the wrong
type or an impossible value raises `ConfigError` naming the key, the bad value and the closest
valid key. One module per job:

    schema       the dataclasses, raw mapping <-> Config (`from_dict`, `to_dict`, `all_keys`)
    loading      YAML, `base:` chains merged key by key, then overrides (`load_config`)
    overrides    dotted `key.sub=value` overrides, typed like the value they replace
    renames      old key names -> new ones, translated in one place, with a warning
    saving       the resolved config as YAML (`save_config`, `dump_config`)
    validation   impossible values and choices (`validate`), the data folder (`check_data_root`)
    builders     free keys against a builder's signature (`check_builder_options`)
    checks       names and nested options against the registries (imports them, and torch, lazily)
    keys, coerce, values   "did you mean", typing of values, ranges of free keys by name

No torch import here: config errors stay fast.
"""
from __future__ import annotations

from hrsel.config.builders import check_builder_options
from hrsel.config.loading import deep_merge, load_config, load_raw
from hrsel.config.overrides import apply_override
from hrsel.config.renames import RENAMED, rename_keys
from hrsel.config.saving import dump_config, save_config
from hrsel.config.schema import (Config, DataConfig, EvalConfig, ModelConfig, OptimConfig, TrainConfig, all_keys,
                                 from_dict, to_dict)
from hrsel.config.validation import check_data_root, validate

__all__ = ["Config", "DataConfig", "EvalConfig", "ModelConfig", "OptimConfig", "RENAMED", "TrainConfig", "all_keys",
           "apply_override", "check_builder_options", "check_data_root", "deep_merge", "dump_config", "from_dict",
           "load_config", "load_raw", "rename_keys", "save_config", "to_dict", "validate"]

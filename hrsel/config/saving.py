"""The resolved config as YAML: the run folder's config.yaml and `--print-config`.

    save_config(cfg, run_dir / "config.yaml")
    print(dump_config(cfg))

What is written is the Config after bases, renames and overrides (`to_dict`): no `base:`, every
key under its current name, every schema field spelt out, so that the run folder alone says how
the run was made and resuming it never reads the file it started from.
"""
from __future__ import annotations

import os
from pathlib import Path

import yaml

from hrsel.config.schema import Config, to_dict


def dump_config(cfg: Config) -> str:
    return yaml.safe_dump(to_dict(cfg), sort_keys=False)


def save_config(cfg: Config, path: str | os.PathLike) -> None:
    Path(path).write_text(dump_config(cfg))

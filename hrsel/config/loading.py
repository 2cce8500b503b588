"""A config file -> a validated Config: YAML, `base:` files merged under it, then overrides.

    cfg = load_config("configs/billiard_max.yaml", ["optim.lr=3e-4"])

A file may name a base (or a list of them) with `base:`, a path relative to the file; a base
may have its own. The bases are read first, each resolved the same way, merged in the order
given, then the file itself on top: mappings merge key by key (so `model.k: 5` changes one
option of the base's `model`), lists and scalars replace. `experiment` is never inherited: it
names the run folder, so it defaults to the loaded file's own name. Dotted overrides come last.
The result is a plain config without `base:`; `save_config` writes it to the run folder, so a
run never depends on a base that may change. Each file's renamed keys are translated as it is
read (`hrsel.config.renames`), so the warning names the file that holds the old key.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Iterable

import yaml

from hrsel.config.overrides import apply_override
from hrsel.config.renames import rename_keys
from hrsel.config.schema import Config, from_dict
from hrsel.config.validation import validate
from hrsel.errors import ConfigError

BASE_KEY = "base"
NOT_INHERITED = ("experiment",)  # a base's run-folder name is never a child's


def load_config(path: str | os.PathLike, overrides: Iterable[str] = ()) -> Config:
    """Read a YAML file and its bases, apply `key.sub=value` overrides and validate everything."""
    path = Path(path)
    raw = load_raw(path)
    raw.setdefault("experiment", path.stem)
    for item in overrides:
        apply_override(raw, item)
    cfg = from_dict(raw, source=f"config file {str(path)!r}")
    validate(cfg)
    return cfg


def load_raw(path: str | os.PathLike, chain: tuple[Path, ...] = ()) -> dict[str, Any]:
    """The file's mapping merged over its bases' (recursively), without `base:`; nothing is validated."""
    path = Path(os.path.normpath(path))
    chain = (*chain, path)
    raw = rename_keys(read_yaml(path, chain), source=f"config file {str(path)!r}")
    merged: dict[str, Any] = {}
    for base in base_paths(raw.pop(BASE_KEY, None), path, chain):
        inherited = load_raw(base, chain)
        for key in NOT_INHERITED:
            inherited.pop(key, None)
        merged = deep_merge(merged, inherited)
    return deep_merge(merged, raw)


def read_yaml(path: Path, chain: tuple[Path, ...]) -> dict[str, Any]:
    """One file's mapping; a missing or malformed file names the chain of bases that led to it."""
    where = f"config file {str(path)!r}{_via(chain)}"
    if not path.is_file():
        hint = ("a base path is relative to the file that names it" if len(chain) > 1 else
                "configs live in configs/*.yaml")
        raise ConfigError(f"{where} does not exist; {hint}")
    try:
        raw = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as e:
        raise ConfigError(f"{where} is not valid YAML: {e}") from None
    if not isinstance(raw, dict):
        raise ConfigError(f"{where} must hold a mapping of keys, got {type(raw).__name__}")
    return raw


def base_paths(value: Any, path: Path, chain: tuple[Path, ...]) -> list[Path]:
    """`base: a.yaml` or `base: [a.yaml, b.yaml]` -> paths next to `path`; a cycle is a ConfigError."""
    if value is None:
        return []
    names = value if isinstance(value, list) else [value]
    if not names or not all(isinstance(n, str) and n.strip() for n in names):
        raise ConfigError(f"config file {str(path)!r}{_via(chain)}: '{BASE_KEY}' = {value!r} must be a path "
                          f"relative to this file, or a list of them, e.g. base: base/billiard.yaml")
    out = []
    for name in names:
        base = Path(os.path.normpath(path.parent / name))
        seen = [p.resolve() for p in chain]
        if base.resolve() in seen:
            cycle = " -> ".join(str(p) for p in (*chain[seen.index(base.resolve()):], base))
            raise ConfigError(f"config file {str(path)!r}: '{BASE_KEY}: {name}' closes a cycle of bases ({cycle}); "
                              f"remove one of these base: keys")
        out.append(base)
    return out


def deep_merge(under: dict[str, Any], over: dict[str, Any]) -> dict[str, Any]:
    """`over` on top of `under`: mappings merge key by key, anything else (lists too) replaces."""
    out = dict(under)
    for key, value in over.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = deep_merge(out[key], value)
        else:
            out[key] = value
    return out


def _via(chain: tuple[Path, ...]) -> str:
    """' (base chain: a.yaml -> b.yaml)' for a file reached through bases, '' for the file named."""
    return f" (base chain: {' -> '.join(str(p) for p in chain)})" if len(chain) > 1 else ""

"""Dotted command-line overrides, applied to the raw mapping after the file and its bases are merged.

    raw = {"optim": {"lr": 0.001}}
    apply_override(raw, "optim.lr=3e-4")      # raw["optim"]["lr"] == 0.0003, a float like the 0.001 it replaces
    apply_override(raw, "model.num_selected=5")  # an old key name: written as model.k, with a warning

A value is parsed as YAML and typed like the value it replaces, or like the schema's field; a
free key (`model.foo`, `data.foo`) is taken as is and checked later against its builder. No torch.
"""
from __future__ import annotations

from typing import Any

import yaml

from hrsel.config.coerce import coerce
from hrsel.config.keys import unknown_key_message
from hrsel.config.renames import rename_override
from hrsel.config.schema import all_keys, field_type, is_free_key
from hrsel.errors import ConfigError


def apply_override(raw: dict[str, Any], item: str) -> None:
    """`a.b.c=value`: the value is parsed as YAML and typed like the value it replaces (in place)."""
    key, sep, text = item.partition("=")
    key = key.strip().lstrip("-")
    if not sep or not key:
        raise ConfigError(f"override {item!r} must look like key.sub=value, e.g. optim.lr=3e-4")
    key = rename_override(key, source=f"override {item!r}")
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
    hint = field_type(parts)
    if leaf in node and node[leaf] is not None:
        value = coerce(value, _type_of(node[leaf]) if hint is None else hint, key, text)
    elif hint is not None:
        value = coerce(value, hint, key, text)
    elif not is_free_key(parts):
        raise ConfigError(unknown_key_message(key, text, all_keys()))
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

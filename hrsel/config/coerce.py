"""Config values against type hints: `coerce` for the schema's fields, `coerce_option` for builder keywords.

    coerce("3e-4", float, "optim.lr")                       # -> 0.0003 (YAML reads 3e-4 as a string)
    coerce_option([8, 16], tuple[int, int, int], "model.scorer_options.widths")  # ConfigError: 3 items

A value of the wrong type raises `ConfigError` naming the key, the value and an example.
Builder keywords may be optional (`int | None`), unions (`int | str | None`), tuples of a
fixed length (`tuple[int, int]`) or of any length (`tuple[int, ...]`), lists, mappings or
Literals; anything else (a class, os.PathLike) is left for the builder to check. No torch.
"""
from __future__ import annotations

import types
import typing
from typing import Any

from hrsel.errors import ConfigError

_UNIONS = (typing.Union, types.UnionType)
_PLAIN = (bool, int, float, str, list, tuple, dict)


def coerce(value: Any, hint: Any, key: str, shown: Any = None) -> Any:
    """Check `value` against a type hint, converting int -> float where harmless."""
    shown = value if shown is None else shown
    origin = typing.get_origin(hint) or hint
    if hint is Any:
        return value
    if origin in _UNIONS or origin is typing.Literal:
        return coerce_option(value, hint, key)
    bad = ConfigError(f"config key {key!r} expects {type_name(hint)}, got {shown!r} ({type(value).__name__}); "
                      f"e.g. {key}={example(hint)}")
    if isinstance(value, str) and origin in (int, float):  # YAML reads `1e-4` as a string
        try:
            value = origin(value)
        except ValueError:
            raise bad from None
    if origin is bool:
        if isinstance(value, bool):
            return value
        raise bad
    if origin is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        if isinstance(value, float) and value.is_integer():
            return int(value)
        raise bad
    if origin is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        raise bad
    if origin is str:
        if isinstance(value, str):
            return value
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return str(shown)
        raise bad
    if origin in (list, tuple):
        return _coerce_sequence(value, hint, key, bad)
    if origin is dict:
        if value is None:
            return {}
        if not isinstance(value, dict):
            raise bad
        args = typing.get_args(hint)
        item = args[1] if len(args) == 2 else Any
        return {k: coerce(v, item, f"{key}.{k}") for k, v in value.items()}
    return value


def _coerce_sequence(value: Any, hint: Any, key: str, bad: ConfigError) -> list[Any]:
    """Always a list, as YAML reads it (a resumed run compares configs); `tuple[int, int]` also fixes the length."""
    if not isinstance(value, (list, tuple)):
        raise bad
    args = typing.get_args(hint)
    if (typing.get_origin(hint) or hint) is tuple and args and args[-1] is not Ellipsis:
        if len(value) != len(args):
            raise ConfigError(f"config key {key!r} = {list(value)!r} must hold {len(args)} items, got "
                              f"{len(value)}; e.g. {key}={example(hint)}")
        return [coerce(v, a, f"{key}[{i}]") for i, (v, a) in enumerate(zip(value, args))]
    item = args[0] if args else Any
    return [coerce(v, item, f"{key}[{i}]") for i, v in enumerate(value)]


def coerce_option(value: Any, hint: Any, key: str) -> Any:
    """A builder keyword's value against its annotation; kinds it cannot check pass unchanged."""
    origin = typing.get_origin(hint) or hint
    if origin is typing.Literal:
        choices = typing.get_args(hint)
        if value not in choices:
            raise ConfigError(f"config key {key!r} = {value!r} is not one of {', '.join(map(str, choices))}")
        return value
    if origin not in _UNIONS:
        return coerce(value, hint, key) if _checkable(hint) else value
    kinds = [a for a in typing.get_args(hint) if a is not type(None)]
    if value is None:
        if len(kinds) < len(typing.get_args(hint)):
            return None
        raise ConfigError(f"config key {key!r} must not be null; it expects {_kinds_name(kinds)}")
    if len(kinds) == 1:
        return coerce_option(value, kinds[0], key)
    if not all(_checkable(k) for k in kinds):
        return value
    for kind in sorted(kinds, key=lambda k: (typing.get_origin(k) or k) is str):  # str last: it takes numbers
        if (typing.get_origin(kind) or kind) is str and not isinstance(value, str):
            continue
        try:
            return coerce(value, kind, key)
        except ConfigError:
            continue
    raise ConfigError(f"config key {key!r} expects {_kinds_name(kinds)}, got {value!r} ({type(value).__name__}); "
                      f"e.g. {key}={example(kinds[0])}")


def _checkable(hint: Any) -> bool:
    origin = typing.get_origin(hint) or hint
    return hint is Any or origin in _PLAIN or origin is typing.Literal


def _kinds_name(kinds: list[Any]) -> str:
    return " or ".join(type_name(k) for k in kinds)


def type_name(hint: Any) -> str:
    origin = typing.get_origin(hint) or hint
    args = typing.get_args(hint)
    if origin is tuple and args and args[-1] is not Ellipsis:
        return f"a list of {len(args)} {type_name(args[0])}s"
    if origin in (list, tuple):
        return "a list"
    if origin is dict:
        return "a mapping"
    return getattr(origin, "__name__", str(origin))


def example(hint: Any) -> str:
    origin = typing.get_origin(hint) or hint
    args = typing.get_args(hint)
    if origin is tuple and args and args[-1] is not Ellipsis:
        return "[" + ",".join(example(a) for a in args) + "]"
    return {bool: "true", int: "10", float: "0.001", str: "name", list: "[1,2]", tuple: "[1,2]",
            dict: "{a: 1}"}.get(origin, "...")

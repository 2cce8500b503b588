"""Free keys against a builder's signature: `data.*` for the data set, `model.*` for the pipeline.

    check_builder_options("model", "ips", {"k": 10, "mode": "lazy"}, IPSPipeline, supplied=("tasks",))

An unknown key names the closest keyword of the builder (or of the section's own keys); values
are typed like the keyword's annotation (`hrsel.config.coerce`). No torch import here: the
builder is passed in.
"""
from __future__ import annotations

import functools
import inspect
import typing
from typing import Any, Callable

from hrsel.config.coerce import coerce_option
from hrsel.config.keys import closest_key
from hrsel.config.schema import all_keys
from hrsel.errors import ConfigError


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

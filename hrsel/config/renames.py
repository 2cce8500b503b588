"""Renamed config keys: one name for one idea across pipelines, the old names translated in one place.

    rename_keys({"model": {"name": "ips", "num_selected": 10}}, source="config file 'old.yaml'")
    # -> {"model": {"name": "ips", "k": 10}}, and a warning naming model.num_selected, model.k and the file

    model.k            was model.num_selected (ips): patches selected per image (DPS's K, IPS's M)
    model.score_chunk  was model.chunk_size (ips): patches scored per no-grad step (IPS's I)
    model.downscale    was model.score_downscale (dps_candidates): the integer block-mean factor of
                       the pixels the cheap network (scorer, attention net, policy; the CNN) sees

Why these names: `k` because every pipeline's selector is a top-K (hard, perturbed, Sinkhorn,
attention sampling) and three of the four selecting pipelines already said `k`; `score_chunk`
because it says which pass is chunked (the no-grad scoring pass) where `chunk_size` did not,
beside DPS's `extract_chunk` (the with-grad extraction pass); `downscale` because the same
operation is called so by dps, ats, patchdrop and cnn, where a `score_` prefix would be wrong
(the CNN scores nothing). The old names keep working: `load_config` translates each file's keys
as it reads it (and each override), `from_dict` those of a run folder's config.yaml or a
checkpoint, `build_pipeline` its keyword arguments; each use logs a warning naming the old key,
the new key and where it was written. A file that sets both names of one key is a ConfigError.
No torch, no YAML.
"""
from __future__ import annotations

import logging
from typing import Any, Callable

from hrsel.errors import ConfigError

log = logging.getLogger(__name__)

RENAMED: dict[str, dict[str, str]] = {  # section -> old key -> new key
    "model": {"num_selected": "k", "chunk_size": "score_chunk", "score_downscale": "downscale"},
}


def rename_message(section: str, old: str, new: str, source: str) -> str:
    return (f"config key '{section}.{old}' ({source}) was renamed '{section}.{new}' (one name per idea across "
            f"pipelines, see the README's table of renamed keys): write {section}.{new} instead; the old name "
            f"still works for now")


def rename_keys(raw: dict[str, Any], *, source: str,
                warn: Callable[[str], None] = log.warning) -> dict[str, Any]:
    """`raw` with every old key of RENAMED under its new name (a copy where one was found; order kept)."""
    for section, names in RENAMED.items():
        block = raw.get(section)
        if isinstance(block, dict) and names.keys() & block.keys():
            raw = {**raw, section: rename_section(block, section=section, source=source, warn=warn)}
    return raw


def rename_section(block: dict[str, Any], *, section: str, source: str,
                   warn: Callable[[str], None] = log.warning) -> dict[str, Any]:
    """One section's keys (e.g. a pipeline's options) with old names replaced by new ones."""
    names = RENAMED.get(section, {})
    for old in [k for k in block if k in names]:
        new = names[old]
        if new in block:
            raise ConfigError(f"{source} sets both '{section}.{old}' and '{section}.{new}': {old!r} is the old name "
                              f"of {new!r}; keep only {section}.{new}")
        warn(rename_message(section, old, new, source))
    return {names.get(k, k): v for k, v in block.items()}


def rename_override(key: str, *, source: str = "a command-line override") -> str:
    """'model.num_selected' -> 'model.k' (with the warning); any other dotted key unchanged."""
    section, _, leaf = key.partition(".")
    new = RENAMED.get(section, {}).get(leaf)
    if new is None:
        return key
    log.warning(rename_message(section, leaf, new, source))
    return f"{section}.{new}"

"""Pipelines by name: `build_pipeline("ips", tasks=tasks, patch_size=50, k=100)`.

Names: ips, dps, dps_candidates, ats, patchdrop, cnn. The options are the keyword-only
arguments of each class (documented in its docstring); an unknown option is a
ConfigError that names it and lists the valid ones. `check_pipeline_options` checks them
before any work, the nested `backbone_options`, `aggregator_options`, `scorer_options` and
`policy_options` too, against the keywords of the part the same section names. A renamed
option (`num_selected`, `chunk_size`, `score_downscale`: `hrsel.config.renames`) still works
here, with a DeprecationWarning naming its new name.
"""
from __future__ import annotations

import inspect
import warnings
from typing import Any

from hrsel.config import check_builder_options
from hrsel.config.renames import rename_section
from hrsel.errors import ConfigError
from hrsel.models.aggregators import AGGREGATORS
from hrsel.models.ats import ATSPipeline
from hrsel.models.backbones import BACKBONES
from hrsel.models.cnn import CNNPipeline
from hrsel.models.dps import DPSPipeline
from hrsel.models.dps_candidates import DPSCandidatesPipeline
from hrsel.models.ips import IPSPipeline
from hrsel.models.patchdrop import PatchDropPipeline
from hrsel.models.pipeline import Pipeline
from hrsel.models.scorers import SCORERS
from hrsel.registry import Registry
from hrsel.tasks import TaskSpec

PIPELINES = Registry("pipeline")
for _name, _cls in {"ips": IPSPipeline, "dps": DPSPipeline, "dps_candidates": DPSCandidatesPipeline,
                    "ats": ATSPipeline, "patchdrop": PatchDropPipeline, "cnn": CNNPipeline}.items():
    PIPELINES.register(_name)(_cls)


# The parts a pipeline builds by name: option `X` names one of REGISTRY, `X_options` are its keywords
# (less those the pipeline fills in itself: in_chans, the backbone's width, one query per task).
PARTS: dict[str, tuple[Registry, tuple[str, ...]]] = {
    "backbone": (BACKBONES, ("in_chans",)),
    "aggregator": (AGGREGATORS, ("in_dim", "num_tokens")),
    "scorer": (SCORERS, ("in_chans",)),
    "policy": (SCORERS, ("in_chans",)),
}
FIXED_PARTS = {"ips": {"aggregator": "attention"}}  # parts a pipeline chooses itself (no option names them)


def pipeline_options(name: str) -> list[str]:
    """The keyword options a pipeline accepts (besides `tasks`)."""
    params = inspect.signature(PIPELINES.get(name)).parameters
    return [p for p in params if p != "tasks"]


def build_pipeline(name: str, *, tasks: dict[str, TaskSpec], **options: Any) -> Pipeline:
    """Build the pipeline `name` for `tasks` with its keyword options."""
    options = rename_section(options, section="model", source=f"build_pipeline({name!r}, ...)",
                             warn=lambda message: warnings.warn(message, DeprecationWarning, stacklevel=4))
    valid = pipeline_options(name)
    unknown = sorted(set(options) - set(valid))
    if unknown:
        raise ConfigError(f"pipeline {name!r} has no option(s) {', '.join(unknown)}; valid: {', '.join(valid)}")
    return PIPELINES.build(name, tasks=tasks, **options)


def check_pipeline_options(name: str, options: dict[str, Any], *, section: str = "model") -> dict[str, Any]:
    """The pipeline's options, typed, with every part name and nested option checked; raises ConfigError.

    `model.backbone: resnt18` names the valid backbones; `model.aggregator_options.headz` names
    `model.aggregator_options.heads`, the closest keyword of the aggregator `model.aggregator` builds.
    """
    builder = lookup(PIPELINES, name, key=f"{section}.name")
    out = check_builder_options(section, name, options, builder, supplied=("tasks",))
    defaults = {p.name: p.default for p in inspect.signature(builder).parameters.values()}
    for part, (registry, supplied) in PARTS.items():
        nested = f"{part}_options"
        if nested not in defaults:
            continue
        chosen = out.get(part, defaults.get(part, FIXED_PARTS.get(name, {}).get(part)))
        part_builder = lookup(registry, chosen, key=f"{section}.{part}")
        if out.get(nested):
            out[nested] = check_builder_options(f"{section}.{nested}", chosen, out[nested], part_builder,
                                                supplied=supplied)
    return out


def lookup(registry: Registry, name: Any, *, key: str) -> Any:
    """`registry.get(name)`, the message naming the config key that chose `name`."""
    try:
        return registry.get(name)
    except ConfigError as e:
        raise ConfigError(f"config key {key!r} = {name!r}: {e}") from None

"""Pipelines by name: `build_pipeline("ips", tasks=tasks, patch_size=50, num_selected=100)`.

Names: ips, dps, dps_candidates, ats, patchdrop, cnn. The options are the keyword-only
arguments of each class (documented in its docstring); an unknown option is a
ConfigError that names it and lists the valid ones.
"""
from __future__ import annotations

import inspect
from typing import Any

from hrsel.errors import ConfigError
from hrsel.models.ats import ATSPipeline
from hrsel.models.cnn import CNNPipeline
from hrsel.models.dps import DPSPipeline
from hrsel.models.dps_candidates import DPSCandidatesPipeline
from hrsel.models.ips import IPSPipeline
from hrsel.models.patchdrop import PatchDropPipeline
from hrsel.models.pipeline import Pipeline
from hrsel.registry import Registry
from hrsel.tasks import TaskSpec

PIPELINES = Registry("pipeline")
for _name, _cls in {"ips": IPSPipeline, "dps": DPSPipeline, "dps_candidates": DPSCandidatesPipeline,
                    "ats": ATSPipeline, "patchdrop": PatchDropPipeline, "cnn": CNNPipeline}.items():
    PIPELINES.register(_name)(_cls)


def pipeline_options(name: str) -> list[str]:
    """The keyword options a pipeline accepts (besides `tasks`)."""
    params = inspect.signature(PIPELINES.get(name)).parameters
    return [p for p in params if p != "tasks"]


def build_pipeline(name: str, *, tasks: dict[str, TaskSpec], **options: Any) -> Pipeline:
    """Build the pipeline `name` for `tasks` with its keyword options."""
    valid = pipeline_options(name)
    unknown = sorted(set(options) - set(valid))
    if unknown:
        raise ConfigError(f"pipeline {name!r} has no option(s) {', '.join(unknown)}; valid: {', '.join(valid)}")
    return PIPELINES.build(name, tasks=tasks, **options)

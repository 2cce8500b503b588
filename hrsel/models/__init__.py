"""Layer 4: scorers, backbones, aggregators, heads and the pipelines composing them with a selector.

Cheap to import: the torch modules load on first use of `build_pipeline` / `PIPELINES`.
"""
from __future__ import annotations

from typing import Any

__all__ = ["PIPELINES", "build_pipeline", "pipeline_options"]


def __getattr__(name: str) -> Any:
    if name in __all__:
        from hrsel.models import build

        return getattr(build, name)
    raise AttributeError(f"module 'hrsel.models' has no attribute {name!r}")

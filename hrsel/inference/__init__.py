"""Inference with trained pipelines: load a run's checkpoint, evaluate it, predict on new images.

    from hrsel.inference import load_model
    model = load_model("runs/mnist")          # best.pt, eval mode, CPU

Submodules load lazily (torch is imported only when one is used).
"""
from __future__ import annotations

import importlib
from typing import Any

_EXPORTS = {
    "LoadedModel": "load",
    "load_model": "load",
    "resolve_checkpoint": "load",
    "evaluate_run": "evaluate",
    "predict_sources": "predict",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'hrsel.inference' has no attribute {name!r}")
    return getattr(importlib.import_module(f"hrsel.inference.{module}"), name)

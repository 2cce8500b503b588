"""Patch grids, foreground masks, Numba kernels and the streaming patch iterator.

Submodules load on first attribute access so `import hrsel.tiling` stays cheap
(numba compiles or loads its cache only when a kernel is needed).
"""
from __future__ import annotations

import importlib
from typing import Any

_EXPORTS = {
    "PatchGrid": "hrsel.tiling.grid",
    "grid_shape": "hrsel.tiling.grid",
    "PatchChunk": "hrsel.tiling.stream",
    "stream_patches": "hrsel.tiling.stream",
    "read_patches": "hrsel.tiling.stream",
    "otsu_threshold": "hrsel.tiling.mask",
    "foreground_mask": "hrsel.tiling.mask",
    "tissue_mask": "hrsel.tiling.mask",
    "TissueMask": "hrsel.tiling.tissue",
    "compute_tissue_mask": "hrsel.tiling.tissue",
    "tissue_pixels": "hrsel.tiling.tissue",
    "kernels": "hrsel.tiling.kernels",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name not in _EXPORTS:
        raise AttributeError(f"module 'hrsel.tiling' has no attribute {name!r}")
    module = importlib.import_module(_EXPORTS[name])
    value = module if name == "kernels" else getattr(module, name)
    globals()[name] = value
    return value

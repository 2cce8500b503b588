"""Patch scores as an OME-Zarr image (NGFF 0.4) that napari opens over the slide.

    grid = score_grid(coords, scores, patch_size=256, selected=idx, mpp=0.25)   # (C, rows, cols)
    write_ome_zarr("slide_scores.zarr", grid)

Channels: "score" (the patch score, NaN where none) and "selected" (1 for a selected patch,
else 0), one cell per patch. Axes c, y, x; the scale transform maps one cell to the patch
stride and the translation puts cell centres on patch centres. With `mpp` (the slide's level-0
microns per pixel) both are in micrometres and the y and x axes say `"unit": "micrometer"`, as
the slide's own OME-Zarr / OME-TIFF metadata does, so the map lies over the slide in napari and
any NGFF viewer; without it they are in level-0 pixels and the axes carry no unit, which lies
over images opened in pixel units only. Coarser levels (2x2 NaN-aware means) are added while the grid is
larger than `MIN_LEVEL_SIDE`. Written in zarr format 2 (what NGFF 0.4 specifies) with the
installed zarr, 2.x or 3.x.
"""
from __future__ import annotations

import math
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np

CHANNELS = ("score", "selected")
CHANNEL_COLORS = ("FF8000", "00E5FF")
MIN_LEVEL_SIDE = 256


@dataclass(frozen=True)
class ScoreGrid:
    values: np.ndarray  # (C, rows, cols) float32
    origin: tuple[float, float]  # level-0 (x, y) of the first cell's patch top-left
    stride: tuple[float, float]  # level-0 (x, y) pixels between cells
    patch_size: tuple[float, float]  # level-0 (width, height) of a patch
    channel_names: tuple[str, ...] = CHANNELS
    mpp: float | None = None  # microns per level-0 pixel: the transforms are in micrometres; None: pixels

    @property
    def unit(self) -> str | None:
        return "micrometer" if self.mpp else None


def _lattice_step(values: np.ndarray, fallback: float) -> float:
    steps = np.diff(np.unique(values))
    steps = steps[steps > 1e-9]
    return float(steps.min()) if len(steps) else float(fallback)


def score_grid(coords: np.ndarray, scores: np.ndarray, *, patch_size: float | Sequence[float],
               selected: Sequence[int] | np.ndarray = (), stride: float | Sequence[float] | None = None,
               mpp: float | None = None) -> ScoreGrid:
    """Scores of patches with top-left `coords` (N, 2) level-0 (x, y) on a regular lattice -> a cell grid.

    `stride` defaults to the smallest step between distinct corners (the patch size for a single
    row or column). `mpp`: the image's level-0 microns per pixel (None: unknown, the map is in
    pixels). Bounded by N cells per channel, never by the image size.
    """
    if mpp is not None and not (math.isfinite(mpp) and mpp > 0):
        raise ValueError(f"mpp={mpp!r} must be a positive number of microns per pixel, or None")
    coords = np.asarray(coords, dtype=np.float64).reshape(-1, 2)
    scores = np.asarray(scores, dtype=np.float64).reshape(-1)
    if len(coords) != len(scores) or len(coords) == 0:
        raise ValueError(f"coords {coords.shape} and scores {scores.shape} must describe the same N > 0 patches")
    pw, ph = (float(patch_size),) * 2 if np.isscalar(patch_size) else tuple(float(v) for v in patch_size)
    if stride is None:
        sx, sy = _lattice_step(coords[:, 0], pw), _lattice_step(coords[:, 1], ph)
    else:
        sx, sy = (float(stride),) * 2 if np.isscalar(stride) else tuple(float(v) for v in stride)
    x0, y0 = coords.min(axis=0)
    cols_idx = np.rint((coords[:, 0] - x0) / sx).astype(np.int64)  # (N,)
    rows_idx = np.rint((coords[:, 1] - y0) / sy).astype(np.int64)
    values = np.full((len(CHANNELS), rows_idx.max() + 1, cols_idx.max() + 1), np.nan, dtype=np.float32)
    values[1] = 0.0
    values[0, rows_idx, cols_idx] = scores
    chosen = np.asarray(selected, dtype=np.int64).reshape(-1)
    chosen = chosen[(chosen >= 0) & (chosen < len(scores))]
    values[1, rows_idx[chosen], cols_idx[chosen]] = 1.0
    return ScoreGrid(values=values, origin=(float(x0), float(y0)), stride=(sx, sy), patch_size=(pw, ph),
                     mpp=float(mpp) if mpp else None)


def _downsample(values: np.ndarray) -> np.ndarray:
    """(C, h, w) -> (C, ceil(h/2), ceil(w/2)): NaN-aware mean of each 2x2 block."""
    c, h, w = values.shape
    padded = np.full((c, h + h % 2, w + w % 2), np.nan, dtype=np.float32)
    padded[:, :h, :w] = values
    blocks = padded.reshape(c, padded.shape[1] // 2, 2, padded.shape[2] // 2, 2)  # (C, h/2, 2, w/2, 2)
    finite = np.isfinite(blocks)
    total = np.where(finite, blocks, 0).sum(axis=(2, 4))
    count = finite.sum(axis=(2, 4))
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(count > 0, total / np.maximum(count, 1), np.nan).astype(np.float32)


def ngff_metadata(grid: ScoreGrid, num_levels: int, *, name: str = "scores") -> dict:
    """The group attributes: NGFF 0.4 `multiscales` and an `omero` block naming the channels."""
    sx, sy = grid.stride
    pw, ph = grid.patch_size
    um = grid.mpp or 1.0  # level-0 pixels -> the axes' unit
    datasets = []
    for level in range(num_levels):
        f = 2 ** level
        # cell centre of level `level` -> centre of the patches it averages, in level-0 pixel centres
        # (pixel i's centre lies at i, as in the slide's own transform: scale mpp, no translation)
        tx = grid.origin[0] + pw / 2 - 0.5 + (f - 1) * sx / 2
        ty = grid.origin[1] + ph / 2 - 0.5 + (f - 1) * sy / 2
        datasets.append({"path": str(level), "coordinateTransformations": [
            {"type": "scale", "scale": [1.0, sy * f * um, sx * f * um]},
            {"type": "translation", "translation": [0.0, ty * um, tx * um]}]})
    space = {"type": "space", **({"unit": grid.unit} if grid.unit else {})}
    score = grid.values[0]
    finite = score[np.isfinite(score)]
    low, high = (float(finite.min()), float(finite.max())) if len(finite) else (0.0, 1.0)
    windows = [(low, high), (0.0, 1.0)]
    channels = [{"label": label, "color": color, "active": True, "coefficient": 1.0, "family": "linear",
                 "inverted": False, "window": {"start": lo, "end": hi, "min": lo, "max": hi}}
                for label, color, (lo, hi) in zip(grid.channel_names, CHANNEL_COLORS, windows)]
    return {"multiscales": [{"version": "0.4", "name": name, "type": "mean",
                             "axes": [{"name": "c", "type": "channel"}, {"name": "y", **space},
                                      {"name": "x", **space}],
                             "datasets": datasets}],
            "omero": {"version": "0.4", "name": name, "channels": channels, "rdefs": {"model": "color"}}}


def write_ome_zarr(path: str | Path, grid: ScoreGrid, *, name: str | None = None) -> Path:
    """Write `grid` as an OME-Zarr group at `path` (replacing an earlier one) and return the path."""
    import zarr

    path = Path(path)
    if path.exists():
        shutil.rmtree(path)
    levels = [grid.values]
    while max(levels[-1].shape[1:]) > MIN_LEVEL_SIDE:
        levels.append(_downsample(levels[-1]))
    major = int(zarr.__version__.split(".")[0])
    group = zarr.open_group(str(path), mode="w", **({"zarr_format": 2} if major >= 3 else {}))
    for level, values in enumerate(levels):
        chunks = (1, min(values.shape[1], 1024), min(values.shape[2], 1024))
        if major >= 3:
            array = group.create_array(str(level), shape=values.shape, chunks=chunks, dtype="float32",
                                       fill_value=np.nan)
            array[...] = values
        else:
            group.create_dataset(str(level), data=values, chunks=chunks, dtype="float32", fill_value=np.nan)
    group.attrs.update(ngff_metadata(grid, len(levels), name=name or path.stem))
    return path

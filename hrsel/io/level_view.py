"""One pyramid level of a source presented as an image of its own, and the level for a physical pixel size.

    level = level_for_mpp(slide, 0.5)            # the coarsest level still at least as fine as 0.5 um/px
    view = LevelView(slide, level)               # view.dimensions == slide.level_dimensions[level]
    view.read_region(x, y, w, h)                 # (x, y) in pixels of that level
    x0, y0 = x * view.downsample, y * view.downsample   # back to the slide's level-0 pixels (heatmaps)

Pipelines read level 0 of the image they are given; a `LevelView` makes that level 0 the
chosen level, so patch sizes count pixels at the target resolution. Pickles by path, like
every source (the wrapped source reopens lazily in the receiving process).
"""
from __future__ import annotations

import logging
from typing import Any

import numpy as np

from hrsel.errors import ImageReadError
from hrsel.io.base import ImageSource, Pyramid

logger = logging.getLogger(__name__)

MPP_TOLERANCE = 0.1  # a level of 0.2527 um/px serves a target of 0.25: scanners round


def level_for_mpp(source: ImageSource, target_mpp: float, *, tolerance: float = MPP_TOLERANCE) -> int:
    """The coarsest level whose pixels are at most `target_mpp` (1 + tolerance) microns: closest to the
    target without being coarser than it. Level 0 when even level 0 is coarser (logged).

    Raises `ImageReadError` naming the image when it carries no microns-per-pixel metadata.
    """
    if not target_mpp > 0:
        raise ValueError(f"target_mpp={target_mpp!r} must be a positive number of microns per pixel, e.g. 0.5")
    mpp = source.mpp
    if not mpp:
        raise ImageReadError(
            f"{source._name()} has no microns-per-pixel metadata (OpenSlide mpp properties, TIFF resolution "
            f"tags, OME PhysicalSizeX / OME-Zarr scale), so target_mpp={target_mpp} cannot pick its level; "
            "write the resolution into the file, or leave target_mpp unset to use level 0")
    best = 0
    for level, downsample in enumerate(source.level_downsamples):
        if mpp * downsample <= target_mpp * (1 + tolerance):
            best = level
    if mpp > target_mpp * (1 + tolerance):
        logger.warning("%s: level 0 is %.4g um/px, coarser than target_mpp=%.4g; using level 0",
                       source._name(), mpp, target_mpp)
    return best


class LevelView(ImageSource):
    """`source` seen from `level` on: level 0 of the view is `source`'s level `level`.

    `downsample` maps the view's pixels back to the source's level-0 pixels; `source` and
    `level` say what it wraps.
    """

    backend = "level_view"

    def __init__(self, source: ImageSource, level: int, *, fill: int | None = None):
        super().__init__(source.path, fill=source.fill if fill is None else fill)
        self.source = source
        self.level = source.check_level(level)

    @property
    def downsample(self) -> float:
        """Source level-0 pixels per pixel of the view."""
        return float(self.source.level_downsamples[self.level])

    def _open(self) -> Any:
        self.source.handle  # noqa: B018 - opens the wrapped source (errors name its path)
        return self.source

    def _close(self, handle: Any) -> None:
        self.source.close()

    def _describe(self, handle: Any) -> Pyramid:
        base = self.source.level_downsamples[self.level]
        mpp = self.source.mpp
        return Pyramid(
            level_dimensions=tuple(self.source.level_dimensions[self.level:]),
            channels=self.source.channels,
            level_downsamples=tuple(d / base for d in self.source.level_downsamples[self.level:]),
            mpp=mpp * base if mpp else None,
            dtype=self.source.dtype.name,
        )

    def _read(self, handle: Any, level: int, x: int, y: int, width: int, height: int) -> np.ndarray:
        return self.source.read_level_region(x, y, width, height, self.level + level)

    def _read_into(self, handle: Any, level: int, x: int, y: int, out: np.ndarray) -> None:
        self.source.read_level_region(x, y, out.shape[1], out.shape[0], self.level + level, out=out)

    def tile_size(self, level: int = 0) -> tuple[int, int] | None:
        return self.source.tile_size(self.level + level)

    def __repr__(self) -> str:
        return f"LevelView({self.source!r}, level={self.level})"

"""One pyramid level of a source presented as an image of its own, and the level for a physical pixel size.

    level = level_for_mpp(slide, 0.5)            # the coarsest level still at least as fine as 0.5 um/px
    view = LevelView(slide, level)               # view.dimensions == slide.level_dimensions[level]
    view.read_region(x, y, w, h)                 # (x, y) in pixels of that level
    x0, y0 = x * view.downsample, y * view.downsample   # back to the slide's level-0 pixels (heatmaps)
    view = view_at_mpp(slide, 0.5)               # that level resampled to exactly 0.5 um/px
    view = view_at(slide, target_mpp=None, level=1)   # either: what hrsel.features and the data sets read

Pipelines read level 0 of the image they are given; a `LevelView` makes that level 0 the
chosen level, so patch sizes count pixels at the target resolution. When no level has the
target resolution (a scanner at 0.25 um/px with levels 0.25 / 1.0 and a target of 0.5), the
view also resamples that level by `scale` = level mpp / target mpp (< 1), so a patch of P
pixels covers P x target_mpp microns as asked; its pyramid keeps the source's levels, each
resampled alike. Pickles by path, like every source (the wrapped source reopens lazily in the
receiving process).
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
    best = source.get_best_level_for_downsample(target_mpp * (1 + tolerance) / mpp)
    if mpp > target_mpp * (1 + tolerance):
        logger.warning("%s: level 0 is %.4g um/px, coarser than target_mpp=%.4g; using level 0",
                       source._name(), mpp, target_mpp)
    return best


def view_at_mpp(source: ImageSource, target_mpp: float, *, tolerance: float = MPP_TOLERANCE) -> "LevelView":
    """The level of `source` serving `target_mpp` (`level_for_mpp`), resampled to exactly `target_mpp` when
    its resolution is off by more than `tolerance` (never upsampled: level 0 coarser than the target is
    read as it is)."""
    level = level_for_mpp(source, target_mpp, tolerance=tolerance)
    level_mpp = source.mpp * source.level_downsamples[level]
    scale = level_mpp / target_mpp
    return LevelView(source, level, scale=1.0 if scale > 1 - tolerance else scale)


def view_at(source: ImageSource, *, target_mpp: float | None = None, level: int = 0) -> ImageSource:
    """What a pipeline reads of `source` at a resolution: `view_at_mpp` with `target_mpp`, else the
    `LevelView` of `level` (`source` itself for level 0)."""
    if target_mpp is not None:
        return view_at_mpp(source, target_mpp)
    return source if level == 0 else LevelView(source, level)


def base_image(source: ImageSource) -> ImageSource:
    """The image under a `LevelView` (a view of a view: the innermost), or `source` itself."""
    while isinstance(source, LevelView):
        source = source.source
    return source


def level0_scale(source: ImageSource) -> float:
    """Level-0 pixels of `base_image(source)` per pixel of `source` (1 for an image that is no view)."""
    scale = 1.0
    while isinstance(source, LevelView):
        scale *= source.downsample
        source = source.source
    return scale


class LevelView(ImageSource):
    """`source` seen from `level` on: level 0 of the view is `source`'s level `level`, resampled by `scale`.

    `downsample` maps the view's pixels back to the source's level-0 pixels; `source`, `level`
    and `scale` (view pixels per pixel of that level, in (0, 1]) say what it wraps.
    """

    backend = "level_view"

    def __init__(self, source: ImageSource, level: int, *, scale: float = 1.0, fill: int | None = None):
        super().__init__(source.path, fill=source.fill if fill is None else fill)
        if not 0 < scale <= 1:
            raise ValueError(f"LevelView scale={scale!r} must be in (0, 1]: views only downsample")
        self.source = source
        self.level = source.check_level(level)
        self.scale = float(scale)

    @property
    def downsample(self) -> float:
        """Source level-0 pixels per pixel of the view."""
        return float(self.source.level_downsamples[self.level]) / self.scale

    def _open(self) -> Any:
        self.source.handle  # noqa: B018 - opens the wrapped source (errors name its path)
        return self.source

    def _close(self, handle: Any) -> None:
        self.source.close()

    def _describe(self, handle: Any) -> Pyramid:
        base = self.source.level_downsamples[self.level]
        mpp = self.source.mpp
        return Pyramid(
            level_dimensions=tuple((max(1, round(w * self.scale)), max(1, round(h * self.scale)))
                                   for w, h in self.source.level_dimensions[self.level:]),
            channels=self.source.channels,
            level_downsamples=tuple(d / base for d in self.source.level_downsamples[self.level:]),
            mpp=mpp * base / self.scale if mpp else None,
            dtype=self.source.dtype.name,
        )

    def _read(self, handle: Any, level: int, x: int, y: int, width: int, height: int) -> np.ndarray:
        if self.scale == 1.0:
            return self.source.read_level_region(x, y, width, height, self.level + level)
        return self._read_resampled(self.level + level, x, y, width, height)

    def _read_into(self, handle: Any, level: int, x: int, y: int, out: np.ndarray) -> None:
        if self.scale == 1.0:
            self.source.read_level_region(x, y, out.shape[1], out.shape[0], self.level + level, out=out)
        else:
            out[...] = self._read_resampled(self.level + level, x, y, out.shape[1], out.shape[0])

    def _read_resampled(self, level: int, x: int, y: int, width: int, height: int) -> np.ndarray:
        """(height, width, C) view pixels: the source box [x, x + width) / scale of `level`, resampled."""
        x0, y0 = x / self.scale, y / self.scale
        x1, y1 = (x + width) / self.scale, (y + height) / self.scale
        margin = int(np.ceil(1 / self.scale)) + 1  # the filter's reach beyond the box: edges as in a whole-level resize
        sx, sy = int(np.floor(x0)) - margin, int(np.floor(y0)) - margin
        region = self.source.read_level_region(sx, sy, int(np.ceil(x1)) - sx + margin,
                                               int(np.ceil(y1)) - sy + margin, level)
        return resample_box(region, (x0 - sx, y0 - sy, x1 - sx, y1 - sy), (width, height))

    def tile_size(self, level: int = 0) -> tuple[int, int] | None:
        return self.source.tile_size(self.level + level)

    def __repr__(self) -> str:
        scale = "" if self.scale == 1.0 else f", scale={self.scale:.4g}"
        return f"LevelView({self.source!r}, level={self.level}{scale})"


def resample_box(image: np.ndarray, box: tuple[float, float, float, float], size: tuple[int, int]) -> np.ndarray:
    """(h, w, C) pixels of any dtype, the float `box` (x0, y0, x1, y1) of it resized to `size` (w, h)
    with Pillow's antialiased bilinear filter, channel by channel in float32; the dtype is kept."""
    from PIL import Image

    planes = [np.asarray(Image.fromarray(np.ascontiguousarray(image[..., c], dtype=np.float32), mode="F")
                         .resize(size, Image.Resampling.BILINEAR, box=box))
              for c in range(image.shape[2])]
    out = np.stack(planes, axis=-1)  # (h, w, C) float32
    if np.issubdtype(image.dtype, np.integer):
        info = np.iinfo(image.dtype)
        out = np.clip(np.rint(out), info.min, info.max)
    return out.astype(image.dtype, copy=False)

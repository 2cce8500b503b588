"""At what resolution a feature cache was made, and the check that bags fit what the config asks for.

    res = BagResolution.of(attrs)                     # from a cache's attrs (hrsel.data.feature_cache)
    check_resolution(path, attrs, target_mpp=0.5, patch_size=256, keys="data.")   # DataError if not

A bag is only meaningful at the resolution its patches were encoded at: a model trained on
0.5 um/px patches and given 0.25 um/px bags sees other things at other sizes, silently. So the
`features` data set checks every bag against `data.target_mpp` / `data.level` / `data.patch_size`
where the config sets them, and the bags of one data set against each other; `hrsel.predict`
checks bags against the run's. Two resolutions are the same when the patch sizes are equal and
the microns per pixel agree within `MPP_TOLERANCE` (scanners round: 0.2527 serves 0.25), or,
without microns per pixel, the downsamples are equal.
"""
from __future__ import annotations

import math
import os
from dataclasses import dataclass
from typing import Any

from hrsel.errors import DataError
from hrsel.io.level_view import MPP_TOLERANCE


@dataclass(frozen=True)
class BagResolution:
    patch_size: int | None  # pixels of a patch as encoded
    downsample: float | None  # level-0 pixels per encoded pixel
    level: int | None  # the pyramid level read
    mpp: float | None  # microns per encoded pixel, when the image said
    target_mpp: float | None  # the microns per pixel asked for, when one was

    @classmethod
    def of(cls, attrs: dict[str, Any]) -> "BagResolution":
        """From a cache's attrs; caches written before `downsample` was recorded give it from the patch sizes
        (a level-0 cache with `patch_size` alone: that size, downsample 1)."""
        size, level0, downsample = attrs.get("patch_size_level"), attrs.get("patch_size"), attrs.get("downsample")
        if size is None and level0 and not attrs.get("level"):
            size, downsample = level0, downsample or 1.0
        downsample = downsample or (level0 / size if size and level0 else None)
        return cls(patch_size=_int(size), downsample=_float(downsample), level=_int(attrs.get("level")),
                   mpp=_float(attrs.get("mpp")), target_mpp=_float(attrs.get("target_mpp")))

    def __str__(self) -> str:
        where = f"{self.mpp:.4g} um/px" if self.mpp else "no known um/px"
        asked = f" (target_mpp {self.target_mpp:g})" if self.target_mpp else ""
        level = f"level {self.level}" if self.level is not None else "level ?"
        scale = f", downsample {self.downsample:.4g}" if self.downsample else ""
        size = f"{self.patch_size} px patches" if self.patch_size else "patches of unknown size"
        span = f" ({self.patch_size * self.mpp:.0f} um)" if self.patch_size and self.mpp else ""
        return f"{size}{span} at {where}{asked}, {level}{scale}"

    def same_as(self, other: "BagResolution") -> bool:
        if self.patch_size != other.patch_size:
            return False
        if self.mpp and other.mpp:
            return abs(self.mpp / other.mpp - 1) <= MPP_TOLERANCE
        if self.mpp or other.mpp:
            return False
        return self.downsample is not None and other.downsample is not None and \
            math.isclose(self.downsample, other.downsample, rel_tol=1e-6)


def mismatches(res: BagResolution, *, target_mpp: float | None = None, level: int | None = None,
               patch_size: int | None = None) -> list[tuple[str, Any, Any]]:
    """(key, asked, the bag's) for every asked setting the bag does not have."""
    wrong = []
    if target_mpp is not None and not (res.mpp and abs(res.mpp / target_mpp - 1) <= MPP_TOLERANCE):
        wrong.append(("target_mpp", target_mpp, res.mpp))
    if level is not None and res.level != level:
        wrong.append(("level", level, res.level))
    if patch_size is not None and res.patch_size != patch_size:
        wrong.append(("patch_size", patch_size, res.patch_size))
    return wrong


def check_resolution(path: str | os.PathLike, attrs: dict[str, Any], *, target_mpp: float | None = None,
                     level: int | None = None, patch_size: int | None = None, keys: str = "data.",
                     asker: str = "the config") -> BagResolution:
    """The bag's resolution; DataError naming the file, both resolutions and the fix when it is not the one asked."""
    res = BagResolution.of(attrs)
    wrong = mismatches(res, target_mpp=target_mpp, level=level, patch_size=patch_size)
    if not wrong:
        return res
    asked = ", ".join(f"{keys}{key}={want!r}" for key, want, _ in wrong)
    theirs = ", ".join(f"{keys}{key}={have!r}" for key, _, have in wrong if have is not None)
    flags = " ".join(f"--{key.replace('_', '-')} {want}" for key, want, _ in wrong)
    settle = f", or set {theirs} to use these caches" if theirs else ""
    raise DataError(f"feature cache {path} holds {res}, but {asker} asks for {asked}: a model sees other "
                    f"things at another resolution. Recompute the caches at the asked resolution (python -m "
                    f"hrsel.features ... {flags} --out NEW_FOLDER, then point data.features_dir at it){settle}")


def check_alike(resolutions: dict[str, BagResolution], *, what: str) -> None:
    """DataError naming two bags of `what` made at different resolutions (a mixed folder)."""
    if not resolutions:
        return
    (first, res), *rest = resolutions.items()
    for name, other in rest:
        if not res.same_as(other):
            raise DataError(f"the feature caches of {what} were made at different resolutions: {first} holds "
                            f"{res}, {name} holds {other}. A model needs one resolution: recompute the odd ones "
                            f"with python -m hrsel.features at the others' settings, and set data.target_mpp (or "
                            f"data.level) and data.patch_size so the data set checks it")


def _int(value: Any) -> int | None:
    return None if value is None else int(value)


def _float(value: Any) -> float | None:
    return None if value is None or (isinstance(value, float) and math.isnan(value)) else float(value)

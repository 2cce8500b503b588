"""How pixels become float, band by band: once, at the hand-over to torch.

Sources hand over their native dtype (uint8, uint16, float32; `hrsel.io.pixels`). `ImageBatch`
(`hrsel.models.patches`) turns every patch chunk into float with a `BandNormalizer`:

    float = (pixel - offset[band]) / scale[band]        (then clipped to [0, 1] when `clip`)

- The default (`default_normalizer(dtype)`): uint8 / 255 (the fast path, unchanged), uint16 /
  65535, float as is (float pixels must then lie in [0, 1]: a `PixelTypeError` says to set
  `data.band_norm` otherwise). Float pixels holding NaN or inf are refused whatever the
  normalisation (`check_finite`).
- `data.band_norm` in a config (`normalizer_from_spec`), in the pixels' own units:
  `{mean: [...], std: [...]}`, `{offset: [...], scale: [...]}` (e.g. `{scale: 4095}` for 12-bit
  data), or computed once over a sample of the training images (`compute_normalizer`):
  `{percentiles: [1, 99]}` (stretch the lo..hi percentiles of each band to 0..1, clipped) or
  `{mean: auto, std: auto}`; `sample: 16` images by default. `hrsel.train` saves the result in the
  run folder as `band_norm.json` and a resumed run reloads it instead of computing it again.

A normaliser travels with the images: `hrsel.data.band_norm.with_band_norm` sets the `band_norm`
attribute of each item's source, and `ImageBatch` uses it (or the dtype default when unset).
Statistics are computed on thumbnails (longer side `STATS_SIZE`), so memory stays bounded.
"""
from __future__ import annotations

import json
import logging
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Sequence

import numpy as np

from hrsel.errors import ChannelMismatchError, ConfigError, PixelTypeError

logger = logging.getLogger(__name__)

DTYPE_SCALES = {"uint8": 255.0, "uint16": 65535.0}  # the default divisor; float: 1
FLOAT_SLACK = 0.5 / 255.0  # float pixels within half an 8-bit step outside [0, 1] pass the default
STATS_SIZE = 512  # thumbnail side used for computed statistics
SPEC_KEYS = ("mean", "std", "offset", "scale", "percentiles", "sample", "clip")


@dataclass(frozen=True)
class BandNormalizer:
    """Per-band (pixel - offset) / scale, optionally clipped to [0, 1]; length-1 tuples apply to every band."""

    offset: tuple[float, ...] = (0.0,)
    scale: tuple[float, ...] = (255.0,)
    clip: bool = False
    rule: str = "uint8 / 255"  # how it was made, for logs and band_norm.json
    check_unit_range: bool = False  # the float default: refuse values outside [0, 1]

    def __post_init__(self) -> None:
        if len(self.offset) != len(self.scale) and 1 not in (len(self.offset), len(self.scale)):
            raise ValueError(f"offset has {len(self.offset)} bands but scale has {len(self.scale)}")
        if not all(np.isfinite(s) and s > 0 for s in self.scale):
            raise ValueError(f"every scale must be a positive number, got {list(self.scale)}")
        if not all(np.isfinite(o) for o in self.offset):
            raise ValueError(f"every offset must be a finite number, got {list(self.offset)}")

    @property
    def bands(self) -> int | None:
        """The band count it was made for, None when it applies to any."""
        n = max(len(self.offset), len(self.scale))
        return None if n == 1 else n

    def __call__(self, x: Any, *, name: str = "images") -> Any:
        """(..., C, h, w) tensor of any dtype -> float32 tensor of the same shape."""
        import torch

        channels = int(x.shape[-3])
        if self.bands is not None and channels != self.bands:
            raise ChannelMismatchError(
                f"{name} have {channels} band(s) but the band normalisation ({self.rule}) has {self.bands}; "
                f"fix data.band_norm (one mean/std or percentile value per band) or the images"
            )
        if x.dtype == torch.uint8 and self.offset == (0.0,) and self.scale == (255.0,) and not self.clip:
            return x.float().div_(255.0)  # the uint8 fast path, unchanged
        out = x.float()
        if x.is_floating_point():
            check_finite(out, name=name, rule=self.rule)
        if self.check_unit_range and out.numel():
            lo, hi = float(out.amin()), float(out.amax())
            if not (lo >= -FLOAT_SLACK and hi <= 1.0 + FLOAT_SLACK):  # NaN fails too
                raise PixelTypeError(
                    f"{name} hold float pixels in {lo:g}..{hi:g}; without data.band_norm hrsel hands float "
                    "pixels to the model as they are and expects [0, 1]. Fix: set data.band_norm, e.g. "
                    "{percentiles: [1, 99]}, {mean: auto, std: auto} or {scale: 10000}, or rescale the files"
                )
        if set(self.offset) == {0.0} and set(self.scale) == {1.0} and not self.clip:
            return out  # float as is (x.float() may be x itself: never changed in place)
        shape = (-1, 1, 1)  # broadcast over (C, h, w)
        offset = torch.tensor(self.offset, dtype=torch.float32, device=out.device).view(shape)
        scale = torch.tensor(self.scale, dtype=torch.float32, device=out.device).view(shape)
        out = (out - offset) / scale  # a new tensor: the caller's pixels stay as they are
        return out.clamp_(0.0, 1.0) if self.clip else out

    # ---- persistence ------------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        return {"offset": list(self.offset), "scale": list(self.scale), "clip": self.clip, "rule": self.rule,
                "check_unit_range": self.check_unit_range}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "BandNormalizer":
        return cls(offset=tuple(float(v) for v in d["offset"]), scale=tuple(float(v) for v in d["scale"]),
                   clip=bool(d.get("clip", False)), rule=str(d.get("rule", "")),
                   check_unit_range=bool(d.get("check_unit_range", False)))

    def save(self, path: str | Path) -> None:
        Path(path).write_text(json.dumps(self.to_dict(), indent=1) + "\n")

    @classmethod
    def load(cls, path: str | Path) -> "BandNormalizer":
        try:
            return cls.from_dict(json.loads(Path(path).read_text()))
        except (OSError, ValueError, KeyError, TypeError) as error:
            raise ConfigError(f"{str(path)!r} is not a band normalisation saved by hrsel ({error}); delete it "
                              "to compute it again from the training images") from None


def check_finite(x: Any, *, name: str = "images", rule: str = "") -> None:
    """Refuse float pixels holding NaN or inf (whatever the normalisation: it would spread them silently)."""
    import torch

    if x.numel() and not bool(torch.isfinite(x).all()):
        finite = x[torch.isfinite(x)]
        seen = f"{float(finite.amin()):g}..{float(finite.amax()):g} and " if finite.numel() else ""
        raise PixelTypeError(
            f"{name} hold float pixels {seen}NaN or inf{f' (band normalisation: {rule})' if rule else ''}; hrsel "
            "does not guess what NaN or inf stand for. Fix: replace them (np.nan_to_num) or mask them in the file")


def to_float(x: Any, normalizer: BandNormalizer | None = None) -> Any:
    """(..., C, h, w) pixels -> float tensor: `normalizer`, else uint8 / 255 (the fast path), uint16 / 65535,
    other dtypes as they are. The one hand-over to float (`ImageBatch`, feature caches)."""
    import torch

    if normalizer is not None:
        return normalizer(x)
    if x.dtype == torch.uint8:
        return x.float().div_(255.0)
    if x.is_floating_point():
        check_finite(x)
    return x.float().div_(65535.0) if x.dtype == torch.uint16 else x.float()


def default_normalizer(dtype: Any) -> BandNormalizer:
    """uint8 / 255, uint16 / 65535, float as is (checked to lie in [0, 1])."""
    name = str(dtype).replace("torch.", "") if type(dtype).__module__.startswith("torch") else np.dtype(dtype).name
    if name in DTYPE_SCALES:
        return BandNormalizer(scale=(DTYPE_SCALES[name],), rule=f"{name} / {DTYPE_SCALES[name]:g}")
    if name.startswith("float") or name.startswith("bfloat"):
        return BandNormalizer(scale=(1.0,), rule="float as is, in [0, 1]", check_unit_range=True)
    raise PixelTypeError(f"no default normalisation for {name} pixels; hrsel hands over uint8, uint16 or float32")


# ---- config specs ---------------------------------------------------------------------------

def check_spec(spec: dict[str, Any] | None) -> dict[str, Any]:
    """The `data.band_norm` mapping, checked: `ConfigError` naming the key, the value and what is valid."""
    spec = dict(spec or {})
    key = "data.band_norm"
    unknown = sorted(set(spec) - set(SPEC_KEYS))
    if unknown:
        raise ConfigError(f"config key '{key}' has unknown key(s) {unknown}; valid: {list(SPEC_KEYS)}")
    if "percentiles" in spec:
        p = spec["percentiles"]
        if not (isinstance(p, (list, tuple)) and len(p) == 2 and all(isinstance(v, (int, float)) for v in p)
                and 0 <= p[0] < p[1] <= 100):
            raise ConfigError(f"config key '{key}.percentiles' = {p!r}: give [lo, hi] with 0 <= lo < hi <= 100, "
                              "e.g. [1, 99]")
        if set(spec) & {"mean", "std", "offset", "scale"}:
            raise ConfigError(f"config key '{key}' mixes percentiles with mean/std/offset/scale; choose one")
    if ("mean" in spec) != ("std" in spec):
        raise ConfigError(f"config key '{key}' needs both mean and std (lists, or both 'auto'), got {spec}")
    if set(spec) & {"mean", "std"} and set(spec) & {"offset", "scale"}:
        raise ConfigError(f"config key '{key}' mixes mean/std with offset/scale; choose one")
    for name in ("mean", "std", "offset", "scale"):
        value = spec.get(name)
        if value is None or (value == "auto" and name in ("mean", "std")):
            continue
        values = value if isinstance(value, (list, tuple)) else [value]
        if not values or not all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in values):
            raise ConfigError(f"config key '{key}.{name}' = {value!r}: give a number or one number per band"
                              + (", or 'auto' to compute it from the training images" if name in ("mean", "std")
                                 else ""))
        if not all(math.isfinite(v) for v in values):
            raise ConfigError(f"config key '{key}.{name}' = {value!r}: every value must be a finite number (no "
                              f".nan or .inf); give the band's {name} in the pixels' units")
        if name in ("std", "scale") and not all(v > 0 for v in values):
            raise ConfigError(f"config key '{key}.{name}' = {value!r}: every value must be positive")
    if (spec.get("mean") == "auto") != (spec.get("std") == "auto"):
        raise ConfigError(f"config key '{key}': mean and std are both 'auto' or both numbers, got {spec}")
    sample = spec.get("sample", 16)
    if isinstance(sample, bool) or not isinstance(sample, int) or sample < 1:
        raise ConfigError(f"config key '{key}.sample' = {sample!r}: give a positive number of training images")
    if not isinstance(spec.get("clip", False), bool):
        raise ConfigError(f"config key '{key}.clip' = {spec['clip']!r}: give true or false")
    return spec


def needs_data(spec: dict[str, Any] | None) -> bool:
    """True when the spec is computed from training images (percentiles, mean/std auto)."""
    spec = spec or {}
    return "percentiles" in spec or spec.get("mean") == "auto"


def normalizer_from_spec(spec: dict[str, Any] | None, sources: Iterable[Any] = ()) -> BandNormalizer | None:
    """The normaliser a `data.band_norm` mapping asks for; None for the dtype default ({}).

    `sources` (the training images, lazily) are read only when the spec is computed.
    """
    spec = check_spec(spec)
    if not set(spec) & {"mean", "offset", "scale", "percentiles"}:
        return None
    clip = bool(spec.get("clip", False))
    if needs_data(spec):
        return compute_normalizer(sources, percentiles=spec.get("percentiles"), sample=spec.get("sample", 16),
                                  clip=spec.get("clip"))
    if "mean" in spec:
        return BandNormalizer(offset=_floats(spec["mean"]), scale=_floats(spec["std"]), clip=clip,
                              rule=f"(x - mean {spec['mean']}) / std {spec['std']}")
    return BandNormalizer(offset=_floats(spec.get("offset", 0.0)), scale=_floats(spec.get("scale", 1.0)), clip=clip,
                          rule=f"(x - {spec.get('offset', 0)}) / {spec.get('scale', 1)}")


def _floats(value: Any) -> tuple[float, ...]:
    return tuple(float(v) for v in (value if isinstance(value, (list, tuple)) else [value]))


def compute_normalizer(sources: Iterable[Any], *, percentiles: Sequence[float] | None = None, sample: int = 16,
                       clip: bool | None = None) -> BandNormalizer:
    """Per-band statistics of the first `sample` sources' thumbnails (longer side `STATS_SIZE`).

    With `percentiles` [lo, hi]: offset = the lo percentile, scale = hi - lo, clipped (unless
    `clip=False`); else offset = mean, scale = std, not clipped (unless `clip=True`).
    """
    pixels, names = [], []
    for source in sources:
        if len(names) >= sample:
            break
        thumb = np.asarray(source.thumbnail(STATS_SIZE), dtype=np.float64)
        pixels.append(thumb.reshape(-1, thumb.shape[-1]))  # (h * w, C)
        names.append(str(getattr(source, "path", None) or repr(source)))
    if not pixels:
        raise ConfigError("data.band_norm asks for statistics of the training images, but the training split "
                          "has no images; give mean/std or offset/scale numbers instead")
    bands = {p.shape[1] for p in pixels}
    if len(bands) != 1:
        raise ChannelMismatchError(f"the training images have different band counts {sorted(bands)} "
                                   f"(first {len(names)}: {names}); one model needs one band count")
    values = np.concatenate(pixels)
    values = values[np.isfinite(values).all(axis=1)]
    where = f"{len(names)} training image(s)"
    if percentiles is not None:
        lo, hi = np.percentile(values, list(percentiles), axis=0)
        scale = np.where(hi > lo, hi - lo, 1.0)
        rule = f"percentiles {list(percentiles)} of {where}, stretched to [0, 1]"
        normalizer = BandNormalizer(offset=tuple(lo.tolist()), scale=tuple(scale.tolist()),
                                    clip=True if clip is None else clip, rule=rule)
    else:
        mean, std = values.mean(axis=0), values.std(axis=0)
        normalizer = BandNormalizer(offset=tuple(mean.tolist()), scale=tuple(np.where(std > 0, std, 1.0).tolist()),
                                    clip=bool(clip), rule=f"(x - mean) / std of {where}")
    logger.info("band normalisation: %s: offset %s, scale %s", normalizer.rule,
                [f"{v:.4g}" for v in normalizer.offset], [f"{v:.4g}" for v in normalizer.scale])
    return normalizer

"""The pixel rules every backend shares: which dtypes are read, how they are kept, how alpha is dropped.

Sources hand over (h, w, c) pixels in one of three native dtypes (`NATIVE_DTYPES`), with the
band count as channels; the conversion to float happens once, at the hand-over to torch
(`hrsel.io.bands.BandNormalizer`: uint8 / 255, uint16 / 65535, float as is, or the per-band
statistics of `data.band_norm`).

- uint8 and uint16 are kept as read; bool becomes uint8 {0, 255}.
- float (16, 32 or 64 bit) becomes float32, any finite value (reflectances, dB, 0..10000):
  the range is checked at the hand-over (float without `data.band_norm` must lie in [0, 1]).
  NaN or inf are refused with `PixelTypeError` naming the image and the range seen.
- Other integer dtypes (int16, int32, uint32...) are refused with `PixelTypeError`: convert
  them to uint16 or float32 first.
- 16-bit PNGs stay uint16 (Pillow mode "I;16"), normalised like a uint16 TIFF.
- Alpha (PNG RGBA/LA/palette transparency, TIFF ExtraSamples 1 or 2) is composited on the
  source's `fill` grey with `composite_alpha`, the same formula for every format and dtype.
- `fill` (the padding grey past the image edge) is given in 8-bit units and scaled to the
  dtype by `fill_value`: 255 -> 65535 for uint16, 1.0 for float.
"""
from __future__ import annotations

import numpy as np

from hrsel.errors import PixelTypeError

NATIVE_DTYPES = (np.dtype(np.uint8), np.dtype(np.uint16), np.dtype(np.float32))


def value_range(values: np.ndarray) -> str:
    """'lo..hi' of the values (NaN named), for messages."""
    if values.size == 0:
        return "empty"
    if np.issubdtype(values.dtype, np.floating) and not np.isfinite(values).all():
        finite = values[np.isfinite(values)]
        span = f"{finite.min():g}..{finite.max():g}" if finite.size else "none finite"
        return f"{span} and NaN or inf"
    return f"{values.min():g}..{values.max():g}"


def native_dtype(dtype: np.dtype, *, name: str) -> np.dtype:
    """The dtype a source hands over for stored `dtype` (uint8, uint16 or float32); refuses the rest."""
    dtype = np.dtype(dtype)
    if dtype == np.bool_ or dtype == np.uint8:
        return np.dtype(np.uint8)
    if dtype.kind == "u" and dtype.itemsize == 2:
        return np.dtype(np.uint16)
    if dtype.kind == "f":
        return np.dtype(np.float32)
    raise PixelTypeError(
        f"{name} has dtype {dtype} (values up to {_dtype_max(dtype)}); hrsel reads uint8, uint16, bool or "
        "float pixels. Convert it first, e.g. np.clip(a, 0, 65535).astype(np.uint16) for non-negative "
        "integers, or a.astype(np.float32) and set data.band_norm to scale it"
    )


def _dtype_max(dtype: np.dtype) -> str:
    return str(np.iinfo(dtype).max) if np.issubdtype(dtype, np.integer) else "?"


def to_native(values: np.ndarray, *, name: str = "array") -> np.ndarray:
    """uint8 / uint16 as is, bool -> uint8 {0, 255}, float -> float32 (finite only); else `PixelTypeError`."""
    dtype = native_dtype(values.dtype, name=name)
    if values.dtype == np.bool_:
        return values.astype(np.uint8) * 255
    if dtype.kind == "f" and values.size and not np.isfinite(values).all():
        raise PixelTypeError(
            f"{name} has {values.dtype} pixels in {value_range(values)} (in the region read); hrsel "
            "does not guess what NaN or inf stand for. Fix: replace them (np.nan_to_num) or mask them in the file"
        )
    return values if values.dtype == dtype else values.astype(dtype)  # float64 -> float32, '>u2' -> native


def fill_value(fill: int, dtype: np.dtype) -> int | float:
    """The 8-bit grey `fill` (0..255) in units of `dtype`: uint16 fill * 257, float fill / 255."""
    dtype = np.dtype(dtype)
    if dtype == np.uint8:
        return int(fill)
    if dtype.kind == "u":
        return int(fill) * (np.iinfo(dtype).max // 255)
    return float(fill) / 255.0


def composite_alpha(pixels: np.ndarray, *, fill: int, associated: bool = False) -> np.ndarray:
    """(h, w, c) pixels whose last channel is alpha -> (h, w, c - 1) composited on grey `fill` (8-bit units).

    For uint8, unassociated (straight) alpha: round((v a + fill (255 - a)) / 255); associated
    (premultiplied): min(255, v + round(fill (255 - a) / 255)); uint16 the same with 65535 and
    fill * 257; float with alpha in [0, 1]. Opaque pixels keep their value, transparent ones are `fill`.
    """
    if pixels.dtype.kind == "f":
        colour, alpha = pixels[..., :-1], np.clip(pixels[..., -1:], 0.0, 1.0)
        background = fill_value(fill, pixels.dtype) * (1.0 - alpha)
        return (colour + background if associated else colour * alpha + background).astype(pixels.dtype)
    top = int(np.iinfo(pixels.dtype).max)
    colour = pixels[..., :-1].astype(np.uint64)
    alpha = pixels[..., -1:].astype(np.uint64)
    background = fill_value(fill, pixels.dtype) * (top - alpha)
    if associated:
        out = colour + (background + top // 2) // top
    else:
        out = (colour * alpha + background + top // 2) // top
    return np.minimum(out, top).astype(pixels.dtype)


def to_display(values: np.ndarray) -> np.ndarray:
    """(h, w, c) pixels of any native dtype -> uint8 for pictures and Otsu masks.

    uint8 is returned as is; uint16 and float are stretched per channel between their 1st and
    99th percentiles (so 12-bit data in uint16 is not nearly black). Not for model input.
    """
    if values.dtype == np.uint8:
        return values
    return stretch(values, *band_limits(values))


def band_limits(values: np.ndarray, percentiles: tuple[float, float] = (1.0, 99.0)) -> tuple[np.ndarray, np.ndarray]:
    """Per channel (low, high) percentiles of (h, w, c) pixels (NaN ignored): what `stretch` maps to 0 and 255."""
    data = values.astype(np.float32)
    flat = data.reshape(-1, data.shape[-1]) if data.ndim == 3 else data.reshape(-1, 1)
    if not flat.size:
        return np.zeros(flat.shape[1]), np.ones(flat.shape[1])
    finite = np.where(np.isfinite(flat), flat, np.nan)
    with np.errstate(all="ignore"):
        lo, hi = np.nanpercentile(finite, percentiles[0], axis=0), np.nanpercentile(finite, percentiles[1], axis=0)
    return np.nan_to_num(lo), np.nan_to_num(hi)


def stretch(values: np.ndarray, low: np.ndarray, high: np.ndarray) -> np.ndarray:
    """(h, w, c) pixels -> uint8, each channel mapped linearly from [low, high] to [0, 255] and clipped."""
    data = values.astype(np.float32)
    low, high = np.asarray(low, dtype=np.float32), np.asarray(high, dtype=np.float32)
    scaled = (data - low) / np.where(high > low, high - low, 1.0)
    return np.rint(np.clip(np.nan_to_num(scaled), 0.0, 1.0) * 255.0).astype(np.uint8)

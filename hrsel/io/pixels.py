"""The pixel rules every backend shares: which dtypes become uint8 and how, and how alpha is dropped.

Sources hand over (h, w, c) uint8; the pipelines divide by 255 at the hand-over to float.

- uint8 is kept; bool becomes {0, 255}.
- float must lie in [0, 1] (half an 8-bit step of slack) and becomes round(255 v). Floats outside
  that range (say 0..255) or NaN are refused with `PixelTypeError` naming the image, dtype and the
  range seen: clipping them would silently turn the image white.
- Other integer dtypes (uint16, int32...) are refused: TIFF and zarr uint16 often hold 10-, 12- or
  14-bit data, so no fixed scale is right. 16-bit PNGs are the exception (`from_16bit`): PNG
  samples are 16 significant bits, so they keep their high byte, v >> 8, as Pillow already does
  for 16-bit colour PNGs; v / 65535 and (v >> 8) / 255 differ by less than 1 / 255.
- Alpha (PNG RGBA/LA/palette transparency, TIFF ExtraSamples 1 or 2) is composited on the
  source's `fill` grey with `composite_alpha`, the same integer formula for every format.
"""
from __future__ import annotations

import numpy as np

from hrsel.errors import PixelTypeError

FLOAT_SLACK = 0.5 / 255.0  # floats within half an 8-bit step outside [0, 1] still round into 0..255


def value_range(values: np.ndarray) -> str:
    """'lo..hi' of the values (NaN named), for messages."""
    if values.size == 0:
        return "empty"
    if np.issubdtype(values.dtype, np.floating) and np.isnan(values).any():
        finite = values[np.isfinite(values)]
        span = f"{finite.min():g}..{finite.max():g}" if finite.size else "none finite"
        return f"{span} and NaN"
    return f"{values.min():g}..{values.max():g}"


def check_dtype(dtype: np.dtype, *, name: str) -> None:
    """Refuse, before any read, dtypes that `to_uint8` never converts (integers other than uint8)."""
    dtype = np.dtype(dtype)
    if dtype == np.uint8 or dtype == np.bool_ or np.issubdtype(dtype, np.floating):
        return
    raise PixelTypeError(
        f"{name} has dtype {dtype} (values up to {_dtype_max(dtype)}); hrsel reads uint8, bool or float "
        "in [0, 1] pixels and cannot tell how many of the bits are used (10, 12, 14 or 16). Convert it "
        "first, e.g. (a / a.max() * 255).astype(np.uint8) or (a >> 8).astype(np.uint8) for full 16-bit data"
    )


def _dtype_max(dtype: np.dtype) -> str:
    return str(np.iinfo(dtype).max) if np.issubdtype(dtype, np.integer) else "?"


def to_uint8(values: np.ndarray, *, name: str = "array") -> np.ndarray:
    """uint8 as is, bool -> {0, 255}, float in [0, 1] -> round(255 v); anything else `PixelTypeError`."""
    if values.dtype == np.uint8:
        return values
    if values.dtype == np.bool_:
        return values.astype(np.uint8) * 255
    check_dtype(values.dtype, name=name)
    if values.size and not (values.min() >= -FLOAT_SLACK and values.max() <= 1.0 + FLOAT_SLACK):  # NaN fails too
        raise PixelTypeError(
            f"{name} has {values.dtype} pixels in {value_range(values)} (in the region read); hrsel reads "
            "float pixels in [0, 1] and does not clip or guess a scale. Fix: rescale the file, e.g. "
            "a / 255 for 0..255 data or (a - a.min()) / (a.max() - a.min()), replace NaN, or save it as uint8"
        )
    return np.rint(np.clip(values, 0.0, 1.0) * 255.0).astype(np.uint8)


def from_16bit(values: np.ndarray) -> np.ndarray:
    """16-bit samples (0..65535) -> uint8 high byte, v >> 8: the 8-bit value nearest below v / 65535 * 255."""
    return (np.asarray(values).astype(np.uint32) >> 8).astype(np.uint8)


def composite_alpha(pixels: np.ndarray, *, fill: int, associated: bool = False) -> np.ndarray:
    """(h, w, c) uint8 whose last channel is alpha -> (h, w, c - 1) uint8 composited on grey `fill`.

    Unassociated (straight) alpha: round((v a + fill (255 - a)) / 255); associated (premultiplied):
    min(255, v + round(fill (255 - a) / 255)). Opaque pixels keep their value, transparent ones are `fill`.
    """
    colour = pixels[..., :-1].astype(np.uint32)
    alpha = pixels[..., -1:].astype(np.uint32)
    background = int(fill) * (255 - alpha)
    if associated:
        out = colour + (background + 127) // 255
    else:
        out = (colour * alpha + background + 127) // 255
    return np.minimum(out, 255).astype(np.uint8)

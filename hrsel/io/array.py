"""In-memory numpy or torch arrays as a single-level `ImageSource`."""
from __future__ import annotations

from typing import Any

import numpy as np

from hrsel.errors import ImageReadError
from hrsel.io.base import ImageSource, Pyramid
from hrsel.io.pixels import to_native

CHANNEL_COUNTS = (1, 3, 4)


def infer_layout(shape: tuple[int, ...], layout: str | None = None, *, name: str = "array") -> str:
    """'hw' (gray), 'hwc' or 'chw' from a shape; `layout` overrides the guess."""
    if layout is not None:
        layout = layout.lower()
        if layout not in ("hw", "hwc", "chw") or len(layout) != len(shape):
            raise ImageReadError(
                f"layout={layout!r} does not fit {name} of shape {tuple(shape)}; "
                "use 'hw' for 2-D, 'hwc' or 'chw' for 3-D"
            )
        return layout
    if len(shape) == 2:
        return "hw"
    if len(shape) == 3:
        if shape[-1] in CHANNEL_COUNTS:
            return "hwc"
        if shape[0] in CHANNEL_COUNTS:
            return "chw"
    raise ImageReadError(
        f"cannot tell the channel axis of {name} with shape {tuple(shape)}: expected (H, W), "
        f"(H, W, C) or (C, H, W) with C in {CHANNEL_COUNTS}; pass layout='hwc' or 'chw'"
    )


def as_numpy(array: Any) -> np.ndarray:
    """numpy view of a numpy array or a (CPU) torch tensor, without importing torch."""
    if isinstance(array, np.ndarray):
        return array
    if type(array).__module__.startswith("torch"):
        return array.detach().cpu().numpy()
    raise ImageReadError(f"expected a numpy array or torch tensor, got {type(array).__name__}")


class ArraySource(ImageSource):
    """A single-level image held in memory: (H, W), (H, W, C) or (C, H, W).

    Pixels follow `hrsel.io.pixels`: uint8 and uint16 kept, bool -> {0, 255}, float -> float32
    (NaN or inf, int16, int32... a `PixelTypeError`). A 4th channel is kept as is (an array does
    not say whether it is alpha or a fourth band); more bands need layout='hwc' or 'chw'.
    """

    backend = "array"

    def __init__(self, array: Any, *, fill: int = 255, layout: str | None = None, mpp: float | None = None):
        super().__init__(None, fill=fill)
        values = as_numpy(array)
        layout = infer_layout(values.shape, layout)
        if layout == "hw":
            values = values[:, :, None]
        elif layout == "chw":
            values = values.transpose(1, 2, 0)
        self.array = np.ascontiguousarray(to_native(values, name=f"in-memory array of shape {tuple(values.shape)}"))
        self._mpp = mpp

    def _open(self) -> np.ndarray:
        return self.array

    def _describe(self, handle: np.ndarray) -> Pyramid:
        h, w, c = handle.shape
        return Pyramid(level_dimensions=((w, h),), channels=c, level_downsamples=(1.0,), mpp=self._mpp,
                       dtype=handle.dtype.name)

    def _read(self, handle: np.ndarray, level: int, x: int, y: int, width: int, height: int) -> np.ndarray:
        return handle[y : y + height, x : x + width].copy()

    def _close(self, handle: np.ndarray) -> None:
        pass  # the array stays; reading after close simply reopens

"""Ordinary images (PNG, JPEG, BMP, WebP...) through Pillow, decoded once on first read."""
from __future__ import annotations

import os
from typing import Any

import numpy as np

from hrsel.errors import ImageReadError, ImageTooLargeError, UnsupportedFormatError
from hrsel.io.base import ImageSource, Pyramid, check_file
from hrsel.io.pixels import composite_alpha, from_16bit, to_uint8

GRAY_MODES = ("1", "L", "LA", "La")
SIXTEEN_BIT_MODES = ("I;16", "I;16L", "I;16B", "I;16N")
ALPHA_MODES = ("RGBA", "RGBa", "LA", "La", "PA")


class PillowSource(ImageSource):
    """A single-level image small enough to decode whole; gray stays 1 channel, the rest RGB.

    Pixels (the rules of `hrsel.io.pixels`):
    - 16-bit PNGs, gray or colour, keep the high byte of each sample (v >> 8): 65535 -> 255,
      1000 -> 3, never saturated; the float handed to a model is within 1 / 255 of v / 65535.
    - 32-bit integer images other than PNG and float ('F') images follow `to_uint8`: float in
      [0, 1] is scaled by 255, anything else is a `PixelTypeError` naming the file and range.
    - Alpha (RGBA, LA, palette or colour-key transparency) is composited on grey `fill` by
      `composite_alpha`, the same rule `TiffSource` applies to RGBA TIFFs, so both give the
      same pixels; gray + alpha stays 1 channel.
    """

    backend = "pillow"

    def __init__(self, path: str | os.PathLike, *, fill: int = 255):
        super().__init__(os.fspath(path), fill=fill)

    def _open(self) -> np.ndarray:
        from PIL import Image

        check_file(self.path)
        try:
            with Image.open(self.path) as image:
                pixels = self._decode(image)
        except Image.DecompressionBombError as error:
            raise ImageTooLargeError(
                f"{self.path!r} is too large to decode whole ({error}); convert it to a tiled "
                "pyramidal TIFF or OME-Zarr and open that instead"
            ) from error
        except Image.UnidentifiedImageError as error:
            raise UnsupportedFormatError(
                f"Pillow cannot identify {self.path!r}; it is not an image Pillow reads"
            ) from error
        except (OSError, SyntaxError, ValueError, EOFError) as error:
            if isinstance(error, (ImageReadError, PermissionError)):
                raise
            raise ImageReadError(
                f"Pillow failed to decode {self.path!r}: {error}. The file may be truncated or "
                "corrupt; re-export it"
            ) from error
        return pixels.reshape(pixels.shape[0], pixels.shape[1], -1)  # (H, W, C)

    def _decode(self, image: Any) -> np.ndarray:
        """(H, W) or (H, W, C) uint8 pixels of an open Pillow image."""
        if image.mode in SIXTEEN_BIT_MODES or (image.mode == "I" and image.format == "PNG"):
            return from_16bit(np.asarray(image))  # a PNG's "I" is 16-bit gray
        if image.mode in ("I", "F"):  # 32-bit integer or float samples
            return to_uint8(np.asarray(image), name=repr(self.path))
        gray = image.mode in GRAY_MODES or _is_gray_alpha_16bit(image)  # palette images become RGB
        if image.mode in ALPHA_MODES or "transparency" in image.info:
            return composite_alpha(np.asarray(image.convert("LA" if gray else "RGBA")), fill=self.fill)
        return np.asarray(image.convert("L" if gray else "RGB"))

    def _describe(self, handle: np.ndarray) -> Pyramid:
        h, w, c = handle.shape
        return Pyramid(level_dimensions=((w, h),), channels=c, level_downsamples=(1.0,))

    def _read(self, handle: np.ndarray, level: int, x: int, y: int, width: int, height: int) -> np.ndarray:
        return handle[y : y + height, x : x + width].copy()

    def _close(self, handle: np.ndarray) -> None:
        pass


def _is_gray_alpha_16bit(image: Any) -> bool:
    """Pillow opens a 16-bit gray + alpha PNG as RGBA (raw mode 'LA;16B'); it stays gray like an 8-bit one."""
    return image.mode == "RGBA" and bool(image.tile) and str(image.tile[0][3]).startswith("LA")

"""Ordinary images (PNG, JPEG, BMP, WebP...) through Pillow, decoded once on first read."""
from __future__ import annotations

import logging
import os
from typing import Any

import numpy as np

from hrsel.errors import ImageReadError, ImageTooLargeError, UnsupportedFormatError
from hrsel.io.base import ImageSource, Pyramid, check_file
from hrsel.io.pixels import composite_alpha, to_native

GRAY_MODES = ("1", "L", "LA", "La")
SIXTEEN_BIT_MODES = ("I;16", "I;16L", "I;16B", "I;16N")
ALPHA_MODES = ("RGBA", "RGBa", "LA", "La", "PA")

logger = logging.getLogger(__name__)


class PillowSource(ImageSource):
    """A single-level image small enough to decode whole; gray stays 1 channel, the rest RGB.

    Pixels (the rules of `hrsel.io.pixels`):
    - 16-bit gray PNGs (Pillow mode "I;16") are read as uint16, every bit kept (1000 stays 1000),
      and normalised like a uint16 TIFF at the hand-over. Pillow itself reduces 16-bit colour
      PNGs to 8 bits when it decodes them (a warning says so); save those as TIFF to keep them.
    - Float ('F') images become float32; 32-bit integer ('I') images other than PNG are refused
      with a `PixelTypeError` naming the file, as every backend refuses int32.
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
        """(H, W) or (H, W, C) pixels (uint8, uint16 or float32) of an open Pillow image."""
        if image.mode in SIXTEEN_BIT_MODES or (image.mode == "I" and image.format == "PNG"):
            return np.asarray(image).astype(np.uint16)  # a PNG's "I" is 16-bit gray; native byte order
        if image.mode in ("I", "F"):  # 32-bit integer (refused, as by every backend) or float samples
            return to_native(np.asarray(image), name=repr(self.path))
        if image.format == "PNG" and _is_16bit_colour(image):
            logger.warning("%r is a 16-bit colour PNG: Pillow decodes it to 8 bits per sample; save it as "
                           "TIFF to keep all 16", self.path)
        gray = image.mode in GRAY_MODES or _is_gray_alpha_16bit(image)  # palette images become RGB
        if image.mode in ALPHA_MODES or "transparency" in image.info:
            return composite_alpha(np.asarray(image.convert("LA" if gray else "RGBA")), fill=self.fill)
        return np.asarray(image.convert("L" if gray else "RGB"))

    def _describe(self, handle: np.ndarray) -> Pyramid:
        h, w, c = handle.shape
        return Pyramid(level_dimensions=((w, h),), channels=c, level_downsamples=(1.0,), dtype=handle.dtype.name)

    def _read(self, handle: np.ndarray, level: int, x: int, y: int, width: int, height: int) -> np.ndarray:
        return handle[y : y + height, x : x + width].copy()

    def _close(self, handle: np.ndarray) -> None:
        pass


def _is_16bit_colour(image: Any) -> bool:
    """True for a PNG whose stored samples are 16-bit colour (raw modes 'RGB;16B', 'RGBA;16B', 'LA;16B')."""
    return bool(image.tile) and str(image.tile[0][3]).endswith(";16B")


def _is_gray_alpha_16bit(image: Any) -> bool:
    """Pillow opens a 16-bit gray + alpha PNG as RGBA (raw mode 'LA;16B'); it stays gray like an 8-bit one."""
    return image.mode == "RGBA" and bool(image.tile) and str(image.tile[0][3]).startswith("LA")

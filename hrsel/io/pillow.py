"""Ordinary images (PNG, JPEG, BMP, WebP...) through Pillow, decoded once on first read."""
from __future__ import annotations

import os
from typing import Any

import numpy as np

from hrsel.errors import ImageReadError, UnsupportedFormatError
from hrsel.io.base import ImageSource, Pyramid


class PillowSource(ImageSource):
    """A single-level image small enough to decode whole; gray stays 1 channel, the rest RGB."""

    backend = "pillow"

    def __init__(self, path: str | os.PathLike, *, fill: int = 255):
        super().__init__(os.fspath(path), fill=fill)

    def _open(self) -> np.ndarray:
        from PIL import Image

        if not os.path.exists(self.path):
            raise ImageReadError(f"no such file: {self.path!r}; check the path")
        try:
            with Image.open(self.path) as image:
                mode = "L" if image.mode in ("1", "L", "I;16", "I", "F") else "RGB"
                if image.mode in ("RGBA", "LA", "PA") or "transparency" in image.info:
                    image = self._flatten(image.convert("RGBA"))
                pixels = np.asarray(image.convert(mode))
        except Image.DecompressionBombError as error:
            raise ImageReadError(
                f"{self.path!r} is too large to decode whole ({error}); convert it to a tiled "
                "pyramidal TIFF or OME-Zarr and open that instead"
            ) from error
        except Image.UnidentifiedImageError as error:
            raise UnsupportedFormatError(
                f"Pillow cannot identify {self.path!r}; it is not an image Pillow reads"
            ) from error
        except (OSError, SyntaxError, ValueError) as error:
            raise ImageReadError(
                f"Pillow failed to decode {self.path!r}: {error}. The file may be truncated or "
                "corrupt; re-export it"
            ) from error
        return pixels.reshape(pixels.shape[0], pixels.shape[1], -1)  # (H, W, C)

    def _flatten(self, rgba: Any) -> Any:
        from PIL import Image

        background = Image.new("RGBA", rgba.size, (self.fill,) * 3 + (255,))
        return Image.alpha_composite(background, rgba)

    def _describe(self, handle: np.ndarray) -> Pyramid:
        h, w, c = handle.shape
        return Pyramid(level_dimensions=((w, h),), channels=c, level_downsamples=(1.0,))

    def _read(self, handle: np.ndarray, level: int, x: int, y: int, width: int, height: int) -> np.ndarray:
        return handle[y : y + height, x : x + width].copy()

    def _close(self, handle: np.ndarray) -> None:
        pass

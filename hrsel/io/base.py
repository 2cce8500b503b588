"""The one protocol every image backend follows (OpenSlide's conventions).

(x, y) are level-0 pixel coordinates; (width, height) are pixels of the level
read; sizes are (width, height) tuples; pixels come back as (h, w, c) of the source's
`dtype` (uint8, uint16 or float32: `hrsel.io.pixels.NATIVE_DTYPES`), one channel per band.
A backend implements `_open` (the handle, opened lazily so sources pickle by
path), `_describe` (the pyramid) and `_read` (an in-bounds window of a level);
the base class does argument checks, edge padding, thumbnails and pickling.
`hrsel.io.pixels` says which dtypes are kept and how alpha is dropped, the same for every backend.
"""
from __future__ import annotations

import logging
import math
import os
import threading
from dataclasses import dataclass
from typing import Any

import numpy as np

from hrsel.errors import ImageReadError, UnsupportedFormatError

logger = logging.getLogger(__name__)


def check_file(path: str, *, directory_ok: bool = False) -> None:
    """Raise a named `ImageReadError` unless `path` exists, is readable and (unless `directory_ok`)
    is a non-empty file. Called before any backend touches the path, so its decoder never reports
    a permission problem, a folder or an empty file as a "corrupt" image."""
    if not os.path.exists(path):
        raise ImageReadError(f"no such file or directory: {path!r}; check the path")
    is_dir = os.path.isdir(path)
    if is_dir and not directory_ok:
        raise UnsupportedFormatError(
            f"{path!r} is a directory, not an image file; pass one image file inside it, or a .zarr "
            "folder to backend='zarr'"
        )
    if not os.access(path, os.R_OK | (os.X_OK if is_dir else 0)):
        raise ImageReadError(permission_message(path))
    if not is_dir and os.path.getsize(path) == 0:
        raise ImageReadError(f"{path!r} is an empty file (0 bytes); re-copy or re-export the image")


def permission_message(path: str) -> str:
    return (
        f"permission denied: cannot read {path!r}; give this user read access (e.g. chmod u+r or "
        "check the owner and group) or copy the image somewhere readable"
    )


@dataclass(frozen=True)
class Pyramid:
    """What a backend reports about an image once it is open."""

    level_dimensions: tuple[tuple[int, int], ...]  # (width, height) per level
    channels: int
    level_downsamples: tuple[float, ...] | None = None  # None: from the dimensions
    mpp: float | None = None
    dtype: str = "uint8"  # the pixels handed over: uint8, uint16 or float32


class ImageSource:
    """A lazily opened, picklable, thread-safe image with one or more levels."""

    backend = "abstract"
    band_norm: Any = None  # a hrsel.io.bands.BandNormalizer set from data.band_norm; None: the dtype's default

    def __init__(self, path: str | None = None, *, fill: int = 255):
        if not 0 <= int(fill) <= 255:
            raise ValueError(f"fill={fill} must be a uint8 value in [0, 255]")
        self.path = path
        self.fill = int(fill)
        self._handle: Any = None
        self._pyramid: Pyramid | None = None
        self._lock = threading.Lock()

    # ---- what a backend implements -------------------------------------------------
    def _open(self) -> Any:
        """Open and return the handle (called once per process, under a lock)."""
        raise NotImplementedError

    def _describe(self, handle: Any) -> Pyramid:
        raise NotImplementedError

    def _read(self, handle: Any, level: int, x: int, y: int, width: int, height: int) -> np.ndarray:
        """(height, width, channels) of `dtype` from level pixels [y, y+h) x [x, x+w), all in bounds."""
        raise NotImplementedError

    def _read_into(self, handle: Any, level: int, x: int, y: int, out: np.ndarray) -> None:
        """Write the in-bounds window at (x, y) into `out` (h, w, channels), maybe a strided view.

        Backends that can decode straight into memory override this and skip a copy.
        """
        out[...] = self._read(handle, level, x, y, out.shape[1], out.shape[0])

    def tile_size(self, level: int = 0) -> tuple[int, int] | None:
        """(width, height) of the blocks the file stores at `level` (tiles or strips), None if unknown.

        Reads aligned to these blocks decode each block once.
        """
        return None

    def _close(self, handle: Any) -> None:
        close = getattr(handle, "close", None)
        if close is not None:
            close()

    # ---- lazy handle -----------------------------------------------------------------
    @property
    def handle(self) -> Any:
        if self._handle is None:
            with self._lock:
                if self._handle is None:
                    handle = self._open_checked()
                    try:
                        self._pyramid = self._check_pyramid(self._describe(handle))
                    except Exception:
                        self._close(handle)
                        raise
                    self._handle = handle
        return self._handle

    def _open_checked(self) -> Any:
        try:
            return self._open()
        except PermissionError as error:  # a decoder's own open() hit the permission problem
            raise ImageReadError(permission_message(str(self.path))) from error

    def _check_pyramid(self, pyramid: Pyramid) -> Pyramid:
        width, height = pyramid.level_dimensions[0]
        if width <= 0 or height <= 0 or pyramid.channels <= 0:
            raise ImageReadError(
                f"{self._name()} has no pixels: level 0 is {width}x{height} (width x height) with "
                f"{pyramid.channels} channel(s); re-export the image, it is empty"
            )
        return pyramid

    @property
    def pyramid(self) -> Pyramid:
        if self._pyramid is None:
            self.handle  # noqa: B018 - opening fills the description
        assert self._pyramid is not None
        return self._pyramid

    # ---- OpenSlide-like properties -----------------------------------------------------
    @property
    def level_count(self) -> int:
        return len(self.pyramid.level_dimensions)

    @property
    def level_dimensions(self) -> tuple[tuple[int, int], ...]:
        return self.pyramid.level_dimensions

    @property
    def dimensions(self) -> tuple[int, int]:
        return self.pyramid.level_dimensions[0]

    @property
    def level_downsamples(self) -> tuple[float, ...]:
        pyramid = self.pyramid
        if pyramid.level_downsamples is not None:
            return pyramid.level_downsamples
        w0, h0 = pyramid.level_dimensions[0]
        return tuple((w0 / w + h0 / h) / 2.0 for w, h in pyramid.level_dimensions)

    @property
    def channels(self) -> int:
        return self.pyramid.channels

    @property
    def mpp(self) -> float | None:
        return self.pyramid.mpp

    @property
    def dtype(self) -> np.dtype:
        """The dtype of the pixels read: uint8, uint16 or float32 (`hrsel.io.pixels`)."""
        return np.dtype(self.pyramid.dtype)

    @property
    def fill_value(self) -> int | float:
        """`fill` (8-bit grey) in units of `dtype`: what pixels outside the image read as."""
        from hrsel.io.pixels import fill_value

        return fill_value(self.fill, self.dtype)

    def get_best_level_for_downsample(self, downsample: float) -> int:
        """The deepest level whose downsample does not exceed `downsample`."""
        best = 0
        for level, d in enumerate(self.level_downsamples):
            if d <= downsample + 1e-6:
                best = level
        return best

    # ---- reading -----------------------------------------------------------------------
    def check_level(self, level: int) -> int:
        if isinstance(level, bool) or not isinstance(level, (int, np.integer)) or not (
            0 <= level < self.level_count
        ):
            raise ImageReadError(
                f"level={level!r} out of range for {self._name()}: it has {self.level_count} "
                f"level(s), use 0..{self.level_count - 1}"
            )
        return int(level)

    def read_region(
        self, x: int, y: int, width: int, height: int, level: int = 0, *, out: np.ndarray | None = None
    ) -> np.ndarray:
        """Pixels (height, width, channels) of `dtype` at `level`, top-left at level-0 (x, y).

        Pixels outside the image are `fill_value`. With `out` (a writable (height, width,
        channels) array of `dtype`) the pixels are written there and `out` is returned.
        """
        level = self.check_level(level)
        downsample = self.level_downsamples[level]
        lx = int(math.floor(x / downsample + 0.5))  # nearest level pixel
        ly = int(math.floor(y / downsample + 0.5))
        return self.read_level_region(lx, ly, width, height, level, out=out)

    def read_level_region(
        self, x: int, y: int, width: int, height: int, level: int = 0, *, out: np.ndarray | None = None
    ) -> np.ndarray:
        """As `read_region` but with (x, y) in pixels of `level` (exact for any downsample)."""
        level = self.check_level(level)
        width, height = int(width), int(height)
        if width <= 0 or height <= 0:
            raise ImageReadError(
                f"region size (width={width}, height={height}) of {self._name()} must be "
                "positive; pass at least one pixel each way"
            )
        if out is not None:
            self._check_out(out, (height, width, self.channels))
        lx, ly = int(x), int(y)
        level_w, level_h = self.level_dimensions[level]
        x0, y0 = max(lx, 0), max(ly, 0)
        x1, y1 = min(lx + width, level_w), min(ly + height, level_h)
        inside = x0 == lx and y0 == ly and x1 == lx + width and y1 == ly + height
        if inside:
            return self._checked_read(level, lx, ly, width, height, out)
        if out is None:
            out = np.empty((height, width, self.channels), dtype=self.dtype)
        out[...] = self.fill_value
        if x1 > x0 and y1 > y0:
            self._checked_read(level, x0, y0, x1 - x0, y1 - y0, out[y0 - ly : y1 - ly, x0 - lx : x1 - lx])
        return out

    def read_level_patches(
        self, level_coords: np.ndarray, size: int, level: int = 0, *, out: np.ndarray | None = None
    ) -> np.ndarray:
        """(n, size, size, channels) patches of `dtype` with top-left `level_coords` (n, 2) (x, y) in
        pixels of `level`; pixels outside the image are `fill`. Checks once, not per patch."""
        level = self.check_level(level)
        coords = np.asarray(level_coords).reshape(-1, 2).tolist()  # Python ints: cheaper to loop on
        expected = (len(coords), int(size), int(size), self.channels)
        if out is None:
            out = np.empty(expected, dtype=self.dtype)
        else:
            self._check_out(out, expected)
        level_w, level_h = self.level_dimensions[level]
        for j, (x, y) in enumerate(coords):
            if x >= 0 and y >= 0 and x + size <= level_w and y + size <= level_h:
                self._checked_read(level, x, y, size, size, out[j])
            else:
                self.read_level_region(x, y, size, size, level, out=out[j])
        return out

    def _check_out(self, out: np.ndarray, expected: tuple[int, ...]) -> None:
        if not isinstance(out, np.ndarray) or out.shape != expected or out.dtype != self.dtype or not out.flags.writeable:
            raise ValueError(
                f"out must be a writable {self.dtype} numpy array of shape {expected} for {self._name()}, got "
                f"{getattr(out, 'dtype', type(out).__name__)} {getattr(out, 'shape', None)}"
            )

    def _checked_read(
        self, level: int, x: int, y: int, width: int, height: int, out: np.ndarray | None = None
    ) -> np.ndarray:
        handle = self.handle
        try:
            if out is None:
                region = self._read(handle, level, x, y, width, height)
            else:
                self._read_into(handle, level, x, y, out)
                region = out
        except ImageReadError:
            raise
        except Exception as error:  # decoder errors from truncated or corrupt files
            raise ImageReadError(
                f"cannot read level {level} region x={x} y={y} {width}x{height} of {self._name()}: "
                f"{type(error).__name__}: {error}. The file may be truncated or corrupt; "
                "re-export or re-download it"
            ) from error
        expected = (height, width, self.channels)
        if region.shape != expected or region.dtype != self.dtype:
            raise ImageReadError(
                f"{self.backend} backend returned {region.dtype} {region.shape} instead of {self.dtype} "
                f"{expected} for {self._name()}"
            )
        return region

    def read_level(self, level: int) -> np.ndarray:
        """A whole level (h, w, c); only sensible for small levels."""
        level = self.check_level(level)
        width, height = self.level_dimensions[level]
        return self._checked_read(level, 0, 0, width, height)

    def thumbnail(self, max_size: int, *, box: tuple[float, float, float, float] | None = None,
                  max_read_pixels: int | None = None) -> np.ndarray:
        """The whole image (or `box`: level-0 x0, y0, x1, y1), block-averaged so its longer side is at
        most `max_size`.

        Reads the smallest level that is still at least `max_size`; if that level has more than
        `max_read_pixels` pixels (default `hrsel.io.resize.THUMBNAIL_READ_PIXELS`) it raises
        `ImageTooLargeError` instead of decoding it: a giant image without a pyramid would take
        minutes. Pass a larger bound to accept the cost.
        """
        from hrsel.io.resize import THUMBNAIL_READ_PIXELS, thumbnail_from

        if int(max_size) <= 0:
            raise ValueError(f"thumbnail max_size={max_size} must be positive")
        limit = THUMBNAIL_READ_PIXELS if max_read_pixels is None else int(max_read_pixels)
        return thumbnail_from(self, int(max_size), box=box, max_read_pixels=limit)

    # ---- lifetime & pickling ------------------------------------------------------------
    def close(self) -> None:
        with self._lock:
            if self._handle is not None:
                try:
                    self._close(self._handle)
                finally:
                    self._handle = None

    def __enter__(self) -> "ImageSource":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __getstate__(self) -> dict[str, Any]:
        state = self.__dict__.copy()
        state["_handle"] = None  # reopened lazily in the receiving process
        state["_lock"] = None
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)
        self._lock = threading.Lock()

    def _name(self) -> str:
        return repr(self.path) if self.path is not None else f"<in-memory {self.backend} image>"

    def __repr__(self) -> str:
        where = repr(self.path) if self.path is not None else "in-memory"
        if self._pyramid is None:
            return f"{type(self).__name__}({where})"
        w, h = self.dimensions
        return (
            f"{type(self).__name__}({where}, {w}x{h}, levels={self.level_count}, "
            f"channels={self.channels})"
        )

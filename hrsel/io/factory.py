"""`open_image`: pick a backend from a file's content and suffix, open it, fail with a clear error."""
from __future__ import annotations

import logging
import os
from typing import Any, Callable

from hrsel.errors import ImageReadError, PixelTypeError, UnsupportedFormatError
from hrsel.io.array import ArraySource
from hrsel.io.base import ImageSource, check_file, permission_message
from hrsel.io.pillow import PillowSource
from hrsel.io.slide import OpenSlideSource, detect_format
from hrsel.io.tiff import TIFF_MAGICS, TiffSource
from hrsel.io.zarr_source import ZarrSource, is_array

logger = logging.getLogger(__name__)

BACKENDS: dict[str, Callable[..., ImageSource]] = {
    "openslide": OpenSlideSource,
    "zarr": ZarrSource,
    "tiff": TiffSource,  # falls back to ZarrSource (tifffile's zarr store) for exotic layouts
    "pillow": PillowSource,
    "array": ArraySource,
}
SLIDE_SUFFIXES = (".svs", ".ndpi", ".mrxs", ".vms", ".vmu", ".scn", ".bif", ".svslide", ".dcm")
PILLOW_MAGICS = (b"\x89PNG", b"\xff\xd8\xff", b"GIF8", b"BM", b"RIFF")
ZARR_MARKERS = (".zarray", ".zgroup", ".zattrs", "zarr.json")


def _is_zarr_node(obj: Any) -> bool:
    module = type(obj).__module__
    return module.startswith("zarr") and (is_array(obj) or hasattr(obj, "array_keys"))


def sniff_backend(path: str) -> str:
    """The backend name for an existing path, from its content first and its suffix second."""
    if os.path.isdir(path):
        if any(os.path.exists(os.path.join(path, m)) for m in ZARR_MARKERS):
            return "zarr"
        raise UnsupportedFormatError(
            f"{path!r} is a directory but not a zarr store (no {', '.join(ZARR_MARKERS)}); "
            "pass the .zarr folder itself or an image file"
        )
    try:
        with open(path, "rb") as file:
            head = file.read(132)
    except PermissionError as error:
        raise ImageReadError(permission_message(path)) from error
    suffix = os.path.splitext(path)[1].lower()
    if head[:4] in TIFF_MAGICS:
        vendor = detect_format(path) if suffix in SLIDE_SUFFIXES else None
        return "openslide" if vendor else "tiff"
    if suffix in SLIDE_SUFFIXES or head[128:132] == b"DICM":
        if detect_format(path):
            return "openslide"
    elif head.startswith(PILLOW_MAGICS):
        return "pillow"
    if detect_format(path):
        return "openslide"
    try:
        from PIL import Image

        with Image.open(path):
            return "pillow"
    except Exception:  # noqa: BLE001 - any failure means Pillow cannot read it either
        pass
    raise UnsupportedFormatError(
        f"no backend can read {path!r} (suffix {suffix or 'none'!r}, first bytes {head[:8]!r}); "
        f"supported: whole-slide formats via OpenSlide, TIFF, zarr/OME-Zarr, ordinary images. "
        "Check the file is complete and really an image, or pass backend= explicitly"
    )


def open_image(path_or_array: Any, backend: str | None = None, *, fill: int = 255) -> ImageSource:
    """An `ImageSource` for a path, a numpy/torch array or a zarr array/group.

    The file is opened (and its header validated) before returning, so a bad
    path fails here with an `hrsel.ImageReadError` subclass naming it: missing,
    unreadable (permission), a directory that is not a zarr store, an empty
    file, an unknown format, truncated or corrupt, no pixels, or a pixel type
    hrsel does not read (`PixelTypeError`; see `hrsel.io.pixels`).
    """
    if isinstance(path_or_array, ImageSource):
        return path_or_array
    if backend is not None and backend not in BACKENDS:
        raise UnsupportedFormatError(
            f"unknown backend {backend!r}; valid: {', '.join(sorted(BACKENDS))}, or None to guess"
        )
    if not isinstance(path_or_array, (str, os.PathLike)):
        chosen = backend or ("zarr" if _is_zarr_node(path_or_array) else "array")
        source = BACKENDS[chosen](path_or_array, fill=fill)
        source.handle  # noqa: B018 - validate now
        return source
    path = os.fspath(path_or_array)
    check_file(path, directory_ok=backend in (None, "zarr"))  # a folder is a zarr store or nothing
    chosen = backend or sniff_backend(path)
    source = BACKENDS[chosen](path, fill=fill)
    try:
        try:
            source.handle  # noqa: B018 - open now so errors name the path here
        except UnsupportedFormatError:
            if chosen != "tiff":
                raise
            logger.debug("%r has a layout TiffSource does not read; using the zarr store", path)
            source = ZarrSource(path, fill=fill)
            source.handle  # noqa: B018
    except ImageReadError as error:
        if backend is not None or chosen != "tiff" or isinstance(error, PixelTypeError) or not detect_format(path):
            raise  # OpenSlide would read 16-bit or float samples as 8-bit, silently wrong
        logger.info("tifffile could not open %r (%s); trying OpenSlide", path, error)
        source = OpenSlideSource(path, fill=fill)
        try:
            source.handle  # noqa: B018
        except ImageReadError:
            raise error from None  # tifffile's message says more (e.g. where it is truncated)
    logger.debug("opened %r with the %s backend", path, chosen)
    return source

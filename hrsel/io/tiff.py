"""TIFF files (pyramidal, tiled or striped): a direct tile reader and tifffile's zarr store.

tifffile's zarr store API moved over the years (`imread(aszarr=True)`,
`TiffFile.aszarr()`, `tifffile.zarr.ZarrTiffStore`); `open_tiff_zarr` tries
each so old and new tifffile releases, with zarr 2 or 3, keep working.
"""
from __future__ import annotations

import logging
import os
import re
from typing import Any, NamedTuple

import numpy as np

from hrsel.errors import ImageReadError, UnsupportedFormatError
from hrsel.io.base import ImageSource, Pyramid, check_file
from hrsel.io.pixels import NATIVE_DTYPES, composite_alpha

logger = logging.getLogger(__name__)

TIFF_MAGICS = (b"II*\x00", b"MM\x00*", b"II+\x00", b"MM\x00+")  # classic and BigTIFF
RAW_CODECS = {5, 8, 32946, 34925, 50000}  # LZW, deflate (both tags), LZMA, zstd: bytes out are pixels


class TiffZarr(NamedTuple):
    node: Any  # a zarr Array (one level) or Group ('0', '1', ... levels)
    tif: Any  # the open tifffile.TiffFile, closed with the source
    store: Any
    axes: str  # tifffile axes of the series, e.g. 'YXS'
    mpp: float | None


def _make_store(tifffile: Any, tif: Any, path: str) -> Any:
    attempts = (
        lambda: tif.aszarr(series=0),
        lambda: tif.series[0].aszarr(),
        lambda: __import__("tifffile.zarr", fromlist=["ZarrTiffStore"]).ZarrTiffStore(tif),
        lambda: tifffile.imread(path, aszarr=True),
    )
    errors = []
    for attempt in attempts:
        try:
            return attempt()
        except (AttributeError, TypeError, ImportError) as error:
            errors.append(f"{type(error).__name__}: {error}")
    raise RuntimeError("no tifffile zarr store API found: " + "; ".join(errors))


def tiff_mpp(page: Any) -> float | None:
    """Microns per pixel from an Aperio description, OME-XML PhysicalSizeX or the resolution tags, else None."""
    description = str(getattr(page, "description", "") or "")
    match = re.search(r"MPP\s*=\s*([0-9.]+)", description)
    if match:
        return float(match.group(1))
    ome = ome_mpp(description)
    if ome is not None:
        return ome
    tags = page.tags
    if "XResolution" not in tags or "ResolutionUnit" not in tags:
        return None
    numerator, denominator = tags["XResolution"].value
    unit = int(tags["ResolutionUnit"].value)
    if not numerator or not denominator:
        return None
    per_unit = numerator / denominator
    microns = {2: 25400.0, 3: 10000.0}.get(unit)  # inch, centimetre
    if microns is None or per_unit <= 1:
        return None
    return microns / per_unit


OME_UNITS = {"µm": 1.0, "um": 1.0, "micron": 1.0, "nm": 1e-3, "mm": 1e3, "cm": 1e4}  # -> microns


def ome_mpp(description: str) -> float | None:
    """Microns per pixel from the first `PhysicalSizeX` of an OME-XML description (unit default µm)."""
    if "<OME" not in description:
        return None
    size = re.search(r'PhysicalSizeX\s*=\s*"([0-9.eE+-]+)"', description)
    unit = re.search(r'PhysicalSizeXUnit\s*=\s*"([^"]+)"', description)
    scale = OME_UNITS.get(unit.group(1) if unit else "µm")
    if size is None or scale is None:
        return None
    value = float(size.group(1)) * scale
    return value if value > 0 else None


def check_complete(tif: Any, path: str, series: Any) -> None:
    """Raise if any tile or strip of the series' levels lies past the end of the file."""
    size = tif.filehandle.size
    for level in getattr(series, "levels", [series]):
        for page in level.pages:
            if page is None:
                continue
            ends = [o + n for o, n in zip(page.dataoffsets, page.databytecounts) if n]
            if ends and max(ends) > size:
                raise EOFError(
                    f"{path!r} is truncated: image data ends at byte {max(ends)} but the file has "
                    f"{size} bytes; re-copy or re-download it"
                )


ZARR3_TIFFFILE = (2025, 5, 21)  # tifffile's zarr stores speak zarr 3 from this release, zarr 2 before


def check_store_compatible(tifffile: Any, zarr: Any, path: str) -> None:
    """Raise a clear error when tifffile's zarr store and the installed zarr disagree on the API."""
    release = tuple(int(part) for part in re.findall(r"\d+", tifffile.__version__)[:3])
    store_zarr3 = release >= ZARR3_TIFFFILE
    if store_zarr3 == zarr.__version__.startswith("2."):
        raise UnsupportedFormatError(
            f"cannot read {path!r} through zarr: tifffile {tifffile.__version__} makes zarr "
            f"{3 if store_zarr3 else 2} stores but zarr {zarr.__version__} is installed. Install tifffile "
            f">= 2025.5.21 with zarr 3, or tifffile < 2025.5.21 with zarr 2; or read the file with "
            "backend='tiff' or 'openslide', which do not need zarr"
        )


def open_tiff_zarr(path: str) -> TiffZarr:
    import tifffile
    import zarr

    check_store_compatible(tifffile, zarr, path)
    tif = tifffile.TiffFile(path)
    try:
        series = tif.series[0]
        check_complete(tif, path, series)
        store = _make_store(tifffile, tif, path)
        node = zarr.open(store, mode="r")
        return TiffZarr(node, tif, store, series.axes, tiff_mpp(series.pages[0]))
    except Exception:
        tif.close()
        raise


def tiff_alpha(page: Any) -> str | None:
    """'associated' or 'unassociated' when the page's single extra sample is alpha (ExtraSamples
    1 or 2) of a gray (2 samples) or RGB (4 samples) image, else None: unspecified extra samples
    (ExtraSamples 0) are not guessed to be alpha and stay channels."""
    extras = tuple(int(e) for e in (getattr(page, "extrasamples", None) or ()))
    if len(extras) != 1 or page.samplesperpixel not in (2, 4) or extras[0] not in (1, 2):
        return None
    return "associated" if extras[0] == 1 else "unassociated"


class TiffPages(NamedTuple):
    tif: Any
    fd: int  # a raw descriptor for os.pread: thread-safe reads without tifffile's lock
    pages: list  # the key page of every level, largest first
    repeats: dict  # compressed bytes -> decoded segment, for byte-identical near-empty tiles
    alpha: str | None  # 'associated' / 'unassociated' alpha composited on `fill`, or None


REPEAT_RATIO = 64  # segments compressed this much (or more) are near-uniform: background, padding
REPEAT_BUDGET = 8 << 20  # bytes of such decoded segments remembered per open file


class TiffSource(ImageSource):
    """Tiled or striped TIFF (pyramids included) read segment by segment with tifffile.

    Reads need no shared lock (os.pread + tifffile's GIL-free decoders), so
    several threads decode in parallel. uint8, uint16 and float32 samples are
    read in their own dtype, any number of bands (a 4-band uint16 GeoTIFF has 4
    channels); uint8 decodes straight into the caller's buffer where it can.
    Layouts it does not handle (planar separate samples, volumes, other dtypes)
    raise `UnsupportedFormatError`; `open_image` then falls back to `ZarrSource`,
    which reads any TIFF and refuses the dtypes `hrsel.io.pixels` refuses.

    An alpha extra sample (ExtraSamples 1 associated or 2 unassociated, see
    `tiff_alpha`) is composited on grey `fill` exactly as `PillowSource` does
    for PNGs: an RGBA TIFF and the same RGBA PNG read the same 3 channels.
    Missing tiles of a sparse TIFF read as `fill` without decoding anything.
    """

    backend = "tiff"

    def __init__(self, path: str | os.PathLike, *, fill: int = 255):
        super().__init__(os.fspath(path), fill=fill)

    def _open(self) -> TiffPages:
        import tifffile

        check_file(self.path)
        try:
            tif = tifffile.TiffFile(self.path)
        except PermissionError:
            raise  # named by ImageSource
        except Exception as error:
            raise ImageReadError(
                f"tifffile cannot open {self.path!r}: {error}. The file may be truncated or corrupt"
            ) from error
        try:
            pages = self._key_pages(tif)
            return TiffPages(tif, os.open(self.path, os.O_RDONLY), pages, {}, tiff_alpha(pages[0]))
        except EOFError as error:
            tif.close()
            raise ImageReadError(str(error)) from error
        except ImageReadError:
            tif.close()
            raise
        except Exception as error:  # tifffile's parser on a broken IFD
            tif.close()
            raise ImageReadError(
                f"tifffile cannot read the image of {self.path!r}: {type(error).__name__}: {error}. The file "
                "may be truncated or corrupt; re-copy or re-export it"
            ) from error

    def _key_pages(self, tif: Any) -> list:
        """The key page of every level; `UnsupportedFormatError` for layouts `ZarrSource` must read."""
        if not tif.series:
            raise ImageReadError(
                f"{self.path!r} holds no readable image (tifffile finds no image series in its IFDs); the "
                "file is truncated or corrupt; re-copy or re-export it"
            )
        series = tif.series[0]
        check_complete(tif, self.path, series)
        pages = [level.keyframe for level in getattr(series, "levels", [series])]
        for page in pages:
            native = page.dtype is not None and np.dtype(page.dtype).newbyteorder("=") in NATIVE_DTYPES
            if not native or page.imagedepth != 1 or (page.samplesperpixel > 1 and page.planarconfig != 1):
                raise UnsupportedFormatError(
                    f"{self.path!r}: TiffSource reads 2-D uint8, uint16 or float32 contiguous TIFFs, this one has "
                    f"dtype {page.dtype}, depth {page.imagedepth}, planarconfig {page.planarconfig}; "
                    "use ZarrSource"
                )
        return pages

    def _describe(self, handle: TiffPages) -> Pyramid:
        dims = tuple((int(p.imagewidth), int(p.imagelength)) for p in handle.pages)
        channels = int(handle.pages[0].samplesperpixel) - (handle.alpha is not None)
        dtype = np.dtype(handle.pages[0].dtype).newbyteorder("=")
        return Pyramid(dims, channels=channels, mpp=tiff_mpp(handle.pages[0]), dtype=dtype.name)

    def _read(self, handle: TiffPages, level: int, x: int, y: int, width: int, height: int) -> np.ndarray:
        out = np.empty((height, width, handle.pages[level].samplesperpixel), dtype=self.dtype)
        self._read_segments(handle, level, x, y, out)
        if handle.alpha is None:
            return out
        return composite_alpha(out, fill=self.fill, associated=handle.alpha == "associated")

    def _read_into(self, handle: TiffPages, level: int, x: int, y: int, out: np.ndarray) -> None:
        if handle.alpha is not None:  # decode all samples, then composite into `out`
            out[...] = self._read(handle, level, x, y, out.shape[1], out.shape[0])
        else:
            self._read_segments(handle, level, x, y, out)

    def _read_segments(self, handle: TiffPages, level: int, x: int, y: int, out: np.ndarray) -> None:
        """Every sample of the window at (x, y) into `out` (h, w, samples per pixel)."""
        page = handle.pages[level]
        height, width = out.shape[:2]
        seg_w, seg_h = self._segment_shape(page)
        cols = -(-page.imagewidth // seg_w)
        for row in range(y // seg_h, (y + height - 1) // seg_h + 1):
            for col in range(x // seg_w, (x + width - 1) // seg_w + 1):
                top, left = row * seg_h, col * seg_w
                y0, y1 = max(y, top), min(y + height, top + seg_h, page.imagelength)
                x0, x1 = max(x, left), min(x + width, left + seg_w, page.imagewidth)
                window = out[y0 - y : y1 - y, x0 - x : x1 - x]
                data = self._segment_bytes(handle.fd, page, row * cols + col)
                if data is None:  # a sparse TIFF's missing tile
                    window[...] = self.fill_value
                    continue
                segment = handle.repeats.get((level, data))  # (seg rows, seg cols, S) or None
                if segment is None:
                    if window.shape[:2] == (seg_h, seg_w) and self._decompress_into(page, data, window):
                        self._remember(handle, level, data, window)
                        continue
                    segment = self._decode(page, data, row * cols + col)
                    self._remember(handle, level, data, segment)
                window[...] = segment[y0 - top : y1 - top, x0 - left : x1 - left]

    @staticmethod
    def _remember(handle: TiffPages, level: int, data: bytes, segment: np.ndarray) -> None:
        """Keep near-uniform segments: scanners and writers store blank areas as byte-identical
        tiles, and copying a kept tile is several times cheaper than inflating it again."""
        if len(data) * REPEAT_RATIO > segment.size:  # real content: never byte-identical twice
            return
        if sum(kept.nbytes for kept in handle.repeats.values()) + segment.nbytes <= REPEAT_BUDGET:
            kept = segment.copy()
            kept.flags.writeable = False
            handle.repeats[level, data] = kept

    @staticmethod
    def _segment_shape(page: Any) -> tuple[int, int]:
        if page.is_tiled:
            return page.tilewidth, page.tilelength
        return page.imagewidth, min(page.rowsperstrip, page.imagelength)

    def tile_size(self, level: int = 0) -> tuple[int, int] | None:
        return self._segment_shape(self.handle.pages[self.check_level(level)])

    def _segment_bytes(self, fd: int, page: Any, index: int) -> bytes | None:
        count = page.databytecounts[index]
        if not count:
            return None
        data = os.pread(fd, count, page.dataoffsets[index])
        if len(data) != count:
            raise EOFError(f"segment {index} of {self.path!r} is cut short; the file is truncated")
        return data

    @staticmethod
    def _decode(page: Any, data: bytes, index: int) -> np.ndarray:
        decoded = page.decode(data, index, jpegtables=page.jpegtables)[0]
        return decoded.reshape(-1, decoded.shape[-2], decoded.shape[-1])

    @staticmethod
    def _decompress_into(page: Any, data: bytes, window: np.ndarray) -> bool:
        """Decompress a whole segment straight into `window`, skipping a copy; False if not possible.

        Only for codecs whose output is the raw pixels (deflate, LZW, zstd, ...)
        with no predictor or bit reversal; JPEG and the rest go through `page.decode`.
        """
        import tifffile

        if page.compression not in RAW_CODECS or page.predictor != 1 or page.fillorder != 1:
            return False
        if window.dtype != np.uint8:  # wider samples have a byte order: page.decode swaps them
            return False
        if not window.flags.c_contiguous:
            return False
        decompress = getattr(tifffile.TIFF, "DECOMPRESSORS", {}).get(page.compression)  # absent in old tifffile
        if decompress is None:
            return False
        flat = window.reshape(-1)
        written = decompress(data, out=flat)
        if len(written) != flat.size:
            raise EOFError(f"a segment inflated to {len(written)} bytes instead of {flat.size}: the file is corrupt")
        return True

    def _close(self, handle: TiffPages) -> None:
        os.close(handle.fd)
        handle.tif.close()

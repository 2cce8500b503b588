"""zarr arrays (HWC or CHW), OME-Zarr multiscale groups and TIFFs through tifffile's zarr store.

Works with the zarr 2 and zarr 3 APIs: only `zarr.open`, `.shape`, `.dtype`,
`.attrs`, `group[key]` and slicing are used.
"""
from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from typing import Any

import numpy as np

from hrsel.errors import ImageReadError, UnsupportedFormatError
from hrsel.io.array import infer_layout
from hrsel.io.base import ImageSource, Pyramid, check_file
from hrsel.io.pixels import composite_alpha, native_dtype, to_native
from hrsel.io.tiff import TIFF_MAGICS, tiff_alpha

logger = logging.getLogger(__name__)


@dataclass
class Levels:
    arrays: list[Any]  # one zarr array per level, largest first
    axes: str  # lower-case axis letters shared by every level, e.g. 'yxc', 'cyx', 'tczyx'
    mpp: float | None
    closer: Any = None  # the tifffile handle, when there is one
    alpha: str | None = None  # a TIFF's alpha sample ('associated' / 'unassociated'), composited on `fill`


def is_array(node: Any) -> bool:
    return hasattr(node, "shape") and hasattr(node, "dtype")


def _attrs(node: Any) -> dict[str, Any]:
    attrs = dict(node.attrs)
    return attrs.get("ome", attrs)  # OME-Zarr 0.5 nests under 'ome'


def _axes_for(shape: tuple[int, ...], layout: str | None, name: str) -> str:
    return {"hw": "yx", "hwc": "yxc", "chw": "cyx"}[infer_layout(shape, layout, name=name)]


def levels_of(node: Any, *, layout: str | None, name: str) -> Levels:
    """Levels and axes of a zarr array, a plain group of '0', '1', ... or an OME-Zarr group."""
    if is_array(node):
        return Levels([node], _axes_for(node.shape, layout, name), None)
    multiscales = _attrs(node).get("multiscales")
    if multiscales:
        scale = multiscales[0]
        paths = [d["path"] for d in scale["datasets"]]
        arrays = [node[p] for p in paths]
        names = [a["name"] if isinstance(a, dict) else a for a in scale.get("axes", [])]
        axes = "".join(n[0].lower() for n in names) if names else ""
        if len(axes) != len(arrays[0].shape) or not {"y", "x"} <= set(axes):
            axes = _axes_for(arrays[0].shape, layout, name)
        return Levels(arrays, axes, _ome_mpp(scale, names))
    keys = sorted((k for k in node.array_keys() if str(k).isdigit()), key=int)
    if not keys:
        raise UnsupportedFormatError(
            f"zarr group {name} has no multiscales metadata and no arrays named 0, 1, ...; "
            "open one of its arrays directly"
        )
    arrays = [node[k] for k in keys]
    return Levels(arrays, _axes_for(arrays[0].shape, layout, name), None)


def _ome_mpp(scale: dict[str, Any], names: list[str]) -> float | None:
    try:
        transforms = scale["datasets"][0]["coordinateTransformations"]
        factors = next(t["scale"] for t in transforms if t["type"] == "scale")
        axes = scale["axes"]
        i = names.index("x")
        unit = axes[i].get("unit") if isinstance(axes[i], dict) else None
    except (KeyError, StopIteration, ValueError, IndexError, TypeError):
        return None
    return float(factors[i]) if unit in ("micrometer", "micron") else None


class ZarrSource(ImageSource):
    """zarr-backed image: a path (.zarr store or TIFF), a zarr array or group.

    Pixels follow `hrsel.io.pixels`: uint8 and uint16 are kept, float becomes float32 (NaN or inf
    refused on the region read, naming the file and the range seen), other integer dtypes are
    refused when the source opens (`PixelTypeError` naming the file and dtype). A TIFF's alpha sample is composited on `fill` as `TiffSource` does; a 4th channel
    of a zarr store is kept (zarr does not say whether it is alpha).
    """

    backend = "zarr"

    def __init__(
        self,
        path_or_array_or_group: Any,
        *,
        fill: int = 255,
        layout: str | None = None,
        mpp: float | None = None,
    ):
        is_path = isinstance(path_or_array_or_group, (str, os.PathLike))
        super().__init__(os.fspath(path_or_array_or_group) if is_path else None, fill=fill)
        self._node = None if is_path else path_or_array_or_group
        self._layout = layout
        self._mpp = mpp
        self._levels: Levels | None = None

    def _is_tiff(self) -> bool:
        if self.path is None or os.path.isdir(self.path):
            return False
        with open(self.path, "rb") as file:
            return file.read(4) in TIFF_MAGICS

    def _open(self) -> Levels:
        if self._node is not None:
            return levels_of(self._node, layout=self._layout, name="<in-memory zarr>")
        check_file(self.path, directory_ok=True)
        try:
            if self._is_tiff():
                from hrsel.io.tiff import open_tiff_zarr

                tiff = open_tiff_zarr(self.path)
                axes = tiff.axes.lower().replace("s", "c")
                levels = levels_of(tiff.node, layout=self._layout, name=repr(self.path))
                if len(axes) == len(levels.arrays[0].shape) and {"y", "x"} <= set(axes):
                    levels.axes = axes
                levels.mpp, levels.closer = tiff.mpp, tiff.tif
                if "c" in levels.axes:
                    levels.alpha = tiff_alpha(tiff.tif.series[0].keyframe)
                return levels
            import zarr

            return levels_of(zarr.open(self.path, mode="r"), layout=self._layout, name=repr(self.path))
        except (ImageReadError, PermissionError):
            raise  # already named (a PermissionError by ImageSource)
        except EOFError as error:
            raise ImageReadError(str(error)) from error
        except Exception as error:
            raise ImageReadError(
                f"cannot open {self.path!r} as zarr/TIFF: {type(error).__name__}: {error}. "
                "The file may be truncated, corrupt or not an image; check it or pick another backend"
            ) from error

    def _describe(self, levels: Levels) -> Pyramid:
        dims, channels = [], 1
        dtype = native_dtype(levels.arrays[0].dtype, name=self._name())
        for array in levels.arrays:
            native_dtype(array.dtype, name=self._name())
            shape = dict(zip(levels.axes, array.shape))
            dims.append((int(shape["x"]), int(shape["y"])))
            channels = int(shape.get("c", 1)) - (levels.alpha is not None)
        return Pyramid(tuple(dims), channels=channels, mpp=self._mpp or levels.mpp, dtype=dtype.name)

    def _read(self, levels: Levels, level: int, x: int, y: int, width: int, height: int) -> np.ndarray:
        index = []
        for axis in levels.axes:
            if axis == "y":
                index.append(slice(y, y + height))
            elif axis == "x":
                index.append(slice(x, x + width))
            elif axis == "c":
                index.append(slice(None))
            else:
                index.append(0)  # t, z, ...: the first plane
        block = np.asarray(levels.arrays[level][tuple(index)])
        kept = [a for a in levels.axes if a in "yxc"]
        order = [kept.index(a) for a in "yxc" if a in kept]
        block = block.transpose(order)  # (h, w[, c])
        if block.ndim == 2:
            block = block[:, :, None]
        block = to_native(block, name=self._name())
        if levels.alpha is not None:
            return composite_alpha(block, fill=self.fill, associated=levels.alpha == "associated")
        return np.ascontiguousarray(block)

    def _close(self, levels: Levels) -> None:
        if levels.closer is not None:
            levels.closer.close()

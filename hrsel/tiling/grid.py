"""`PatchGrid`: the level-0 top-left corners of every patch, in raster order, optionally masked."""
from __future__ import annotations

import functools
from typing import Any, Callable

import numpy as np

from hrsel.errors import ImageTooLargeError
from hrsel.tiling.kernels import box_fractions, grid_coords

MAX_GRID_CELLS = 1 << 26  # 67 M patches: 1.5 GiB of corners and indices, built in about a second


def _count(extent: int, patch: int, stride: int, cover: bool) -> int:
    """Patches along one axis of `extent` padded pixels."""
    if extent < patch:
        return 1 if cover and extent > 0 else 0
    if cover:
        return -(-(extent - patch) // stride) + 1
    return (extent - patch) // stride + 1


class PatchGrid:
    """Patches of `patch_size` level pixels every `stride` level pixels, coordinates at level 0.

    `padding` level pixels are added on every side (patches may start at -padding);
    `cover=True` adds a last, partly outside patch so every pixel is covered.
    A masked grid (`with_mask`) keeps a subset: `.indices` are its positions in
    the full raster grid and `.coords` only the kept corners.
    A grid of more than `max_cells` patches raises `ImageTooLargeError` before
    allocating anything (its corners alone would take minutes and gigabytes).
    """

    def __init__(
        self,
        *,
        image_size: tuple[int, int],
        patch_size: int,
        stride: int | None = None,
        level: int = 0,
        downsample: float = 1.0,
        padding: int = 0,
        level_size: tuple[int, int] | None = None,
        cover: bool = False,
        max_cells: int = MAX_GRID_CELLS,
    ):
        stride = patch_size if stride is None else stride
        if patch_size <= 0 or stride <= 0 or padding < 0 or downsample <= 0:
            raise ValueError(
                f"PatchGrid needs patch_size > 0, stride > 0, padding >= 0, downsample > 0; got "
                f"patch_size={patch_size}, stride={stride}, padding={padding}, downsample={downsample}"
            )
        width, height = map(int, image_size)
        if level_size is None:
            level_size = (int(width / downsample + 1e-6), int(height / downsample + 1e-6))
        self.image_size = (width, height)
        self.level_size = tuple(map(int, level_size))
        self.patch_size, self.stride, self.padding = int(patch_size), int(stride), int(padding)
        self.level, self.downsample, self.cover = int(level), float(downsample), bool(cover)
        cols = _count(self.level_size[0] + 2 * padding, self.patch_size, self.stride, cover)
        rows = _count(self.level_size[1] + 2 * padding, self.patch_size, self.stride, cover)
        self.shape = (rows, cols)
        self._check_cells(max_cells)
        self.level_coords = grid_coords(rows, cols, self.stride, self.padding)  # (n, 2) level px
        self.indices = np.arange(rows * cols, dtype=np.int64)

    def _check_cells(self, max_cells: int) -> None:
        rows, cols = self.shape
        if rows * cols <= max_cells:
            return
        raise ImageTooLargeError(
            f"a grid of {self.patch_size} px patches every {self.stride} px over level {self.level} "
            f"({self.level_size[0]}x{self.level_size[1]} px) has {rows}x{cols} = {rows * cols} patches, more "
            f"than max_cells={max_cells}. Fix: a larger patch_size or stride, a coarser level, or pass "
            "max_cells to accept the memory (about 24 bytes per patch)"
        )

    @classmethod
    def for_source(
        cls,
        source: Any,
        *,
        patch_size: int,
        stride: int | None = None,
        level: int = 0,
        padding: int = 0,
        cover: bool = False,
        min_tissue_fraction: float | None = None,
        mask_size: int = 1024,
        max_cells: int = MAX_GRID_CELLS,
    ) -> "PatchGrid":
        """The grid over an `ImageSource` at `level`; with `min_tissue_fraction`, only the patches on tissue
        (`with_mask`: the tissue mask of `hrsel.tiling.tissue`, pen ink left out).

        Too many patches (`max_cells`) or a mask whose thumbnail would decode a giant level
        raise `ImageTooLargeError` naming the image.
        """
        level = source.check_level(level)
        try:
            grid = cls(
                image_size=source.dimensions,
                patch_size=patch_size,
                stride=stride,
                level=level,
                downsample=source.level_downsamples[level],
                padding=padding,
                level_size=source.level_dimensions[level],
                cover=cover,
                max_cells=max_cells,
            )
        except ImageTooLargeError as error:
            raise ImageTooLargeError(f"{source!r}: {error}") from None
        if min_tissue_fraction is not None:
            grid = grid.with_mask(source=source, min_tissue_fraction=min_tissue_fraction, mask_size=mask_size)
        return grid

    @classmethod
    def from_corners(
        cls, corners: np.ndarray, *, image_size: tuple[int, int], patch_size: int, stride: int
    ) -> "PatchGrid":
        """A level-0 grid of patches at explicit (n, 2) (x, y) corners, kept in the given order.

        `stride` is the horizontal step between neighbours on a row: where the step is
        exactly `stride`, streaming reads neighbours with one region call.
        """
        corners = np.asarray(corners)
        if corners.ndim != 2 or corners.shape[1] != 2:
            raise ValueError(f"corners must be (n, 2) (x, y), got shape {corners.shape}")
        grid = cls(image_size=image_size, patch_size=patch_size, stride=stride, level_size=(0, 0))  # skip the raster
        grid.level_size = grid.image_size
        grid.level_coords = np.ascontiguousarray(corners, dtype=np.int64)
        grid.indices = np.arange(corners.shape[0], dtype=np.int64)
        grid.shape = (1, corners.shape[0])
        return grid

    @functools.cached_property
    def coords(self) -> np.ndarray:
        """(n, 2) int64 (x, y) level-0 top-left corners (computed once: callers index it in loops)."""
        return np.rint(self.level_coords * self.downsample).astype(np.int64)

    @property
    def patch_size_level0(self) -> float:
        return self.patch_size * self.downsample

    def boxes(self) -> np.ndarray:
        """(n, 4) float64 level-0 (x0, y0, x1, y1) of every patch."""
        corners = self.level_coords * self.downsample
        return np.concatenate([corners, corners + self.patch_size_level0], axis=1)

    def __len__(self) -> int:
        return int(self.indices.shape[0])

    def subset(self, keep: np.ndarray) -> "PatchGrid":
        """A grid with the patches where `keep` (bool (n,) or positions) selects, order kept."""
        keep = np.asarray(keep)
        if keep.dtype == np.bool_ and keep.shape != (len(self),):
            raise ValueError(f"boolean keep must have shape ({len(self)},), got {keep.shape}")
        grid = object.__new__(PatchGrid)
        grid.__dict__.update(self.__dict__)
        grid.__dict__.pop("coords", None)  # the cached corners of the full grid
        grid.level_coords = self.level_coords[keep]
        grid.indices = self.indices[keep]
        return grid

    def with_mask(
        self,
        mask: np.ndarray | Callable[[np.ndarray], np.ndarray] | None = None,
        *,
        source: Any = None,
        min_tissue_fraction: float = 0.5,
        mask_size: int = 1024,
        foreground: str = "dark",
    ) -> "PatchGrid":
        """Keep patches whose foreground fraction is >= `min_tissue_fraction`.

        `mask` is a 2-D bool array spanning the whole level-0 image (any scale),
        or a function of the (n, 2) level-0 coords returning bool (n,). Without
        one, `source`'s tissue mask (`hrsel.tiling.tissue.compute_tissue_mask` of its
        thumbnail, longer side `mask_size`: the one every data set and command uses, pen
        ink left out) picks the patches as it picks a pipeline's candidate cells;
        `foreground="bright"` takes the bright side of Otsu's threshold instead.
        """
        if callable(mask):
            keep = np.asarray(mask(self.coords), dtype=bool)
            if keep.shape != (len(self),):
                raise ValueError(f"mask function must return bool ({len(self)},), got {keep.shape}")
            return self.subset(keep)
        if mask is None:
            if source is None:
                raise ValueError("with_mask needs a mask array, a mask function or source=")
            if foreground == "dark":
                from hrsel.tiling.tissue import compute_tissue_mask

                tissue = compute_tissue_mask(source, max_size=mask_size, min_fraction=min_tissue_fraction)
                return self.subset(tissue.candidates(self.boxes()[:, :2], self.patch_size_level0))
            from hrsel.tiling.mask import tissue_mask

            mask = tissue_mask(source, max_size=mask_size, foreground=foreground)
        fractions = self.tissue_fractions(np.asarray(mask))
        return self.subset(fractions >= min_tissue_fraction)

    def tissue_fractions(self, mask: np.ndarray) -> np.ndarray:
        """(n,) fraction of each patch covered by True pixels of a whole-image 2-D mask."""
        if mask.ndim != 2:
            raise ValueError(f"mask must be 2-D (h, w) over the whole image, got shape {mask.shape}")
        scale_x = mask.shape[1] / self.image_size[0]  # mask pixels per level-0 pixel
        scale_y = mask.shape[0] / self.image_size[1]
        boxes = self.boxes() * np.array([scale_x, scale_y, scale_x, scale_y])
        boxes = np.rint(boxes).astype(np.int64)
        boxes[:, 2:] = np.maximum(boxes[:, 2:], boxes[:, :2] + 1)  # a patch covers >= 1 mask pixel
        return box_fractions(mask, boxes)

    def __repr__(self) -> str:
        rows, cols = self.shape
        return (
            f"PatchGrid({len(self)} of {rows}x{cols} patches of {self.patch_size} px, stride {self.stride}, "
            f"level {self.level} (downsample {self.downsample:g}), image {self.image_size[0]}x{self.image_size[1]})"
        )


def grid_shape(extent: tuple[int, int], patch_size: int, stride: int, padding: int = 0) -> tuple[int, int]:
    """(rows, cols) of a grid over an (width, height) extent; the arithmetic of `PatchGrid`."""
    return (
        _count(extent[1] + 2 * padding, patch_size, stride, False),
        _count(extent[0] + 2 * padding, patch_size, stride, False),
    )


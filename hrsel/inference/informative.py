"""Which scored patches carry information: what the GeoJSON writes and the heatmap shows by default.

    blank = blank_patches(source.thumbnail(THUMB_SIDE), image_wh=(w, h), coords=xy, patch_size=(pw, ph))
    keep = informative(scores, selected, blank=blank, top=TOP_PATCHES)     # (N,) bool

A patch carries information when it has a score and is not blank, or is among the `top` highest
scores, or was selected. A run with `data.tissue` scores only the patches on tissue (the others
are NaN), so glass drops out there. Blank is judged on a thumbnail (no patch is read at full
resolution): a patch whose thumbnail pixels vary by at most `BLANK_STD` (standard deviation, in
the 0-255 units of the picture) in every band, such as the empty canvas around digits or a flat
scanner background. On `make demo`'s 20000 x 20000 canvas that keeps 76,871 of 508,369 patches
(29 MB of GeoJSON instead of 194 MB): those touching its 5 digits and 8,889 noise strokes.
"""
from __future__ import annotations

from typing import Sequence

import numpy as np

from hrsel.inference.geojson import score_ranks

TOP_PATCHES = 100  # the highest scores are written even when blank: where the model looked
THUMB_SIDE = 2048  # longer side of the thumbnail blank patches are judged on
BLANK_STD = 1.0  # a patch is blank when its thumbnail pixels' std is at most this, in every band


def informative(scores: np.ndarray, selected: Sequence[int] | np.ndarray = (), *, blank: np.ndarray | None = None,
                top: int = TOP_PATCHES) -> np.ndarray:
    """(N,) bool: the patches with a score that are not `blank` (N,) bool, the `top` highest scores and
    the `selected` indices (-1 and out-of-range indices ignored)."""
    scores = np.asarray(scores, dtype=np.float64).reshape(-1)
    keep = np.isfinite(scores)
    if blank is not None:
        keep &= ~np.asarray(blank, dtype=bool).reshape(-1)
    ranks = score_ranks(scores)  # 1 = highest, 0 = no score
    keep |= (ranks > 0) & (ranks <= top)
    chosen = np.asarray(selected, dtype=np.int64).reshape(-1)
    keep[chosen[(chosen >= 0) & (chosen < len(keep))]] = True
    return keep


def blank_patches(thumbnail: np.ndarray, *, image_wh: tuple[int, int], coords: np.ndarray,
                  patch_size: float | Sequence[float]) -> np.ndarray:
    """(N,) bool: patches with top-left `coords` (N, 2) (x, y) and `patch_size` in the pixels of an image
    of `image_wh`, whose pixels in `thumbnail` (h, w, C) uint8 of that image vary by <= `BLANK_STD`."""
    coords = np.asarray(coords, dtype=np.float64).reshape(-1, 2)
    pw, ph = (float(patch_size),) * 2 if np.isscalar(patch_size) else tuple(float(v) for v in patch_size)
    pixels = thumbnail[..., None] if thumbnail.ndim == 2 else thumbnail
    th, tw = pixels.shape[:2]
    sx, sy = tw / image_wh[0], th / image_wh[1]
    c0 = np.clip(np.floor(coords[:, 0] * sx), 0, tw - 1).astype(np.int64)  # (N,) thumbnail boxes
    r0 = np.clip(np.floor(coords[:, 1] * sy), 0, th - 1).astype(np.int64)
    c1 = np.clip(np.ceil((coords[:, 0] + pw) * sx), c0 + 1, tw).astype(np.int64)
    r1 = np.clip(np.ceil((coords[:, 1] + ph) * sy), r0 + 1, th).astype(np.int64)
    count = (r1 - r0) * (c1 - c0)
    blank = np.ones(len(coords), dtype=bool)
    for band in range(pixels.shape[-1]):
        values = pixels[..., band].astype(np.int64)
        total = _box_sums(_integral(values), r0, c0, r1, c1)  # (N,)
        squares = _box_sums(_integral(values * values), r0, c0, r1, c1)
        variance = (count * squares - total * total) / (count * count)  # exact integers until the division
        blank &= variance <= BLANK_STD ** 2
    return blank


def _integral(values: np.ndarray) -> np.ndarray:
    """(h, w) -> (h + 1, w + 1) summed-area table with a zero first row and column."""
    table = np.zeros((values.shape[0] + 1, values.shape[1] + 1), dtype=np.int64)
    table[1:, 1:] = values.cumsum(axis=0).cumsum(axis=1)
    return table


def _box_sums(table: np.ndarray, r0: np.ndarray, c0: np.ndarray, r1: np.ndarray, c1: np.ndarray) -> np.ndarray:
    return table[r1, c1] - table[r0, c1] - table[r1, c0] + table[r0, c0]

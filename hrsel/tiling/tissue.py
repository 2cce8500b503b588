"""Tissue masks: which part of a slide holds tissue, from its thumbnail, once per image.

    mask = compute_tissue_mask(source)                      # a TissueMask over the whole image
    fractions = mask.fractions(corners_xy, patch_size)      # (n,) tissue fraction of each patch
    keep = mask.candidates(corners_xy, patch_size)          # (n,) bool: the cells pipelines may score
    mask.save("slide.npz"); TissueMask.load("slide.npz"); mask.save_picture(thumbnail, "slide_tissue.png")

A thumbnail pixel is tissue when it is not pen ink and either
1. on the dark side of Otsu's threshold of the grey levels (computed without the ink pixels,
   so a slide heavy with marker does not pull the threshold into the ink) and saturated at
   least a little (HSV saturation >= `min_saturation`: a grey shadow or dust is no tissue), or
2. clearly coloured (saturation >= `faint_saturation`): pale, thin tissue that Otsu puts on
   the bright side with the glass; glass is bright *and* grey (saturation about 0.02).
Pen ink, of any colour, on glass or over tissue (`ink_pixels`):
- coloured ink: saturation >= `ink_saturation` at a hue H&E never takes (`ink_hues`, degrees):
  green to blue (75-250) and red (350-20); eosin is pink to magenta (about 300-345), haematoxylin
  purple (about 260-300). Blood, which is as red as red ink, is lost with it.
- black and dark ink: dark (optical density OD = -log10(I / 255) of the darkest channel >=
  `ink_density`) and grey in optical density (min OD / max OD over R, G, B >= `ink_greyness`).
  Stains absorb some colours far more than others (H&E: 0.1-0.5), so their darker pixels stay
  as colourful; ink absorbs every colour alike (about 1), and over tissue it adds the same OD
  to each channel, pulling the ratio up (black ink of transmittance 0.3 over stroma: 0.7).
- near-black pixels (max channel < `min_value`).
No morphology: the mask is per thumbnail pixel.
A patch is a candidate when its tissue fraction is at least `min_fraction` and pen ink covers at
most `max_ink_fraction` (0.1) of it: ink over tissue is not tissue, but a patch two-thirds tissue
and one-third ink would otherwise pass, and on synthetic slides a trained IPS ranked exactly such
a patch (the end of a blue stroke over tissue) first on a tumour slide.
The mask is the thumbnail's size (longer side `max_size`, 1024 by default), so memory does not
depend on the image size. 16-bit and float thumbnails are stretched to 0..255 as pictures are
(`hrsel.io.pixels.to_display`); non-RGB ones (grey, multispectral) use step 1 alone on the mean
of the bands.
"""
from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from hrsel.io.pixels import to_display
from hrsel.tiling.mask import otsu_threshold

logger = logging.getLogger(__name__)

DEFAULTS = {"min_saturation": 0.07, "faint_saturation": 0.1, "ink_hues": ((75.0, 250.0), (350.0, 20.0)),
            "ink_saturation": 0.3, "ink_density": 0.15, "ink_greyness": 0.65, "min_value": 40, "min_contrast": 8}
MAX_INK_FRACTION = 0.1  # a patch with more pen ink than this is no candidate, whatever its tissue
RULE_VERSION = 3  # bump when the rule changes: cached masks and feature caches made with another are redone
HueRange = tuple[float, float]  # (from, to) degrees, counter-clockwise: (350, 20) wraps through 0


def hsv(rgb: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(h, w, 3) uint8 -> hue in degrees [0, 360), saturation in [0, 1], value in 0..255 (float64 each)."""
    x = rgb.astype(np.float64)
    r, g, b = x[..., 0], x[..., 1], x[..., 2]
    hi, lo = x.max(axis=-1), x.min(axis=-1)
    span = hi - lo
    safe = np.where(span > 0, span, 1.0)
    hue = np.where(hi == r, ((g - b) / safe) % 6.0, np.where(hi == g, (b - r) / safe + 2.0, (r - g) / safe + 4.0))
    hue = np.where(span > 0, hue * 60.0, 0.0)
    sat = np.where(hi > 0, span / np.where(hi > 0, hi, 1.0), 0.0)
    return hue, sat, hi


def ink_pixels(rgb: np.ndarray, *, ink_hues: tuple[HueRange, ...] = DEFAULTS["ink_hues"],
               ink_saturation: float = DEFAULTS["ink_saturation"], ink_density: float = DEFAULTS["ink_density"],
               ink_greyness: float = DEFAULTS["ink_greyness"], min_value: int = DEFAULTS["min_value"]) -> np.ndarray:
    """(h, w, 3) uint8 -> (h, w) bool: pen ink of any colour (see the module doc)."""
    hue, sat, value = hsv(rgb)
    coloured = np.zeros(hue.shape, dtype=bool)
    for start, stop in ink_hues:
        inside = (hue >= start) & (hue <= stop) if start <= stop else (hue >= start) | (hue <= stop)
        coloured |= inside
    coloured &= sat >= ink_saturation
    od = optical_density(rgb)  # (h, w, 3)
    darkest, lightest = od.max(axis=-1), od.min(axis=-1)
    grey = (darkest >= ink_density) & (lightest >= ink_greyness * darkest)
    return coloured | grey | (value < min_value)


def optical_density(rgb: np.ndarray) -> np.ndarray:
    """(..., 3) uint8 -> float64 -log10(I / 255) per channel, I clipped to >= 1 (Beer-Lambert absorbance)."""
    return -np.log10(np.maximum(rgb.astype(np.float64), 1.0) / 255.0)


def tissue_pixels(thumbnail: np.ndarray, **options: Any) -> np.ndarray:
    """(h, w) bool tissue mask of a thumbnail (see the module doc); options: `tissue_and_ink`'s."""
    return tissue_and_ink(thumbnail, **options)[0]


def tissue_and_ink(thumbnail: np.ndarray, *, min_saturation: float = DEFAULTS["min_saturation"],
                   faint_saturation: float = DEFAULTS["faint_saturation"], min_contrast: int = DEFAULTS["min_contrast"],
                   **ink: Any) -> tuple[np.ndarray, np.ndarray]:
    """((h, w) bool tissue, (h, w) bool pen ink) of a thumbnail; `ink`: options of `ink_pixels`."""
    image = to_display(np.asarray(thumbnail))
    if image.ndim == 3 and image.shape[2] == 1:
        image = image[..., 0]
    rgb = image.ndim == 3 and image.shape[2] in (3, 4)
    if rgb:
        image = image[..., :3]
        _, sat, _ = hsv(image)
        ink_mask = ink_pixels(image, **ink)
    else:
        ink_mask = np.zeros(image.shape[:2], dtype=bool)
    grey = np.rint(image.mean(axis=2) if image.ndim == 3 else image).astype(np.uint8)
    rest = grey[~ink_mask]
    if rest.size == 0 or int(rest.max()) - int(rest.min()) < min_contrast:
        dark = np.ones(grey.shape, dtype=bool)  # one grey level: nothing for Otsu to split
    else:
        dark = grey <= otsu_threshold(rest)
    if not rgb:
        return dark, ink_mask
    return ((dark & (sat >= min_saturation)) | (sat >= faint_saturation)) & ~ink_mask, ink_mask


@dataclass
class TissueMask:
    """A (h, w) bool mask spanning a whole image of `image_size` (width, height) pixels.

    `min_fraction`: the tissue fraction a patch needs to be a candidate (`candidates`); `ink`: an
    (h, w) bool mask of pen ink (None: none known), of which a candidate holds at most
    `max_ink_fraction`.
    """

    mask: np.ndarray
    image_size: tuple[int, int]
    min_fraction: float = 0.5
    ink: np.ndarray | None = None
    max_ink_fraction: float = MAX_INK_FRACTION

    def __post_init__(self):
        self.mask = np.asarray(self.mask, dtype=bool)
        if self.mask.ndim != 2 or 0 in self.mask.shape:
            raise ValueError(f"a tissue mask must be a non-empty 2-D (h, w) array, got shape {self.mask.shape}")
        if self.ink is not None:
            self.ink = np.asarray(self.ink, dtype=bool)
            if self.ink.shape != self.mask.shape:
                raise ValueError(f"the ink mask's shape {self.ink.shape} differs from the tissue mask's "
                                 f"{self.mask.shape}")
            if not self.ink.any():
                self.ink = None
        self.image_size = (int(self.image_size[0]), int(self.image_size[1]))
        if min(self.image_size) <= 0:
            raise ValueError(f"image_size must be a positive (width, height), got {self.image_size}")
        if not 0.0 <= float(self.min_fraction) <= 1.0:
            raise ValueError(f"min_fraction={self.min_fraction!r} must be in [0, 1] (e.g. data.min_tissue_fraction)")
        self._integral: dict[str, np.ndarray] = {}  # summed-area tables of the tissue and ink masks

    @property
    def downsample(self) -> tuple[float, float]:
        """Image pixels per mask pixel, (x, y)."""
        return self.image_size[0] / self.mask.shape[1], self.image_size[1] / self.mask.shape[0]

    @property
    def tissue_share(self) -> float:
        return float(self.mask.mean())

    def fractions(self, corners_xy: np.ndarray, patch_size: int | tuple[int, int]) -> np.ndarray:
        """(n, 2) (x, y) top-left corners in image pixels -> (n,) float64 tissue fraction of each patch.

        Exact area fractions of the piecewise-constant mask (a bilinear read of its summed-area
        table); parts of a patch outside the image count as no tissue.
        """
        return self._fractions("tissue", self.mask, corners_xy, patch_size)

    def ink_fractions(self, corners_xy: np.ndarray, patch_size: int | tuple[int, int]) -> np.ndarray:
        """(n,) float64 share of each patch covered by pen ink (zeros without an ink mask)."""
        if self.ink is None:
            return np.zeros(len(np.asarray(corners_xy).reshape(-1, 2)))
        return self._fractions("ink", self.ink, corners_xy, patch_size)

    def candidates(self, corners_xy: np.ndarray, patch_size: int | tuple[int, int]) -> np.ndarray:
        """(n,) bool: patches with some tissue, a fraction >= `min_fraction`, ink <= `max_ink_fraction`."""
        f = self.fractions(corners_xy, patch_size)
        keep = (f > 0) & (f >= self.min_fraction)
        if self.ink is not None:
            keep &= self.ink_fractions(corners_xy, patch_size) <= self.max_ink_fraction
        return keep

    def _fractions(self, name: str, mask: np.ndarray, corners_xy: np.ndarray,
                   patch_size: int | tuple[int, int]) -> np.ndarray:
        corners = np.asarray(corners_xy, dtype=np.float64).reshape(-1, 2)
        pw, ph = (patch_size, patch_size) if np.isscalar(patch_size) else patch_size
        if pw <= 0 or ph <= 0:
            raise ValueError(f"patch_size must be positive, got {patch_size!r}")
        if name not in self._integral:
            table = np.zeros((mask.shape[0] + 1, mask.shape[1] + 1), dtype=np.float64)
            table[1:, 1:] = mask.cumsum(axis=0, dtype=np.float64).cumsum(axis=1)
            self._integral[name] = table
        s = self._integral[name]
        dx, dy = self.downsample
        h, w = mask.shape
        x0 = np.clip(corners[:, 0] / dx, 0, w)
        x1 = np.clip((corners[:, 0] + pw) / dx, 0, w)
        y0 = np.clip(corners[:, 1] / dy, 0, h)
        y1 = np.clip((corners[:, 1] + ph) / dy, 0, h)
        inside = _area(s, x1, y1) - _area(s, x0, y1) - _area(s, x1, y0) + _area(s, x0, y0)
        return np.clip(inside / ((pw / dx) * (ph / dy)), 0.0, 1.0)

    # ---- cache -----------------------------------------------------------------------------
    def save(self, path: str | os.PathLike, *, key: str = "") -> Path:
        """Write an .npz (atomically: a reader never sees half a file); `key` says what it was made from."""
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
        with open(tmp, "wb") as f:
            np.savez_compressed(f, mask=self.mask, image_size=np.asarray(self.image_size, np.int64),
                                key=np.asarray(key), ink=np.zeros((0, 0), bool) if self.ink is None else self.ink)
        os.replace(tmp, path)
        return path

    @classmethod
    def load(cls, path: str | os.PathLike, *, min_fraction: float = 0.5, key: str | None = None) -> "TissueMask | None":
        """The mask saved at `path`, or None when absent, unreadable or made from something else than `key`."""
        try:
            with np.load(path, allow_pickle=False) as data:
                if key is not None and str(data["key"]) != key:
                    return None
                ink = data["ink"] if "ink" in data.files and data["ink"].size else None
                return cls(data["mask"], tuple(int(v) for v in data["image_size"]), min_fraction, ink=ink)
        except (OSError, KeyError, ValueError) as e:
            if Path(path).exists():
                logger.warning("tissue mask cache %s is unreadable (%s); computing it again", path, e)
            return None

    # ---- QC picture ------------------------------------------------------------------------
    def outline(self) -> np.ndarray:
        """(h, w) bool: mask pixels with a non-mask 4-neighbour (or on the border)."""
        m = np.pad(self.mask, 1, constant_values=False)
        inner = m[1:-1, 1:-1] & m[:-2, 1:-1] & m[2:, 1:-1] & m[1:-1, :-2] & m[1:-1, 2:]
        return self.mask & ~inner

    def save_picture(self, thumbnail: np.ndarray, path: str | os.PathLike, *, title: str = "") -> Path:
        """The thumbnail with the glass dimmed and the mask outlined in green, as a PNG."""
        from PIL import Image, ImageDraw

        image = to_display(np.asarray(thumbnail))
        if image.ndim == 2 or image.shape[2] != 3:
            grey = image if image.ndim == 2 else image.mean(axis=2)
            image = np.repeat(np.asarray(grey, np.uint8)[..., None], 3, axis=2)
        mask = _resize_nearest(self.mask, image.shape[:2])
        out = image.astype(np.float32)
        out[~mask] = out[~mask] * 0.45 + 255 * 0.2  # glass / ink dimmed
        edge = _resize_nearest(self.outline(), image.shape[:2])
        out[edge] = (0, 200, 0)
        picture = Image.fromarray(out.clip(0, 255).astype(np.uint8))
        if title:
            ImageDraw.Draw(picture).text((4, 4), title, fill=(200, 0, 0))
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        picture.save(path)
        return path


def _area(s: np.ndarray, x: np.ndarray, y: np.ndarray) -> np.ndarray:
    """Mask area in [0, x) x [0, y) (mask pixels, continuous): bilinear in the summed-area table `s`."""
    i = np.minimum(np.floor(x).astype(np.int64), s.shape[1] - 2)
    j = np.minimum(np.floor(y).astype(np.int64), s.shape[0] - 2)
    a, b = x - i, y - j
    return (s[j, i] * (1 - a) * (1 - b) + s[j, i + 1] * a * (1 - b) + s[j + 1, i] * (1 - a) * b
            + s[j + 1, i + 1] * a * b)


def _resize_nearest(mask: np.ndarray, hw: tuple[int, int]) -> np.ndarray:
    rows = np.minimum((np.arange(hw[0]) * mask.shape[0]) // hw[0], mask.shape[0] - 1)
    cols = np.minimum((np.arange(hw[1]) * mask.shape[1]) // hw[1], mask.shape[1] - 1)
    return mask[rows[:, None], cols[None, :]]


def compute_tissue_mask(source: Any, *, max_size: int = 1024, min_fraction: float = 0.5,
                        thumbnail: np.ndarray | None = None, **options: Any) -> TissueMask:
    """The TissueMask of an ImageSource (its thumbnail, longer side `max_size`); options: `tissue_pixels`."""
    thumb = source.thumbnail(max_size) if thumbnail is None else thumbnail
    mask, ink = tissue_and_ink(thumb, **options)
    if not mask.any():
        logger.warning("%r: no tissue found in its thumbnail (%dx%d); every patch stays a candidate", source,
                       mask.shape[1], mask.shape[0])
        mask = np.ones_like(mask)
    return TissueMask(mask, tuple(source.dimensions), min_fraction, ink=ink)

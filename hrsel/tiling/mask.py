"""Foreground (tissue) masks from a thumbnail with Otsu's threshold."""
from __future__ import annotations

import logging
from typing import Any

import numpy as np

logger = logging.getLogger(__name__)


def otsu_threshold(values: np.ndarray) -> int:
    """The uint8 level t maximising the between-class variance of {v <= t} vs {v > t}."""
    hist = np.bincount(np.asarray(values, dtype=np.uint8).reshape(-1), minlength=256).astype(np.float64)
    total = hist.sum()
    if total == 0:
        raise ValueError("otsu_threshold needs at least one value")
    levels = np.arange(256, dtype=np.float64)
    weight0 = np.cumsum(hist)  # pixels <= t
    weight1 = total - weight0
    mean0_sum = np.cumsum(hist * levels)
    mean0 = mean0_sum / np.maximum(weight0, 1)
    mean1 = (mean0_sum[-1] - mean0_sum) / np.maximum(weight1, 1)
    between = weight0 * weight1 * (mean0 - mean1) ** 2
    return int(np.argmax(between))


def foreground_mask(thumbnail: np.ndarray, *, foreground: str = "dark", min_contrast: int = 8) -> np.ndarray:
    """(h, w) bool: pixels on the `foreground` side ('dark' or 'bright') of Otsu's threshold.

    A thumbnail with less than `min_contrast` grey levels of spread has no
    separable background, so everything is kept.
    """
    if foreground not in ("dark", "bright"):
        raise ValueError(f"foreground={foreground!r}; use 'dark' (tissue on white) or 'bright'")
    if thumbnail.dtype != np.uint8:  # uint16 / float bands: stretched to 0..255 (hrsel.io.pixels.to_display)
        from hrsel.io.pixels import to_display

        thumbnail = to_display(thumbnail if thumbnail.ndim == 3 else thumbnail[:, :, None])
    gray = thumbnail.mean(axis=2) if thumbnail.ndim == 3 else thumbnail.astype(np.float64)
    gray = np.rint(gray).astype(np.uint8)
    if int(gray.max()) - int(gray.min()) < min_contrast:
        logger.warning("thumbnail has no contrast (grey %d..%d); keeping every patch", gray.min(), gray.max())
        return np.ones(gray.shape, dtype=bool)
    threshold = otsu_threshold(gray)
    return gray <= threshold if foreground == "dark" else gray > threshold


def tissue_mask(source: Any, *, max_size: int = 1024, foreground: str = "dark") -> np.ndarray:
    """Otsu foreground mask of a source's thumbnail; it spans the whole level-0 image."""
    return foreground_mask(source.thumbnail(max_size), foreground=foreground)

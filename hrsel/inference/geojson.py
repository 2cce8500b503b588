"""Scored patches as a GeoJSON FeatureCollection that QuPath imports (File > Import objects).

    write_geojson("slide.geojson", coords=xy, patch_size=256, scores=s, selected=idx, image_wh=(w, h))

One Polygon feature per scored patch, in level-0 pixel coordinates (origin top-left, as QuPath's
ROIs): properties `objectType` ("tile" by default; "annotation" or "detection" also import),
`classification` {"name": "selected" | "scored", "color": [r, g, b]} and `measurements`
{"score": s, "rank": r} (rank 1 = highest score; the dict form of QuPath 0.4 and later).
Patches without a score (NaN: masked out, padding) are left out, and so are those where `keep`
(N,) is false (`hrsel.predict` keeps the patches that carry information, `informative.py`). A pure
function of the patch corners, size, scores and selected indices: no pixels are read.
"""
from __future__ import annotations

import json
import logging
import math
from pathlib import Path
from typing import Any, Iterator, Sequence

import numpy as np

SELECTED_COLOR = (0, 229, 255)  # the outline colour of the heatmap pictures
SCORED_COLOR = (160, 160, 160)
OBJECT_TYPES = ("tile", "annotation", "detection")

log = logging.getLogger(__name__)


def score_ranks(scores: np.ndarray) -> np.ndarray:
    """(N,) scores -> (N,) int ranks, 1 = highest; ties in raster order; 0 where the score is NaN."""
    scores = np.asarray(scores, dtype=np.float64).reshape(-1)
    finite = np.isfinite(scores)
    order = np.argsort(np.where(finite, -scores, np.inf), kind="stable")
    ranks = np.zeros(len(scores), dtype=np.int64)
    ranks[order] = np.arange(1, len(scores) + 1)
    ranks[~finite] = 0
    return ranks


def patch_polygon(x: float, y: float, width: float, height: float,
                  image_wh: tuple[int, int] | None = None) -> list[list[float]] | None:
    """The closed ring of a patch's rectangle (clipped to the image when `image_wh` is given); None if empty."""
    x0, y0, x1, y1 = float(x), float(y), float(x) + float(width), float(y) + float(height)
    if image_wh is not None:
        w, h = image_wh
        x0, y0, x1, y1 = max(x0, 0.0), max(y0, 0.0), min(x1, float(w)), min(y1, float(h))
    if x1 <= x0 or y1 <= y0:
        return None
    return [[x0, y0], [x1, y0], [x1, y1], [x0, y1], [x0, y0]]


def patch_features(coords: np.ndarray, patch_size: float | Sequence[float], scores: np.ndarray,
                   selected: Sequence[int] | np.ndarray = (), *, image_wh: tuple[int, int] | None = None,
                   object_type: str = "tile", keep: np.ndarray | None = None) -> dict[str, Any]:
    """A GeoJSON FeatureCollection of the N patches with top-left `coords` (N, 2) as level-0 (x, y).

    `patch_size`: level-0 pixels (one number, or (width, height)); `scores` (N,) (NaN = not
    scored, left out); `selected`: patch indices the model selected (-1 = none, ignored).
    """
    return {"type": "FeatureCollection", "features": list(iter_features(
        coords, patch_size, scores, selected, image_wh=image_wh, object_type=object_type, keep=keep))}


def iter_features(coords: np.ndarray, patch_size: float | Sequence[float], scores: np.ndarray,
                  selected: Sequence[int] | np.ndarray = (), *, image_wh: tuple[int, int] | None = None,
                  object_type: str = "tile", keep: np.ndarray | None = None) -> Iterator[dict[str, Any]]:
    """The features of `patch_features`, one at a time (a 20000^2 image has 160000 of them); only the
    patches where `keep` (N,) bool is true, when given."""
    if object_type not in OBJECT_TYPES:
        raise ValueError(f"object_type={object_type!r}; valid: {', '.join(OBJECT_TYPES)}")
    coords = np.asarray(coords, dtype=np.float64).reshape(-1, 2)
    scores = np.asarray(scores, dtype=np.float64).reshape(-1)
    if len(coords) != len(scores):
        raise ValueError(f"coords {coords.shape} and scores {scores.shape} must describe the same N patches")
    width, height = (patch_size, patch_size) if np.isscalar(patch_size) else patch_size
    chosen = {int(i) for i in np.asarray(selected, dtype=np.int64).reshape(-1) if 0 <= i < len(scores)}
    ranks = score_ranks(scores)
    if keep is not None and len(keep) != len(scores):
        raise ValueError(f"keep {np.shape(keep)} must have one flag per patch, {len(scores)}")
    for i in range(len(scores)) if keep is None else np.flatnonzero(keep).tolist():
        (x, y), score = coords[i], scores[i]
        ring = patch_polygon(x, y, width, height, image_wh)
        if ring is None or not (math.isfinite(score) or i in chosen):
            continue
        name, color = ("selected", SELECTED_COLOR) if i in chosen else ("scored", SCORED_COLOR)
        measurements = {"score": float(score), "rank": int(ranks[i])} if math.isfinite(score) else {}
        measurements["patch index"] = i
        yield {"type": "Feature", "geometry": {"type": "Polygon", "coordinates": [ring]},
               "properties": {"objectType": object_type, "name": f"patch {i}",
                              "classification": {"name": name, "color": list(color)},
                              "measurements": measurements}}


def write_geojson(path: str | Path, coords: np.ndarray, patch_size: float | Sequence[float], scores: np.ndarray,
                  selected: Sequence[int] | np.ndarray = (), *, image_wh: tuple[int, int] | None = None,
                  object_type: str = "tile", keep: np.ndarray | None = None) -> Path:
    """Write `patch_features(...)` to `path` (UTF-8 JSON, the bytes of `json.dumps` of it) and return the path.

    Features are serialised one at a time, so memory does not grow with the number of patches.
    `keep` (N,) bool: write only those patches. Logs the number of features and the file size."""
    features = iter_features(coords, patch_size, scores, selected, image_wh=image_wh, object_type=object_type,
                             keep=keep)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    count = 0
    with open(path, "w", encoding="utf-8") as f:
        f.write('{"type": "FeatureCollection", "features": [')
        for count, feature in enumerate(features, start=1):
            f.write((", " if count > 1 else "") + json.dumps(feature, allow_nan=False))
        f.write("]}")
    log.info("%s: %s features, %s", path, f"{count:,}", file_size(path.stat().st_size))
    return path


def file_size(num_bytes: float) -> str:
    """'812 B', '3.4 kB', '194.2 MB': a size for a log line."""
    if num_bytes < 1000:
        return f"{num_bytes:.0f} B"
    for unit in ("kB", "MB", "GB"):
        num_bytes /= 1000
        if num_bytes < 1000 or unit == "GB":
            break
    return f"{num_bytes:.1f} {unit}"

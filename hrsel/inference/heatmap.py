"""The prediction picture of one image: thumbnail, score overlay, selected patches, top-K gallery.

    save_heatmap_picture("slide_heatmap.png", source, coords=xy, patch_size=(256, 256), scores=s,
                         selected=idx, title="tumor: positive (p=0.93)", color_scale="auto")

Top: the part of the image that holds the patches worth showing (`show`, default: those with a
score, i.e. on tissue, and the selected ones; `hrsel.predict` also leaves out blank ones), with a
margin, read at the resolution the picture needs (a speck of tissue on a 60000^2 slide fills the
picture); the patch scores over it (alpha, so the image stays visible) coloured by
`hrsel.engine.colorscale` (`color_scale`: 0 to 1 by default for probabilities and attention,
the actual range in the colour bar), a scale bar (micrometres when the source knows its mpp,
else pixels) and the selected patches outlined and numbered by rank (1 = highest score).
Bottom: the selected patches at full resolution, read from the source one by one (K reads, never
the whole image), stretched per band as the overview is (uint16 and multispectral images; more
than three bands: the first three as R, G, B, said under the title). Without a source (a feature
bag whose slide is not at hand) the overlay is drawn on grey. The score raster, thumbnail,
crop and layout come from `hrsel.engine.visualize`.
"""
from __future__ import annotations

import math
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from hrsel.engine.visualize import (MAX_SIDE, PatchLayout, band_note, crop_box, display_pixels, draw_scale_bar,
                                    draw_scores)
from hrsel.inference.geojson import SELECTED_COLOR

GALLERY_MAX = 8


def selected_by_rank(scores: np.ndarray, selected: Sequence[int] | np.ndarray) -> list[int]:
    """The valid selected indices, highest score first (NaN scores last, then raster order)."""
    scores = np.asarray(scores, dtype=np.float64).reshape(-1)
    chosen = sorted({int(i) for i in np.asarray(selected, dtype=np.int64).reshape(-1) if 0 <= i < len(scores)})
    return sorted(chosen, key=lambda i: (-scores[i] if math.isfinite(scores[i]) else math.inf, i))


def _color(rgb: tuple[int, int, int]) -> tuple[float, ...]:
    return tuple(c / 255 for c in rgb)


def _read_patch(source: Any, x: float, y: float, width: float, height: float) -> np.ndarray:
    return np.asarray(source.read_region(int(round(x)), int(round(y)), int(round(width)), int(round(height))))


def save_heatmap_picture(path: str | Path, source: Any | None, *, image_wh: tuple[int, int], coords: np.ndarray,
                         patch_size: float | Sequence[float], scores: np.ndarray,
                         selected: Sequence[int] | np.ndarray = (), title: str = "",
                         gallery: int = GALLERY_MAX, color_scale: str = "auto", show: np.ndarray | None = None) -> Path:
    """Write the PNG described in the module docstring and return its path."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure
    from matplotlib.patches import Rectangle

    w, h = image_wh
    pw, ph = (float(patch_size),) * 2 if np.isscalar(patch_size) else tuple(float(v) for v in patch_size)
    layout = PatchLayout(coords=np.asarray(coords, dtype=np.float64).reshape(-1, 2), width=pw, height=ph)
    scores = np.asarray(scores, dtype=np.float64).reshape(-1)
    ranked = selected_by_rank(scores, selected)
    if show is None:
        show = np.isfinite(scores)
        show[ranked] = True
    box = crop_box(layout, show, (h, w))
    x0, y0, x1, y1 = box
    shown = ranked[:gallery] if source is not None else []
    note = band_note(int(source.channels)) if source is not None else ""
    title = f"{title}\n{note}" if note else title
    cols = max(1, len(shown))
    main_h = 7 * (y1 - y0) / (x1 - x0)
    fig = Figure(figsize=(7.5, main_h + (7 / max(cols, 4) + 0.5 if shown else 0) + 0.3 * (title.count("\n") + 1)),
                 dpi=110)
    FigureCanvasAgg(fig)
    grid = fig.add_gridspec(2 if shown else 1, max(cols, 4), height_ratios=[main_h, 7 / max(cols, 4)] if shown else None)
    ax = fig.add_subplot(grid[0, :])
    limits = None
    if source is not None:
        whole = box == (0.0, 0.0, float(w), float(h))
        picture, limits = display_pixels(np.asarray(source.thumbnail(MAX_SIDE, box=None if whole else box)))
        ax.imshow(picture, extent=(x0, x1, y1, y0), interpolation="nearest")
    else:
        ax.add_patch(Rectangle((0, 0), w, h, color="0.85"))
    if np.isfinite(scores).any():
        draw_scores(fig, ax, layout, scores, (h, w), box=box, scale=color_scale, alpha=0.5)
    outline = _color(SELECTED_COLOR)
    for rank, i in enumerate(ranked, start=1):
        x, y = layout.coords[i]
        if x >= x1 or y >= y1 or x + pw <= x0 or y + ph <= y0:
            continue
        ax.add_patch(Rectangle((x, y), pw, ph, fill=False, edgecolor=outline, linewidth=1.5))
        ax.text(x + pw * 0.04, y + ph * 0.04, str(rank), color="black", fontsize=7, va="top", ha="left",
                bbox={"boxstyle": "square,pad=0.1", "facecolor": outline, "edgecolor": "none"})
    draw_scale_bar(ax, x1 - x0, getattr(source, "mpp", None) if source is not None else None)
    ax.set_xlim(x0, x1)
    ax.set_ylim(y1, y0)
    ax.set_axis_off()
    ax.set_title(title, fontsize=9)
    for column, i in enumerate(shown):
        x, y = layout.coords[i]
        patch_ax = fig.add_subplot(grid[1, column])
        pixels, _ = display_pixels(_read_patch(source, x, y, pw, ph), limits)
        patch_ax.imshow(pixels, interpolation="nearest")
        patch_ax.set_title(f"#{column + 1} {scores[i]:.3g}", fontsize=7)
        patch_ax.set_axis_off()
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)
    return path

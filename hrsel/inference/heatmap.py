"""The prediction picture of one image: thumbnail, score overlay, selected patches, top-K gallery.

    save_heatmap_picture("slide_heatmap.png", source, coords=xy, patch_size=(256, 256), scores=s,
                         selected=idx, title="tumor: positive (p=0.93)")

Top: the thumbnail with the patch scores over it (alpha, so the image stays visible), a colour
bar with the score range, a scale bar (micrometres when the source knows its mpp, else level-0
pixels) and the selected patches outlined and numbered by rank (1 = highest score). Bottom:
the selected patches at full resolution, read from the source one by one (K reads, never the
whole image). Without a source (a feature bag whose slide is not at hand) the overlay is drawn
on grey. The score raster, thumbnail and layout come from `hrsel.engine.visualize`.
"""
from __future__ import annotations

import math
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from hrsel.engine.visualize import PatchLayout, display_array, score_heatmap
from hrsel.inference.geojson import SELECTED_COLOR

GALLERY_MAX = 8
NICE_STEPS = (1, 2, 5)


def selected_by_rank(scores: np.ndarray, selected: Sequence[int] | np.ndarray) -> list[int]:
    """The valid selected indices, highest score first (NaN scores last, then raster order)."""
    scores = np.asarray(scores, dtype=np.float64).reshape(-1)
    chosen = sorted({int(i) for i in np.asarray(selected, dtype=np.int64).reshape(-1) if 0 <= i < len(scores)})
    return sorted(chosen, key=lambda i: (-scores[i] if math.isfinite(scores[i]) else math.inf, i))


def nice_length(target: float) -> float:
    """The 1-2-5 number closest below `target` (> 0): a scale bar's length."""
    if target <= 0:
        return 1.0
    exponent = math.floor(math.log10(target))
    return max(step * 10 ** exponent for step in NICE_STEPS if step * 10 ** exponent <= target)


def _color(rgb: tuple[int, int, int]) -> tuple[float, ...]:
    return tuple(c / 255 for c in rgb)


def _draw_scale_bar(ax: Any, width_px: int, mpp: float | None) -> None:
    from mpl_toolkits.axes_grid1.anchored_artists import AnchoredSizeBar

    unit_per_px = mpp if mpp else 1.0
    length = nice_length(width_px * unit_per_px / 5)  # in units
    label = f"{length:g} µm" if mpp else f"{length:g} px"
    bar = AnchoredSizeBar(ax.transData, length / unit_per_px, label, "lower left", pad=0.4, color="white",
                          frameon=True, size_vertical=max(1.0, width_px / 200), fontproperties={"size": 8})
    bar.patch.set_facecolor((0, 0, 0, 0.55))
    bar.patch.set_edgecolor("none")
    ax.add_artist(bar)


def _read_patch(source: Any, x: float, y: float, width: float, height: float) -> np.ndarray:
    pixels = np.asarray(source.read_region(int(round(x)), int(round(y)), int(round(width)), int(round(height))))
    if pixels.ndim == 3 and pixels.shape[-1] == 1:
        return pixels[..., 0]
    return pixels[..., :3]


def save_heatmap_picture(path: str | Path, source: Any | None, *, image_wh: tuple[int, int], coords: np.ndarray,
                         patch_size: float | Sequence[float], scores: np.ndarray,
                         selected: Sequence[int] | np.ndarray = (), title: str = "",
                         gallery: int = GALLERY_MAX) -> Path:
    """Write the PNG described in the module docstring and return its path."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure
    from matplotlib.patches import Rectangle

    w, h = image_wh
    pw, ph = (float(patch_size),) * 2 if np.isscalar(patch_size) else tuple(float(v) for v in patch_size)
    layout = PatchLayout(coords=np.asarray(coords, dtype=np.float64).reshape(-1, 2), width=pw, height=ph)
    scores = np.asarray(scores, dtype=np.float64).reshape(-1)
    ranked = selected_by_rank(scores, selected)
    shown = ranked[:gallery] if source is not None else []
    cols = max(1, len(shown))
    main_h = 7 * h / w
    fig = Figure(figsize=(7.5, main_h + (7 / max(cols, 4) + 0.5 if shown else 0) + 0.3 * (title.count("\n") + 1)),
                 dpi=110)
    FigureCanvasAgg(fig)
    grid = fig.add_gridspec(2 if shown else 1, max(cols, 4), height_ratios=[main_h, 7 / max(cols, 4)] if shown else None)
    ax = fig.add_subplot(grid[0, :])
    if source is not None:
        ax.imshow(display_array(source), extent=(0, w, h, 0), interpolation="nearest")
    else:
        ax.add_patch(Rectangle((0, 0), w, h, color="0.85"))
    if np.isfinite(scores).any():
        heat = score_heatmap(layout, scores, (h, w))
        low, high = float(np.nanmin(scores)), float(np.nanmax(scores))
        overlay = ax.imshow(heat, extent=(0, w, h, 0), cmap="inferno", alpha=0.5, interpolation="nearest",
                            vmin=low, vmax=high if high > low else low + 1e-9)
        fig.colorbar(overlay, ax=ax, fraction=0.04, pad=0.02, label=f"patch score ({low:.3g} to {high:.3g})")
    outline = _color(SELECTED_COLOR)
    for rank, i in enumerate(ranked, start=1):
        x, y = layout.coords[i]
        ax.add_patch(Rectangle((x, y), pw, ph, fill=False, edgecolor=outline, linewidth=1.5))
        ax.text(x + pw * 0.04, y + ph * 0.04, str(rank), color="black", fontsize=7, va="top", ha="left",
                bbox={"boxstyle": "square,pad=0.1", "facecolor": outline, "edgecolor": "none"})
    _draw_scale_bar(ax, w, getattr(source, "mpp", None) if source is not None else None)
    ax.set_xlim(0, w)
    ax.set_ylim(h, 0)
    ax.set_axis_off()
    ax.set_title(title, fontsize=9)
    for column, i in enumerate(shown):
        x, y = layout.coords[i]
        patch_ax = fig.add_subplot(grid[1, column])
        pixels = _read_patch(source, x, y, pw, ph)
        patch_ax.imshow(pixels, cmap="gray" if pixels.ndim == 2 else None, interpolation="nearest")
        patch_ax.set_title(f"#{column + 1} {scores[i]:.3g}", fontsize=7)
        patch_ax.set_axis_off()
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)
    return path

"""Pictures of what a pipeline looked at: image + score heatmap + selected patches.

    save_selection_picture(path, image, layout=layout, scores=s, indices=idx, title="pred 3 | truth 3")

Drawn with matplotlib's Agg canvas (no display, no pyplot state). The image may
be a (C, H, W) tensor or a lazy `ImageSource` (its thumbnail is drawn). The picture shows the
part of the image holding the scored and selected patches (`crop_box`: patches off tissue have
no score), with a margin; colours follow `hrsel.engine.colorscale` (0 to 1 by default for
probabilities and attention, the actual range in the colour bar); a scale bar is in micrometres
when the image knows its microns per pixel. Images of other than three bands are shown as grey
(one band) or as an RGB composite of their first three bands, each stretched between its 1st and
99th percentiles when not 8-bit.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from hrsel.engine.colorscale import score_colors
from hrsel.io.pixels import band_limits, stretch, to_display

MAX_SIDE = 768  # pixels of the drawn image
CROP_MARGIN = 0.1  # of the cropped box's longer side, at least one patch
CROP_MIN_GAIN = 0.8  # crop only when the box is at most this share of the image's width or height
NICE_STEPS = (1, 2, 5)


@dataclass(frozen=True)
class PatchLayout:
    """Where the N patches of a grid lie: level-0 top-left corners (N, 2) as (x, y) and their size."""

    coords: np.ndarray  # (N, 2) int64, raster order
    width: float
    height: float


def _grid_shape(num_patches: int, image_hw: tuple[int, int]) -> tuple[int, int]:
    """The rows x cols factorisation of N closest to the image's aspect ratio."""
    h, w = image_hw
    pairs = [(r, num_patches // r) for r in range(1, num_patches + 1) if num_patches % r == 0]
    return min(pairs, key=lambda rc: abs(math.log(rc[0] / rc[1]) - math.log(h / w)))


def infer_layout(num_patches: int, image_hw: tuple[int, int]) -> PatchLayout:
    """A rows x cols grid of equal cells covering the image (the last resort of `layout_for`)."""
    h, w = image_hw
    rows, cols = _grid_shape(num_patches, image_hw)
    ch, cw = h / rows, w / cols
    ys, xs = np.meshgrid(np.arange(rows), np.arange(cols), indexing="ij")
    coords = np.stack([xs.ravel() * cw, ys.ravel() * ch], axis=1)  # (N, 2) raster order
    return PatchLayout(coords=coords, width=cw, height=ch)


def layout_for(pipeline: Any, image: Any, num_patches: int) -> PatchLayout:
    """Where the N patches a pipeline scored lie in `image`.

    In order: the pipeline's `patch_layout(image) -> (coords (N, 2) as (x, y), size)`; its
    regular grid (`patch_size`, `stride` attributes: IPS, DPS with candidates, PatchDrop);
    patches of `patch_size` centred on a rows x cols score grid (DPS, ATS); equal cells.
    """
    describe = getattr(pipeline, "patch_layout", None)
    if callable(describe):
        coords, size = describe(image)
        size_w, size_h = (size, size) if np.isscalar(size) else size
        return PatchLayout(coords=np.asarray(coords, dtype=np.float64), width=float(size_w), height=float(size_h))
    hw = image_size_hw(image)
    patch = getattr(pipeline, "patch_size", None)
    if isinstance(patch, int):
        from hrsel.select.extract import GridGeometry

        try:
            geometry = GridGeometry.regular(hw, patch_size=patch, stride=getattr(pipeline, "stride", None))
            if geometry.num_patches != num_patches:
                geometry = GridGeometry.centred(hw, _grid_shape(num_patches, hw), patch_size=patch)
        except ValueError:
            return infer_layout(num_patches, hw)
        yx = geometry.top_left(torch.arange(num_patches)).numpy()  # (N, 2) as (y, x)
        return PatchLayout(coords=yx[:, ::-1].astype(np.float64), width=float(patch), height=float(patch))
    return infer_layout(num_patches, hw)


def image_size_hw(image: Any) -> tuple[int, int]:
    if isinstance(image, torch.Tensor):
        return int(image.shape[-2]), int(image.shape[-1])
    w, h = image.dimensions
    return int(h), int(w)


def display_array(image: Any, box: tuple[float, float, float, float] | None = None) -> np.ndarray:
    """(h, w, 3) uint8 for drawing `box` (level-0 x0, y0, x1, y1; default all) of a (C, H, W) tensor
    (strided) or a source (its thumbnail of that box)."""
    if isinstance(image, torch.Tensor):
        if box is not None:
            x0, y0, x1, y1 = (int(round(v)) for v in box)
            image = image[..., max(y0, 0):max(y1, y0 + 1), max(x0, 0):max(x1, x0 + 1)]
        step = max(1, math.ceil(max(image.shape[-2:]) / MAX_SIDE))
        arr = image[..., ::step, ::step].detach().cpu()
        if arr.dtype.is_floating_point:
            arr = (arr.clamp(0, 1) * 255).round()
        if arr.dtype not in (torch.uint8, torch.float32, torch.float64, torch.float16, torch.bfloat16):
            arr = to_display(arr.float().permute(1, 2, 0).numpy())  # uint16 bands: stretched as a thumbnail
        else:
            arr = arr.to(torch.uint8).permute(1, 2, 0).numpy()  # (C, h, w) -> (h, w, C)
        return as_rgb(arr)
    return display_pixels(np.asarray(image.thumbnail(MAX_SIDE, box=box)))[0]


def display_pixels(pixels: np.ndarray, limits: tuple[np.ndarray, np.ndarray] | None = None
                   ) -> tuple[np.ndarray, tuple[np.ndarray, np.ndarray] | None]:
    """(h, w, C) pixels of a source -> ((h, w, 3) uint8, the per-band stretch used or None for uint8).

    Not 8-bit: each band stretched between `limits` (default its own 1st and 99th percentiles), so
    patches drawn with the limits of the overview look as they do in it."""
    if pixels.ndim == 2:
        pixels = pixels[..., None]
    if pixels.dtype == np.uint8:
        return as_rgb(pixels), None
    limits = band_limits(pixels) if limits is None else limits
    return as_rgb(stretch(pixels, *limits)), limits


def as_rgb(pixels: np.ndarray) -> np.ndarray:
    """(h, w, C) uint8 -> (h, w, 3): one band as grey, more than three: the first three as R, G, B."""
    if pixels.ndim == 2:
        pixels = pixels[..., None]
    if pixels.shape[-1] < 3:
        pixels = np.repeat(pixels[..., :1], 3, axis=-1)
    return np.ascontiguousarray(pixels[..., :3])


def band_note(channels: int) -> str:
    """What the picture's colours are, for images that are not plain grey or RGB ("" otherwise)."""
    if channels in (1, 3):
        return ""
    if channels == 2:
        return "band 1 of 2 as grey"
    return f"bands 1, 2, 3 of {channels} as R, G, B"


def crop_box(layout: PatchLayout, keep: np.ndarray, image_hw: tuple[int, int]) -> tuple[float, float, float, float]:
    """(x0, y0, x1, y1): the bounding box of the patches where `keep` (N,) is true, with a margin
    (`CROP_MARGIN`), inside the image; the whole image when nothing is kept or the box is nearly as large."""
    h, w = image_hw
    whole = (0.0, 0.0, float(w), float(h))
    keep = np.asarray(keep, dtype=bool).reshape(-1)[: len(layout.coords)]
    if not keep.any():
        return whole
    corners = layout.coords[np.flatnonzero(keep)]
    x0, y0 = corners.min(axis=0)
    x1, y1 = corners.max(axis=0) + (layout.width, layout.height)
    margin = max(CROP_MARGIN * max(x1 - x0, y1 - y0), layout.width, layout.height)
    box = (max(0.0, x0 - margin), max(0.0, y0 - margin), min(float(w), x1 + margin), min(float(h), y1 + margin))
    if box[2] - box[0] > CROP_MIN_GAIN * w and box[3] - box[1] > CROP_MIN_GAIN * h:
        return whole
    return tuple(float(v) for v in box)


def nice_length(target: float) -> float:
    """The 1-2-5 number closest below `target` (> 0): a scale bar's length."""
    if target <= 0:
        return 1.0
    exponent = math.floor(math.log10(target))
    return max(step * 10 ** exponent for step in NICE_STEPS if step * 10 ** exponent <= target)


def draw_scale_bar(ax: Any, width_px: float, mpp: float | None) -> None:
    """A bar of a round length in the lower left: micrometres when `mpp` is known, else pixels."""
    from mpl_toolkits.axes_grid1.anchored_artists import AnchoredSizeBar

    unit_per_px = mpp if mpp else 1.0
    length = nice_length(width_px * unit_per_px / 5)  # in units
    label = f"{length:g} µm" if mpp else f"{length:g} px"
    bar = AnchoredSizeBar(ax.transData, length / unit_per_px, label, "lower left", pad=0.4, color="white",
                          frameon=True, size_vertical=max(1.0, width_px / 200), fontproperties={"size": 8})
    bar.patch.set_facecolor((0, 0, 0, 0.55))
    bar.patch.set_edgecolor("none")
    ax.add_artist(bar)


def score_heatmap(layout: PatchLayout, scores: np.ndarray, image_hw: tuple[int, int], side: int = 256, *,
                  box: tuple[float, float, float, float] | None = None) -> np.ndarray:
    """Mean score of the patches covering each cell of a (<= side)-pixel raster of `box` (level-0
    x0, y0, x1, y1; default the whole image); NaN where no patch with a score lies."""
    h, w = image_hw
    bx0, by0, bx1, by1 = box or (0.0, 0.0, float(w), float(h))
    f = max(bx1 - bx0, by1 - by0) / side
    rows, cols = max(1, round((by1 - by0) / f)), max(1, round((bx1 - bx0) / f))
    total = np.zeros((rows, cols))
    count = np.zeros((rows, cols))
    for (x, y), s in zip(layout.coords, scores):
        if not math.isfinite(s) or x >= bx1 or y >= by1 or x + layout.width <= bx0 or y + layout.height <= by0:
            continue
        r0, c0 = max(0, int((y - by0) / f)), max(0, int((x - bx0) / f))
        r1 = max(r0 + 1, int(math.ceil((y + layout.height - by0) / f)))
        c1 = max(c0 + 1, int(math.ceil((x + layout.width - bx0) / f)))
        total[r0:r1, c0:c1] += s
        count[r0:r1, c0:c1] += 1
    with np.errstate(invalid="ignore"):
        return np.where(count > 0, total / np.maximum(count, 1), np.nan)


def draw_scores(fig: Any, ax: Any, layout: PatchLayout, scores: np.ndarray, image_hw: tuple[int, int], *,
                box: tuple[float, float, float, float], scale: str = "auto", alpha: float = 0.5) -> None:
    """The score raster of `box` over `ax` under `scale` (`hrsel.engine.colorscale`), with its colour bar."""
    colors = score_colors(scores, scale)
    heat = score_heatmap(layout, colors.values, image_hw, box=box)
    x0, y0, x1, y1 = box
    shown = ax.imshow(heat, extent=(x0, x1, y1, y0), cmap="inferno", alpha=alpha, interpolation="nearest",
                      vmin=colors.vmin, vmax=colors.vmax)
    fig.colorbar(shown, ax=ax, fraction=0.04, pad=0.02, label=colors.label)


def picture_box(layout: PatchLayout, scores: np.ndarray | None, indices: np.ndarray | None,
                image_hw: tuple[int, int]) -> tuple[float, float, float, float]:
    """What a picture shows: the patches with a score (on tissue) and the selected ones (`crop_box`)."""
    keep = np.zeros(len(layout.coords), dtype=bool)
    if scores is not None:
        keep[: len(scores)] |= np.isfinite(np.asarray(scores, dtype=np.float64))[: len(keep)]
    for i in [] if indices is None else np.asarray(indices).reshape(-1):
        if 0 <= int(i) < len(keep):
            keep[int(i)] = True
    if scores is not None and keep.all():
        return (0.0, 0.0, float(image_hw[1]), float(image_hw[0]))
    return crop_box(layout, keep, image_hw)


def save_selection_picture(path: str | Path, image: Any, *, layout: PatchLayout, scores: np.ndarray | None = None,
                           indices: np.ndarray | None = None, title: str = "", color_scale: str = "auto") -> Path:
    """Write a PNG: image, score heatmap (if any) and selected patches outlined (if any), cropped to them."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure
    from matplotlib.patches import Rectangle

    h, w = image_size_hw(image)
    box = picture_box(layout, scores, indices, (h, w))
    x0, y0, x1, y1 = box
    note = band_note(int(image.shape[-3]) if isinstance(image, torch.Tensor) else int(image.channels))
    title = f"{title}\n{note}" if note else title
    fig = Figure(figsize=(6, 6 * (y1 - y0) / (x1 - x0) + 0.2 + 0.18 * (title.count("\n") + 1)), dpi=110)
    FigureCanvasAgg(fig)
    ax = fig.add_subplot(1, 1, 1)
    ax.imshow(display_array(image, None if box == (0.0, 0.0, float(w), float(h)) else box),
              extent=(x0, x1, y1, y0), interpolation="nearest")
    if scores is not None and len(scores) and np.isfinite(np.asarray(scores, dtype=np.float64)).any():
        draw_scores(fig, ax, layout, np.asarray(scores, dtype=np.float64), (h, w), box=box, scale=color_scale,
                    alpha=0.45)
    for i in [] if indices is None else np.asarray(indices).reshape(-1):
        if int(i) < 0:
            continue
        x, y = layout.coords[int(i)]
        ax.add_patch(Rectangle((x, y), layout.width, layout.height, fill=False, edgecolor="#00e5ff", linewidth=1.5))
    mpp = None if isinstance(image, torch.Tensor) else getattr(image, "mpp", None)
    draw_scale_bar(ax, x1 - x0, mpp)
    ax.set_xlim(x0, x1)
    ax.set_ylim(y1, y0)
    ax.set_axis_off()
    ax.set_title(title, fontsize=9)
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)
    return path


def draw_batch(folder: Path, prefix: str, *, pipeline: Any, batch: dict[str, Any], out: Any,
               tasks: dict[str, Any], limit: int, class_names: dict[str, list[str]] | None = None) -> int:
    """Draw up to `limit` images of an evaluation batch to folder/<prefix><id>.png; returns how many.

    Each picture: the image, the pipeline's score map, the selected patches and, per task, the
    prediction and the truth, by class name where `class_names` ({task: [name per class]}) has
    them. Feature bags have no pixels: nothing is drawn (returns `limit`).
    """
    from hrsel.engine.metrics import predictions
    from hrsel.models.bags import is_feature_bags

    if is_feature_bags(batch["images"]):
        return limit
    n = min(limit, len(batch["ids"]))
    names = class_names or {}
    preds = {t: [class_label(p, names.get(t)) for p in predictions(out.logits[t].float().cpu(), spec)]
             for t, spec in tasks.items()}
    truth = {t: [class_label(v, names.get(t)) for v in _readable(batch["targets"][t], spec)]
             for t, spec in tasks.items()}
    for i in range(n):
        image = batch["images"][i]
        scores = None if out.scores is None else out.scores[i].float().cpu().numpy()
        indices = None if out.indices is None else out.indices[i].cpu().numpy()
        num = len(scores) if scores is not None else (int(indices.max()) + 1 if indices is not None else 1)
        title = f"{batch['ids'][i]}\n" + "\n".join(f"{t}: predicted {preds[t][i]}, true {truth[t][i]}" for t in tasks)
        save_selection_picture(Path(folder) / f"{prefix}{_safe(batch['ids'][i])}.png", image,
                               layout=layout_for(pipeline, image, num), scores=scores, indices=indices, title=title)
    return n


def class_label(value: Any, names: list[str] | None) -> str:
    """A class index (or a list of them, multilabel) as its name(s); the number where no name is known."""
    if isinstance(value, (list, tuple)):
        return "|".join(class_label(v, names) for v in value) or "(none)"
    index = int(value)
    return names[index] if names and 0 <= index < len(names) else str(index)


def _readable(target: torch.Tensor, spec: Any) -> Any:
    if spec.kind == "multilabel":
        return [torch.nonzero(row > 0.5).flatten().tolist() for row in target]
    return target.reshape(len(target), -1)[:, 0].long().tolist() if spec.kind == "binary" else target.tolist()


def _safe(name: str) -> str:
    return "".join(c if c.isalnum() or c in "-_." else "_" for c in str(name))[:60]

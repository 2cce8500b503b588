"""Pictures of what a pipeline looked at: image + score heatmap + selected patches.

    save_selection_picture(path, image, layout=layout, scores=s, indices=idx, title="pred 3 | truth 3")

Drawn with matplotlib's Agg canvas (no display, no pyplot state). The image may
be a (C, H, W) tensor or a lazy `ImageSource` (its thumbnail is drawn).
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from hrsel.io.pixels import to_display

MAX_SIDE = 768  # pixels of the drawn image


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


def display_array(image: Any) -> np.ndarray:
    """(h, w, 3) uint8 for drawing: a strided view of a tensor or a source's thumbnail."""
    if isinstance(image, torch.Tensor):
        step = max(1, math.ceil(max(image.shape[-2:]) / MAX_SIDE))
        arr = image[..., ::step, ::step].detach().cpu()
        if arr.dtype.is_floating_point:
            arr = (arr.clamp(0, 1) * 255).round()
        if arr.dtype not in (torch.uint8, torch.float32, torch.float64, torch.float16, torch.bfloat16):
            arr = arr.float()  # uint16 bands: stretched below, like a source's thumbnail
            arr = to_display(arr.permute(1, 2, 0).numpy())
        else:
            arr = arr.to(torch.uint8).permute(1, 2, 0).numpy()  # (C, h, w) -> (h, w, C)
    else:
        arr = to_display(np.asarray(image.thumbnail(MAX_SIDE)))  # uint16 / float bands: 1..99 % stretch
    if arr.ndim == 2:
        arr = arr[..., None]
    if arr.shape[-1] == 1:
        arr = np.repeat(arr, 3, axis=-1)
    return arr[..., :3]


def score_heatmap(layout: PatchLayout, scores: np.ndarray, image_hw: tuple[int, int], side: int = 256) -> np.ndarray:
    """Mean score of the patches covering each cell of a (<= side)-pixel raster; nan where none."""
    h, w = image_hw
    f = max(h, w) / side
    rows, cols = max(1, round(h / f)), max(1, round(w / f))
    total = np.zeros((rows, cols))
    count = np.zeros((rows, cols))
    for (x, y), s in zip(layout.coords, scores):
        r0, c0 = int(y / f), int(x / f)
        r1 = max(r0 + 1, int(math.ceil((y + layout.height) / f)))
        c1 = max(c0 + 1, int(math.ceil((x + layout.width) / f)))
        total[r0:r1, c0:c1] += s
        count[r0:r1, c0:c1] += 1
    with np.errstate(invalid="ignore"):
        return np.where(count > 0, total / np.maximum(count, 1), np.nan)


def save_selection_picture(path: str | Path, image: Any, *, layout: PatchLayout, scores: np.ndarray | None = None,
                           indices: np.ndarray | None = None, title: str = "") -> Path:
    """Write a PNG: image, score heatmap (if any) and selected patches outlined (if any)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure
    from matplotlib.patches import Rectangle

    h, w = image_size_hw(image)
    fig = Figure(figsize=(6, 6 * h / w + 0.2 + 0.18 * (title.count("\n") + 1)), dpi=110)
    FigureCanvasAgg(fig)
    ax = fig.add_subplot(1, 1, 1)
    ax.imshow(display_array(image), extent=(0, w, h, 0), interpolation="nearest")
    if scores is not None and len(scores):
        heat = score_heatmap(layout, np.asarray(scores, dtype=np.float64), (h, w))
        shown = ax.imshow(heat, extent=(0, w, h, 0), cmap="inferno", alpha=0.45, interpolation="nearest")
        fig.colorbar(shown, ax=ax, fraction=0.04, pad=0.02, label="patch score")
    for i in [] if indices is None else np.asarray(indices).reshape(-1):
        x, y = layout.coords[int(i)]
        ax.add_patch(Rectangle((x, y), layout.width, layout.height, fill=False, edgecolor="#00e5ff", linewidth=1.5))
    ax.set_xlim(0, w)
    ax.set_ylim(h, 0)
    ax.set_axis_off()
    ax.set_title(title, fontsize=9)
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)
    return path


def draw_batch(folder: Path, prefix: str, *, pipeline: Any, batch: dict[str, Any], out: Any,
               tasks: dict[str, Any], limit: int) -> int:
    """Draw up to `limit` images of an evaluation batch to folder/<prefix><id>.png; returns how many.

    Each picture: the image, the pipeline's score map, the selected patches and, per task, the
    prediction and the truth. Feature bags have no pixels: nothing is drawn (returns `limit`).
    """
    from hrsel.engine.metrics import predictions
    from hrsel.models.bags import is_feature_bags

    if is_feature_bags(batch["images"]):
        return limit
    n = min(limit, len(batch["ids"]))
    preds = {t: predictions(out.logits[t].float().cpu(), spec) for t, spec in tasks.items()}
    truth = {t: _readable(batch["targets"][t], spec) for t, spec in tasks.items()}
    for i in range(n):
        image = batch["images"][i]
        scores = None if out.scores is None else out.scores[i].float().cpu().numpy()
        indices = None if out.indices is None else out.indices[i].cpu().numpy()
        num = len(scores) if scores is not None else (int(indices.max()) + 1 if indices is not None else 1)
        title = f"{batch['ids'][i]}\n" + "\n".join(f"{t}: predicted {preds[t][i]}, true {truth[t][i]}" for t in tasks)
        save_selection_picture(Path(folder) / f"{prefix}{_safe(batch['ids'][i])}.png", image,
                               layout=layout_for(pipeline, image, num), scores=scores, indices=indices, title=title)
    return n


def _readable(target: torch.Tensor, spec: Any) -> Any:
    if spec.kind == "multilabel":
        return [torch.nonzero(row > 0.5).flatten().tolist() for row in target]
    return target.reshape(len(target), -1)[:, 0].long().tolist() if spec.kind == "binary" else target.tolist()


def _safe(name: str) -> str:
    return "".join(c if c.isalnum() or c in "-_." else "_" for c in str(name))[:60]

"""Synthetic H&E-like slides with a lesion and pen marks, for trying the own-data path end to end.

    root = make_slide_set("data/synthetic_slides", n_train=16, n_val=4, n_test=4, size=1024)
    # root/slides.csv (path,label,split), root/slides/case_000.tif ..., root/lesions.json

Each slide is a pyramidal TIFF (`hrsel.io.writer.write_pyramid`, resolution tags at `mpp`) of
white glass and a few elliptical tissue sections: eosin pink with sparse, small haematoxylin
nuclei. A `tumor` slide has one round lesion inside its tissue where nuclei are large, dark and
crowded (a few patches across at 0.5 um/px); a `normal` slide has none. Pen marks (black, green
or blue strokes over glass and tissue) are drawn on both classes, so ink is no shortcut to the
label: a model that scores dark ink as lesion gets the pen-marked normal slides wrong.
`lesions.json` holds each tumour slide's lesion as a circle in level-0 pixels: the ground truth
for "the top-ranked patch lies on the lesion".
"""
from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

GLASS = (242, 240, 244)
EOSIN = (228, 160, 200)
NUCLEUS = (120, 70, 160)
LESION_NUCLEUS = (70, 30, 110)
LESION_STROMA = (190, 120, 180)
INKS = {"black": (32, 32, 36), "green": (40, 120, 80), "blue": (45, 60, 150)}


@dataclass(frozen=True)
class Lesion:
    x: float  # centre, level-0 pixels
    y: float
    radius: float

    def covers(self, x0: float, y0: float, width: float, height: float, *, fraction: float = 0.25) -> bool:
        """Whether the lesion covers at least `fraction` of the box (x0, y0, width, height), sampled on a
        16 x 16 lattice of points."""
        xs = x0 + (np.arange(16) + 0.5) * width / 16
        ys = y0 + (np.arange(16) + 0.5) * height / 16
        inside = (xs[None, :] - self.x) ** 2 + (ys[:, None] - self.y) ** 2 <= self.radius ** 2
        return bool(inside.mean() >= fraction)


def render_slide(rng: np.random.Generator, size: int, *, lesion: bool, pen: bool,
                 lesion_radius: float) -> tuple[np.ndarray, Lesion | None]:
    """(size, size, 3) uint8 pixels of one slide and its lesion (None without one)."""
    image = np.empty((size, size, 3), np.float32)
    image[:] = GLASS
    tissue = _tissue_mask(rng, size)
    image[tissue] = EOSIN
    _stamp_nuclei(rng, image, tissue, density=0.0015, radius=(1.5, 3.0), colour=NUCLEUS)
    found = None
    if lesion:
        found = _place_lesion(rng, tissue, lesion_radius)
        yy, xx = np.mgrid[:size, :size]
        inside = (xx - found.x) ** 2 + (yy - found.y) ** 2 <= found.radius ** 2
        image[inside] = LESION_STROMA
        _stamp_nuclei(rng, image, inside, density=0.012, radius=(3.0, 5.0), colour=LESION_NUCLEUS)
    if pen:
        for _ in range(int(rng.integers(1, 3))):
            _draw_stroke(rng, image, INKS[str(rng.choice(list(INKS)))], width=size / 25)
    image += rng.normal(0.0, 4.0, image.shape).astype(np.float32)  # sensor noise
    return np.clip(image, 0, 255).astype(np.uint8), found


def _tissue_mask(rng: np.random.Generator, size: int) -> np.ndarray:
    """(size, size) bool: two or three overlapping ellipses covering roughly a third of the slide."""
    yy, xx = np.mgrid[:size, :size].astype(np.float32) / size
    mask = np.zeros((size, size), bool)
    for _ in range(int(rng.integers(2, 4))):
        cx, cy = rng.uniform(0.3, 0.7, 2)
        ax, ay = rng.uniform(0.15, 0.28, 2)
        angle = rng.uniform(0, np.pi)
        u = (xx - cx) * np.cos(angle) + (yy - cy) * np.sin(angle)
        v = -(xx - cx) * np.sin(angle) + (yy - cy) * np.cos(angle)
        mask |= (u / ax) ** 2 + (v / ay) ** 2 <= 1.0
    return mask


def _place_lesion(rng: np.random.Generator, tissue: np.ndarray, radius: float) -> Lesion:
    """A circle of `radius` whose centre lies on tissue at least `radius` from the tissue's edge, if any."""
    size = tissue.shape[0]
    ys, xs = np.nonzero(tissue[::8, ::8])
    order = rng.permutation(len(xs))
    for i in order[:400]:
        x, y = xs[i] * 8 + 4.0, ys[i] * 8 + 4.0
        box = tissue[int(max(0, y - radius)):int(min(size, y + radius)),
                     int(max(0, x - radius)):int(min(size, x + radius))]
        if box.size and box.mean() > 0.97:
            return Lesion(x, y, radius)
    i = order[0]
    return Lesion(xs[i] * 8 + 4.0, ys[i] * 8 + 4.0, radius)


def _stamp_nuclei(rng: np.random.Generator, image: np.ndarray, where: np.ndarray, *, density: float,
                  radius: tuple[float, float], colour: tuple[int, int, int]) -> None:
    """Dark disks at random points of `where` (`density` per pixel), radii drawn from `radius` (pixels)."""
    ys, xs = np.nonzero(where)
    if len(xs) == 0:
        return
    count = rng.poisson(density * len(xs))
    picks = rng.integers(0, len(xs), count)
    for x, y, r in zip(xs[picks], ys[picks], rng.uniform(*radius, count)):
        _stamp_disk(image, int(x), int(y), float(r), colour)


def _draw_stroke(rng: np.random.Generator, image: np.ndarray, colour: tuple[int, int, int], *, width: float) -> None:
    """A pen stroke: a thick quadratic curve from one side of the slide towards the other."""
    size = image.shape[0]
    p0, p1, p2 = rng.uniform(0.05, 0.95, (3, 2)) * size
    t = np.linspace(0, 1, int(size * 1.5))[:, None]
    points = (1 - t) ** 2 * p0 + 2 * (1 - t) * t * p1 + t ** 2 * p2  # (n, 2) x, y
    for x, y in points.astype(int):
        _stamp_disk(image, int(x), int(y), width / 2, colour)


def _stamp_disk(image: np.ndarray, x: int, y: int, radius: float, colour: tuple[int, int, int]) -> None:
    """Paint the disk of `radius` around pixel (x, y), clipped to the (H, W, 3) image."""
    n = int(np.ceil(radius))
    h, w = image.shape[:2]
    y0, y1, x0, x1 = max(0, y - n), min(h, y + n + 1), max(0, x - n), min(w, x + n + 1)
    if y0 >= y1 or x0 >= x1:
        return
    dy, dx = np.ogrid[y0 - y:y1 - y, x0 - x:x1 - x]
    image[y0:y1, x0:x1][dx ** 2 + dy ** 2 <= radius * radius] = colour


@dataclass
class SlideRow:
    path: str  # relative to the set's root
    label: str  # "tumor" | "normal"
    split: str  # "train" | "val" | "test"
    pen: bool


def make_slide_set(root: str | Path, *, n_train: int = 16, n_val: int = 4, n_test: int = 4, size: int = 1024,
                   mpp: float = 0.25, lesion_um: float = 24.0, pen_fraction: float = 0.5, seed: int = 0,
                   levels: int = 3) -> Path:
    """Write `root/slides/case_NNN.tif`, `root/slides.csv` (path,label,split) and `root/lesions.json`.

    Half of each split is `tumor` (a lesion of radius `lesion_um` micrometres), half `normal`;
    `pen_fraction` of each class carries pen strokes. `size`: level-0 pixels per side, at `mpp`
    microns per pixel; `levels` halvings are stored, so a run at `data.target_mpp` of 2 x mpp reads
    level 1. Deterministic for a seed. A folder that already holds a slides.csv is a DataError:
    nothing is overwritten.
    """
    from hrsel.errors import DataError
    from hrsel.io.writer import write_pyramid

    root = Path(root)
    if (root / "slides.csv").exists():
        raise DataError(f"{root / 'slides.csv'} exists: make_slide_set writes a new set and overwrites nothing; "
                        f"give another folder, or delete {root} to make the set again")
    (root / "slides").mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    rows: list[SlideRow] = []
    lesions: dict[str, dict] = {}
    for split, count in (("train", n_train), ("val", n_val), ("test", n_test)):
        for i in range(count):
            label = "tumor" if i % 2 == 0 else "normal"
            pen = (i // 2) < round(pen_fraction * ((count + 1 - i % 2) // 2))
            name = f"case_{len(rows):03d}"
            image, lesion = render_slide(rng, size, lesion=label == "tumor", pen=pen,
                                         lesion_radius=lesion_um / mpp)
            write_pyramid(root / "slides" / f"{name}.tif", image, levels=levels, tile=256, compression="jpeg",
                          mpp=mpp)
            rows.append(SlideRow(f"slides/{name}.tif", label, split, pen))
            if lesion is not None:
                lesions[name] = asdict(lesion)
    lines = ["path,label,split"] + [f"{r.path},{r.label},{r.split}" for r in rows]
    (root / "slides.csv").write_text("\n".join(lines) + "\n")
    (root / "lesions.json").write_text(json.dumps(
        {"units": "level-0 pixels", "mpp": mpp, "lesions": lesions,
         "pen": [Path(r.path).stem for r in rows if r.pen]}, indent=1))
    return root


def check_predictions(root: str | Path, predictions: str | Path) -> list[dict]:
    """One dict per slide `hrsel.predict` wrote into the folder `predictions` for this set: id, split,
    label, predicted, p_tumor, pen, the rank-1 patch of its GeoJSON (`top_patch`: x0, y0, width,
    height in level-0 pixels) and, for a tumour slide, whether that patch lies on the lesion
    (`top_on_lesion`: the lesion covers at least a quarter of it); `top_ink`: predict's pen-ink share of
    that patch (None for a run without tissue masks)."""
    import csv

    root, predictions = Path(root), Path(predictions)
    truth = json.loads((root / "lesions.json").read_text())
    out = []
    with (predictions / "predictions.csv").open(newline="") as f:
        for row in csv.DictReader(f):
            name = Path(row["path"]).stem
            top = top_patch(predictions / f"{name}.geojson")
            lesion = truth["lesions"].get(name)
            out.append({"id": name, "split": row.get("split"), "label": row["label/true"],
                        "predicted": row["label/predicted"], "p_tumor": float(row["label/prob/tumor"]),
                        "pen": name in truth["pen"], "top_patch": top,
                        "top_on_lesion": None if lesion is None else Lesion(**lesion).covers(*top),
                        "top_ink": float(row["top_patch/ink"]) if row.get("top_patch/ink") else None})
    return out


def top_patch(geojson: str | Path) -> tuple[float, float, float, float]:
    """(x0, y0, width, height) in level-0 pixels of the rank-1 patch of a `hrsel.predict` GeoJSON."""
    features = json.loads(Path(geojson).read_text())["features"]
    top = min(features, key=lambda f: f["properties"].get("measurements", {}).get("rank", 1 << 62))
    ring = top["geometry"]["coordinates"][0]
    xs, ys = [p[0] for p in ring], [p[1] for p in ring]
    return min(xs), min(ys), max(xs) - min(xs), max(ys) - min(ys)

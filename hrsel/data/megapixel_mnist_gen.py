"""Generate Megapixel MNIST (the ATS task as extended by IPS) into lazily readable zarr arrays.

Each image: an H x W canvas, 5 MNIST digits (3 of a target class, 2 of other classes)
placed without overlap, and optionally IPS's noise drawn first: `n_noise` placements, at
top-left corners in [28, H - 28), of 50 line-scribble 28x28 patterns per split
(`make_noise_patterns`). Later patches overwrite earlier ones, so digits sit on top of
the noise. Labels:
`majority` (the target class), `max` (largest digit), `top` (digit with the smallest
row) and `multi` (10-dim multi-hot of the digits present). The random layout of a
split comes from `seed + int(split == "train")`, drawn in the main process, so the
data set does not depend on the number of workers.

On disk (`out/`): `parameters.json` (written last: its presence marks a complete
data set), and per split `train/labels.json` plus `train/images.zarr/00000`, ... one
chunked compressed (H, W, 1) uint8 zarr array per image. Images are rendered in bands
of rows and blank chunks are not stored, so 20000^2 canvases need O(band) memory; the
array attribute `stored_chunks` lists the (row, col) of the chunks that were, so a loader
tells a deleted chunk from a blank one. The set is written into a staging folder and moved
into `out/` when complete (`hrsel.data.output_folder`).
"""
from __future__ import annotations

import json
import logging
import os
from concurrent.futures import ProcessPoolExecutor
from dataclasses import asdict, dataclass
from multiprocessing import get_context
from pathlib import Path

import numpy as np

from hrsel.data.digits import DigitPools
from hrsel.data.output_folder import owned_layout, staged_output
from hrsel.errors import DataError

log = logging.getLogger(__name__)

DIGIT = 28  # MNIST digit side, also the noise pattern side
FORMAT = "hrsel-megapixel-mnist/1"
SPLITS = ("train", "test")
STORED_CHUNKS = "stored_chunks"  # image attribute: [[row, col], ...] of the chunks on disk
_BAND_BYTES = 64 << 20  # rows rendered at once: at most ~64 MiB per band
N_NOISE_PATTERNS = 50  # distinct noise patterns per split; IPS's code makes n_noise of them (50 there too)
NOISE_MAX_ANGLE = 0.4 * np.pi  # 72 deg: IPS draws slopes tan(U[0, 1) * pi / 2.5)
NOISE_MIRROR_P = 2 * 0.33 * 0.67  # IPS flips the copy twice, each with p = 0.33, both along the columns


@dataclass
class SplitLayout:
    """Everything random about one split; images are a pure function of it and the pools."""

    digit_index: np.ndarray  # (N, 5) indices into the split's digit pool
    digit_label: np.ndarray  # (N, 5) their labels; the first three are the target class
    positions: np.ndarray  # (N, 5, 2) top-left (y, x) of each digit
    noise_positions: np.ndarray  # (N, n_noise, 2) top-left (y, x); n_noise may be 0
    noise_index: np.ndarray  # (N, n_noise) which pattern each placement uses
    noise_patterns: np.ndarray  # (P, 28, 28) uint8

    def labels(self) -> dict[str, list]:
        top = self.digit_label[np.arange(len(self.digit_label)), self.positions[:, :, 0].argmin(1)]
        multi = np.zeros((len(self.digit_label), 10), dtype=np.int64)
        np.put_along_axis(multi, self.digit_label, 1, axis=1)
        return {
            "majority": self.digit_label[:, 0].tolist(),
            "max": self.digit_label.max(1).tolist(),
            "top": top.tolist(),
            "multi": multi.tolist(),
            "digits": self.digit_label.tolist(),
            "positions": self.positions.tolist(),
        }


def noise_lines(angles: np.ndarray, *, size: int = DIGIT) -> np.ndarray:
    """(n, size, size) bool: one straight line per angle, from the corner (0, 0) to the border.

    `angles` (n,) in radians from the row axis towards the column axis, in [0, pi/2]
    (0: down the left edge, pi/2: along the top edge). As IPS rasterises them: 2 * size
    points t * (cos, sin), t from 0 to where the longer axis reaches `size - 0.51`,
    rounded half to even; 28 to 42 pixels per line of a 28x28 pattern.
    """
    angles = np.asarray(angles, dtype=np.float64).reshape(-1)
    if np.any((angles < 0) | (angles > np.pi / 2)):
        raise DataError(f"noise line angles must lie in [0, pi/2] radians; got {angles.min()}..{angles.max()}")
    direction = np.stack([np.cos(angles), np.sin(angles)], axis=-1)  # (n, 2) as (row, col)
    length = (size - 0.51) / direction.max(-1)  # (n,) where the longer axis reaches the border
    t = np.linspace(0.0, 1.0, 2 * size)[None, :, None] * length[:, None, None]  # (n, 2 * size, 1)
    points = np.rint(t * direction[:, None, :]).astype(np.int64)  # (n, 2 * size, 2)
    lines = np.zeros((len(angles), size, size), dtype=bool)
    lines[np.arange(len(angles))[:, None], points[..., 0], points[..., 1]] = True
    return lines


def make_noise_patterns(rng: np.random.Generator, n: int = N_NOISE_PATTERNS) -> np.ndarray:
    """(n, 28, 28) uint8 line-scribble noise, drawn as IPS does (benbergner/ips make_mnist.py).

    Pattern i is the union of a line from the corner (0, 0) at an angle in [0, 72 deg)
    (`noise_lines`) and the line of a randomly permuted pattern, mirrored left-right with
    probability ~0.44 (then it starts at the corner (0, 27)); ~66 lit pixels on average.
    Lit pixels get floor(255 * U[0.8, 1)), i.e. 204..254, as IPS's float -> uint8 cast.
    """
    lines = noise_lines(rng.uniform(0.0, NOISE_MAX_ANGLE, size=n))  # (n, 28, 28)
    copies = lines[rng.permutation(n)]
    mirror = rng.random(n) < NOISE_MIRROR_P
    copies[mirror] = copies[mirror, :, ::-1]
    intensity = rng.uniform(0.8, 1.0, size=lines.shape)  # (n, 28, 28)
    return np.floor(255 * (lines | copies) * intensity).astype(np.uint8)


def _place_digits(rng: np.random.Generator, height: int, width: int, count: int = 5) -> np.ndarray:
    placed: list[np.ndarray] = []
    for _ in range(10_000):
        pos = rng.integers(0, [height - DIGIT + 1, width - DIGIT + 1])
        if all(np.any(np.abs(pos - other) >= DIGIT) for other in placed):
            placed.append(pos)
            if len(placed) == count:
                return np.stack(placed)
    raise DataError(f"cannot place {count} non-overlapping {DIGIT}x{DIGIT} digits on a "
                    f"{height}x{width} canvas; use a larger --width/--height")


def sample_layout(labels: np.ndarray, *, n: int, height: int, width: int, noise: bool,
                  n_noise: int, seed: int) -> SplitLayout:
    """Draw the layout of `n` images from a pool with digit `labels` (n_pool,)."""
    if noise and min(height, width) <= 2 * DIGIT:
        raise DataError(f"noise needs a canvas larger than {2 * DIGIT} px; got {height}x{width}")
    rng = np.random.default_rng(seed)
    by_class = [np.flatnonzero(labels == c) for c in range(10)]
    not_class = [np.flatnonzero(labels != c) for c in range(10)]
    missing = [c for c in range(10) if len(by_class[c]) == 0]
    if missing:
        raise DataError(f"the digit pool has no digit of class {missing}; it needs all ten")
    index = np.empty((n, 5), dtype=np.int64)
    target = rng.integers(0, 10, size=n)
    for i, c in enumerate(target):
        index[i, :3] = rng.choice(by_class[c], size=3)
        index[i, 3:] = rng.choice(not_class[c], size=2)
    positions = np.stack([_place_digits(rng, height, width) for _ in range(n)]) if n else np.zeros((0, 5, 2), int)
    k = n_noise if noise else 0
    patterns = make_noise_patterns(rng)
    noise_positions = rng.integers(DIGIT, [height - DIGIT, width - DIGIT], size=(n, k, 2))
    noise_index = rng.integers(0, len(patterns), size=(n, k))
    return SplitLayout(index, labels[index], positions.astype(np.int64), noise_positions, noise_index, patterns)


def image_patches(layout: SplitLayout, pool: np.ndarray, item: int) -> list[tuple[np.ndarray, np.ndarray]]:
    """((y, x) top-left, (28, 28) uint8 pixels) of image `item` in drawing order: noise first, digits on top."""
    patches = [(p, layout.noise_patterns[j]) for p, j in zip(layout.noise_positions[item], layout.noise_index[item])]
    return patches + [(p, pool[j]) for p, j in zip(layout.positions[item], layout.digit_index[item])]


def paint(canvas: np.ndarray, patches: list[tuple[np.ndarray, np.ndarray]], origin: tuple[int, int]) -> np.ndarray:
    """Draw `patches` (`image_patches`) into the 2-D `canvas` whose pixel [0, 0] is the image's
    (y, x) = `origin`, clipped to the canvas; later patches overwrite earlier ones. Returns `canvas`."""
    y0, x0 = origin
    h, w = canvas.shape
    for (y, x), patch in patches:
        top, bottom, left, right = max(y, y0), min(y + DIGIT, y0 + h), max(x, x0), min(x + DIGIT, x0 + w)
        if top < bottom and left < right:
            canvas[top - y0:bottom - y0, left - x0:right - x0] = patch[top - y:bottom - y, left - x:right - x]
    return canvas


def render_rows(layout: SplitLayout, pool: np.ndarray, item: int, rows: tuple[int, int], width: int) -> np.ndarray:
    """Rows [y0, y1) of image `item` as (y1 - y0, width) uint8: noise first, digits on top."""
    y0, y1 = rows
    return paint(np.zeros((y1 - y0, width), dtype=np.uint8), image_patches(layout, pool, item), (y0, 0))


def write_image(path: Path, layout: SplitLayout, pool: np.ndarray, item: int, *,
                height: int, width: int, chunk: int) -> None:
    """Render image `item` band by band into a chunked compressed zarr array at `path`."""
    import zarr

    sparse = {"write_empty_chunks": False} if zarr.__version__.startswith("2.") else {}  # zarr 3: the default
    array = zarr.open_array(store=str(path), mode="w", shape=(height, width, 1),
                            chunks=(chunk, chunk, 1), dtype="uint8", fill_value=0, **sparse)
    band = max(chunk, _BAND_BYTES // max(width, 1) // chunk * chunk)
    stored: list[list[int]] = []
    for y0 in range(0, height, band):
        y1 = min(y0 + band, height)
        rows = render_rows(layout, pool, item, (y0, y1), width)
        array[y0:y1, :, 0] = rows
        stored += nonblank_chunks(rows, chunk, first_row=y0 // chunk)
    array.attrs[STORED_CHUNKS] = stored


def nonblank_chunks(rows: np.ndarray, chunk: int, *, first_row: int = 0) -> list[list[int]]:
    """[row, col] of the chunk x chunk blocks of a (h, W) band with a non-zero pixel (the ones zarr stores)."""
    found = []
    for r, y in enumerate(range(0, rows.shape[0], chunk)):
        strip = rows[y:y + chunk]
        found += [[first_row + r, c] for c, x in enumerate(range(0, rows.shape[1], chunk))
                  if strip[:, x:x + chunk].any()]
    return found


_WORKER: dict = {}  # per process: split -> (layout, digit pool, images folder), and the parameters


def _init_worker(splits: dict[str, tuple[SplitLayout, np.ndarray, str]], params: "MegapixelParameters") -> None:
    _WORKER.update(splits=splits, params=params)


def _write_items(split: str, items: list[int]) -> int:
    layout, pool, folder = _WORKER["splits"][split]
    p = _WORKER["params"]
    for item in items:
        write_image(Path(folder) / f"{item:05d}", layout, pool, item, height=p.height, width=p.width, chunk=p.chunk)
    return len(items)


@dataclass(frozen=True)
class MegapixelParameters:
    width: int = 1500
    height: int = 1500
    n_train: int = 5000
    n_test: int = 1000
    noise: bool = True
    n_noise: int = 50
    seed: int = 0
    chunk: int = 512


def check_parameters(params: MegapixelParameters) -> None:
    """DataError naming the first bad setting (by its command-line flag)."""
    if min(params.width, params.height) < DIGIT or params.chunk < 1:
        raise DataError(f"canvas height={params.height} x width={params.width} must be at least {DIGIT} px "
                        f"and chunk={params.chunk} >= 1 (--height, --width, --chunk)")
    if params.n_train < 1:
        raise DataError(f"n_train={params.n_train} (--n-train): the train split needs at least 1 image")
    if params.n_test < 0 or params.n_noise < 0:
        raise DataError(f"n_test={params.n_test} and n_noise={params.n_noise} (--n-test, --n-noise) cannot be "
                        "negative")


def foreign_files(out: Path) -> list[str]:
    """Entries of `out` that `generate_megapixel_mnist` does not write."""
    def owned(f: Path) -> bool:
        return f.parts[0] == "images.zarr" or f.as_posix() == "labels.json"

    return owned_layout(out, {split: owned for split in SPLITS})


def generate_megapixel_mnist(out_dir: str | os.PathLike, pools: DigitPools, *,
                             params: MegapixelParameters = MegapixelParameters(),
                             workers: int = 1, progress: bool = True, overwrite: bool = False) -> Path:
    """Write the train and test splits and `parameters.json` under `out_dir`; returns it.

    Raises DataError before writing anything when a setting is invalid, when `out_dir` holds
    files of its own, or when it holds a data set and `overwrite` is False.
    """
    check_parameters(params)
    layouts = {split: _split_layout(split, pools, params) for split in SPLITS}  # may fail: before any write
    with staged_output(out_dir, overwrite=overwrite, foreign=foreign_files, what="Megapixel MNIST") as stage:
        splits = {split: (layout, images, str(_images_group(stage / split)))
                  for split, (layout, images) in layouts.items()}
        _write_images(splits, params, workers=workers, progress=progress)
        for split, (layout, _) in layouts.items():
            (stage / split / "labels.json").write_text(json.dumps(layout.labels()))
        meta = {**asdict(params), "format": FORMAT, "digits": pools.source, "digits_note": pools.note,
                "tasks": {"majority": "multiclass:10", "max": "multiclass:10", "top": "multiclass:10",
                          "multi": "multilabel:10"}}
        (stage / "parameters.json").write_text(json.dumps(meta, indent=2))
    out = Path(out_dir)
    log.info("Megapixel MNIST written to %s (%d train, %d test, digits: %s)", out, params.n_train, params.n_test,
             pools.source)
    return out


def _split_layout(split: str, pools: DigitPools, params: MegapixelParameters) -> tuple[SplitLayout, np.ndarray]:
    """(layout, digit pool) of one split."""
    images, labels = pools.split(split)
    n = params.n_train if split == "train" else params.n_test
    layout = sample_layout(labels, n=n, height=params.height, width=params.width, noise=params.noise,
                           n_noise=params.n_noise, seed=params.seed + int(split == "train"))
    return layout, images


def _images_group(folder: Path) -> Path:
    """A new split folder with its empty `images.zarr` group; returns the group's path."""
    import zarr

    folder.mkdir()
    zarr.open_group(str(folder / "images.zarr"), mode="w")
    return folder / "images.zarr"


def _write_images(splits: dict[str, tuple[SplitLayout, np.ndarray, str]], params: MegapixelParameters, *,
                  workers: int, progress: bool) -> None:
    """Render every image of every split, in batches of 8, in this process or a pool of `workers`."""
    from tqdm.auto import tqdm

    tasks = [(split, list(range(i, min(i + 8, len(layout.digit_index)))))
             for split, (layout, _, _) in splits.items() for i in range(0, len(layout.digit_index), 8)]
    total = sum(len(items) for _, items in tasks)
    if not tasks:
        return
    with tqdm(total=total, unit="img", desc="megapixel mnist", disable=not progress) as bar:
        if workers <= 1:
            _init_worker(splits, params)
            try:
                for split, items in tasks:
                    bar.update(_write_items(split, items))
            finally:
                _WORKER.clear()
        else:
            with ProcessPoolExecutor(workers, mp_context=get_context("spawn"), initializer=_init_worker,
                                     initargs=(splits, params)) as ex:
                for done in ex.map(_write_items, *zip(*tasks)):
                    bar.update(done)


# ---------------------------------------------------------------------------------------- one big canvas

IPS_NOISE_DENSITY = 50 / 1500**2  # IPS: 50 line patterns on every 1500x1500 canvas
BIG_CANVAS_FORMAT = "hrsel-megapixel-mnist-canvas/1"


def paper_noise_count(height: int, width: int) -> int:
    """Noise placements at IPS's density on a height x width canvas (50 per 1500x1500)."""
    return int(round(IPS_NOISE_DENSITY * height * width))


def big_canvas_sidecar(path: str | os.PathLike) -> Path:
    """The JSON beside a big canvas (`big_canvas_20000.tif` -> `big_canvas_20000.json`)."""
    return Path(path).with_suffix(".json")


def write_big_canvas(path: str | os.PathLike, *, side: int = 20000, digits: DigitPools | str = "mnist",
                     split: str = "test", n_noise: int | None = None, seed: int = 0, tile: int = 512,
                     mnist_dir: str | os.PathLike | None = None, progress: bool = False) -> dict:
    """One Megapixel MNIST image on a side x side canvas, as a tiled pyramidal TIFF; returns its labels.

    The 5 digits (3 of the majority class) and `n_noise` line patterns (default: IPS's density,
    `paper_noise_count`) are drawn as `sample_layout` and `image_patches` draw a data set's image,
    from the `split` pool of `digits` (a `DigitPools`, or a source name for `load_digit_pools`,
    never downloading), at the training scale: 28x28 with the same pixel values. The canvas is
    written tile by tile (`hrsel.io.writer.write_sparse_pyramid`): only tiles touching a digit or
    a pattern are rendered and memory stays O(tile), whatever the side; lower levels are block
    means down to a level under 1024 px. Returns `SplitLayout.labels()` of the image (majority, max,
    top, multi, digits, positions as [y, x]), also written with the parameters to
    `big_canvas_sidecar(path)`. The TIFF is written to a temporary file and moved into place.
    """
    from tqdm.auto import tqdm

    from hrsel.data.digits import load_digit_pools
    from hrsel.io.resize import block_mean
    from hrsel.io.writer import write_sparse_pyramid

    if side < 2 * DIGIT + 1 or tile < 16 or tile % 16:
        raise DataError(f"big canvas side={side} must exceed {2 * DIGIT} px and tile={tile} be a multiple of 16 "
                        f"(a TIFF tile rule); use a larger side or tile")
    pools = digits if isinstance(digits, DigitPools) else load_digit_pools(
        digits=digits, mnist_dir=mnist_dir, download=False, progress=False)
    pool, labels = pools.split(split)
    n_noise = paper_noise_count(side, side) if n_noise is None else int(n_noise)
    if n_noise < 0:
        raise DataError(f"n_noise={n_noise} cannot be negative")
    layout = sample_layout(labels, n=1, height=side, width=side, noise=n_noise > 0, n_noise=n_noise, seed=seed)
    buckets: dict[tuple[int, int], list] = {}  # level-0 tile (row, col) -> the patches touching it, in order
    for patch in image_patches(layout, pool, 0):
        (y, x) = patch[0]
        for ty in range(y // tile, (y + DIGIT - 1) // tile + 1):
            for tx in range(x // tile, (x + DIGIT - 1) // tile + 1):
                buckets.setdefault((ty, tx), []).append(patch)
    levels = 1
    while (side >> levels) >= 512 and tile % (1 << levels) == 0:
        levels += 1
    total = sum((-(-max(1, side >> level) // tile)) ** 2 for level in range(levels))
    with tqdm(total=total, unit="tile", desc=f"big canvas {side}x{side}", disable=not progress) as bar:
        def tile_fn(level: int, tx: int, ty: int) -> np.ndarray | None:
            bar.update(1)
            f = 1 << level
            step = tile // f  # pixels of this level per level-0 tile
            out = None
            for sy in range(f):
                for sx in range(f):
                    key = (ty * f + sy, tx * f + sx)
                    found = buckets.get(key)
                    if not found:
                        continue
                    block = paint(np.zeros((tile, tile), np.uint8), found, (key[0] * tile, key[1] * tile))
                    if out is None:
                        out = np.zeros((tile, tile, 1), np.uint8)
                    out[sy * step:(sy + 1) * step, sx * step:(sx + 1) * step] = block_mean(block[:, :, None], f)
            return out

        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f"{path.name}.{os.getpid()}.tmp")
        try:
            write_sparse_pyramid(tmp, size=(side, side), tile_fn=tile_fn, levels=levels, tile=tile, channels=1,
                                 background=0)
            os.replace(tmp, path)
        finally:
            tmp.unlink(missing_ok=True)
    result = {task: values[0] for task, values in layout.labels().items()}
    meta = {"format": BIG_CANVAS_FORMAT, "side": side, "n_noise": n_noise, "seed": seed, "split": split,
            "tile": tile, "levels": levels, "digits": pools.source, "labels": result}
    sidecar = big_canvas_sidecar(path)
    sidecar.with_name(sidecar.name + ".tmp").write_text(json.dumps(meta, indent=2))
    os.replace(sidecar.with_name(sidecar.name + ".tmp"), sidecar)
    log.info("big canvas %s: %dx%d, %d noise patterns, %d of %d level-0 tiles hold pixels, majority %d",
             path, side, side, n_noise, len(buckets), (-(-side // tile)) ** 2, result["majority"])
    return result

"""Procedural billiard task: numbered balls on a table, in the DPS release's file format.

Each image shows 4-8 balls of six colours on a felt table; every ball carries its number
(1-9) in a small white disc, readable only at full resolution (about 4 px tall after the
DPS 4x downscale). Files: `out/{train,valid,test}/<id>.png` + `<id>.json` (a list of
`{"position": [x, y, 0], "number", "color", "radius"}`, x, y the ball centre in pixels)
and `out/parameters.json`. Image i of split s is drawn from the seed (seed, s, i), so
the output does not depend on the number of workers. The set is written into a staging
folder and moved into `out` when complete (`hrsel.data.output_folder`): a folder that
already holds a data set is refused unless `overwrite`, one with other files always.
"""
from __future__ import annotations

import json
import os
from concurrent.futures import ProcessPoolExecutor
from dataclasses import asdict, dataclass
from multiprocessing import get_context
from pathlib import Path

import numpy as np

from hrsel.data.output_folder import owned_layout, staged_output
from hrsel.errors import DataError

COLOURS = {"green": (40, 160, 60), "blue": (40, 70, 200), "purple": (120, 50, 160),
           "yellow": (235, 200, 40), "red": (200, 40, 40), "orange": (240, 130, 30)}
FORMAT = "hrsel-billiard/1"
SPLITS = ("train", "valid", "test")
MIN_SIZE = 64  # smaller tables cannot hold 8 balls with readable numbers
DISC = 0.36  # radius of the white number disc, as a share of the ball's radius


@dataclass(frozen=True)
class BilliardParameters:
    size: int = 1000
    n_train: int = 8000
    n_valid: int = 2000
    n_test: int = 10000
    min_balls: int = 4
    max_balls: int = 8
    seed: int = 0


def sample_balls(rng: np.random.Generator, size: int, min_balls: int, max_balls: int) -> list[dict]:
    """Non-overlapping balls inside the cushions, with colour and number."""
    radius = size * 0.045
    margin = size * 0.06 + radius
    balls: list[dict] = []
    target = int(rng.integers(min_balls, max_balls + 1))
    for _ in range(10_000):
        r = float(radius * rng.uniform(0.9, 1.1))
        x, y = rng.uniform(margin, size - margin, size=2)
        if all((x - b["position"][0]) ** 2 + (y - b["position"][1]) ** 2 > (r + b["radius"] + 4) ** 2 for b in balls):
            colour = list(COLOURS)[int(rng.integers(len(COLOURS)))]
            balls.append({"position": [round(float(x), 2), round(float(y), 2), 0.0],
                          "number": int(rng.integers(1, 10)), "color": colour, "radius": round(r, 2)})
            if len(balls) == target:
                return balls
    raise DataError(f"cannot place {target} balls on a {size}x{size} table; use a larger size")


def render(balls: list[dict], size: int, rng: np.random.Generator) -> np.ndarray:
    """(size, size, 3) uint8 picture of the table and balls."""
    from PIL import Image, ImageDraw, ImageFont

    felt = np.array([25, 105, 55], np.float32) + rng.normal(0, 6, size=(size, size, 1)).astype(np.float32)
    table = np.clip(felt, 0, 255).astype(np.uint8)
    edge = int(size * 0.04)  # wooden cushions
    border = np.ones((size, size), bool)
    border[edge:size - edge, edge:size - edge] = False
    table[border] = (90, 50, 20)
    image = Image.fromarray(table)
    draw = ImageDraw.Draw(image)
    for ball in balls:
        x, y, _ = ball["position"]
        r = ball["radius"]
        base = np.array(COLOURS[ball["color"]])
        draw.ellipse([x - r, y - r, x + r, y + r], fill=tuple(int(c) for c in base * 0.75))
        draw.ellipse([x - 0.85 * r, y - 0.9 * r, x + 0.8 * r, y + 0.75 * r], fill=tuple(int(c) for c in base))
        hx, hy = x - 0.45 * r, y - 0.45 * r
        draw.ellipse([hx - 0.15 * r, hy - 0.15 * r, hx + 0.15 * r, hy + 0.15 * r],
                     fill=tuple(int(min(255, c + 90)) for c in base))
        disc = DISC * r
        draw.ellipse([x - disc, y - disc, x + disc, y + disc], fill=(245, 245, 240))
        font = ImageFont.load_default(size=max(6, int(0.42 * r)))
        draw.text((x, y), str(ball["number"]), fill=(10, 10, 10), font=font, anchor="mm")
    return np.asarray(image)


def _write(job: tuple[str, int, int, BilliardParameters]) -> None:
    from PIL import Image

    folder, split_index, item, params = job
    rng = np.random.default_rng([params.seed, split_index, item])
    size = params.size
    balls = sample_balls(rng, size, params.min_balls, params.max_balls)
    Image.fromarray(render(balls, size, rng)).save(Path(folder) / f"{item}.png", compress_level=1)
    (Path(folder) / f"{item}.json").write_text(json.dumps(balls))


def check_parameters(params: BilliardParameters) -> None:
    """DataError naming the first bad setting (by its command-line flag)."""
    if params.size < MIN_SIZE:
        raise DataError(f"size={params.size} (--size): billiard images need at least {MIN_SIZE} px per side "
                        f"(DPS: 1000)")
    if params.n_train < 1:
        raise DataError(f"n_train={params.n_train} (--n-train): the train split needs at least 1 image")
    for key, n in (("n_valid", params.n_valid), ("n_test", params.n_test)):
        if n < 0:
            raise DataError(f"{key}={n} (--{key.replace('_', '-')}): an image count cannot be negative")
    if not 1 <= params.min_balls <= params.max_balls:
        raise DataError(f"need 1 <= min_balls <= max_balls (--min-balls, --max-balls); got {params.min_balls}, "
                        f"{params.max_balls}")


def foreign_files(out: Path) -> list[str]:
    """Entries of `out` that `generate_billiard` does not write."""
    return owned_layout(out, {split: (lambda f: len(f.parts) == 1 and f.suffix in (".png", ".json"))
                              for split in SPLITS})


def generate_billiard(out_dir: str | os.PathLike, *, params: BilliardParameters = BilliardParameters(),
                      workers: int = 1, progress: bool = True, overwrite: bool = False) -> Path:
    """Write the three splits and `parameters.json` (last) under `out_dir`; returns it.

    Raises DataError before writing anything when a setting is invalid, when `out_dir` holds
    files of its own, or when it holds a data set and `overwrite` is False.
    """
    check_parameters(params)
    with staged_output(out_dir, overwrite=overwrite, foreign=foreign_files, what="billiard") as stage:
        _write_all(stage, params, workers=workers, progress=progress)
        meta = {**asdict(params), "format": FORMAT, "generator": "procedural (hrsel), not the DPS Kubric renders"}
        (stage / "parameters.json").write_text(json.dumps(meta, indent=2))
    return Path(out_dir)


def _write_all(out: Path, params: BilliardParameters, *, workers: int, progress: bool) -> None:
    from tqdm.auto import tqdm

    jobs = []
    for split_index, (split, n) in enumerate(zip(SPLITS, (params.n_train, params.n_valid, params.n_test))):
        (out / split).mkdir(parents=True, exist_ok=True)
        jobs += [(str(out / split), split_index, i, params) for i in range(n)]
    with tqdm(total=len(jobs), unit="img", desc="billiard", disable=not progress) as bar:
        if workers <= 1:
            for job in jobs:
                _write(job)
                bar.update()
        else:
            with ProcessPoolExecutor(workers, mp_context=get_context("spawn")) as ex:
                for _ in ex.map(_write, jobs, chunksize=16):
                    bar.update()

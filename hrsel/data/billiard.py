"""Billiard balls (DPS, Cordonnier et al. 2021): inter-patch reasoning over numbered balls.

Layout (the DPS release, and what `tools/make_billiard.py` writes):
    root/{train,valid,test}/<id>.png   1000 x 1000 renders
    root/{train,valid,test}/<id>.json  a list of balls {"position": [x, y, ...], "number": 1..9, "color": ...}
The x axis of `position` grows to the right of the image. Labels are computed by the
release's label functions; the default `max-left-right` is the larger number of the
leftmost and rightmost balls minus 1 (9 classes).
"""
from __future__ import annotations

import json
import logging
import os
from pathlib import Path
from typing import Callable

import torch

from hrsel.errors import DataError
from hrsel.tasks import TaskSpec

log = logging.getLogger(__name__)

URL = "http://storage.googleapis.com/gresearch/ptokp_patch_selection/billiard.tar.xz"
SPLITS = ("train", "valid", "test")
MIN_COLOURS = ("green", "blue", "purple")
MAX_COLOURS = ("yellow", "red", "orange")


def _x(ball: dict) -> float:
    return ball["position"][0]


def rightmost_number(balls: list[dict]) -> int:
    return max(balls, key=_x)["number"] - 1


def max_left_right(balls: list[dict]) -> int:
    return max(min(balls, key=_x)["number"], max(balls, key=_x)["number"]) - 1


def sum_all_modulo10(balls: list[dict]) -> int:
    return sum(b["number"] for b in balls) % 10


def left_color_min_max(balls: list[dict]) -> int:
    """Min of the numbers when the leftmost ball is green/blue/purple, max when yellow/red/orange; minus 1."""
    colour = min(balls, key=_x)["color"]
    if colour not in MIN_COLOURS + MAX_COLOURS:
        raise ValueError(f"leftmost ball colour {colour!r} is not one of {MIN_COLOURS + MAX_COLOURS}")
    pick = min if colour in MIN_COLOURS else max
    return pick(b["number"] for b in balls) - 1


LABELS: dict[str, tuple[Callable[[list[dict]], int], int]] = {
    "max-left-right": (max_left_right, 9),
    "rightmost-number": (rightmost_number, 9),
    "sum-all-modulo10": (sum_all_modulo10, 10),
    "left-color-min-max": (left_color_min_max, 9),
}


def read_balls(path: Path) -> list[dict]:
    """The ball list of one JSON file, checked; DataError names the file (and line)."""
    try:
        balls = json.loads(path.read_text())
    except OSError as exc:
        raise DataError(f"cannot read {path}: {exc}") from exc
    except json.JSONDecodeError as exc:
        raise DataError(f"{path}:{exc.lineno}: invalid JSON ({exc.msg})") from exc
    if isinstance(balls, dict) and "objects" in balls:
        balls = balls["objects"]
    if not isinstance(balls, list) or not balls:
        raise DataError(f"{path}: expected a non-empty list of balls, got {type(balls).__name__}")
    for i, ball in enumerate(balls):
        if not isinstance(ball, dict) or not {"position", "number"} <= set(ball):
            raise DataError(f"{path}: ball {i} lacks 'position' or 'number': {ball!r}")
    return balls


def find_split(root: Path, split: str) -> Path | None:
    for folder in (root / split, root / "billiard" / split):
        if folder.is_dir():
            return folder
    return None


def ensure_billiard(root: str | os.PathLike, split: str, *, download: bool = False, progress: bool = True) -> Path:
    """The split folder, downloading and extracting the release when asked."""
    root = Path(root)
    folder = find_split(root, split)
    if folder is not None:
        return folder
    if not download:
        raise DataError(f"billiard split {split!r} not found under {root}; download {URL} and extract it there "
                        f"(or pass download=True), or generate one with `python tools/make_billiard.py {root}`")
    from hrsel.data.download import download_url, extract_archive

    try:
        archive = download_url(URL, root / "billiard.tar.xz", progress=progress)
    except DataError as exc:
        raise DataError(f"{exc} Place billiard.tar.xz from {URL} in {root}, or generate the task offline with "
                        f"`python tools/make_billiard.py {root}`.") from exc
    extract_archive(archive, root)
    folder = find_split(root, split)
    if folder is None:
        raise DataError(f"{archive} did not contain a {split}/ folder; delete it and download again")
    return folder


class Billiard(torch.utils.data.Dataset):
    """One split of the billiard task; `label` picks the release's label function.

    `augment` (default: train split) is the DPS augmentation: pad to `padded_size` and a
    random crop back to the image size. `image_size` (W, H) is checked on every image.
    """

    def __init__(self, *, root: str | os.PathLike, split: str = "train", label: str = "max-left-right",
                 augment: bool | None = None, padded_size: int = 1100, image_size: tuple[int, int] | None = None,
                 download: bool = False):
        if split not in SPLITS:
            raise DataError(f"billiard split must be one of {SPLITS}, got {split!r}")
        if label not in LABELS:
            raise DataError(f"unknown billiard label {label!r}; valid: {list(LABELS)}")
        self.folder = ensure_billiard(root, split, download=download)
        self.split, self.label = split, label
        label_fn, num_classes = LABELS[label]
        self.tasks = {label: TaskSpec("multiclass", num_classes)}
        params_path = self.folder.parent / "parameters.json"
        if image_size is None:
            size = json.loads(params_path.read_text()).get("size", 1000) if params_path.is_file() else 1000
            image_size = (size, size)
        self.image_size = tuple(image_size)
        self.ids = sorted((p.stem for p in self.folder.glob("*.png")), key=lambda s: (len(s), s))
        if not self.ids:
            raise DataError(f"no PNG images in {self.folder}")
        self.labels = []
        for sample_id in self.ids:
            path = self.folder / f"{sample_id}.json"
            if not path.is_file():
                raise DataError(f"{self.folder / (sample_id + '.png')} has no label file {path}")
            try:
                self.labels.append(int(label_fn(read_balls(path))))
            except (ValueError, TypeError, KeyError) as exc:
                raise DataError(f"{path}: cannot compute label {label!r}: {exc}") from exc
        self.augment = split == "train" if augment is None else augment
        self.padded_size = padded_size

    def __len__(self) -> int:
        return len(self.ids)

    def __getitem__(self, index: int) -> dict:
        from hrsel.data.augment import pad_random_crop
        from hrsel.data.image_file import load_rgb

        path = self.folder / f"{self.ids[index]}.png"
        image = load_rgb(path, expected=(self.image_size[1], self.image_size[0]))  # (3, H, W) uint8
        if self.augment:
            image = pad_random_crop(image, (self.padded_size, self.padded_size))
        targets = {self.label: torch.tensor(self.labels[index], dtype=torch.int64)}
        return {"image": image, "targets": targets, "id": f"{self.split}/{self.ids[index]}"}

"""Billiard balls (DPS, Cordonnier et al. 2021): inter-patch reasoning over numbered balls.

Layout (the DPS release, and what `tools/make_billiard.py` writes):
    root/{train,valid,test}/<id>.png   1000 x 1000 renders
    root/{train,valid,test}/<id>.json  a list of balls {"position": [x, y, ...], "number": 1..9, "color": ...}
The x axis of `position` grows to the right of the image. Labels are computed by the
release's label functions; the default `max-left-right` is the larger number of the
leftmost and rightmost balls minus 1 (9 classes). Every sample needs both files and balls
numbered 1..9; the loader lists what is missing or wrong by file instead of skipping it.
"""
from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Callable

import torch

from hrsel.data.jsonfile import read_json
from hrsel.errors import DataError
from hrsel.tasks import TaskSpec

log = logging.getLogger(__name__)

URL = "http://storage.googleapis.com/gresearch/ptokp_patch_selection/billiard.tar.xz"
SPLITS = ("train", "valid", "test")
MIN_COLOURS = ("green", "blue", "purple")
MAX_COLOURS = ("yellow", "red", "orange")
NUMBERS = range(1, 10)  # the number on a ball
DPS_PADDING = 1.1  # DPS pads 1000 px images to 1100 before the random crop
MAX_PADDING = 1.5  # a larger pad could shift most of the image out of the crop
_LISTED = 5  # missing files named in a message


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
    balls = read_json(path, fix="restore the file from the release or regenerate the data set")
    if isinstance(balls, dict) and "objects" in balls:
        balls = balls["objects"]
    if not isinstance(balls, list) or not balls:
        raise DataError(f"{path}: expected a non-empty list of balls, got {type(balls).__name__}")
    for i, ball in enumerate(balls):
        check_ball(ball, path, i)
    return balls


def check_ball(ball: object, path: Path, i: int) -> None:
    """One ball: a dict with a numeric `position` [x, y, ...] and an integer `number` in 1..9."""
    if not isinstance(ball, dict):
        raise DataError(f"{path}: ball {i} is a {type(ball).__name__}, not an object: {ball!r}")
    missing = [key for key in ("position", "number") if key not in ball]
    if missing:
        raise DataError(f"{path}: ball {i} lacks {' and '.join(repr(k) for k in missing)}: {ball!r}")
    position, number = ball["position"], ball["number"]
    if (not isinstance(position, list) or len(position) < 2
            or not all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in position)):
        raise DataError(f"{path}: ball {i} position {position!r} is not a list of numbers [x, y, ...]")
    if isinstance(number, bool) or not isinstance(number, int) or number not in NUMBERS:
        raise DataError(f"{path}: ball {i} number {number!r} is not an integer in 1..9")


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


def image_size_of(root: Path) -> tuple[int, int]:
    """(W, H) from the generator's `parameters.json` ("size"), else the release's 1000 x 1000."""
    path = root / "parameters.json"
    if not path.is_file():
        return (1000, 1000)
    params = read_json(path, fix="regenerate the data set or delete the file")
    size = params.get("size", 1000) if isinstance(params, dict) else None
    if isinstance(size, bool) or not isinstance(size, int) or size < 1:
        raise DataError(f"{path}: 'size' must be a positive integer (the image side), got {size!r}")
    return (size, size)


def list_samples(folder: Path) -> list[str]:
    """Sample ids with both `<id>.png` and `<id>.json`; DataError listing the files that lack their pair."""
    pngs = {p.stem for p in folder.glob("*.png")}
    jsons = {p.stem for p in folder.glob("*.json")}
    if not pngs and not jsons:
        raise DataError(f"no billiard samples (<id>.png + <id>.json) in {folder}")
    lacking = ([f"{folder / s}.json has no image {s}.png" for s in sorted(jsons - pngs)]
               + [f"{folder / s}.png has no label file {s}.json" for s in sorted(pngs - jsons)])
    if lacking:
        more = f"; and {len(lacking) - _LISTED} more" if len(lacking) > _LISTED else ""
        shown = "; ".join(lacking[:_LISTED]) + more
        raise DataError(f"{len(lacking)} billiard sample(s) in {folder} lack a file: {shown}. Every sample needs "
                        "<id>.png and <id>.json; re-extract or regenerate the split")
    return sorted(pngs, key=lambda s: (len(s), s))


def compute_label(path: Path, label: str) -> int:
    """The label of one sample's JSON; DataError naming the file when it cannot be computed or is out of range."""
    label_fn, num_classes = LABELS[label]
    try:
        value = int(label_fn(read_balls(path)))
    except (ValueError, TypeError, KeyError) as exc:
        raise DataError(f"{path}: cannot compute label {label!r}: {exc}") from exc
    if not 0 <= value < num_classes:
        raise DataError(f"{path}: label {label!r} is {value}, outside 0..{num_classes - 1}")
    return value


def check_padding(padded_size: int | None, image_size: tuple[int, int]) -> int:
    """The DPS pad size for (W, H) images: 1.1 x the larger side by default, between 1 and 1.5 x when given."""
    side = max(image_size)
    if padded_size is None:
        return round(DPS_PADDING * side)
    if (isinstance(padded_size, bool) or not isinstance(padded_size, int)
            or not side <= padded_size <= MAX_PADDING * side):
        raise DataError(f"billiard padded_size={padded_size!r} does not suit {image_size[0]}x{image_size[1]} images: "
                        f"it must lie in {side}..{int(MAX_PADDING * side)} (DPS: 1.1 x the side, "
                        f"{round(DPS_PADDING * side)} here); a larger pad shifts most of the image out of the crop")
    return padded_size


class Billiard(torch.utils.data.Dataset):
    """One split of the billiard task; `label` picks the release's label function.

    `augment` (default: train split) is the DPS augmentation: pad to `padded_size` and a
    random crop back to the image size; `padded_size` defaults to 1.1 x the image side (DPS:
    1100 for 1000) and may be at most 1.5 x. `image_size` (W, H) is checked on every image.
    """

    def __init__(self, *, root: str | os.PathLike, split: str = "train", label: str = "max-left-right",
                 augment: bool | None = None, padded_size: int | None = None,
                 image_size: tuple[int, int] | None = None, download: bool = False):
        if split not in SPLITS:
            raise DataError(f"billiard split must be one of {SPLITS}, got {split!r}")
        if label not in LABELS:
            raise DataError(f"unknown billiard label {label!r}; valid: {list(LABELS)}")
        self.folder = ensure_billiard(root, split, download=download)
        self.split, self.label = split, label
        self.tasks = {label: TaskSpec("multiclass", LABELS[label][1])}
        self.image_size = tuple(image_size) if image_size is not None else image_size_of(self.folder.parent)
        self.ids = list_samples(self.folder)
        self.labels = [compute_label(self.folder / f"{sample_id}.json", label) for sample_id in self.ids]
        self.augment = split == "train" if augment is None else augment
        self.padded_size = check_padding(padded_size, self.image_size)

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

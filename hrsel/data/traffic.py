"""Swedish Traffic Signs, the speed-limit subset of ATS (Katharopoulos & Fleuret, 2019).

Files under `root` (the layout the download produces):
    Set1/annotations.txt, Set1/<images of Set1Part0.zip>   (training set for seed 0)
    Set2/annotations.txt, Set2/<images of Set2Part0.zip>   (test set for seed 0)

Annotation lines read `file:sign;sign;...`, each sign `VISIBILITY, x_max, y_max, x_min,
y_min, TYPE, NAME`; numbers lose trailing junk characters until they parse. Rules (ATS):
skip `MISC_SIGNS`; an image without (other) signs is EMPTY; otherwise keep the speed-limit
signs (50_SIGN, 70_SIGN, 80_SIGN) sorted by visibility (VISIBLE, BLURRED, SIDE_ROAD,
OCCLUDED), then larger area first; drop the image if none is left or the first is not
VISIBLE; its label is the first sign. Split: Set{1 + (seed + 1 + train) % 2}. With the
official annotation files the subset has 747 (Set1) and 684 (Set2) images; that is checked.
Other sign names (PEDESTRIAN_CROSSING, 30_SIGN, ...) are not classes and are skipped, but a
misspelt class (`50_sign`, `50-SIGN`) or an empty name is an error naming the line: it would
silently turn a labelled image into a dropped or EMPTY one.
"""
from __future__ import annotations

import json
import logging
import os
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import torch

from hrsel.data.download import check_md5, download_url, extract_archive, md5sum
from hrsel.data.image_file import load_rgb
from hrsel.errors import DataError
from hrsel.tasks import TaskSpec

log = logging.getLogger(__name__)

BASE_URL = "http://www.isy.liu.se/cvl/research/trafficSigns/swedishSignsSummer/"
ANNOTATION_MD5 = {"Set1": "9106a905a86209c95dc9b51d12f520d6", "Set2": "09debbc67f6cd89c1e2a2688ad1d03ca"}
EXPECTED_COUNTS = {"Set1": 747, "Set2": 684}  # ATS subset sizes with the official annotations
CLASSES = ("EMPTY", "50_SIGN", "70_SIGN", "80_SIGN")
VISIBILITY = ("VISIBLE", "BLURRED", "SIDE_ROAD", "OCCLUDED")
IMAGE_SIZE = (960, 1280)  # (height, width) of every image
TASKS = {"speed_limit": TaskSpec("multiclass", len(CLASSES))}
_INDEX_VERSION = 1


@dataclass(frozen=True)
class Sign:
    visibility: str
    x_max: float
    y_max: float
    x_min: float
    y_min: float
    type: str
    name: str

    @property
    def area(self) -> float:
        return (self.x_max - self.x_min) * (self.y_max - self.y_min)

    def sort_key(self) -> tuple[int, float]:
        """Most visible first, then the larger sign first."""
        return VISIBILITY.index(self.visibility), -self.area


def parse_number(text: str) -> float:
    """float(text) after dropping trailing characters until it parses ("123.4q" -> 123.4)."""
    original = text
    while text:
        try:
            return float(text)
        except ValueError:
            text = text[:-1]
    raise ValueError(f"no number in {original!r}")


def parse_line(line: str, *, where: str) -> tuple[str, list[Sign], int]:
    """(file name, signs without MISC_SIGNS, number of MISC_SIGNS skipped) of one annotation line."""
    if ":" not in line:
        raise DataError(f"{where}: expected 'file:sign;sign;...', got {line!r}")
    name, rest = line.split(":", 1)
    signs, misc = [], 0
    for text in rest.split(";"):
        if text == "":
            continue
        parts = [p.strip() for p in text.split(",")]
        if parts[0] == "MISC_SIGNS":
            misc += 1
            continue
        if len(parts) != 7 or parts[0] not in VISIBILITY:
            raise DataError(f"{where}: sign {text!r} is not 'VISIBILITY, x_max, y_max, x_min, y_min, TYPE, "
                            f"NAME' with VISIBILITY in {VISIBILITY}")
        try:
            box = [parse_number(p) for p in parts[1:5]]
        except ValueError as exc:
            raise DataError(f"{where}: bad coordinate in sign {text!r}: {exc}") from exc
        check_sign_name(parts[6], where=where, text=text)
        signs.append(Sign(parts[0], *box, type=parts[5], name=parts[6]))
    return name.strip(), signs, misc


def check_sign_name(name: str, *, where: str, text: str) -> None:
    """DataError for an empty sign name or a class written another way (case, '-' or ' ' for '_')."""
    if not name:
        raise DataError(f"{where}: sign {text!r} has an empty NAME; classes: {', '.join(CLASSES[1:])}")
    canonical = name.upper().replace("-", "_").replace(" ", "_")
    if canonical != name and canonical in CLASSES[1:]:
        raise DataError(f"{where}: sign name {name!r} is not a known class; did you mean {canonical!r}? "
                        f"classes: {', '.join(CLASSES[1:])} (other names are skipped)")


def label_of(signs: list[Sign]) -> tuple[int | None, str]:
    """(class index or None when dropped, the rule that decided)."""
    if not signs:
        return CLASSES.index("EMPTY"), "empty"
    limits = sorted((s for s in signs if s.name in CLASSES[1:]), key=Sign.sort_key)
    if not limits:
        return None, "dropped_no_speed_limit"
    if limits[0].visibility != "VISIBLE":
        return None, "dropped_first_not_visible"
    return CLASSES.index(limits[0].name), "speed_limit"


def set_for(split: str, seed: int) -> str:
    if split not in ("train", "test"):
        raise DataError(f"traffic split must be 'train' or 'test', got {split!r}")
    return f"Set{1 + (seed + 1 + int(split == 'train')) % 2}"


def _image_path(folder: Path, name: str) -> Path | None:
    for candidate in (folder / name, folder / f"{folder.name}Part0" / name):
        if candidate.is_file():
            return candidate
    return None


def build_index(root: str | os.PathLike, set_name: str) -> dict:
    """Parse `root/<set>/annotations.txt` by the ATS rules: images, labels and per-rule counts."""
    folder = Path(root) / set_name
    path = folder / "annotations.txt"
    try:
        lines = path.read_text(encoding="utf-8", errors="strict").splitlines()
    except (OSError, UnicodeDecodeError) as exc:
        raise DataError(f"cannot read {path}: {exc}") from exc
    images, labels, counts, missing = [], [], Counter(), []
    for lineno, line in enumerate(lines, 1):
        line = line.strip()
        if not line:
            continue
        name, signs, misc = parse_line(line, where=f"{path}:{lineno}")
        counts["misc_signs_skipped"] += misc
        label, rule = label_of(signs)
        counts[rule] += 1
        if label is None:
            continue
        image = _image_path(folder, name)
        if image is None:
            missing.append(f"{folder / name} (line {lineno})")
            continue
        images.append(str(image.relative_to(root)))
        labels.append(label)
    if missing:
        raise DataError(f"{len(missing)} image(s) listed in {path} are missing, e.g. {missing[:3]}; "
                        f"extract {set_name}Part0.zip into {folder}")
    digest = md5sum(path)
    official = digest == ANNOTATION_MD5[set_name]
    if official and len(images) != EXPECTED_COUNTS[set_name]:
        raise DataError(f"{path} gives {len(images)} images, the ATS subset has {EXPECTED_COUNTS[set_name]}: "
                        "the parsing rules are broken")
    return {"version": _INDEX_VERSION, "set": set_name, "annotations_md5": digest, "official": official,
            "images": images, "labels": labels, "counts": dict(counts)}


def load_index(root: str | os.PathLike, set_name: str) -> dict:
    """`build_index`, cached in `root/<set>/hrsel_index.json` until the annotations change."""
    cache = Path(root) / set_name / "hrsel_index.json"
    annotations = Path(root) / set_name / "annotations.txt"
    if cache.is_file() and annotations.is_file():
        try:
            index = json.loads(cache.read_text())
            if (isinstance(index, dict) and index.get("version") == _INDEX_VERSION
                    and index.get("annotations_md5") == md5sum(annotations)):
                if _valid_index(index):
                    return index
                log.warning("cached index %s holds labels outside 0..%d or mismatched lists; rebuilding it",
                            cache, len(CLASSES) - 1)
        except (OSError, UnicodeDecodeError, json.JSONDecodeError):
            log.warning("cached index %s is unreadable; rebuilding it", cache)
    index = build_index(root, set_name)
    log.info("traffic %s: %d images kept; rule counts %s", set_name, len(index["images"]), index["counts"])
    try:
        cache.write_text(json.dumps(index))
    except OSError as exc:
        log.warning("cannot cache the parsed index at %s: %s", cache, exc)
    return index


def _valid_index(index: dict) -> bool:
    images, labels = index.get("images"), index.get("labels")
    return (isinstance(images, list) and isinstance(labels, list) and len(images) == len(labels)
            and all(isinstance(v, int) and not isinstance(v, bool) and 0 <= v < len(CLASSES) for v in labels))


def ensure_traffic_signs(root: str | os.PathLike, *, download: bool = True, progress: bool = True) -> Path:
    """Make sure both sets are under `root`, downloading and extracting what is missing."""
    root = Path(root)
    for set_name in ("Set1", "Set2"):
        folder = root / set_name
        annotations = folder / "annotations.txt"
        url = f"{BASE_URL}{set_name}/"
        if annotations.is_file() and (any(folder.glob("*.jpg")) or any(folder.glob("*/*.jpg"))):
            if not check_md5(annotations, ANNOTATION_MD5[set_name]):
                log.warning("%s differs from the official annotations (md5); the 747/684 counts are not checked",
                            annotations)
            continue
        if not download:
            raise DataError(f"traffic signs {set_name} not found under {folder}; download {url}{set_name}Part0.zip "
                            f"and {url}annotations.txt, extract the zip into {folder} and put annotations.txt "
                            "there (or pass download=True)")
        try:
            download_url(url + "annotations.txt", annotations, md5=ANNOTATION_MD5[set_name], progress=progress)
            archive = download_url(url + f"{set_name}Part0.zip", root / f"{set_name}Part0.zip", progress=progress)
        except DataError as exc:
            raise DataError(f"{exc} The traffic sign data set needs {url}{set_name}Part0.zip and "
                            f"{url}annotations.txt in {folder} (zip extracted there).") from exc
        extract_archive(archive, folder)
    return root


class TrafficSigns(torch.utils.data.Dataset):
    """The ATS speed-limit subset: 4 classes (EMPTY, 50, 70, 80), 747 train / 684 test images.

    `image_size` (H, W) resizes (IPS: (1200, 1600)); `augment` (default: train split) applies
    the ATS/DPS augmentation: a random translation of up to `max_shift` pixels (pad to
    1160 x 1480 and crop) and, with probability 0.8, x -> a x + b, a in [0.8, 1.2], b in [-0.1, 0.1].
    `as_source=True` returns a lazy, equally augmented image source instead of a tensor.
    """

    def __init__(self, *, root: str | os.PathLike, split: str = "train", seed: int = 0, download: bool = True,
                 image_size: tuple[int, int] | None = None, augment: bool | None = None,
                 max_shift: tuple[int, int] = (100, 100), colour_p: float = 0.8, as_source: bool = False):
        self.root, self.split = Path(root), split
        self.set_name = set_for(split, seed)
        ensure_traffic_signs(root, download=download)
        index = load_index(root, self.set_name)
        self.images, self.labels, self.counts = index["images"], index["labels"], index["counts"]
        self.tasks = dict(TASKS)
        self.image_size = tuple(image_size) if image_size is not None else None
        self.augment = split == "train" if augment is None else augment
        self.max_shift, self.colour_p, self.as_source = tuple(max_shift), colour_p, as_source
        if as_source and self.image_size is not None:
            raise DataError("traffic: as_source=True reads the original 960x1280 pixels; drop image_size")

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, index: int) -> dict:
        from hrsel.data import augment as aug

        path = self.root / self.images[index]
        params = (aug.sample_params(None, max_shift=self.max_shift, colour_p=self.colour_p)
                  if self.augment else aug.AugmentParams())
        if self.as_source:
            from hrsel.io import open_image

            image = aug.AugmentedSource(open_image(str(path), fill=0), params)
        else:
            image = load_rgb(path, expected=IMAGE_SIZE)
            if self.image_size is not None:
                image = torch.nn.functional.interpolate(image[None].float(), size=self.image_size, mode="bilinear",
                                                        antialias=True, align_corners=False)
                image = image[0].round().clamp(0, 255).to(torch.uint8)
            image = aug.apply_params(image, params)
        targets = {"speed_limit": torch.tensor(self.labels[index], dtype=torch.int64)}
        return {"image": image, "targets": targets, "id": f"{self.set_name}/{Path(self.images[index]).name}"}

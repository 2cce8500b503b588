"""CUB-200-2011 from its official folder layout (`CUB_200_2011/` or its contents under root).

Files: images.txt (`<id> <class folder>/<file>.jpg`), image_class_labels.txt (`<id> <class 1..200>`),
train_test_split.txt (`<id> <1 train | 0 test>`), classes.txt, images/. The standard split
has 5994 train / 5794 test images (checked when all 11788 are listed). Preprocessing as
NTS-Net (used by DPS): resize to 600 x 600; train: random 448 crop + horizontal flip; test:
centre 448 crop.
"""
from __future__ import annotations

import os
from pathlib import Path

import torch

from hrsel.data.image_file import load_rgb
from hrsel.errors import DataError
from hrsel.tasks import TaskSpec

TASKS = {"species": TaskSpec("multiclass", 200)}
OFFICIAL_COUNTS = {"train": 5994, "test": 5794}


def _read_table(path: Path, columns: int) -> dict[int, list[str]]:
    if not path.is_file():
        raise DataError(f"CUB-200-2011 file {path} is missing; the folder must hold the official release")
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as exc:
        raise DataError(f"cannot read CUB-200-2011 file {path}: {exc}; re-extract the release") from exc
    table = {}
    for lineno, line in enumerate(lines, 1):
        if not line.strip():
            continue
        parts = line.split()
        if len(parts) != columns or not parts[0].isdigit():
            raise DataError(f"{path}:{lineno}: expected {columns} fields '<id> ...', got {line!r}")
        table[int(parts[0])] = parts[1:]
    return table


def find_cub_root(root: str | os.PathLike) -> Path:
    for folder in (Path(root), Path(root) / "CUB_200_2011"):
        if (folder / "images.txt").is_file():
            return folder
    raise DataError(f"no CUB-200-2011 release under {root}: expected images.txt there or in {root}/CUB_200_2011; "
                    "download CUB_200_2011.tgz from the Caltech page and extract it there")


def read_split(root: str | os.PathLike, split: str) -> tuple[list[str], list[int]]:
    """Relative image paths and 0-based class labels of the official split."""
    if split not in ("train", "test"):
        raise DataError(f"CUB-200 split must be 'train' or 'test', got {split!r}")
    folder = find_cub_root(root)
    images = _read_table(folder / "images.txt", 2)
    classes = _read_table(folder / "image_class_labels.txt", 2)
    is_train = _read_table(folder / "train_test_split.txt", 2)
    paths, labels = [], []
    for image_id, (rel,) in sorted(images.items()):
        if image_id not in classes or image_id not in is_train:
            raise DataError(f"image id {image_id} ({rel}) of {folder / 'images.txt'} has no class or split entry")
        label, flag = classes[image_id][0], is_train[image_id][0]
        if not label.isdigit() or not 1 <= int(label) <= 200:
            raise DataError(f"{folder / 'image_class_labels.txt'}: image id {image_id} ({rel}) has class {label!r}, "
                            "not 1..200")
        if flag not in ("0", "1"):
            raise DataError(f"{folder / 'train_test_split.txt'}: image id {image_id} ({rel}) has split flag {flag!r}, "
                            "not 1 (train) or 0 (test)")
        label = int(label)
        if (flag == "1") == (split == "train"):
            paths.append(str(Path("images") / rel))
            labels.append(label - 1)
    if len(images) == 11788 and len(paths) != OFFICIAL_COUNTS[split]:
        raise DataError(f"{folder}: {len(paths)} {split} images, the official split has {OFFICIAL_COUNTS[split]}")
    return paths, labels


class CUB200(torch.utils.data.Dataset):
    """CUB-200-2011 images (3, crop, crop) uint8 with the `species` label (200 classes)."""

    def __init__(self, *, root: str | os.PathLike, split: str = "train", resize: int = 600, crop: int = 448,
                 augment: bool | None = None):
        self.folder = find_cub_root(root)
        self.split = split
        self.images, self.labels = read_split(root, split)
        self.tasks = dict(TASKS)
        self.resize, self.crop = resize, crop
        self.augment = split == "train" if augment is None else augment

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, index: int) -> dict:
        image = load_rgb(self.folder / self.images[index])
        image = torch.nn.functional.interpolate(image[None].float(), size=(self.resize, self.resize),
                                                mode="bilinear", antialias=True, align_corners=False)[0]
        image = image.round().clamp(0, 255).to(torch.uint8)  # (3, resize, resize)
        span = self.resize - self.crop
        if self.augment:
            top, left = (int(v) for v in torch.randint(0, span + 1, (2,)))
        else:
            top = left = span // 2
        image = image[:, top:top + self.crop, left:left + self.crop]
        if self.augment and torch.rand(()) < 0.5:
            image = image.flip(-1)
        targets = {"species": torch.tensor(self.labels[index], dtype=torch.int64)}
        return {"image": image.contiguous(), "targets": targets, "id": Path(self.images[index]).stem}

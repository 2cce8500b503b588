"""Megapixel MNIST as a DataLoader-ready data set over the generator's zarr output.

Items are `{"image", "targets", "id"}`. The image is a (1, H, W) uint8 tensor for
canvases up to `max_tensor_pixels`, otherwise (or with `as_source=True`) a lazy
`hrsel.io.ZarrSource`, so 20000^2 canvases are never materialised. Nothing is kept
open between items: the data set pickles cheaply into DataLoader workers.
"""
from __future__ import annotations

import json
import os
from pathlib import Path

import torch

from hrsel.data.megapixel_mnist_gen import FORMAT
from hrsel.errors import DataError
from hrsel.tasks import TaskSpec

TASKS = {
    "majority": TaskSpec("multiclass", 10),
    "max": TaskSpec("multiclass", 10),
    "top": TaskSpec("multiclass", 10),
    "multi": TaskSpec("multilabel", 10),
}
SPLITS = ("train", "test")


def read_parameters(root: str | os.PathLike) -> dict:
    """The generator's `parameters.json`; raises DataError when the folder is not a finished data set."""
    path = Path(root) / "parameters.json"
    if not path.is_file():
        raise DataError(
            f"{path} not found: {root} is not a (finished) Megapixel MNIST data set. Create one with "
            f"`python tools/make_megapixel_mnist.py {root}`"
        )
    try:
        params = json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise DataError(f"{path} is not valid JSON (line {exc.lineno}): {exc.msg}") from exc
    if params.get("format") != FORMAT:
        raise DataError(f"{path}: format {params.get('format')!r} is not {FORMAT!r}; regenerate the data set")
    return params


class MegapixelMNIST(torch.utils.data.Dataset):
    """Generated Megapixel MNIST split; `tasks` picks which labels go into `targets`."""

    def __init__(self, *, root: str | os.PathLike, split: str = "train",
                 tasks: tuple[str, ...] = tuple(TASKS), as_source: bool | None = None,
                 max_tensor_pixels: int = 4096 * 4096):
        if split not in SPLITS:
            raise DataError(f"Megapixel MNIST split must be one of {SPLITS}, got {split!r}")
        unknown = [t for t in tasks if t not in TASKS]
        if unknown:
            raise DataError(f"unknown Megapixel MNIST task(s) {unknown}; valid: {list(TASKS)}")
        self.root, self.split = Path(root), split
        self.parameters = read_parameters(root)
        self.tasks = {t: TASKS[t] for t in tasks}
        self.image_size = (int(self.parameters["width"]), int(self.parameters["height"]))  # (W, H)
        self.as_source = (self.image_size[0] * self.image_size[1] > max_tensor_pixels
                          if as_source is None else as_source)
        labels_path = self.root / split / "labels.json"
        try:
            labels = json.loads(labels_path.read_text())
        except (OSError, json.JSONDecodeError) as exc:
            raise DataError(f"cannot read labels {labels_path}: {exc}; regenerate the data set") from exc
        self.labels = labels
        n = len(labels["majority"])
        expected = self.parameters[f"n_{split}"]
        if n != expected or any(len(labels[t]) != n for t in TASKS):
            raise DataError(f"{labels_path} has {n} items, parameters.json says n_{split}={expected}")

    def __len__(self) -> int:
        return len(self.labels["majority"])

    def image_path(self, index: int) -> Path:
        return self.root / self.split / "images.zarr" / f"{index:05d}"

    def targets(self, index: int) -> dict[str, torch.Tensor]:
        out = {}
        for task, spec in self.tasks.items():
            value = self.labels[task][index]
            out[task] = (torch.tensor(value, dtype=torch.float32) if spec.kind == "multilabel"
                         else torch.tensor(value, dtype=torch.int64))
        return out

    def __getitem__(self, index: int) -> dict:
        if not 0 <= index < len(self):
            raise IndexError(f"index {index} out of range for {len(self)} items of {self.root / self.split}")
        path = self.image_path(index)
        if not path.exists():
            raise DataError(f"image {path} is missing; regenerate the data set")
        if self.as_source:
            from hrsel.io import ZarrSource

            image = ZarrSource(str(path), fill=0)
        else:
            import zarr

            array = zarr.open_array(store=str(path), mode="r")
            image = torch.from_numpy(array[...]).permute(2, 0, 1).contiguous()  # (H, W, 1) -> (1, H, W)
        return {"image": image, "targets": self.targets(index), "id": f"{self.split}/{index:05d}"}

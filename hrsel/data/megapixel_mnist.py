"""Megapixel MNIST as a DataLoader-ready data set over the generator's zarr output.

Items are `{"image", "targets", "id"}`. The image is a (1, H, W) uint8 tensor for
canvases up to `max_tensor_pixels`, otherwise (or with `as_source=True`) a lazy
`hrsel.io.ZarrSource`, so 20000^2 canvases are never materialised. Nothing is kept
open between items: the data set pickles cheaply into DataLoader workers.

Every error names the file and the item: a malformed `parameters.json` or `labels.json`
(missing task, value out of range), an image whose metadata or chunk cannot be decoded,
and a chunk deleted from disk (zarr would read it as blank: the generator's
`stored_chunks` attribute says which chunks hold pixels). The digits' origin
(`parameters.json` "digits") is logged, loudly when they were drawn from a font.
"""
from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any

import numpy as np
import torch

from hrsel.data.megapixel_mnist_gen import FORMAT, STORED_CHUNKS
from hrsel.data.jsonfile import read_json
from hrsel.errors import DataError
from hrsel.tasks import TaskSpec

TASKS = {
    "majority": TaskSpec("multiclass", 10),
    "max": TaskSpec("multiclass", 10),
    "top": TaskSpec("multiclass", 10),
    "multi": TaskSpec("multilabel", 10),
}
SPLITS = ("train", "test")
REQUIRED = {"width": 28, "height": 28, "n_train": 1, "n_test": 0}  # parameters.json key -> smallest value

log = logging.getLogger(__name__)


def read_parameters(root: str | os.PathLike) -> dict:
    """The generator's `parameters.json`; raises DataError when the folder is not a finished data set."""
    path = Path(root) / "parameters.json"
    if not path.is_file():
        raise DataError(
            f"{path} not found: {root} is not a (finished) Megapixel MNIST data set. Create one with "
            f"`python tools/make_megapixel_mnist.py {root}`"
        )
    params = read_json(path, fix="regenerate the data set")
    if not isinstance(params, dict):
        raise DataError(f"{path} holds a JSON {type(params).__name__}, not an object; regenerate the data set")
    if params.get("format") != FORMAT:
        raise DataError(f"{path}: format {params.get('format')!r} is not {FORMAT!r}; regenerate the data set")
    for key, least in REQUIRED.items():
        value = params.get(key)
        if isinstance(value, bool) or not isinstance(value, int) or value < least:
            raise DataError(f"{path}: {key!r} must be an integer >= {least}, got {value!r}; regenerate the data set")
    return params


def log_digits(root: Path, params: dict) -> None:
    """Say where the digits of a data set came from; a warning unless real MNIST."""
    digits, note = params.get("digits"), params.get("digits_note", "")
    if digits == "mnist":
        log.info("Megapixel MNIST %s: MNIST digits (%s)", root, note)
    elif digits == "rendered":
        log.warning("Megapixel MNIST %s holds digits RENDERED FROM A FONT, not MNIST: results are not comparable "
                    "to the papers. Regenerate it with MNIST (tools/make_megapixel_mnist.py --mnist-dir DIR "
                    "--overwrite) for real runs", root)
    elif digits == "mnist-t10k-split":
        log.warning("Megapixel MNIST %s: digits from the MNIST t10k split only (%s)", root, note)
    else:
        log.warning("Megapixel MNIST %s: parameters.json does not say where its digits came from (digits=%r)",
                    root, digits)


def check_labels(labels: Any, path: Path, n: int) -> None:
    """labels.json: every task a list of `n` values in range; DataError names the task and the item."""
    if not isinstance(labels, dict):
        raise DataError(f"{path} holds a JSON {type(labels).__name__}, not an object; regenerate the data set")
    missing = [t for t in TASKS if t not in labels]
    if missing:
        raise DataError(f"{path} has no labels for task(s) {missing} (it has {sorted(labels)}); regenerate the "
                        "data set")
    for task in TASKS:
        values = labels[task]
        if not isinstance(values, list) or len(values) != n:
            got = len(values) if isinstance(values, list) else type(values).__name__
            raise DataError(f"{path}: task {task!r} has {got} labels, parameters.json says {n} items")
        shape = (n, 10) if task == "multi" else (n,)
        valid = (0, 1) if task == "multi" else tuple(range(10))
        try:
            array = np.asarray(values, dtype=np.float64).reshape(shape)
        except (TypeError, ValueError) as exc:
            kind = "10-dim 0/1 vectors" if task == "multi" else "integers"
            raise DataError(f"{path}: task {task!r} labels are not {kind}: {exc}; regenerate the data set") from exc
        bad = ~np.isin(array, valid)
        if bad.any():
            item = int(np.argwhere(bad)[0][0])
            raise DataError(f"{path}: task {task!r}, item {item}: label {values[item]!r} is not in "
                            f"{valid[0]}..{valid[-1]}; regenerate the data set")


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
        log_digits(self.root, self.parameters)
        self.tasks = {t: TASKS[t] for t in tasks}
        self.image_size = (int(self.parameters["width"]), int(self.parameters["height"]))  # (W, H)
        self.as_source = (self.image_size[0] * self.image_size[1] > max_tensor_pixels
                          if as_source is None else as_source)
        labels_path = self.root / split / "labels.json"
        labels = read_json(labels_path, fix="regenerate the data set")
        check_labels(labels, labels_path, self.parameters[f"n_{split}"])
        self.labels = labels

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
        path, item = self.image_path(index), f"{self.split}/{index:05d}"
        if not path.exists():
            raise DataError(f"image {path} (item {item}) is missing; regenerate the data set")
        array = open_image_array(path, item=item, shape=(self.image_size[1], self.image_size[0], 1))
        if self.as_source:
            from hrsel.io import ZarrSource

            image = ZarrSource(str(path), fill=0)
        else:
            image = torch.from_numpy(read_pixels(array, path, item=item)).permute(2, 0, 1).contiguous()  # (1, H, W)
        return {"image": image, "targets": self.targets(index), "id": item}


def open_image_array(path: Path, *, item: str, shape: tuple[int, int, int]) -> Any:
    """The image's zarr array, checked: readable metadata, the canvas shape, no stored chunk deleted."""
    import zarr

    try:
        array = zarr.open_array(store=str(path), mode="r")
    except Exception as exc:  # zarr raises JSON, key and value errors of many kinds for a broken zarr.json
        raise DataError(f"cannot open image {path} (item {item}): {type(exc).__name__}: {exc}; its metadata "
                        "(zarr.json, .zarray) is missing or corrupt; regenerate the data set") from exc
    if tuple(array.shape) != shape:
        raise DataError(f"image {path} (item {item}) has shape {tuple(array.shape)}, parameters.json says {shape}; "
                        "regenerate the data set")
    missing = [f for f in _chunk_files(array, path) if not f.is_file()]
    if missing:
        raise DataError(f"image {path} (item {item}) lacks {len(missing)} stored chunk(s), e.g. {missing[0]}: "
                        "zarr would read them as blank. Regenerate the data set")
    return array


def _chunk_files(array: Any, path: Path) -> list[Path]:
    """Files of the chunks the generator stored (its `stored_chunks` attribute; [] for older data sets)."""
    stored = array.attrs.get(STORED_CHUNKS)
    if not stored:
        return []
    encode = getattr(getattr(array, "metadata", None), "encode_chunk_key", None)  # zarr 3
    key = encode if encode is not None else array._chunk_key  # zarr 2
    return [path / key((int(r), int(c), 0)) for r, c in stored]


def read_pixels(array: Any, path: Path, *, item: str) -> np.ndarray:
    """The whole (H, W, 1) image; DataError naming the chunk file that cannot be decoded."""
    try:
        return array[...]
    except Exception as exc:  # numcodecs / zstd / blosc errors name no file
        raise DataError(f"cannot decode image {path} (item {item}): {_bad_chunk(array, path)}"
                        f"{type(exc).__name__}: {exc}. The file is corrupt; regenerate the data set") from exc


def _bad_chunk(array: Any, path: Path) -> str:
    """'chunk file X: ' for the first stored chunk that fails to decode, '' when none is found."""
    stored = array.attrs.get(STORED_CHUNKS) or []
    ch, cw = array.chunks[:2]
    for (r, c), file in zip(stored, _chunk_files(array, path)):
        try:
            array[r * ch:(r + 1) * ch, c * cw:(c + 1) * cw]
        except Exception:
            return f"chunk file {file}: "
    return ""

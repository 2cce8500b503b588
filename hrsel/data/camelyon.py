"""CAMELYON16: whole-slide images opened lazily, tissue grids, and per-slide feature caches.

Slides: every `*.tif` under `root` (any sub-folder); the train split is `normal_*` and
`tumor_*` (label from the name), the test split `test_*` with labels from the reference
CSV (`reference.csv` under root, or `labels_csv`): lines `test_001,Tumor,...` or
`test_002,Normal`. Task `tumor` is binary (slide-level), metric AUC.

`cache_features` streams each slide's tissue patches through a frozen encoder into an HDF5
feature cache per slide (hrsel.data.feature_cache; `python -m hrsel.features` is the command),
so IPS can run over tens of thousands of patches per slide (data set `features`).
"""
from __future__ import annotations

import csv
import io
import logging
import os
from pathlib import Path
from typing import Any, Callable

import torch

from hrsel.data.csvfile import read_csv_text
from hrsel.errors import DataError
from hrsel.io.names import image_stem
from hrsel.tasks import TaskSpec

log = logging.getLogger(__name__)

TASKS = {"tumor": TaskSpec("binary", 1)}
PREFIXES = {"train": ("normal_", "tumor_"), "test": ("test_",)}


def read_reference_csv(path: str | os.PathLike) -> dict[str, int]:
    """slide name -> 1 (Tumor) / 0 (Normal); DataError names the file and line."""
    labels = {}
    with io.StringIO(read_csv_text(path), newline="") as f:
        for lineno, row in enumerate(csv.reader(f), 1):
            if not row or not row[0].strip() or row[0].strip().lower() in ("image", "slide", "name"):
                continue
            if len(row) < 2 or row[1].strip().lower() not in ("tumor", "normal"):
                raise DataError(f"{path}:{lineno}: expected 'slide,Tumor|Normal,...', got {','.join(row)!r}")
            labels[image_stem(row[0].strip())] = int(row[1].strip().lower() == "tumor")
    return labels


def list_slides(root: str | os.PathLike, split: str) -> list[Path]:
    if split not in PREFIXES:
        raise DataError(f"CAMELYON16 split must be one of {list(PREFIXES)}, got {split!r}")
    slides = sorted((p for p in Path(root).rglob("*.tif") if p.name.lower().startswith(PREFIXES[split])),
                    key=lambda p: p.name)
    if not slides:
        raise DataError(f"no CAMELYON16 {split} slides ({'/'.join(PREFIXES[split])}*.tif) under {root}")
    return slides


def slide_labels(root: str | os.PathLike, slides: list[Path], labels_csv: str | os.PathLike | None) -> list[int]:
    if labels_csv is not None:
        csv_path: Path | None = Path(labels_csv)
    else:
        csv_path = next(iter(sorted(Path(root).rglob("reference.csv"))), None)
    table = read_reference_csv(csv_path) if csv_path is not None else {}
    labels = []
    for slide in slides:
        name = image_stem(slide)
        if name in table:
            labels.append(table[name])
        elif name.lower().startswith(("tumor_", "normal_")):
            labels.append(int(name.lower().startswith("tumor_")))
        else:
            raise DataError(f"no label for slide {slide}: add it to the reference CSV "
                            f"({csv_path or 'none found; pass labels_csv='})")
    return labels


class Camelyon16(torch.utils.data.Dataset):
    """Slides as lazy `ImageSource`s with a binary `tumor` label; `grid(i)` is the tissue grid.

    With `tissue=True` items also hold "tissue": the slide's `TissueMask` (hrsel.tiling.tissue,
    cached with a QC picture in `tissue_cache`, default <root>/tissue_masks), so the pipelines
    score only patches with >= `min_tissue_fraction` tissue.
    """

    def __init__(self, *, root: str | os.PathLike, split: str = "train", labels_csv: str | None = None,
                 patch_size: int = 256, level: int = 0, min_tissue_fraction: float = 0.5, tissue: bool = False,
                 tissue_cache: str = "", tissue_size: int = 1024):
        self.root, self.split = Path(root), split
        self.tissue = None
        if tissue:
            from hrsel.data.tissue_cache import TissueCache, check_tissue_options

            check_tissue_options(min_tissue_fraction=min_tissue_fraction, tissue_size=tissue_size)
            self.tissue = TissueCache(tissue_cache or self.root / "tissue_masks", min_fraction=min_tissue_fraction,
                                      max_size=tissue_size)
        self.slides = list_slides(root, split)
        self.labels = slide_labels(root, self.slides, labels_csv)
        self.tasks = dict(TASKS)
        self.patch_size, self.level, self.min_tissue_fraction = patch_size, level, min_tissue_fraction

    def __len__(self) -> int:
        return len(self.slides)

    def source(self, index: int) -> Any:
        from hrsel.io import open_image

        return open_image(str(self.slides[index]))

    def grid(self, index: int, source: Any = None) -> Any:
        from hrsel.tiling import PatchGrid

        return PatchGrid.for_source(source or self.source(index), patch_size=self.patch_size, level=self.level,
                                    min_tissue_fraction=self.min_tissue_fraction)

    def __getitem__(self, index: int) -> dict:
        targets = {"tumor": torch.tensor(float(self.labels[index]))}
        item = {"image": self.source(index), "targets": targets, "id": image_stem(self.slides[index])}
        if self.tissue is not None:
            item["tissue"] = self.tissue.get(item["id"], item["image"], path=str(self.slides[index]))
        return item


def compute_feature_cache(source: Any, grid: Any, encoder: Callable[[torch.Tensor], torch.Tensor],
                          out_path: str | os.PathLike, *, chunk_size: int = 256, device: str = "cpu",
                          dtype: str = "float16", workers: int = 2) -> Path:
    """Encode every grid patch into the HDF5 feature cache `out_path` (hrsel.data.feature_cache.write_bag)."""
    from hrsel.data.feature_cache import write_bag

    return write_bag(out_path, source, grid, encoder, batch_size=chunk_size, device=device, dtype=dtype,
                     workers=workers)


def cache_features(dataset: Camelyon16, encoder: Callable[[torch.Tensor], torch.Tensor],
                   features_dir: str | os.PathLike, *, chunk_size: int = 256, **options: Any) -> list[Path]:
    """A feature cache per slide of `dataset` in `features_dir/<slide>.h5`; complete caches are kept.

    The library side of `python -m hrsel.features` for a `Camelyon16` data set (its tissue grids).
    """
    from hrsel.data.feature_cache import bag_name, cache_bag

    paths = []
    for i in range(len(dataset)):
        path = Path(features_dir) / bag_name(image_stem(dataset.slides[i]))
        cache_bag(path, lambda i=i: dataset.source(i), lambda source, i=i: dataset.grid(i, source), encoder,
                  batch_size=chunk_size, **options)
        paths.append(path)
    return paths

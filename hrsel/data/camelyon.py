"""CAMELYON16: whole-slide images opened lazily, tissue grids, and per-slide feature caches.

Slides: every `*.tif` under `root` (any sub-folder); the train split is `normal_*` and
`tumor_*` (label from the name), the test split `test_*` with labels from the reference
CSV (`reference.csv` under root, or `labels_csv`): lines `test_001,Tumor,...` or
`test_002,Normal`. Task `tumor` is binary (slide-level), metric AUC.

`compute_feature_cache` streams a slide's tissue patches through a frozen encoder and
writes `features` (n, D) and `coords` (n, 2) to a zarr group chunk by chunk, so IPS can
run over tens of thousands of patches per slide (`Camelyon16Features`).
"""
from __future__ import annotations

import csv
import logging
import os
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch

from hrsel.errors import DataError
from hrsel.tasks import TaskSpec

log = logging.getLogger(__name__)

TASKS = {"tumor": TaskSpec("binary", 1)}
PREFIXES = {"train": ("normal_", "tumor_"), "test": ("test_",)}


def read_reference_csv(path: str | os.PathLike) -> dict[str, int]:
    """slide name -> 1 (Tumor) / 0 (Normal); DataError names the file and line."""
    labels = {}
    with open(path, newline="") as f:
        for lineno, row in enumerate(csv.reader(f), 1):
            if not row or not row[0].strip() or row[0].strip().lower() in ("image", "slide", "name"):
                continue
            if len(row) < 2 or row[1].strip().lower() not in ("tumor", "normal"):
                raise DataError(f"{path}:{lineno}: expected 'slide,Tumor|Normal,...', got {','.join(row)!r}")
            labels[Path(row[0].strip()).stem] = int(row[1].strip().lower() == "tumor")
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
        name = slide.stem
        if name in table:
            labels.append(table[name])
        elif name.lower().startswith(("tumor_", "normal_")):
            labels.append(int(name.lower().startswith("tumor_")))
        else:
            raise DataError(f"no label for slide {slide}: add it to the reference CSV "
                            f"({csv_path or 'none found; pass labels_csv='})")
    return labels


class Camelyon16(torch.utils.data.Dataset):
    """Slides as lazy `ImageSource`s with a binary `tumor` label; `grid(i)` is the tissue grid."""

    def __init__(self, *, root: str | os.PathLike, split: str = "train", labels_csv: str | None = None,
                 patch_size: int = 256, level: int = 0, min_tissue_fraction: float = 0.5):
        self.root, self.split = Path(root), split
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
        return {"image": self.source(index), "targets": targets, "id": self.slides[index].stem}


@torch.no_grad()
def compute_feature_cache(source: Any, grid: Any, encoder: Callable[[torch.Tensor], torch.Tensor],
                          out_path: str | os.PathLike, *, chunk_size: int = 256, device: str = "cpu",
                          dtype: str = "float16", workers: int = 2) -> Path:
    """Encode every grid patch (uint8 -> float in [0, 1]) and store features (n, D) + coords (n, 2).

    Memory is O(chunk_size); the group gets `complete=True` only when every chunk is written.
    """
    import zarr

    from hrsel.tiling import stream_patches

    out_path = Path(out_path)
    group = zarr.open_group(str(out_path), mode="w")
    n = len(grid)
    make = group.create_array if hasattr(group, "create_array") else group.create_dataset  # zarr 3 / zarr 2
    coords = make("coords", shape=(n, 2), chunks=(max(n, 1), 2), dtype="int64")
    coords[...] = grid.coords
    features = None
    for chunk in stream_patches(source, grid, chunk_size=chunk_size, workers=workers):
        x = chunk.patches.to(device).float().div_(255)  # (b, C, p, p)
        f = encoder(x).float().cpu().numpy()  # (b, D)
        if features is None:
            features = make("features", shape=(n, f.shape[1]), chunks=(chunk_size, f.shape[1]), dtype=dtype)
        start = int(chunk.indices[0])  # chunks are consecutive positions in the (masked) grid
        features[start:start + len(f)] = f.astype(dtype)
    group.attrs.update({"complete": True, "n": n, "patch_size": int(grid.patch_size), "level": int(grid.level),
                        "source": str(getattr(source, "path", ""))})
    return out_path


def cache_features(dataset: Camelyon16, encoder: Callable[[torch.Tensor], torch.Tensor],
                   features_dir: str | os.PathLike, **options: Any) -> list[Path]:
    """A feature cache per slide of `dataset` in `features_dir/<slide>.zarr`; complete caches are kept."""
    import zarr

    paths = []
    for i in range(len(dataset)):
        path = Path(features_dir) / f"{dataset.slides[i].stem}.zarr"
        if not (path.exists() and zarr.open_group(str(path), mode="r").attrs.get("complete")):
            source = dataset.source(i)
            log.info("caching features of %s (%d patches)", path.stem, len(dataset.grid(i, source)))
            compute_feature_cache(source, dataset.grid(i, source), encoder, path, **options)
        paths.append(path)
    return paths


class Camelyon16Features(torch.utils.data.Dataset):
    """Per-slide feature bags from `features_dir` (default `root/features`): image = (N, D) float32."""

    def __init__(self, *, root: str | os.PathLike, split: str = "train", features_dir: str | None = None,
                 labels_csv: str | None = None):
        self.slides = list_slides(root, split)
        self.labels = slide_labels(root, self.slides, labels_csv)
        self.features_dir = Path(features_dir) if features_dir is not None else Path(root) / "features"
        self.tasks = dict(TASKS)
        missing = [s.stem for s in self.slides if not (self.features_dir / f"{s.stem}.zarr").exists()]
        if missing:
            raise DataError(f"no feature cache for {len(missing)} slide(s) in {self.features_dir}, e.g. "
                            f"{missing[:3]}; compute them with hrsel.data.camelyon.cache_features")

    def __len__(self) -> int:
        return len(self.slides)

    def __getitem__(self, index: int) -> dict:
        import zarr

        name = self.slides[index].stem
        group = zarr.open_group(str(self.features_dir / f"{name}.zarr"), mode="r")
        if not group.attrs.get("complete"):
            raise DataError(f"feature cache {self.features_dir / name}.zarr is incomplete; delete it and recompute")
        features = torch.from_numpy(np.asarray(group["features"][...], dtype=np.float32))  # (N, D)
        coords = torch.from_numpy(np.asarray(group["coords"][...]))  # (N, 2)
        targets = {"tumor": torch.tensor(float(self.labels[index]))}
        return {"image": features, "coords": coords, "targets": targets, "id": name}

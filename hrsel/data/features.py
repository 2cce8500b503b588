"""Cached feature bags: one `<id>.h5` per image (hrsel.data.feature_cache), labels from a CSV or CAMELYON16.

The workflow (CLAM, IPS on CAMELYON16): encode every tissue patch once with a frozen backbone,

    python -m hrsel.features slides.yaml --backbone resnet50 --out data/camelyon16/features

then train IPS / attention MIL on the (N, D) bags (`data.name: features`). Items are
{"image": (N, D) float32, "coords": (N, 2) int64 level-0 (x, y), "targets", "id"}.

Labels (`layout`):
- `csv`: `labels_csv` (default `root/labels.csv`) with a header naming an id column (`id`,
  `image`, `slide`, `path` or `name`; a path counts by its image id, the path without its image
  suffix as `hrsel.io.names.image_ids` makes it, so the manifest CSV of the slides serves), a
  label column (`label_column`, default `label`) and optionally `split` (rows of other splits
  are skipped; without it every row is in every split). Its `val` rows are the validation
  split (`validation_split`: data.val_split=auto validates on them). Classes: integer labels as
  given, otherwise the sorted label strings. Task `task` (default `label`), multiclass.
- `camelyon16`: bags named `normal_*` / `tumor_*` (train) and `test_*` (test); the label is the
  name, or the CAMELYON16 reference CSV (`labels_csv`, else `reference.csv` under root) for
  test slides. Task `tumor`, binary.

Resolution: `target_mpp`, `level` and `patch_size`, where set, are what every bag must have
been made at (`hrsel.data.bag_resolution`: a bag made at another is a DataError naming both and
the fix); set or not, the bags of a split must share one resolution.
"""
from __future__ import annotations

import csv
import io
import logging
import os
from pathlib import Path
from typing import Any

import torch

from hrsel.data.csvfile import read_csv_text
from hrsel.data.feature_cache import SUFFIX, bag_name, read_bag
from hrsel.data.manifest_table import SPLITS
from hrsel.errors import DataError
from hrsel.tasks import TaskSpec

log = logging.getLogger(__name__)

ID_COLUMNS = ("id", "image", "slide", "path", "name")
LAYOUTS = ("csv", "camelyon16")


class FeatureBags(torch.utils.data.Dataset):
    """Per-image feature bags from `features_dir` (default `root/features`, else root) with labels (see module)."""

    def __init__(self, *, root: str | os.PathLike, split: str = "train", features_dir: str | None = None,
                 layout: str = "csv", labels_csv: str | None = None, label_column: str = "label",
                 task: str = "label", target_mpp: float | None = None, level: int | None = None,
                 patch_size: int | None = None):
        if layout not in LAYOUTS:
            raise DataError(f"features data set: layout {layout!r} is unknown; valid: {', '.join(LAYOUTS)}")
        split = SPLITS.get(split, split)
        self.root, self.split = Path(root), split
        self.features_dir = _features_dir(self.root, features_dir)
        self.validation_split = None
        if layout == "camelyon16":
            self.ids, self.labels, self.tasks, self.class_names = _camelyon16(self.root, self.features_dir,
                                                                             split, labels_csv)
        else:
            csv_path = Path(labels_csv) if labels_csv is not None else self.root / "labels.csv"
            self.ids, self.labels, names, splits = _csv_labels(csv_path, split, label_column)
            self.tasks = {task: TaskSpec("multiclass", len(names))}
            self.class_names = {task: names}
            self.validation_split = "val" if "val" in splits else None
        self.task = next(iter(self.tasks))
        missing = [i for i in self.ids if not self.path(i).is_file()]
        if missing:
            raise DataError(f"no feature cache for {len(missing)} of {len(self.ids)} {split} image(s) in "
                            f"{self.features_dir}, e.g. {[bag_name(i) for i in missing[:3]]}; compute them with "
                            f"python -m hrsel.features ... --out {self.features_dir}")
        self.resolution = self._check_resolutions(target_mpp=target_mpp, level=level, patch_size=patch_size)
        log.info("%d %s feature bags in %s (%s)", len(self.ids), split, self.features_dir, self.resolution)

    def _check_resolutions(self, **asked: Any) -> Any:
        """The bags' one resolution, checked against the asked one (hrsel.data.bag_resolution)."""
        from hrsel.data.bag_resolution import check_alike, check_resolution
        from hrsel.data.feature_cache import read_attrs

        found = {}
        for image_id in self.ids:
            attrs = read_attrs(self.path(image_id))
            if attrs is not None:  # an unreadable one is named when it is read
                found[bag_name(image_id)] = check_resolution(self.path(image_id), attrs, **asked)
        check_alike(found, what=f"split {self.split!r} in {self.features_dir}")
        return next(iter(found.values()), None)

    def path(self, image_id: str) -> Path:
        return self.features_dir / bag_name(image_id)

    def __len__(self) -> int:
        return len(self.ids)

    def __getitem__(self, index: int) -> dict:
        image_id = self.ids[index]
        features, coords, _ = read_bag(self.path(image_id))
        if len(features) == 0:
            raise DataError(f"feature cache {self.path(image_id)} holds no patches (no tissue found); lower "
                            f"--min-tissue-fraction when running python -m hrsel.features, or drop the image")
        kind = self.tasks[self.task].kind
        label = self.labels[index]
        target = torch.tensor(float(label)) if kind == "binary" else torch.tensor(label, dtype=torch.long)
        return {"image": torch.from_numpy(features), "coords": torch.from_numpy(coords),
                "targets": {self.task: target}, "id": image_id}


class Camelyon16Features(FeatureBags):
    """`features` with the CAMELYON16 layout (data set name `camelyon16_features`)."""

    def __init__(self, *, root: str | os.PathLike, split: str = "train", features_dir: str | None = None,
                 labels_csv: str | None = None, target_mpp: float | None = None, level: int | None = None,
                 patch_size: int | None = None):
        super().__init__(root=root, split=split, features_dir=features_dir, layout="camelyon16",
                         labels_csv=labels_csv, target_mpp=target_mpp, level=level, patch_size=patch_size)


def _features_dir(root: Path, features_dir: str | None) -> Path:
    if features_dir is not None:
        folder = Path(features_dir)
    else:
        folder = root / "features" if (root / "features").is_dir() else root
    if not folder.is_dir():
        raise DataError(f"feature folder {folder} does not exist; write it with python -m hrsel.features ... "
                        f"--out {folder}, or set data.features_dir")
    return folder


def _camelyon16(root: Path, folder: Path, split: str,
                labels_csv: str | None) -> tuple[list[str], list[int], dict, dict]:
    from hrsel.data.camelyon import PREFIXES, TASKS, slide_labels

    if split not in PREFIXES:
        raise DataError(f"CAMELYON16 split must be one of {list(PREFIXES)}, got {split!r}")
    bags = sorted(p for p in folder.glob(f"*{SUFFIX}") if p.name.lower().startswith(PREFIXES[split]))
    if not bags:
        raise DataError(f"no CAMELYON16 {split} feature bags ({'/'.join(PREFIXES[split])}*{SUFFIX}) in {folder}; "
                        f"compute them with python -m hrsel.features ... --out {folder}")
    labels = slide_labels(root, bags, labels_csv)
    return [p.stem for p in bags], labels, dict(TASKS), {"tumor": ["normal", "tumor"]}


def _csv_labels(path: Path, split: str, label_column: str) -> tuple[list[str], list[int], list[str], set[str]]:
    """(ids, class ids, class names) of the rows of `split` in a labels CSV with a header, and every split named."""
    from hrsel.io.names import image_ids

    if not path.is_file():
        raise DataError(f"no labels CSV at {path}: write one with a header 'id,{label_column}[,split]' or set "
                        f"data.labels_csv (or data.layout: camelyon16 for the challenge's names)")
    with io.StringIO(read_csv_text(path), newline="") as f:
        reader = csv.DictReader(f)
        header = [h.strip() for h in reader.fieldnames or []]
        id_col = next((c for c in ID_COLUMNS if c in header), None)
        if id_col is None or label_column not in header:
            raise DataError(f"{path}:1: the header {header} needs an id column (one of {', '.join(ID_COLUMNS)}) "
                            f"and the label column {label_column!r} (data.label_column)")
        rows = []  # (id, label, split) of every split: the classes are the same in all
        for lineno, row in enumerate(reader, 2):
            row = {k.strip(): (v or "").strip() for k, v in row.items() if k is not None}
            if not row.get(id_col) or not row.get(label_column):
                raise DataError(f"{path}:{lineno}: empty {id_col!r} or {label_column!r}")
            named = row.get("split") or ""
            rows.append((row[id_col], row[label_column], SPLITS.get(named.lower(), named) or split))
    if id_col == "path":  # the ids the manifest data set and hrsel.features give these paths
        rows = [(i, label, s) for i, (_, label, s) in zip(image_ids([r[0] for r in rows]), rows)]
    values = [label for _, label, _ in rows]
    integers = bool(values) and all(v.lstrip("-").isdigit() for v in values)
    if integers:
        if min(int(v) for v in values) < 0:
            raise DataError(f"{path}: integer labels must be >= 0, got {min(int(v) for v in values)}")
        names = [str(c) for c in range(max(int(v) for v in values) + 1)]
    else:
        names = sorted(set(values))
    named_splits = {s for _, _, s in rows}
    rows = [(i, label) for i, label, s in rows if s == split]
    if not rows:
        raise DataError(f"{path}: no rows of split {split!r}; check its 'split' column (splits: "
                        f"{sorted(named_splits)})")
    ids = [int(v) if integers else names.index(v) for _, v in rows]
    return [i for i, _ in rows], ids, names, named_splits

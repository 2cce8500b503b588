"""`manifest`: your own images, listed in a CSV (one row per image; see `hrsel.data.manifest_table`).

    data:
      name: manifest
      root: data/my_slides          # the manifest is read from here
      manifest: slides.csv          # path,label[,split][,fold]; image paths relative to the CSV's folder
      target_mpp: 0.5               # optional: read each slide at the level closest to 0.5 um/px
      tissue: true                  # optional: score only patches on tissue (hrsel.tiling.tissue)
      min_tissue_fraction: 0.5      #   the share of a patch that must be tissue
      tissue_cache: ""              #   where masks and QC pictures go ("" = <root>/tissue_masks)

Splits, in this order:
1. a `split` column (train / val / test) is used as written; `val` rows are the data set's own
   validation split (data.val_split=auto validates on them). With `fold: K` as well, the non-test
   rows with fold == K become `val` and the other non-test rows `train` (cross-validation with a
   fixed test set).
2. no split column, `fold: K`: rows with fold == K are `test`, the others `train`.
3. neither: a seeded, class-stratified `test_fraction` of the rows is `test`, the rest `train`;
   row r is keyed by blake2b(f"{split_seed}:{path}") (hrsel.data.split.holdout_indices), so the split
   is a pure function of (split_seed, the rows, their labels).
Without `val` rows the trainer holds out data.val_fraction of `train` (validation.json records it,
with this data set's own rule under "data_split").

Items: {"image": the opened ImageSource (a `LevelView` of the level serving target_mpp), "targets",
"id" (the path as written without its image suffix, `slides/a.ome.tiff` -> `slides/a`: `hrsel.io.names`;
the same id names its feature cache), "path"} and, with `tissue: true`, "tissue": the image's
`TissueMask` (computed once from its thumbnail, cached with a QC picture; `hrsel.data.tissue_cache`),
which the trainer and predict hand to the pipeline as candidate cells; sources open lazily and pickle by path, so they
cross DataLoader workers. Images of different sizes need data.batch_size: 1.
"""
from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any

import torch

from hrsel.data.manifest_table import ManifestRow, ManifestTable, read_manifest
from hrsel.errors import DataError

__all__ = ["ManifestDataset", "ManifestTable", "read_manifest", "assign_splits"]

log = logging.getLogger(__name__)

_TABLES: dict[tuple, ManifestTable] = {}  # one check of the images per process, shared by the splits
_WARNED: set[str] = set()  # warnings about a table given once per process


def assign_splits(table: ManifestTable, *, fold: int | None = None, test_fraction: float = 0.2,
                  split_seed: int = 0) -> tuple[list[str], dict[str, Any]]:
    """The split (train / val / test) of every row, and a record of the rule (see the module doc)."""
    rows = table.rows
    if fold is None and table.has_fold:
        _warn_once(f"{table.csv} has a 'fold' column but data.fold is not set, so the folds are not used "
                   f"({'the split column decides' if table.has_split else 'a seeded test_fraction of the rows is test'}"
                   f"); set data.fold=K to test (or, with a split column, validate) on the rows of fold K")
    if fold is not None:
        if not table.has_fold:
            raise DataError(f"config key 'data.fold' = {fold} but {table.csv} has no 'fold' column; add one "
                            "(an integer per row) or remove data.fold")
        present = sorted({row.fold for row in rows})
        if fold not in present:
            raise DataError(f"config key 'data.fold' = {fold}: no row of {table.csv} has fold {fold}; "
                            f"folds present: {present}")
    if table.has_split:
        splits = [row.split if fold is None or row.split == "test" else ("val" if row.fold == fold else "train")
                  for row in rows]
        rule = "the manifest's split column" + (f", non-test rows with fold == {fold} as val" if fold is not None
                                                else "")
        return splits, _record(table, splits, rule)
    if fold is not None:
        splits = ["test" if row.fold == fold else "train" for row in rows]
        return splits, _record(table, splits, f"rows with fold == {fold} are test, the others train")
    if not 0 < test_fraction < 1:
        raise DataError(f"config key 'data.test_fraction' = {test_fraction!r} must be in (0, 1), e.g. 0.2 "
                        f"({table.csv} has no split column, so a test part is held out of its rows)")
    from hrsel.data.split import holdout_indices

    task = next((t for t, spec in table.tasks.items() if spec.kind != "multilabel"), None)
    labels = None if task is None else [table.label_ids(task, i)[0] for i in range(len(rows))]
    _, test = holdout_indices(len(rows), fraction=test_fraction, seed=split_seed, labels=labels,
                              names=[row.rel for row in rows])
    held = set(test)
    splits = ["test" if i in held else "train" for i in range(len(rows))]
    rule = (f"no split column: a test_fraction {test_fraction} of the rows, stratified on {task or 'nothing'}, "
            f"per class the rows with the smallest blake2b('{split_seed}:<path>') (hrsel.data.split.holdout_indices)")
    record = _record(table, splits, rule)
    record.update(seed=split_seed, test_fraction=test_fraction, stratified_on=task,
                  test=[rows[i].rel for i in test])
    return splits, record


def _warn_once(message: str) -> None:
    """Log `message` as a warning the first time only (each split of a data set reads the same table)."""
    if message not in _WARNED:
        _WARNED.add(message)
        log.warning(message)


def _record(table: ManifestTable, splits: list[str], rule: str) -> dict[str, Any]:
    return {"manifest": str(table.csv), "rule": rule,
            "sizes": {name: splits.count(name) for name in ("train", "val", "test")}}


class ManifestDataset(torch.utils.data.Dataset):
    """The rows of one split of a CSV manifest, as lazy image sources with their targets.

    Attributes: `tasks` (TaskSpec per task), `class_names` ({task: [str]}, binary: ["0", "1"]), `labels`
    (class ids of the single-label tasks, for stratified hold-outs), `validation_split` ("val" when the
    manifest has validation rows, else None), `split_record` (how the rows were split), `table`.
    """

    def __init__(self, *, root: str | os.PathLike, split: str = "train", manifest: str = "slides.csv",
                 tasks: dict | list | None = None, target_mpp: float | None = None, fold: int | None = None,
                 test_fraction: float = 0.2, split_seed: int = 0, check_images: bool = True, tissue: bool = False,
                 min_tissue_fraction: float = 0.5, tissue_cache: str = "", tissue_size: int = 1024):
        if target_mpp is not None and not target_mpp > 0:
            raise DataError(f"config key 'data.target_mpp' = {target_mpp!r} must be a positive number of microns "
                            "per pixel (e.g. 0.5 for 20x), or unset to read level 0")
        csv_path = Path(manifest) if Path(manifest).is_absolute() else Path(root) / manifest
        self.table = _table(csv_path, tasks=tasks, check_images=check_images, target_mpp=target_mpp)
        if not self.table.tasks:
            raise DataError(f"{csv_path} has no label column besides path / split / fold: add one column per task "
                            "(e.g. path,label)")
        self.target_mpp = target_mpp
        splits, self.split_record = assign_splits(self.table, fold=fold, test_fraction=test_fraction,
                                                  split_seed=split_seed)
        wanted = {"valid": "val", "validation": "val"}.get(split, split)
        self.split = wanted
        self.indices = [i for i, s in enumerate(splits) if s == wanted]
        if not self.indices:
            sizes = {k: v for k, v in self.split_record["sizes"].items() if v}
            raise DataError(f"split {split!r} of manifest {csv_path} has no rows (rule: {self.split_record['rule']}; "
                            f"rows per split: {sizes})")
        self.validation_split = "val" if "val" in splits else None
        self.tasks = dict(self.table.tasks)
        self.class_names = {t: list(n) for t, n in self.table.class_names.items()}
        self.labels = {t: [self.table.label_ids(t, i)[0] for i in self.indices]
                       for t, spec in self.tasks.items() if spec.kind != "multilabel"}
        every_id = self.table.ids  # over all rows, so an image has one id whatever the split
        self.ids = [every_id[i] for i in self.indices]
        self.tissue = None
        if tissue:
            from hrsel.data.tissue_cache import TissueCache, check_tissue_options

            check_tissue_options(min_tissue_fraction=min_tissue_fraction, tissue_size=tissue_size)
            self.tissue = TissueCache(tissue_cache or Path(root) / "tissue_masks", min_fraction=min_tissue_fraction,
                                      max_size=tissue_size)
        log.info("manifest %s: %d %s image(s), tasks %s", csv_path, len(self.indices), wanted,
                 {t: s.kind for t, s in self.tasks.items()})

    def __len__(self) -> int:
        return len(self.indices)

    def row(self, index: int) -> ManifestRow:
        return self.table.rows[self.indices[index]]

    def source(self, index: int) -> Any:
        """The image of item `index`, opened (header only); with target_mpp, the `LevelView` of the level
        serving it, resampled to exactly target_mpp when no level has it (`view_at_mpp`)."""
        from hrsel.io import open_image
        from hrsel.io.level_view import view_at_mpp

        source = open_image(str(self.row(index).path))
        return view_at_mpp(source, self.target_mpp) if self.target_mpp is not None else source

    def __getitem__(self, index: int) -> dict:
        row = self.row(index)
        item = {"image": self.source(index), "targets": self.table.targets(self.indices[index]),
                "id": self.ids[index], "path": str(row.path)}
        if self.tissue is not None:
            item["tissue"] = self.tissue.get(self.ids[index], item["image"], path=str(row.path))
        return item


def _table(csv_path: Path, **options: Any) -> ManifestTable:
    try:
        stat = csv_path.stat()
        key = (str(csv_path.resolve()), stat.st_mtime_ns, stat.st_size, repr(sorted(options.items(), key=str)))
    except OSError:
        return read_manifest(csv_path, **options)  # names the missing file
    if key not in _TABLES:
        _TABLES[key] = read_manifest(csv_path, **options)
    return _TABLES[key]


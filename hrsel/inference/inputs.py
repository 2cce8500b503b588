"""What `python -m hrsel.predict` reads: image files, folders of them, a manifest CSV, feature caches.

    items = expand_inputs(["slide.svs", "folder/", "cohort.csv", "features/slide2.h5"])

Each input becomes `PredictInput`s (path, kind "image" | "bag", labels and split from a manifest).
Folders contribute every readable image (and `.h5` feature cache) directly inside them, sorted by
name; a manifest CSV its rows (read with `hrsel.data.manifest.read_manifest` when that module
exists, else a CSV with a `path` column relative to the CSV and optional label columns named
after the tasks). Nothing here reads pixels: sources are opened when an item is predicted.

A row's split is the run's own when the CSV is the run's manifest (`data.fold`, `test_fraction`
and `split_seed` applied as in training: `manifest_splits`), else the CSV's `split` column as
written, else None (an image or folder, or a CSV without one).
"""
from __future__ import annotations

import csv
import io
import logging
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

from hrsel.data.csvfile import read_csv_text
from hrsel.errors import DataError, HrselError, ImageReadError

log = logging.getLogger(__name__)

BAG_SUFFIXES = (".h5", ".hdf5")
MANIFEST_SUFFIXES = (".csv",)


@dataclass
class PredictInput:
    path: Path
    kind: str  # "image" | "bag"
    labels: dict[str, str] = field(default_factory=dict)  # task -> label text from a manifest ("" = unknown)
    id: str = ""
    split: str | None = None  # train / val / test of a manifest row (None: no split known)

    def __post_init__(self):
        self.id = self.id or str(self.path)


def expand_inputs(inputs: Sequence[str | os.PathLike], *, tasks: dict[str, Any] | None = None,
                  class_names: dict[str, list[str]] | None = None, out_dir: str | os.PathLike | None = None,
                  config: Any = None) -> list[PredictInput]:
    """Resolve files, folders and manifests into the items to predict, in order; errors name the input.

    `tasks` / `class_names` (the model's) say which manifest columns are labels; `config` (the run's)
    gives the rows of the run's own manifest the run's splits. A folder that is
    `out_dir` or an earlier predict's output (it holds predictions.csv) contributes no file predict
    wrote (heatmaps, score maps); any other file of a folder that is no image is named in a warning."""
    items: list[PredictInput] = []
    for raw in inputs:
        path = Path(raw)
        if not path.exists():
            raise ImageReadError(f"input {str(path)!r} does not exist; pass image files, folders, a manifest .csv "
                                 f"or feature caches (.h5)")
        if path.is_dir() and not _is_zarr(path):
            found = _folder_items(path, own_outputs=_holds_outputs(path, out_dir))
            if not found:
                raise ImageReadError(f"folder {str(path)!r} holds no readable image or .h5 feature cache")
            items.extend(found)
        elif path.suffix.lower() in MANIFEST_SUFFIXES:
            items.extend(read_manifest_inputs(path, tasks, class_names, config=config))
        else:
            items.append(PredictInput(path=path, kind=_kind(path)))
    if not items:
        raise ImageReadError("no inputs to predict; pass image files, folders, a manifest .csv or .h5 caches")
    return items


def check_input_kinds(items: Sequence[PredictInput], *, takes_bags: bool, run: str, data_name: str) -> None:
    """A run trained on feature caches takes `.h5` caches, one trained on images takes images: DataError naming
    the inputs of the other kind and what to give instead."""
    wrong = [item for item in items if (item.kind == "bag") != takes_bags]
    if not wrong:
        return
    names = ", ".join(str(item.path) for item in wrong[:3]) + (f" and {len(wrong) - 3} more" if len(wrong) > 3
                                                                 else "")
    if takes_bags:
        raise DataError(f"{names}: image(s), but the run {run} was trained on feature caches (data.name: "
                        f"{data_name}) and takes .h5 caches only. Encode the images first with python -m "
                        f"hrsel.features (the backbone and resolution of the run's caches) and predict on the .h5 "
                        f"files")
    raise DataError(f"{names}: feature cache(s) (.h5 patch embeddings), but the run {run} was trained on images "
                    f"(data.name: {data_name}) and reads pixels. Predict on the images themselves (a cache names "
                    f"its image in its 'source' attribute), or with a run trained on feature caches (data.name: "
                    f"features)")


def _kind(path: Path) -> str:
    return "bag" if path.suffix.lower() in BAG_SUFFIXES else "image"


def _is_zarr(path: Path) -> bool:
    from hrsel.io.factory import ZARR_MARKERS

    return any((path / marker).exists() for marker in ZARR_MARKERS)


def _holds_outputs(folder: Path, out_dir: str | os.PathLike | None) -> bool:
    """`folder` is this predict's --out, or an earlier one's (its predictions.csv says so)."""
    from hrsel.inference.outputs import PREDICTIONS

    same = out_dir is not None and Path(out_dir).exists() and os.path.samefile(folder, out_dir)
    return same or (folder / PREDICTIONS).is_file()


def _folder_items(folder: Path, *, own_outputs: bool = False) -> list[PredictInput]:
    """The images and .h5 caches directly in `folder`, sorted; with `own_outputs`, predict's files left out."""
    from hrsel.inference.outputs import is_output
    from hrsel.io.factory import sniff_backend

    items, skipped, outputs = [], [], 0
    for path in sorted(folder.iterdir()):
        if path.name.startswith("."):
            continue
        if own_outputs and is_output(path):
            outputs += 1
            continue
        if path.is_file() and path.suffix.lower() in BAG_SUFFIXES:
            items.append(PredictInput(path=path, kind="bag"))
            continue
        if path.is_dir() and not _is_zarr(path):
            continue
        try:
            sniff_backend(str(path))
        except HrselError as e:
            skipped.append(f"{path.name} ({str(e).split('; ')[0]})")
            continue
        items.append(PredictInput(path=path, kind="image"))
    if outputs:
        log.info("folder %s: leaving out the %d file(s) hrsel.predict wrote there (heatmaps, score maps, tables)",
                 folder, outputs)
    if skipped:
        shown = "; ".join(skipped[:5]) + (f"; and {len(skipped) - 5} more" if len(skipped) > 5 else "")
        log.warning("folder %s: skipping %d file(s) that are no image hrsel reads: %s. Pass an image file itself "
                    "to see why it cannot be read", folder, len(skipped), shown)
    return items


def read_manifest_inputs(path: Path, tasks: dict[str, Any] | None = None,
                         class_names: dict[str, list[str]] | None = None, *, config: Any = None) -> list[PredictInput]:
    """The rows of a manifest CSV as inputs, with the labels of the model's `tasks` when it has those columns,
    and their splits (`manifest_splits`).

    With label columns, `hrsel.data.manifest.read_manifest` reads and checks it (every bad row in one
    DataError); a CSV of paths only is read here (the manifest data set needs labels).
    """
    header = [h.strip() for h in next(csv.reader(io.StringIO(read_csv_text(path), newline="")), [])]
    labelled = [t for t in (tasks or {}) if t in header]
    try:
        from hrsel.data.manifest import read_manifest
    except ImportError:
        labelled = []
    if not labelled:
        return _read_csv_manifest(path, labelled=list(tasks or {}))
    wanted = {}
    for task in labelled:
        kind = tasks[task].kind
        names = (class_names or {}).get(task)
        wanted[task] = {"kind": kind, "classes": names} if names and kind != "binary" else kind
    table = read_manifest(path, tasks=wanted)
    splits, rule = manifest_splits(table, config)
    log.info("manifest %s: rows split by %s", path, rule)
    return [PredictInput(path=Path(p), kind=_kind(Path(p)), labels=dict(labels), id=str(i), split=split)
            for (p, labels, i), split in zip(_table_rows(table), splits)]


def manifest_splits(table: Any, config: Any = None) -> tuple[list[str | None], str]:
    """(the split of every row, the rule that gave them): the run's own split when `table` is the run's
    manifest (`config`: the run's config), else the CSV's split column as written, else None per row."""
    if _is_run_manifest(table.csv, config):
        from hrsel.data.manifest import assign_splits

        options = config.data.options
        splits, record = assign_splits(table, fold=options.get("fold"),
                                       test_fraction=options.get("test_fraction", 0.2),
                                       split_seed=options.get("split_seed", 0))
        return list(splits), f"the run's own split of its manifest ({record['rule']})"
    if table.has_split:
        return [row.split for row in table.rows], "the CSV's split column"
    return [None] * len(table.rows), "nothing (the CSV has no split column)"


def _is_run_manifest(csv_path: Path, config: Any) -> bool:
    data = getattr(config, "data", None)
    if data is None or data.name != "manifest":
        return False
    name = (data.options or {}).get("manifest", "slides.csv")
    own = Path(name) if Path(name).is_absolute() else Path(data.root) / name
    try:
        return own.is_file() and os.path.samefile(own, csv_path)
    except OSError:
        return False


def _table_rows(table: Any):
    """(path, {task: label text}, id) per row of a `ManifestTable`, whatever its exact shape."""
    rows = getattr(table, "rows", table)
    for row in rows:
        get = row.get if isinstance(row, dict) else lambda key, default=None, r=row: getattr(r, key, default)
        path = get("path")
        labels = get("labels", None) or get("targets", None) or {}
        yield path, {k: "" if v is None else str(v) for k, v in dict(labels).items()}, get("id", None) or get("rel", None) or path


def _read_csv_manifest(path: Path, *, labelled: list[str]) -> list[PredictInput]:
    """A CSV with a `path` column (relative to the CSV's folder) and optional columns `labelled`."""
    reader = csv.DictReader(io.StringIO(read_csv_text(path), newline=""))
    if reader.fieldnames is None or "path" not in reader.fieldnames:
        raise DataError(f"manifest {str(path)!r} has no 'path' column (columns: {reader.fieldnames}); "
                        f"add a header row with 'path' and one column per task")
    items = []
    for line, row in enumerate(reader, start=2):
        value = (row.get("path") or "").strip()
        if not value:
            raise DataError(f"manifest {str(path)!r} line {line}: empty 'path'; fill it or delete the row")
        target = Path(value) if Path(value).is_absolute() else path.parent / value
        labels = {k: (row.get(k) or "").strip() for k in labelled if k in row}
        items.append(PredictInput(path=target, kind=_kind(target), labels=labels,
                                  id=(row.get("id") or "").strip() or value, split=_split_cell(path, line, row)))
    return items


def _split_cell(path: Path, line: int, row: dict[str, str]) -> str | None:
    from hrsel.data.manifest_table import SPLITS

    text = (row.get("split") or "").strip()
    if text and text.lower() not in SPLITS:
        raise DataError(f"manifest {str(path)!r} line {line}: split {text!r} must be train, val or test (or empty)")
    return SPLITS.get(text.lower()) if text else None

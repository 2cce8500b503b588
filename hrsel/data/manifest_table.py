"""Read a CSV of images: one row per image, a `path` column, label columns, optional `split` and `fold`.

    table = read_manifest("data/my_slides/slides.csv")            # kinds and classes inferred
    table.paths, table.tasks, table.class_names, table.targets(0)

Paths are relative to the CSV's folder (absolute paths are kept). Every other column is a task
unless `tasks` names them: a list of columns (kinds inferred), or a mapping column -> kind
("multiclass", "binary", "multilabel", or {kind: ..., classes: [...]} to fix the class list).
Inferred kinds: a column with a `|` in any cell is multilabel (`a|b`), integers 0/1 only are
binary, other integers or any strings are multiclass with the sorted class names (integers
sorted as numbers; `1` and `1.0` are one class). An inferred column with a different value in
each of its rows (at least `FREE_TEXT_ROWS`: notes, ids) is refused rather than made a task of
one class per row. Classes are taken over all rows, whatever their split, so every split
agrees on them. Every bad row (missing or unreadable image, duplicate path, empty label, a label
outside the given classes, a bad split or fold, no microns per pixel when `target_mpp` is
set) is reported in one `DataError`, with its line number and the fix (the first
`SHOWN_PROBLEMS`, and a count of the rest). The file must be UTF-8 (`hrsel.data.csvfile`).
"""
from __future__ import annotations

import csv
import io
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from hrsel.data.csvfile import read_csv_text
from hrsel.errors import DataError, HrselError
from hrsel.tasks import TaskSpec

RESERVED = ("path", "split", "fold")
KINDS = ("multiclass", "binary", "multilabel")
SPLITS = {"train": "train", "val": "val", "valid": "val", "validation": "val", "test": "test"}
INTEGER = re.compile(r"[+-]?\d+(?:\.0*)?")  # 1, 01, 1.0 and 1. are the integer 1 (pandas writes 1.0)
SHOWN_PROBLEMS = 20  # bad rows listed in the error; the rest are counted
FREE_TEXT_ROWS = 8  # an inferred task with a distinct value in every row of at least this many: free text


@dataclass(frozen=True)
class ManifestRow:
    line: int  # the CSV line (the header is line 1)
    number: int  # the row (the first image is row 1)
    rel: str  # the path as written
    path: Path  # resolved against the CSV's folder
    labels: dict[str, str]  # task -> cell text, stripped
    split: str | None = None  # train / val / test when the CSV has a split column
    fold: int | None = None
    level: int = 0  # the pyramid level that serves target_mpp

    @property
    def where(self) -> str:
        return f"line {self.line} (row {self.number})"


@dataclass
class ManifestTable:
    """The checked rows of a manifest, its tasks and their class names."""

    csv: Path
    rows: list[ManifestRow]
    tasks: dict[str, TaskSpec]
    class_names: dict[str, list[str]]
    has_split: bool = False
    has_fold: bool = False
    target_mpp: float | None = None
    _index: dict[str, dict[str, int]] = field(default_factory=dict, repr=False)

    def __post_init__(self) -> None:
        self._index = {t: {c: i for i, c in enumerate(names)} for t, names in self.class_names.items()}

    def __len__(self) -> int:
        return len(self.rows)

    @property
    def paths(self) -> list[Path]:
        return [row.path for row in self.rows]

    @property
    def ids(self) -> list[str]:
        """One id per row: its path as written without the image suffix (`hrsel.io.names.image_ids`)."""
        from hrsel.io.names import image_ids

        return image_ids([row.rel for row in self.rows])

    def label_ids(self, task: str, row: int) -> list[int]:
        """Class indices of `task` for row `row` (one for multiclass and binary)."""
        text = self.rows[row].labels[task]
        if self.tasks[task].kind == "binary":
            return [_integer(text)]
        return sorted({self._index[task][name] for name in _cell_classes(text, self.tasks[task].kind)})

    def targets(self, row: int) -> dict[str, Any]:
        """{task: tensor}: multiclass int64 (), binary float (), multilabel float multi-hot (C,)."""
        import torch

        out = {}
        for task, spec in self.tasks.items():
            ids = self.label_ids(task, row)
            if spec.kind == "multiclass":
                out[task] = torch.tensor(ids[0], dtype=torch.int64)
            elif spec.kind == "binary":
                out[task] = torch.tensor(float(ids[0]))
            else:
                hot = torch.zeros(spec.num_classes)
                hot[ids] = 1.0
                out[task] = hot
        return out


def read_manifest(path: str | os.PathLike, *, tasks: dict | list | None = None, check_images: bool = True,
                  target_mpp: float | None = None) -> ManifestTable:
    """Read and check the CSV at `path`; one `DataError` lists every bad row (see the module doc)."""
    csv_path = Path(path)
    if not csv_path.is_file():
        raise DataError(f"manifest {str(csv_path)!r} does not exist; write a CSV with a 'path' column there or point "
                        "data.manifest at it (relative to data.root)")
    header, raw = _read_csv(csv_path)
    columns = _task_columns(csv_path, header, tasks)
    bad: list[tuple[int, str]] = []  # (row, problem)
    rows = _rows(csv_path, header, raw, columns, bad)
    specs, names = _infer_tasks(csv_path, rows, columns, bad)
    if check_images:
        rows = _check_images(rows, target_mpp, bad)
    if bad:
        raise DataError(bad_rows_message(csv_path, bad))
    return ManifestTable(csv_path, rows, specs, names, has_split="split" in header, has_fold="fold" in header,
                         target_mpp=target_mpp)


def bad_rows_message(csv_path: Path, bad: list[tuple[int, str]]) -> str:
    """Every bad row counted, the first `SHOWN_PROBLEMS` problems listed (a broken 100k-row CSV stays readable)."""
    problems = [text for _, text in sorted(bad, key=lambda b: b[0])]  # stable: a row's problems in check order
    rows = len({n for n, _ in bad})
    more = len(problems) - SHOWN_PROBLEMS
    tail = (f"\n  ... and {more} more problem(s) not shown: fix these, then run again to see the next ones"
            if more > 0 else "")
    return (f"{csv_path}: {rows} bad row(s) ({len(bad)} problem(s)); nothing was started. Fix or remove them:\n  "
            + "\n  ".join(problems[:SHOWN_PROBLEMS]) + tail)


def _read_csv(csv_path: Path) -> tuple[list[str], list[tuple[int, list[str]]]]:
    reader = csv.reader(io.StringIO(read_csv_text(csv_path), newline=""))
    header = [h.strip() for h in next(reader, [])]
    raw = [(reader.line_num, [c.strip() for c in row]) for row in reader if any(c.strip() for c in row)]
    if "path" not in header:
        raise DataError(f"{csv_path}: line 1 must be a header with a 'path' column (image paths relative to the CSV); "
                        f"got columns {header}")
    dupes = sorted({h for h in header if header.count(h) > 1})
    if dupes or "" in header:
        raise DataError(f"{csv_path}: header columns must be named and unique, got {header}; rename {dupes or ['']}")
    if not raw:
        raise DataError(f"{csv_path} lists no images: add one row per image below the header")
    return header, raw


def _task_columns(csv_path: Path, header: list[str], tasks: dict | list | None) -> dict[str, dict]:
    """task -> {"kind": kind or None (infer), "classes": list or None}, in the CSV's or the config's order."""
    if tasks is None:
        chosen: dict[str, Any] = {h: None for h in header if h not in RESERVED}
    elif isinstance(tasks, (list, tuple)):
        chosen = {str(t): None for t in tasks}
    else:
        chosen = dict(tasks)
    out = {}
    for task, spec in chosen.items():
        if task not in header or task in RESERVED:
            raise DataError(f"config key 'data.tasks' names {task!r}, which is not a label column of {csv_path} "
                            f"(label columns: {[h for h in header if h not in RESERVED]})")
        spec = {"kind": spec} if spec is None or isinstance(spec, str) else dict(spec)
        unknown = set(spec) - {"kind", "classes"}
        if unknown or spec.get("kind") not in (None, *KINDS):
            raise DataError(f"config key 'data.tasks.{task}' = {chosen[task]!r}: give a kind ({', '.join(KINDS)}), "
                            "or {kind: ..., classes: [...]}")
        classes = spec.get("classes")
        out[task] = {"kind": spec.get("kind"), "classes": None if classes is None else [str(c) for c in classes]}
    return out  # none: a list of images to predict on


def _rows(csv_path: Path, header: list[str], raw: list, columns: dict, bad: list[tuple[int, str]]) -> list[ManifestRow]:
    rows, seen = [], {}
    for number, (line, cells) in enumerate(raw, 1):
        where = f"line {line} (row {number})"
        if len(cells) != len(header):
            bad.append((number, f"{where}: {len(cells)} cells for {len(header)} columns {header}; quote cells "
                                "holding commas"))
            continue
        cell = dict(zip(header, cells))
        rel = cell["path"]
        if not rel:
            bad.append((number, f"{where}: empty path; write the image's path relative to {csv_path.parent}"))
            continue
        path = Path(rel) if Path(rel).is_absolute() else csv_path.parent / rel
        key = os.path.normpath(os.path.abspath(path))
        if key in seen:
            bad.append((number, f"{where}: {rel!r} repeats {seen[key]}; list each image once"))
            continue
        seen[key] = where
        split, fold = cell.get("split"), cell.get("fold")
        if "split" in header and split.lower() not in SPLITS:
            bad.append((number, f"{where}: split {split!r} must be train, val or test"))
        if "fold" in header and not INTEGER.fullmatch(fold or ""):
            bad.append((number, f"{where}: fold {fold!r} must be an integer (the fold this image belongs to)"))
        labels = {task: cell[task] for task in columns}
        for task, text in labels.items():
            if not text:
                bad.append((number, f"{where}: empty {task!r} label; fill it in, remove the row, or leave the "
                                    "task out (data.tasks)"))
        rows.append(ManifestRow(line, number, rel, path, labels, SPLITS.get((split or "").lower()),
                                _integer(fold) if fold and INTEGER.fullmatch(fold) else None))
    return rows


def _cell_classes(text: str, kind: str) -> list[str]:
    if kind == "multilabel":
        return [part.strip() for part in text.split("|") if part.strip()]
    return [canonical_label(text)]


def canonical_label(text: str) -> str:
    """How the manifest names a class: an integer cell as the integer ('01', '1.0' -> '1'), other text as is."""
    return str(_integer(text)) if INTEGER.fullmatch(text) else text


def _integer(text: str) -> int:
    """The integer of a cell INTEGER matches: '01' -> 1, '1.0' -> 1."""
    return int(text.split(".")[0])


def _infer_tasks(csv_path: Path, rows: list[ManifestRow], columns: dict,
                 bad: list[tuple[int, str]]) -> tuple[dict, dict]:
    specs, names = {}, {}
    for task, spec in columns.items():
        values = [(row, row.labels[task]) for row in rows if row.labels[task]]
        kind = spec["kind"] or _infer_kind([v for _, v in values])
        classes = spec["classes"]
        if kind == "binary":
            classes = ["0", "1"]
            for row, text in values:
                if not (INTEGER.fullmatch(text) and _integer(text) in (0, 1)):
                    bad.append((row.number, f"{row.where}: {task!r} label {text!r} is not 0 or 1 (a binary task); "
                                            f"fix the cell or declare data.tasks.{task}: multiclass"))
        elif classes is not None:
            for row, text in values:
                for name in _cell_classes(text, kind):
                    if name not in classes:
                        bad.append((row.number, f"{row.where}: {task!r} label {name!r} is not one of the "
                                                f"classes {classes} (data.tasks.{task}.classes); fix the cell or add "
                                                "the class"))
        else:
            found = {name for _, text in values for name in _cell_classes(text, kind)}
            numeric = all(INTEGER.fullmatch(n) for n in found)
            classes = sorted(found, key=(lambda n: (int(n), n)) if numeric else None)
            if spec["kind"] is None and kind == "multiclass" and not bad:
                _refuse_free_text(csv_path, task, [v for _, v in values], list(columns))
        if kind != "binary" and len(classes) < 2 and not bad:
            raise DataError(f"task {task!r} has {len(classes)} class(es) {classes} in the manifest; a task needs at "
                            "least two (or 0/1 labels for a binary task)")
        specs[task] = TaskSpec(kind, 1 if kind == "binary" else max(len(classes), 2))
        names[task] = list(classes)
    return specs, names


def _refuse_free_text(csv_path: Path, task: str, values: list[str], tasks: list[str]) -> None:
    """A column with its own value in every row (notes, ids) would be a task of one class per row: refused."""
    if len(values) < FREE_TEXT_ROWS or len({canonical_label(v) for v in values}) < len(values):
        return
    others = [t for t in tasks if t != task]
    leave_out = f"data.tasks: {others}" if others else "data.tasks (naming the label columns)"
    declared = ", ".join([f"{t}: null" for t in others] + [f"{task}: multiclass"])
    raise DataError(f"{csv_path}: column {task!r} has a different value in each of its {len(values)} rows (e.g. "
                    f"{', '.join(repr(v) for v in values[:3])}): it reads as free text or an id, not as labels, and "
                    f"would be a task with one class per row. Leave it out with {leave_out}, or declare it to "
                    f"train on it anyway: data.tasks: {{{declared}}}")


def _infer_kind(values: list[str]) -> str:
    if any("|" in v for v in values):
        return "multilabel"
    if values and all(INTEGER.fullmatch(v) for v in values) and {_integer(v) for v in values} <= {0, 1}:
        return "binary"
    return "multiclass"


def _check_images(rows: list[ManifestRow], target_mpp: float | None, bad: list[tuple[int, str]]) -> list[ManifestRow]:
    """Open every image (header only); with target_mpp pick each one's level."""
    from dataclasses import replace

    from hrsel.io import open_image
    from hrsel.io.level_view import level_for_mpp

    checked = []
    for row in rows:
        try:
            with open_image(str(row.path)) as source:
                level = level_for_mpp(source, target_mpp) if target_mpp is not None else 0
        except HrselError as e:
            fix = "" if row.path.exists() else " (paths are relative to the CSV's folder)"
            bad.append((row.number, f"{row.where}: image {row.rel!r}: {e}{fix}"))
            continue
        checked.append(replace(row, level=level))
    return checked

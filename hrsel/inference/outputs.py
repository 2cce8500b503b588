"""The `--out` folder of `hrsel.predict`: one run at a time, complete tables, its own files known.

    with claim_output_folder("predictions/"):             # RunFolderError: a file, read-only, busy
        ...
        with writing(path):                                # disk full, read-only: one RunFolderError
            write_geojson(path, ...)
        write_table(out / PREDICTIONS, text)               # temp file + os.replace, at the end

- One predict per folder: `predict.lock`, the trainer's run-folder lock
  (`hrsel.engine.rundir.RunLock`): a second predict into the same `--out` stops at once (exit
  status 2) and names the first one; a lock left by a killed predict is taken over.
- `predictions.csv` and `metrics.json` are written once, when every image is done, through a
  temp file renamed over the old one: a failed or interrupted run leaves the previous table
  whole (or none), never a mix of two runs.
- `is_output(path)` knows the files predict writes, so a folder that is also the `--out` (or
  was one) is not read back as images.
"""
from __future__ import annotations

import functools
import os
import shutil
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

from hrsel.engine.checkpoint import atomic_write, write_error
from hrsel.engine.rundir import FolderUse, RunLock
from hrsel.errors import HrselError, RunFolderError

PREDICTIONS = "predictions.csv"
METRICS = "metrics.json"
TISSUE = "tissue"  # the run's tissue masks, cached (data.tissue)
MAP_SUFFIXES = (".geojson", "_scores.zarr", "_heatmap.png")  # per image: <stem> + suffix
USE = FolderUse("output folder", "predict.lock", "predictions.csv and maps", "--out DIR",
                "give this run another folder with --out DIR")
TABLES = (PREDICTIONS, METRICS)

_write_error = functools.partial(write_error, folder_kind="output folder", elsewhere="choose another --out",
                                 then="run hrsel.predict again", cls=RunFolderError)


def claim_output_folder(out_dir: str | os.PathLike) -> RunLock:
    """Lock `out_dir` (created if missing) for one predict; RunFolderError names a file, a read-only
    folder or the predict that holds it. Use as a context manager, or call `release()`."""
    return RunLock.acquire(out_dir, use=USE)


def is_output(path: Path) -> bool:
    """True for a file or folder `hrsel.predict` writes into its --out (tables, maps, masks, lock, temp files)."""
    name = Path(path).name
    return (name in (*TABLES, TISSUE, USE.lock) or name.endswith(MAP_SUFFIXES)
            or any(name.startswith(f".{table}.tmp") for table in TABLES))


def write_table(path: Path, text: str) -> None:
    """`text` (UTF-8) into `path` through a temp file and os.replace: the old table stays whole on failure."""
    data = text.encode("utf-8")
    atomic_write(path, lambda f: f.write(data), on_error=_write_error)


@contextmanager
def writing(path: Path) -> Iterator[None]:
    """Around the writing of one map: an OSError (disk full, read-only) removes the partial file and
    becomes one RunFolderError naming it; hrsel's own errors pass."""
    try:
        yield
    except HrselError:
        raise
    except OSError as error:
        _remove(path)
        raise _write_error(path, error) from None


def _remove(path: Path) -> None:
    try:
        if path.is_dir() and not path.is_symlink():
            shutil.rmtree(path, ignore_errors=True)
        else:
            path.unlink(missing_ok=True)
    except OSError:
        pass

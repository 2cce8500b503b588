"""Where the data set generators write: a staging folder, moved into place only once complete.

A generator never mixes two data sets and never loses one:

- a folder holding anything that is not the generator's own output is refused, overwrite or not;
- a folder holding the generator's output (finished or interrupted) is refused unless
  `overwrite`, which then empties it;
- the new data set is written into a hidden sibling `.<name>.partial` and moved into the
  folder only when complete (`parameters.json` last), so a failed or interrupted run leaves
  the previous data set as it was (and its staging folder is removed).

Generators use `staged_output`:

    with staged_output(out, overwrite=..., foreign=..., what="billiard") as stage:
        ...write the data set under stage, parameters.json last...
"""
from __future__ import annotations

import logging
import shutil
from contextlib import contextmanager
from pathlib import Path
from typing import Callable, Iterator

from hrsel.errors import DataError

log = logging.getLogger(__name__)

MARKER = ".hrsel-partial"  # inside a staging folder: it is ours to delete
PARAMETERS = "parameters.json"  # written last: its presence marks a finished data set

# out folder -> the entries under it that the generator did not write (relative paths)
ForeignFiles = Callable[[Path], list[str]]


def owned_layout(out: Path, splits: dict[str, Callable[[Path], bool]]) -> list[str]:
    """Entries of `out` outside `parameters.json` + split folders whose every file passes its test."""
    foreign = []
    for entry in sorted(out.iterdir()):
        if entry.name == PARAMETERS and entry.is_file():
            continue
        if entry.name in splits and entry.is_dir():
            foreign += [str(f.relative_to(out)) for f in sorted(entry.rglob("*"))
                        if f.is_file() and not splits[entry.name](f.relative_to(entry))]
            continue
        foreign.append(entry.name)
    return foreign


@contextmanager
def staged_output(out: str | Path, *, overwrite: bool, foreign: ForeignFiles, what: str) -> Iterator[Path]:
    """A fresh staging folder; moved into `out` when the block ends normally, deleted when it raises."""
    stage = prepare_output(out, overwrite=overwrite, foreign=foreign, what=what)
    try:
        yield stage
    except BaseException:
        shutil.rmtree(stage, ignore_errors=True)
        raise
    try:
        commit_output(stage, out, overwrite=overwrite, foreign=foreign, what=what)
    except DataError as exc:
        raise DataError(f"{exc}. The new {what} data set is complete in {stage}; move it yourself") from exc


def staging_folder(out: Path) -> Path:
    return out.parent / f".{out.name}.partial"


def prepare_output(out: str | Path, *, overwrite: bool, foreign: ForeignFiles, what: str) -> Path:
    """Check `out` (see the module doc) and return a fresh, empty staging folder for the new data set."""
    out = Path(out)
    _check_target(out, overwrite=overwrite, foreign=foreign, what=what)
    stage = staging_folder(out)
    if stage.exists():
        if not (stage / MARKER).is_file():
            raise DataError(f"{stage} exists and was not made by hrsel; remove or rename it, then run again")
        log.info("removing the leftovers of an interrupted run in %s", stage)
        shutil.rmtree(stage)
    stage.mkdir(parents=True)
    (stage / MARKER).write_text("a data set being generated; deleted by the next run\n")
    return stage


def _check_target(out: Path, *, overwrite: bool, foreign: ForeignFiles, what: str) -> None:
    if out.exists() and not out.is_dir():
        raise DataError(f"output {out} is a file, not a folder; choose a folder for the {what} data set")
    if not out.exists() or not any(out.iterdir()):
        return
    others = foreign(out)
    if others:
        shown = ", ".join(others[:5]) + (f" and {len(others) - 5} more" if len(others) > 5 else "")
        raise DataError(f"{out} holds files that are not {what} output ({shown}); nothing was changed. "
                        "Choose an empty or new folder")
    if not overwrite:
        state = "a finished" if (out / PARAMETERS).is_file() else "an unfinished (interrupted)"
        raise DataError(f"{out} already holds {state} {what} data set; nothing was changed. Pass --overwrite "
                        "(overwrite=True) to replace it, or choose another folder")


def commit_output(stage: Path, out: str | Path, *, overwrite: bool, foreign: ForeignFiles, what: str) -> Path:
    """Move the complete data set in `stage` into `out` (emptied first when `overwrite`); returns `out`."""
    out = Path(out)
    _check_target(out, overwrite=overwrite, foreign=foreign, what=what)  # again: the run may have taken hours
    out.mkdir(parents=True, exist_ok=True)
    (out / PARAMETERS).unlink(missing_ok=True)  # first: a crash below leaves an unfinished set, not a mixed one
    for entry in out.iterdir():
        shutil.rmtree(entry) if entry.is_dir() and not entry.is_symlink() else entry.unlink()
    for entry in sorted(stage.iterdir()):
        if entry.name not in (MARKER, PARAMETERS):
            entry.rename(out / entry.name)
    (stage / PARAMETERS).rename(out / PARAMETERS)
    (stage / MARKER).unlink()
    stage.rmdir()
    return out

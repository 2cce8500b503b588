"""Checkpoints: atomic writes (temp file + rename), `last.pt` and `best.pt` per run.

A checkpoint holds everything a resumed run needs to continue bit-for-bit on the
CPU: model, optimiser, grad scaler, step / epoch / batch position in the epoch
(the data order is a function of seed and epoch), best metric and every RNG state.
"""
from __future__ import annotations

import errno
import logging
import os
import pickle
import random
import shutil
from pathlib import Path
from typing import IO, Any, Callable

import numpy as np
import torch

from hrsel.errors import CheckpointError, RunWriteError

log = logging.getLogger(__name__)

LAST = "last.pt"
BEST = "best.pt"


def rng_state() -> dict[str, Any]:
    state = {
        "python": random.getstate(),
        "numpy": np.random.get_state(),
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def atomic_save(obj: Any, path: str | os.PathLike) -> None:
    """torch.save to a temp file in the same folder, fsync, then rename over `path`."""
    atomic_write(path, lambda f: torch.save(obj, f))


def atomic_copy(src: str | os.PathLike, dst: str | os.PathLike) -> None:
    atomic_write(dst, lambda f: _copy_into(src, f))


def atomic_write(path: str | os.PathLike, write: Callable[[IO], None], *, text: bool = False) -> None:
    """Call `write(file)` on a temp file beside `path`, fsync, then rename it over `path`.

    A failed write (disk full, no permission) leaves `path` as it was, removes the temp
    file and raises one `RunWriteError` naming the file, the reason and the free space.
    """
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    try:
        with open(tmp, "w" if text else "wb", **({"newline": ""} if text else {})) as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except (OSError, RuntimeError) as e:
        if isinstance(e, RuntimeError) and not _torch_write_failure(e):
            raise
        raise write_error(path, e) from None
    finally:
        _remove_quietly(tmp)


def write_error(path: Path, error: BaseException) -> RunWriteError:
    """The one error a failed write of a run file raises: what, why, free space, what is kept, the fix."""
    folder = path.parent
    reason = _reason(error)
    kept = (f"the previous {path.name} is unchanged" if path.exists()
            else f"no partial {path.name} was left behind")
    fix = ("free space on that disk (or move the run to another output_dir)" if _no_space(error)
           else "make the folder writable and check the disk")
    return RunWriteError(f"cannot write {path}: {reason}; {_free_space(folder)} free on the disk of run folder "
                         f"{folder}; {kept}. {fix.capitalize()}, then continue the run with --resume")


def _copy_into(src: str | os.PathLike, f: IO) -> None:
    with open(src, "rb") as source:
        shutil.copyfileobj(source, f)


def _torch_write_failure(error: RuntimeError) -> bool:
    """torch.save reports a failed write (disk full) as a RuntimeError of its zip writer."""
    text = str(error)
    return "inline_container" in text or "PytorchStreamWriter" in text or "file write failed" in text


def _no_space(error: BaseException) -> bool:
    return getattr(error, "errno", None) in (errno.ENOSPC, errno.EDQUOT) or "unexpected pos" in str(error)


def _reason(error: BaseException) -> str:
    if _no_space(error):
        return "no space left on the device"
    if isinstance(error, OSError) and error.strerror:
        return error.strerror.lower()
    return str(error).splitlines()[0] if str(error) else type(error).__name__


def _free_space(folder: Path) -> str:
    try:
        free = shutil.disk_usage(folder).free
    except OSError:
        return "unknown space"
    for unit, size in (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if free >= size:
            return f"{free / size:.1f} {unit}"
    return f"{free} bytes"


def _remove_quietly(path: Path) -> None:
    try:
        path.unlink(missing_ok=True)
    except OSError:
        log.warning("could not remove the temporary file %s; delete it by hand", path)


def save_checkpoint(run_dir: str | os.PathLike, state: dict[str, Any], *, is_best: bool = False) -> Path:
    """Write `last.pt` (and `best.pt` when `is_best`); returns the path of `last.pt`."""
    run_dir = Path(run_dir)
    last = run_dir / LAST
    atomic_save(state, last)
    if is_best:
        atomic_copy(last, run_dir / BEST)
    log.debug("checkpoint step %s -> %s%s", state.get("step"), last, " (best)" if is_best else "")
    return last


TRAINING_KEYS = ("model", "optimizer", "scaler", "train_state", "rng")  # what Trainer.save writes


def load_checkpoint(path: str | os.PathLike, *, require: tuple[str, ...] = ()) -> dict[str, Any]:
    """Load a checkpoint file, or `last.pt` of a run folder, onto the CPU.

    A missing, empty, truncated or foreign file (not a dict holding the keys `require`)
    raises `CheckpointError` naming the file and the checkpoints that may be used instead.
    """
    path = Path(path)
    if path.is_dir():
        path = path / LAST
    if not path.is_file():
        raise CheckpointError(f"no checkpoint at {str(path)!r}; --resume expects a run folder holding {LAST} "
                              f"(or a checkpoint file in one){_instead(path)}")
    try:
        state = torch.load(path, map_location="cpu", weights_only=False)
    except (EOFError, RuntimeError, ValueError, OSError, pickle.UnpicklingError, AttributeError, ImportError,
            IndexError, KeyError, TypeError) as e:
        size = path.stat().st_size
        what = "empty" if size == 0 else f"truncated, corrupt or not a torch checkpoint ({size} bytes)"
        raise CheckpointError(f"checkpoint {str(path)!r} cannot be read: the file is {what}; torch.load said: "
                              f"{_first_line(e)}{_instead(path)}") from None
    missing = [k for k in require if not isinstance(state, dict) or k not in state]
    if missing:
        held = sorted(map(str, state))[:8] if isinstance(state, dict) else type(state).__name__
        raise CheckpointError(f"checkpoint {str(path)!r} is not a hrsel training checkpoint: it lacks "
                              f"{', '.join(missing)} (it holds {held}){_instead(path)}")
    return state


def _instead(path: Path) -> str:
    """Which other checkpoint of the run folder a person may resume from."""
    others = [p for p in (path.parent / LAST, path.parent / BEST) if p != path and p.is_file()]
    if others:
        return (f". Resume from another checkpoint of the run instead, e.g. --resume {others[0]} "
                f"(training continues from the step it holds), or restore {path.name} from a backup")
    return f". Restore {path.name} from a backup, or start the run again with --overwrite"


def _first_line(error: BaseException) -> str:
    """The error's first sentence (torch's zip reader adds a paragraph of advice after it)."""
    text = " ".join(str(error).split())
    return f"{type(error).__name__}: {text.split('. ')[0][:200]}"

"""Checkpoints: atomic writes (temp file + rename), `last.pt` and `best.pt` per run.

A checkpoint holds everything a resumed run needs to continue bit-for-bit on the
CPU: model, optimiser, grad scaler, step / epoch / batch position in the epoch
(the data order is a function of seed and epoch), best metric and every RNG state.
"""
from __future__ import annotations

import errno
import logging
import os
import random
import shutil
from pathlib import Path
from typing import IO, Any, Callable

import numpy as np
import torch

from hrsel.errors import CheckpointError, RunWriteError
from hrsel.models.torch_file import load_weights_only

log = logging.getLogger(__name__)

LAST = "last.pt"
BEST = "best.pt"


def rng_state() -> dict[str, Any]:
    """Every RNG state as plain containers and tensors (loadable with torch.load(weights_only=True))."""
    version, internal, gauss = random.getstate()
    numpy_state = np.random.get_state(legacy=False)
    state = {
        "python": [version, list(internal), gauss],
        "numpy": {"bit_generator": numpy_state["bit_generator"],
                  "key": torch.from_numpy(numpy_state["state"]["key"].astype(np.int64)),
                  "pos": int(numpy_state["state"]["pos"]), "has_gauss": int(numpy_state["has_gauss"]),
                  "gauss": float(numpy_state["gauss"])},
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    """Restore what `rng_state` returned (or the tuple form of checkpoints before hrsel 0.1.1)."""
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    saved = state["numpy"]
    if isinstance(saved, dict):
        key = np.asarray(saved["key"].numpy() if isinstance(saved["key"], torch.Tensor) else saved["key"],
                         dtype=np.uint32)
        np.random.set_state({"bit_generator": saved["bit_generator"], "state": {"key": key, "pos": saved["pos"]},
                             "has_gauss": saved["has_gauss"], "gauss": saved["gauss"]})
    else:
        np.random.set_state(saved)
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def atomic_save(obj: Any, path: str | os.PathLike) -> None:
    """torch.save to a temp file in the same folder, fsync, then rename over `path`."""
    atomic_write(path, lambda f: torch.save(obj, f))


def atomic_copy(src: str | os.PathLike, dst: str | os.PathLike) -> None:
    atomic_write(dst, lambda f: _copy_into(src, f))


def atomic_write(path: str | os.PathLike, write: Callable[[IO], None], *, text: bool = False,
                 on_error: Callable[[Path, BaseException], Exception] | None = None) -> None:
    """Call `write(file)` on a temp file beside `path`, fsync, then rename it over `path`.

    A failed write (disk full, no permission) leaves `path` as it was, removes the temp
    file and raises one error naming the file, the reason and the free space: `on_error(path,
    error)`, by default `write_error` (a `RunWriteError` of a run folder).
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
        raise (on_error or write_error)(path, e) from None
    finally:
        _remove_quietly(tmp)


def write_error(path: Path, error: BaseException, *, folder_kind: str = "run folder",
                elsewhere: str = "move the run to another output_dir", then: str = "continue the run with --resume",
                cls: type[Exception] = RunWriteError) -> Exception:
    """The one error a failed write of a run file raises: what, why, free space, what is kept, the fix.

    The keywords word it for another folder (hrsel.predict's --out: `cls` RunFolderError)."""
    folder = path.parent
    reason = _reason(error)
    kept = (f"the previous {path.name} is unchanged" if path.exists()
            else f"no partial {path.name} was left behind")
    fix = (f"free space on that disk (or {elsewhere})" if _no_space(error)
           else "make the folder writable and check the disk")
    return cls(f"cannot write {path}: {reason}; {_free_space(folder)} free on the disk of {folder_kind} "
               f"{folder}; {kept}. {fix.capitalize()}, then {then}")


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


def load_checkpoint(path: str | os.PathLike, *, require: tuple[str, ...] = (), resuming: bool = True
                    ) -> dict[str, Any]:
    """Load a checkpoint file, or `last.pt` of a run folder, onto the CPU, with torch.load(weights_only=True).

    A missing, empty, truncated or foreign file (not a dict holding the keys `require`)
    raises `CheckpointError` naming the file and the checkpoints that may be used instead
    (to resume from, or with `resuming=False` to load: hrsel.inference.load_model).
    """
    path = Path(path)
    if path.is_dir():
        path = path / LAST
    if not path.is_file():
        raise CheckpointError(f"no checkpoint at {str(path)!r}; --resume expects a run folder holding {LAST} "
                              f"(or a checkpoint file in one){_instead(path, resuming)}")
    state = load_weights_only(path, advice=_instead(path, resuming))
    missing = [k for k in require if not isinstance(state, dict) or k not in state]
    if missing:
        held = sorted(map(str, state))[:8] if isinstance(state, dict) else type(state).__name__
        raise CheckpointError(f"checkpoint {str(path)!r} is not a hrsel training checkpoint: it lacks "
                              f"{', '.join(missing)} (it holds {held}){_instead(path, resuming)}")
    return state


def _instead(path: Path, resuming: bool = True) -> str:
    """Which other checkpoint of the run folder a person may resume from (or load)."""
    others = [p for p in (path.parent / LAST, path.parent / BEST) if p != path and p.is_file()]
    if not resuming:
        if others:
            return (f". Load the run's other checkpoint instead (checkpoint={others[0].stem!r}, "
                    f"--checkpoint {others[0].stem}), or restore {path.name} from a backup")
        return f". Restore {path.name} from a backup, or train the run again"
    if others:
        return (f". Resume from another checkpoint of the run instead, e.g. --resume {others[0]} "
                f"(training continues from the step it holds), or restore {path.name} from a backup")
    return f". Restore {path.name} from a backup, or start the run again with --overwrite"


# ----------------------------------------------------------------------------- what a checkpoint describes

def run_metadata(cfg: Any, tasks: dict[str, Any], dataset: Any = None) -> dict[str, Any]:
    """What a checkpoint carries besides the training state, so that it loads on its own
    (hrsel.inference.load_model): the resolved config as a plain dict, the task specs, the class
    names and the hrsel version. Plain containers, numbers and strings only (weights_only-safe).
    """
    from hrsel import __version__
    from hrsel.config import to_dict

    specs = {str(name): {"kind": str(spec.kind), "num_classes": int(spec.num_classes)} for name, spec in tasks.items()}
    return {"config": plain(to_dict(cfg)), "tasks": specs, "class_names": class_names_of(dataset, tasks),
            "hrsel_version": __version__}


def class_names_of(dataset: Any, tasks: dict[str, Any]) -> dict[str, list[str]]:
    """{task: [name per class]}: the data set's `class_names` where it has them, else "0".."C-1".

    A `Subset` (a held-out split) is looked through to the data set it wraps.
    """
    found = None
    while dataset is not None and found is None:
        found = getattr(dataset, "class_names", None)
        dataset = getattr(dataset, "dataset", None)
    found = found or {}
    out = {}
    for name, spec in tasks.items():
        names = found.get(name) if isinstance(found, dict) else None
        count = max(int(spec.num_classes), 2) if spec.kind == "binary" else int(spec.num_classes)
        if names is None or len(names) != count:
            if names is not None:
                log.warning("class names of task %r: %d names for %d classes; numbering the classes instead",
                            name, len(names), count)
            names = [str(i) for i in range(count)]
        out[str(name)] = [str(n) for n in names]
    return out


def plain(value: Any) -> Any:
    """`value` as plain containers (dict, list), str, int, float, bool and None; anything else as str."""
    if isinstance(value, dict):
        return {str(k): plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [plain(v) for v in value]
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    if hasattr(value, "item") and callable(value.item):  # numpy / torch scalars
        try:
            return plain(value.item())
        except (TypeError, ValueError, RuntimeError):
            pass
    return str(value)

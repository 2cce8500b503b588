"""The run folder (`output_dir/experiment`): one run at a time, and no finished run lost.

    lock = claim_run_folder(run_dir, mode="new")      # "new" | "resume" | "overwrite"
    ...                                               # every check, the data, a dry run
    move_previous_run(run_dir)                        # mode "overwrite" only: old files move aside
    ...                                               # config.yaml, training
    lock.release()

- A run holds `run.lock` (an flock, plus who holds it: pid, host, start time) for as long as
  it lives; a second run in the same folder stops at once and names the holder. A lock left
  by a process that died (SIGKILL, a crash) is taken over with a warning. The same lock guards
  the `--out` of hrsel.predict and hrsel.features (`RunLock.acquire(folder, use=FolderUse(...))`:
  another lock file and wording); a path that is a file or a folder that cannot be written is
  refused there too.
- A new run refuses a folder holding results of an earlier run (last.pt, best.pt,
  metrics.csv, test_metrics.json): continue it with --resume, or start over with --overwrite,
  which moves the earlier files to `<run folder>.replaced-<time>/` (nothing is deleted).
- A resumed run uses the run's own config.yaml; `resume_config` allows only the overrides in
  `SAFE_ON_RESUME` and names every other difference.

Unix only (fcntl), like the rest of the trainer.
"""
from __future__ import annotations

import errno
import fcntl
import json
import logging
import os
import socket
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from hrsel.config import Config, from_dict, to_dict, validate
from hrsel.errors import CheckpointError, ConfigError, RunFolderError

log = logging.getLogger(__name__)

LOCK = "run.lock"
RESULTS = ("last.pt", "best.pt", "metrics.csv", "test_metrics.json")  # what a rerun must never replace
MODES = ("new", "resume", "overwrite")
# Keys a resumed run may change: they do not alter what was learnt so far or how it is scored.
SAFE_ON_RESUME = ("device", "train.epochs", "train.max_steps", "train.checkpoint_every", "train.progress_bar",
                  "train.find_unused_parameters", "data.num_workers", "data.eval_batch_size", "eval.pictures",
                  "train.channels_last", "model.score_batch", "model.compile_scorer")  # the last three: speed only
LOCATION_KEYS = ("output_dir", "experiment")  # where the run lives: given by the folder itself on resume


# ----------------------------------------------------------------------------- the lock

@dataclass(frozen=True)
class FolderUse:
    """Whose folder a `RunLock` guards, for its lock file's name and its messages."""

    what: str  # "run folder", "output folder"
    lock: str  # the lock file's name
    outputs: str  # what two runs in one folder would overwrite
    flag: str  # the option that chooses the folder
    elsewhere: str  # how to give a run another folder


TRAINING_RUN = FolderUse("run folder", LOCK, "checkpoints", "--output-dir DIR",
                         "give this run another folder with experiment=NAME or --output-dir DIR")


@dataclass(frozen=True)
class Holder:
    """Who holds (or held) a run folder's lock."""

    pid: int
    host: str
    started: str
    command: str = ""

    def __str__(self) -> str:
        return f"pid {self.pid} on host {self.host!r}, started {self.started}"

    @classmethod
    def me(cls) -> "Holder":
        started = time.strftime("%Y-%m-%d %H:%M:%S %z")
        return cls(os.getpid(), socket.gethostname(), started, " ".join(sys.argv)[:500])


class RunLock:
    """An exclusive flock on `run_dir/run.lock` holding this process's `Holder`; `release()` removes it."""

    def __init__(self, run_dir: Path, fd: int, *, created_folder: bool, name: str = LOCK):
        self.run_dir, self.path, self._fd, self.created_folder = run_dir, run_dir / name, fd, created_folder

    @classmethod
    def acquire(cls, run_dir: str | os.PathLike, *, use: "FolderUse | None" = None) -> "RunLock":
        """Lock `run_dir` (created if missing); `use` says whose folder it is (default: a training run's)."""
        use = use or TRAINING_RUN
        run_dir = Path(run_dir)
        created = not run_dir.exists()
        if run_dir.exists() and not run_dir.is_dir():
            raise RunFolderError(f"{use.what} {str(run_dir)!r} is a file, not a folder; {use.elsewhere}")
        try:
            run_dir.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise RunFolderError(f"cannot create {use.what} {str(run_dir)!r}: {e.strerror or e}; choose a writable "
                                 f"place with {use.flag}") from None
        path = run_dir / use.lock
        for _ in range(20):  # retried only while a releasing holder unlinks the file under us
            try:
                fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
            except OSError as e:  # a read-only folder or disk, a full disk
                cls._remove_created(run_dir, created)
                raise RunFolderError(f"cannot write in {use.what} {str(run_dir)!r} (creating its lock {path.name}: "
                                     f"{e.strerror or e}); make it writable or {use.elsewhere}") from None
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError as e:
                os.close(fd)
                if e.errno not in (errno.EAGAIN, errno.EACCES, errno.EWOULDBLOCK):
                    raise RunFolderError(f"{use.what} {str(run_dir)!r}: cannot lock {str(path)!r}: {e}") from None
                raise RunFolderError(_busy_message(run_dir, read_holder(path), use)) from None
            if _same_file(fd, path):
                lock = cls(run_dir, fd, created_folder=created, name=use.lock)
                lock._write_holder()
                return lock
            os.close(fd)  # the previous holder unlinked the file between our open and flock: try again
        raise RunFolderError(f"{use.what} {str(run_dir)!r}: {str(path)!r} keeps changing; is another run "
                             f"starting there? Try again")

    @staticmethod
    def _remove_created(run_dir: Path, created: bool) -> None:
        if created and run_dir.is_dir() and not any(run_dir.iterdir()):
            run_dir.rmdir()

    def _write_holder(self) -> None:
        previous = _parse_holder(os.pread(self._fd, 4096, 0))
        if previous is not None and previous.pid != os.getpid():
            log.warning("run folder %s: taking over the lock of %s, which ended without releasing it (killed or "
                        "crashed); its checkpoints are kept", self.run_dir, previous)
        text = json.dumps(Holder.me().__dict__).encode()
        os.ftruncate(self._fd, 0)
        os.pwrite(self._fd, text, 0)
        os.fsync(self._fd)

    def release(self) -> None:
        """Remove the lock file, unlock; an empty folder this run created goes too."""
        if self._fd < 0:
            return
        try:
            os.ftruncate(self._fd, 0)
            self.path.unlink(missing_ok=True)
        finally:
            fcntl.flock(self._fd, fcntl.LOCK_UN)
            os.close(self._fd)
            self._fd = -1
        self._remove_created(self.run_dir, self.created_folder)

    def __enter__(self) -> "RunLock":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.release()


def read_holder(path: str | os.PathLike) -> Holder | None:
    """The holder written in a lock file, or None (no file, empty, unreadable)."""
    try:
        return _parse_holder(Path(path).read_bytes())
    except OSError:
        return None


def _parse_holder(raw: bytes) -> Holder | None:
    try:
        data = json.loads(raw.decode() or "null")
        return Holder(int(data["pid"]), str(data["host"]), str(data["started"]), str(data.get("command", "")))
    except (ValueError, TypeError, KeyError, UnicodeDecodeError):
        return None


def _same_file(fd: int, path: Path) -> bool:
    try:
        return os.fstat(fd).st_ino == os.stat(path).st_ino
    except FileNotFoundError:
        return False


def _busy_message(run_dir: Path, holder: Holder | None, use: FolderUse) -> str:
    who = str(holder) if holder is not None else "another process (its lock file names no holder yet)"
    command = f" (command: {holder.command})" if holder is not None and holder.command else ""
    return (f"{use.what} {str(run_dir)!r} is in use by {who}{command}: two runs in one folder would overwrite "
            f"each other's {use.outputs}. Wait for it to end (or stop it), or {use.elsewhere}")


# ----------------------------------------------------------------------------- rerun, resume, overwrite

def claim_run_folder(run_dir: str | os.PathLike, *, mode: str) -> RunLock:
    """Lock the run folder and check that `mode` may use it; raises `RunFolderError` (nothing written)."""
    if mode not in MODES:
        raise ValueError(f"mode {mode!r} is not one of {', '.join(MODES)}")
    run_dir = Path(run_dir)
    lock = RunLock.acquire(run_dir)
    results = previous_results(run_dir)
    if mode == "new" and results:
        lock.release()
        raise RunFolderError(
            f"run folder {str(run_dir)!r} already holds a run ({', '.join(results)}); nothing was changed. "
            f"Continue it with `--resume {run_dir}`, start it over with `--overwrite` (its files move to "
            f"{run_dir.name}.replaced-<time>/ beside it, nothing is deleted), or give this run another folder "
            f"with experiment=NAME or --output-dir DIR")
    return lock


def previous_results(run_dir: Path) -> list[str]:
    """The result files of an earlier run in `run_dir` (a folder with none may be reused)."""
    return [name for name in RESULTS if (run_dir / name).exists()]


def move_previous_run(run_dir: str | os.PathLike) -> Path | None:
    """--overwrite: move everything but the lock to `<run_dir>.replaced-<time>/`; returns that folder."""
    run_dir = Path(run_dir)
    entries = [p for p in run_dir.iterdir() if p.name != LOCK]
    if not entries:
        return None
    stamp = time.strftime("%Y%m%d-%H%M%S")
    target = run_dir.with_name(f"{run_dir.name}.replaced-{stamp}")
    n = 1
    while target.exists():
        target, n = run_dir.with_name(f"{run_dir.name}.replaced-{stamp}-{n}"), n + 1
    target.mkdir()
    for entry in entries:
        os.replace(entry, target / entry.name)
    return target


def resume_target(path: str | os.PathLike) -> tuple[Path, Path]:
    """`--resume PATH` -> (run folder, checkpoint file): a run folder means its last.pt, a .pt file itself."""
    path = Path(path)
    if path.is_file():
        if path.suffix != ".pt":
            raise ConfigError(f"--resume {str(path)!r} is a file but not a checkpoint (.pt); give the run folder, "
                              f"e.g. --resume {path.parent}")
        run_dir, checkpoint = path.parent, path
    elif path.is_dir():
        run_dir, checkpoint = path, path / "last.pt"
    else:
        raise RunFolderError(f"--resume {str(path)!r}: no such run folder{_run_folders_near(path)}")
    if not (run_dir / "config.yaml").is_file():
        raise RunFolderError(f"--resume {str(path)!r}: {str(run_dir)!r} holds no config.yaml, so it is not a run "
                             f"folder; give the folder a run wrote (runs/NAME){_run_folders_near(run_dir)}")
    if not checkpoint.is_file():
        best = run_dir / "best.pt"
        instead = f"; its best.pt may be used: --resume {best}" if best.is_file() and best != checkpoint else ""
        raise CheckpointError(f"--resume {str(path)!r}: no checkpoint {str(checkpoint)!r} (the run stopped before "
                              f"its first checkpoint, or the file was removed){instead}")
    return run_dir, checkpoint


def _run_folders_near(path: Path) -> str:
    parent = path.parent if path.parent.is_dir() else None
    if parent is None:
        return ""
    runs = sorted(p.name for p in parent.iterdir() if (p / "config.yaml").is_file())[:8]
    return f". Run folders in {str(parent)!r}: {', '.join(runs)}" if runs else ""


def resume_config(saved: Config, requested: Config, *, run_dir: Path,
                  config_file: Path) -> tuple[Config, list[str]]:
    """The config a resumed run uses: the run's own (`saved`), with only SAFE_ON_RESUME keys taken from `requested`.

    Returns (config, changes); a difference in any other key raises `ConfigError` naming it.
    """
    old, new = _flat(to_dict(saved)), _flat(to_dict(requested))
    differing = [k for k in sorted(old.keys() | new.keys()) if k not in LOCATION_KEYS
                 and old.get(k, _ABSENT) != new.get(k, _ABSENT)]
    unsafe = [k for k in differing if k not in SAFE_ON_RESUME]
    if unsafe:
        shown = "; ".join(f"{k}: run {old.get(k, _ABSENT)!r}, asked {new.get(k, _ABSENT)!r}" for k in unsafe)
        raise ConfigError(
            f"--resume {run_dir}: the run was trained with {config_file}, and this command changes {shown}. A "
            f"resumed run keeps its hyper-parameters; only {', '.join(SAFE_ON_RESUME)} may change. Drop those "
            f"overrides (`--resume {run_dir}` alone uses the run's config), or start a new run with another "
            f"experiment=NAME")
    merged = to_dict(saved)
    for key in differing:
        section, _, leaf = key.rpartition(".")
        (merged[section] if section else merged)[leaf] = new[key]
    merged["output_dir"], merged["experiment"] = str(run_dir.parent), run_dir.name
    cfg = from_dict(merged)
    validate(cfg)
    changes = [f"{k}: {old.get(k, _ABSENT)!r} -> {new[k]!r}" for k in differing]
    return cfg, changes


class _Absent:
    def __repr__(self) -> str:
        return "(not set)"


_ABSENT = _Absent()


def _flat(raw: dict[str, Any]) -> dict[str, Any]:
    """{'train': {'epochs': 3}} -> {'train.epochs': 3}; one level deep (sections), values as YAML holds them."""
    out: dict[str, Any] = {}
    for key, value in raw.items():
        if isinstance(value, dict) and key in ("data", "model", "optim", "train", "eval"):
            out.update({f"{key}.{k}": _as_yaml(v) for k, v in value.items()})
        else:
            out[key] = _as_yaml(value)
    return out


def _as_yaml(value: Any) -> Any:
    """Tuples as lists, recursively: a typed option (1, 2) equals the [1, 2] of a saved config.yaml."""
    if isinstance(value, (list, tuple)):
        return [_as_yaml(v) for v in value]
    if isinstance(value, dict):
        return {k: _as_yaml(v) for k, v in value.items()}
    return value

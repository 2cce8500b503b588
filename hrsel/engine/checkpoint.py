"""Checkpoints: atomic writes (temp file + rename), `last.pt` and `best.pt` per run.

A checkpoint holds everything a resumed run needs to continue bit-for-bit on the
CPU: model, optimiser, grad scaler, step / epoch / batch position in the epoch
(the data order is a function of seed and epoch), best metric and every RNG state.
"""
from __future__ import annotations

import logging
import os
import random
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import torch

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
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    try:
        with open(tmp, "wb") as f:
            torch.save(obj, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()


def atomic_copy(src: str | os.PathLike, dst: str | os.PathLike) -> None:
    dst = Path(dst)
    tmp = dst.with_name(f".{dst.name}.tmp{os.getpid()}")
    shutil.copyfile(src, tmp)
    os.replace(tmp, dst)


def save_checkpoint(run_dir: str | os.PathLike, state: dict[str, Any], *, is_best: bool = False) -> Path:
    """Write `last.pt` (and `best.pt` when `is_best`); returns the path of `last.pt`."""
    run_dir = Path(run_dir)
    last = run_dir / LAST
    atomic_save(state, last)
    if is_best:
        atomic_copy(last, run_dir / BEST)
    log.debug("checkpoint step %s -> %s%s", state.get("step"), last, " (best)" if is_best else "")
    return last


def load_checkpoint(path: str | os.PathLike) -> dict[str, Any]:
    """Load a checkpoint file, or `last.pt` of a run folder, onto the CPU."""
    path = Path(path)
    if path.is_dir():
        path = path / LAST
    if not path.is_file():
        from hrsel.errors import ConfigError

        raise ConfigError(f"no checkpoint at {str(path)!r}; --resume expects a run folder holding {LAST}")
    return torch.load(path, map_location="cpu", weights_only=False)

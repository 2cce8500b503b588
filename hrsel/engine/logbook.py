"""What a run writes about itself: log lines, `metrics.csv`, TensorBoard, progress bars.

Only rank 0 writes; other ranks get a disabled `RunLog` whose methods do nothing.
"""
from __future__ import annotations

import csv
import logging
import math
import resource
import sys
import time
from pathlib import Path
from typing import IO, Any, Iterable

import torch

from hrsel.cli import StderrHandler
from hrsel.engine.checkpoint import atomic_write

log = logging.getLogger(__name__)


FILE_ONLY = {"file_only": True}  # `log.error(..., extra=FILE_ONLY)`: for train.log, not stderr (the CLI prints it)


def setup_logging(run_dir: Path | None, *, is_main: bool, level: int = logging.INFO) -> None:
    """Log to stderr (rank 0 only, others warnings) and to run_dir/train.log."""
    root = logging.getLogger()
    for handler in list(root.handlers):
        if getattr(handler, "_hrsel", False):
            root.removeHandler(handler)
            handler.close()
    fmt = logging.Formatter("%(asctime)s %(levelname)s %(message)s", "%H:%M:%S")
    handlers: list[logging.Handler] = [StderrHandler()]  # the stderr of the moment, not of the first run
    handlers[0].addFilter(lambda record: not getattr(record, "file_only", False))
    if is_main and run_dir is not None:
        handlers.append(_RunLogFile(run_dir / "train.log"))
    for handler in handlers:
        handler.setFormatter(fmt)
        handler._hrsel = True  # type: ignore[attr-defined]
        root.addHandler(handler)
    root.setLevel(level if is_main else logging.WARNING)


class _RunLogFile(logging.FileHandler):
    """train.log; when it cannot be written (disk full) it says so once instead of a traceback per line."""

    failed = False

    def handleError(self, record: logging.LogRecord) -> None:
        if not self.failed:
            self.failed = True
            error = sys.exc_info()[1]
            sys.stderr.write(f"hrsel: cannot write {self.baseFilename} ({error}); it misses the lines from here\n")


def progress(iterable: Iterable, *, total: int, desc: str, enabled: bool) -> Iterable:
    """A tqdm bar on rank 0 (when stderr is a terminal or forced), else the iterable itself."""
    if not enabled:
        return iterable
    from tqdm.auto import tqdm

    return tqdm(iterable, total=total, desc=desc, leave=False, dynamic_ncols=True, file=sys.stderr)


# ----------------------------------------------------------------------------- efficiency

def reset_peak_memory(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)


def peak_memory_mb(device: torch.device) -> float:
    """Peak GPU memory since the last reset, or the process's peak resident memory on the CPU."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux, bytes on macOS
    return rss / (2**20 if sys.platform == "darwin" else 2**10)


class Throughput:
    """Per-epoch timing of training batches: ms per batch, images/s, patches scored/s."""

    def __init__(self, device: torch.device):
        self.device = device
        self.reset()

    def reset(self) -> None:
        self.seconds = 0.0
        self.batches = 0
        self.images = 0
        self.patches = 0.0
        self._start = 0.0

    def start(self) -> None:
        self._start = time.perf_counter()

    def stop(self, *, images: int, patches: float) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        self.seconds += time.perf_counter() - self._start
        self.batches += 1
        self.images += images
        self.patches += patches

    def state_dict(self) -> dict[str, float]:
        """The epoch's totals so far (kept in checkpoints: a resumed epoch reports the whole epoch)."""
        return {"seconds": self.seconds, "batches": self.batches, "images": self.images, "patches": self.patches}

    def load_state_dict(self, state: dict[str, float]) -> None:
        self.seconds, self.batches = float(state["seconds"]), int(state["batches"])
        self.images, self.patches = int(state["images"]), float(state["patches"])

    def summary(self) -> dict[str, float]:
        s = max(self.seconds, 1e-9)
        return {"ms_per_batch": 1000 * s / max(self.batches, 1), "images_per_s": self.images / s,
                "patches_per_s": self.patches / s}


# ----------------------------------------------------------------------------- run log

class RunLog:
    """metrics.csv (one row per epoch, columns grow as new keys appear) + TensorBoard."""

    def __init__(self, run_dir: Path, *, enabled: bool, tensorboard: bool = True):
        self.enabled = enabled
        self.path = run_dir / "metrics.csv"
        self.rows: list[dict[str, Any]] = []
        self.writer = _tensorboard_writer(run_dir / "tensorboard") if enabled and tensorboard else None

    def resume(self, epochs_done: int) -> None:
        """Keep the rows of the epochs a resumed run has already finished."""
        if self.enabled and self.path.exists():
            with open(self.path, newline="") as f:
                self.rows = [r for r in csv.DictReader(f) if int(float(r["epoch"])) <= epochs_done]

    def scalars(self, values: dict[str, float], step: int, prefix: str = "") -> None:
        if self.writer is None:
            return
        for key, value in values.items():
            if isinstance(value, (int, float)) and math.isfinite(value):
                self.writer.add_scalar(prefix + key, value, step)

    def epoch(self, row: dict[str, Any]) -> None:
        """Append (or replace, on a resumed run) the row of `row['epoch']` and rewrite the CSV."""
        if not self.enabled:
            return
        self.rows = [r for r in self.rows if int(float(r["epoch"])) != int(row["epoch"])] + [row]
        columns: list[str] = []
        for r in self.rows:
            columns += [k for k in r if k not in columns]
        atomic_write(self.path, lambda f: _write_csv(f, columns, self.rows), text=True)
        self.scalars({k: v for k, v in row.items() if k not in ("epoch", "step")}, int(row["step"]), "epoch/")
        if self.writer is not None:
            self.writer.flush()

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()
            self.writer = None


def _write_csv(f: IO, columns: list[str], rows: list[dict[str, Any]]) -> None:
    writer = csv.DictWriter(f, fieldnames=columns)
    writer.writeheader()
    writer.writerows(rows)


def _tensorboard_writer(path: Path):
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:  # tensorboard is an optional extra
        log.warning("tensorboard is not installed; TensorBoard logs are off (pip install tensorboard)")
        return None
    return SummaryWriter(str(path))


def epoch_line(epoch: int, epochs: int, row: dict[str, Any]) -> str:
    """One readable line per epoch: losses, eval metrics, lr, efficiency."""
    parts = [f"epoch {epoch}/{epochs}"]
    for key, value in row.items():
        if key in ("epoch", "step"):
            continue
        if isinstance(value, float):
            text = f"{value:.4g}" if abs(value) < 1e4 else f"{value:.0f}"
        else:
            text = str(value)
        parts.append(f"{key} {text}")
    return " | ".join(parts)

"""What keeps a run safe to stop, skip and resume: the stop and non-finite errors, buffer snapshots.

The loop honours a stop (SIGINT/SIGTERM) before a batch's forward pass, so a model's
buffers (BatchNorm running statistics) never hold a batch that the checkpoint does not
count; between two updates of gradient accumulation it rolls back to the last update
with `copy_buffers` / `restore_buffers`. A model with nan/inf parameters or buffers
(`first_non_finite`) is never saved as best.pt.
"""
from __future__ import annotations

import itertools
import math
import signal

import torch

from hrsel.engine.distributed import DistInfo
from hrsel.errors import HrselError


class NonFiniteLossError(HrselError, RuntimeError):
    """The loss became nan/inf (or stayed so for train.max_nan_skips batches); last.pt is kept."""


class Interrupted(HrselError):
    """SIGINT/SIGTERM arrived; the run stopped at a checkpoint it can be resumed from."""

    def __init__(self, signum: int, *, where: str = "", kept: str = ""):
        name = signal.Signals(signum).name
        text = f"stopped by signal {name}" + (f" {where}" if where else "") + (f"; {kept}" if kept else "")
        super().__init__(f"{text}; continue with --resume")
        self.signum = signum


def first_non_finite(module: torch.nn.Module) -> str | None:
    """The name of the first floating-point parameter or buffer holding nan/inf, or None."""
    for name, tensor in itertools.chain(module.named_parameters(), module.named_buffers()):
        if tensor.is_floating_point() and not bool(torch.isfinite(tensor).all()):
            return name
    return None


def copy_buffers(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    """A copy of every buffer (BatchNorm running statistics and counters), on its device."""
    return {name: buffer.detach().clone() for name, buffer in module.named_buffers()}


@torch.no_grad()
def restore_buffers(module: torch.nn.Module, saved: dict[str, torch.Tensor]) -> None:
    """Put the buffers of `copy_buffers` back in place (the module's buffers keep their identity)."""
    for name, buffer in module.named_buffers():
        buffer.copy_(saved[name])


def batches_on_every_rank(length: int, *, batch_size: int, info: DistInfo) -> int:
    """Evaluation batches every rank has (ShardSampler shards unevenly): where a per-batch collective is safe."""
    return min(math.ceil(len(range(rank, length, info.world_size)) / batch_size) for rank in range(info.world_size))

"""Distributed training with `torchrun`: process group, samplers, reductions.

A plain `python -m hrsel.train` run is a world of one; under `torchrun` the
environment (RANK, WORLD_SIZE, LOCAL_RANK) starts DDP with NCCL on GPUs and gloo
on the CPU. Only rank 0 logs, draws pictures and writes checkpoints.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any, Iterator

import torch
import torch.distributed as dist
from torch.utils.data import Dataset, DistributedSampler, Sampler


@dataclass(frozen=True)
class DistInfo:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def enabled(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def resolve_device(name: str, local_rank: int = 0) -> torch.device:
    """'auto' -> cuda:<local_rank> when a GPU is there, else cpu."""
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    device = torch.device(name)
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", local_rank)
    return device


def check_device(name: str) -> None:
    """Config key `device`: auto, cpu, cuda, cuda:N of a GPU this machine has, or mps where there is one."""
    from hrsel.errors import ConfigError

    if name == "auto":
        return
    valid = "auto, cpu, cuda, cuda:N (N < the number of GPUs) or mps"
    try:
        device = torch.device(name)
    except (RuntimeError, ValueError):
        raise ConfigError(f"config key 'device' = {name!r} is not a device; use {valid}, e.g. --device cuda:0") \
            from None
    if device.type == "cpu":
        return
    if device.type == "cuda":
        count = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if count == 0:
            raise ConfigError(f"config key 'device' = {name!r}, but torch sees no CUDA GPU on this machine (torch "
                              f"{torch.__version__}, CUDA build {torch.version.cuda}); use --device cpu or auto")
        if device.index is not None and device.index >= count:
            raise ConfigError(f"config key 'device' = {name!r}, but this machine has {count} CUDA GPU(s): "
                              f"cuda:0 to cuda:{count - 1}")
        return
    mps = getattr(torch.backends, "mps", None)
    if device.type == "mps" and mps is not None and mps.is_available():
        return
    raise ConfigError(f"config key 'device' = {name!r}: not a device hrsel trains on here; use {valid}")


def init_distributed(device: torch.device) -> DistInfo:
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    if world_size <= 1:
        return DistInfo()
    info = DistInfo(int(os.environ["RANK"]), world_size, int(os.environ.get("LOCAL_RANK", "0")))
    if not dist.is_initialized():
        backend = "nccl" if device.type == "cuda" else "gloo"
        if device.type == "cuda":
            torch.cuda.set_device(device)
        dist.init_process_group(backend=backend)
    return info


def cleanup() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def barrier(info: DistInfo) -> None:
    if info.enabled:
        dist.barrier()


def all_reduce_sum(values: torch.Tensor, info: DistInfo) -> torch.Tensor:
    """Sum a tensor over ranks (in place on a copy); identity in a world of one."""
    values = values.detach().clone()
    if info.enabled:
        dist.all_reduce(values, op=dist.ReduceOp.SUM)
    return values


def gather_objects(obj: Any, info: DistInfo) -> list[Any]:
    """Every rank's `obj`, in rank order (picklable objects; CPU tensors)."""
    if not info.enabled:
        return [obj]
    out: list[Any] = [None] * info.world_size
    dist.all_gather_object(out, obj)
    return out


def broadcast_object(obj: Any, info: DistInfo) -> Any:
    if not info.enabled:
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


class TrainSampler(DistributedSampler):
    """DistributedSampler (shuffle by seed + epoch via `set_epoch`) that can start mid-epoch.

    `skip` items of this rank's share are left out at the start, so a run
    resumed after b batches sees exactly the batches it had not seen yet.
    """

    def __init__(self, dataset: Dataset, info: DistInfo, *, seed: int):
        super().__init__(dataset, num_replicas=info.world_size, rank=info.rank, shuffle=True,
                         seed=seed, drop_last=False)
        self.skip = 0

    def __iter__(self) -> Iterator[int]:
        return iter(list(super().__iter__())[self.skip:])

    def __len__(self) -> int:
        return max(super().__len__() - self.skip, 0)


class ShardSampler(Sampler[int]):
    """Evaluation: rank r takes items r, r + world, ... (no padding, no duplicates)."""

    def __init__(self, length: int, info: DistInfo):
        self.indices = list(range(info.rank, length, info.world_size))

    def __iter__(self) -> Iterator[int]:
        return iter(self.indices)

    def __len__(self) -> int:
        return len(self.indices)

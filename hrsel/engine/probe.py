"""Which parameters a training step leaves without a gradient: DDP's find_unused_parameters, decided.

DDP must be told when some parameters get no gradient in a step (a scorer run only without
grad, a hard selector, a branch switched off): with `find_unused_parameters=False` such a
step fails, with `True` every step pays a graph traversal and, when nothing is unused, DDP
warns on every rank. `unused_parameters` runs one training step (forward, the trainer's loss,
backward) on one batch and names the parameters left without gradient; it puts the
pipeline's buffers, gradients, mode and RNG back as they were.

A pipeline whose set of used parameters changes during training declares it with a class
attribute `leaves_parameters_unused = True`; the probe then answers for it without running.
"""
from __future__ import annotations

import dataclasses
import logging
from typing import Any, Callable

import torch

from hrsel.config import Config
from hrsel.engine import distributed
from hrsel.engine import metrics as M
from hrsel.tasks import TaskSpec

log = logging.getLogger(__name__)


def decide_find_unused(cfg: Config, pipeline: torch.nn.Module, dataset: Any, collate: Callable, info: Any, *,
                       tasks: dict[str, TaskSpec]) -> Config:
    """Under torchrun: the config with train.find_unused_parameters = whether a probe step leaves a parameter
    without gradient on any rank (probed on `dataset[0]`); unchanged in a world of one.

    `train.find_unused_parameters: false` turns DDP's search off whatever the probe finds.
    """
    if not info.enabled or not cfg.train.find_unused_parameters:
        return cfg
    batch = collate([dataset[0]])
    images, device = batch["images"], next(pipeline.parameters()).device
    if isinstance(images, torch.Tensor) and cfg.data.images_to_device:
        images = images.to(device)
    targets = {t: v.to(device) for t, v in batch["targets"].items()}
    unused = unused_parameters(pipeline, images, targets, tasks)
    found = bool(distributed.all_reduce_sum(torch.tensor([float(bool(unused))]), info)[0] > 0)
    log.info("DDP: find_unused_parameters=%s (a probe training step left %s without gradient)", found,
             ", ".join(unused[:4]) + (" ..." if len(unused) > 4 else "") if unused else "no parameter")
    return dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, find_unused_parameters=found))


def unused_parameters(pipeline: torch.nn.Module, images, targets: dict[str, torch.Tensor],
                      tasks: dict[str, TaskSpec]) -> list[str]:
    """Names of the trainable parameters that one training step on (images, targets) gives no gradient."""
    trainable = [(name, p) for name, p in pipeline.named_parameters() if p.requires_grad]
    if getattr(pipeline, "leaves_parameters_unused", False):
        return [name for name, _ in trainable]
    buffers = {name: b.detach().clone() for name, b in pipeline.named_buffers()}
    grads = {name: p.grad for name, p in trainable}
    was_training = pipeline.training
    device = next(iter(pipeline.parameters())).device
    cuda = device.type == "cuda"
    try:
        with torch.random.fork_rng(devices=[device] if cuda else [], device_type="cuda" if cuda else "cpu"):
            for _, p in trainable:
                p.grad = None
            pipeline.train()
            set_progress = getattr(pipeline, "set_progress", None)
            if set_progress is not None:
                set_progress(0, 1)
            out = pipeline(images)
            loss = M.multitask_loss(out.logits, targets, tasks)[0] + pipeline.auxiliary_loss(out, targets)
            loss.backward()
            return [name for name, p in trainable if p.grad is None]
    finally:
        for name, p in trainable:
            p.grad = grads[name]
        with torch.no_grad():
            for name, b in pipeline.named_buffers():
                if name in buffers:
                    b.copy_(buffers[name])
        pipeline.train(was_training)

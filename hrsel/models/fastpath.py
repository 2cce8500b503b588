"""The device fast path: memory format, cuDNN autotuning and the size of no-grad encoder calls.

None of these changes what is computed, only how fast (tests compare selections and losses
with and without each):

- channels_last: convolution weights (and so their outputs) in NHWC. oneDNN on the CPU and
  cuDNN's tensor cores on the GPU run NHWC convolutions faster (CPU, ResNet18 to layer2 on
  50x50 patches: 1.3x forward + backward, 1.4x eval forward). Inputs need no conversion:
  a convolution follows its weight's layout.
- score_batch: the no-grad scoring pass of IPS encodes a chunk of B x I patches; on the CPU,
  64 patches per call keep a ResNet stage's activations in cache (2x faster per patch than
  one call of 400). On the GPU one call for the whole chunk is best.
- constant patches (empty canvas, blank glass) are encoded once per value in the no-grad pass:
  in eval mode an embedding depends on the patch alone. Megapixel MNIST at 500x500 is ~80%
  empty patches; a 20000^2 canvas nearly 100%.
- BatchNorm folded into the convolution before it (eval mode, a `FoldedBackbone` copy refreshed
  from the live weights before each no-grad pass): one pass over the activations less per layer
  (CPU, ResNet18 to layer2: 1.2x faster scoring).
- cudnn.benchmark: patch shapes are fixed, so autotuning pays after the first step.

One change is for safety, not speed: on an x86 CPU, strided 1x1 convolutions with few input
channels run as subsample + stride 1 (`hrsel.models.onednn`), around a oneDNN bug that corrupts
the heap in their backward pass. It applies whatever `channels_last` says: streamed patches
arrive in channels_last, and a convolution follows its input's layout too.
"""
from __future__ import annotations

import logging
from typing import Callable

import torch
from torch import nn

from hrsel.errors import ConfigError
from hrsel.models.onednn import UPSTREAM_ISSUE, needs_route_around, route_around_strided_pointwise

log = logging.getLogger(__name__)

CPU_SCORE_BATCH = 64  # patches per encoder call in the no-grad pass on a CPU ("auto")


def prepare_for_device(model: nn.Module, device: torch.device | str, *, channels_last: bool = True) -> nn.Module:
    """Move `model` to `device`, its convolutions to channels_last; turn on cuDNN autotuning on CUDA.

    On an x86 CPU, also route the convolutions that oneDNN#6035 corrupts around it (module docstring).
    """
    device = torch.device(device)
    model = model.to(device)
    if needs_route_around(device):
        changed = route_around_strided_pointwise(model)
        if changed:
            log.debug("%d strided 1x1 convolutions run as subsample + stride 1 (%s): %s", len(changed),
                      UPSTREAM_ISSUE, ", ".join(changed))
    if channels_last and any(isinstance(m, nn.Conv2d) for m in model.modules()):
        model = model.to(memory_format=torch.channels_last)  # 4-D parameters only; the rest is unchanged
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True
    return model


def resolve_score_batch(score_batch: int | str | None, device: torch.device) -> int | None:
    """`score_batch` as patches per call: "auto" -> 64 on a CPU, None (the whole chunk) elsewhere."""
    if score_batch == "auto":
        return CPU_SCORE_BATCH if device.type == "cpu" else None
    return score_batch


def check_score_batch(score_batch: int | str | None) -> None:
    if score_batch in (None, "auto"):
        return
    if isinstance(score_batch, bool) or not isinstance(score_batch, int) or score_batch < 1:
        raise ConfigError(f"model.score_batch must be a positive int, 'auto' or null (one encoder call per "
                          f"chunk), got {score_batch!r}")


def encode_in_parts(encode: Callable[[torch.Tensor], torch.Tensor], patches: torch.Tensor,
                    part: int | None) -> torch.Tensor:
    """(n, C, p, p) -> (n, D) by calls of at most `part` patches (all at once for None).

    Only for eval mode: in train mode BatchNorm's statistics would change with the parts.
    """
    if part is None or patches.shape[0] <= part:
        return encode(patches)
    return torch.cat([encode(piece) for piece in patches.split(part)])


def constant_patches(patches: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(..., C, p, p) -> (the smallest value per channel (..., C), whether the patch is one colour (...) bool)."""
    lo, hi = patches.flatten(-2).aminmax(dim=-1)  # (..., C) each
    return lo, (lo == hi).all(dim=-1)


def encode_eval(encode: Callable[[torch.Tensor], torch.Tensor], patches: torch.Tensor,
                part: int | None = None, constant: tuple[torch.Tensor, torch.Tensor] | None = None) -> torch.Tensor:
    """(n, C, p, p) -> (n, D) in eval mode: each distinct constant patch encoded once, the rest by parts.

    `constant`: `constant_patches(patches)` when the caller has it already. Other inputs (feature
    bags (n, D)) go through `encode_in_parts` as they are.
    """
    if patches.dim() != 4:
        return encode_in_parts(encode, patches, part)
    lo, constant = constant_patches(patches) if constant is None else constant  # (n, C), (n,)
    if not bool(constant.any()):
        return encode_in_parts(encode, patches, part)
    values, which = torch.unique(lo[constant], dim=0, return_inverse=True)  # (u, C) distinct fills, (m,)
    rest = (~constant).nonzero()[:, 0]  # (r,)
    fills = values[:, :, None, None].expand(-1, -1, *patches.shape[2:])  # (u, C, p, p)
    encoded = encode_in_parts(encode, torch.cat([fills, patches[rest]]), part)  # (u + r, D)
    out = encoded.new_empty((patches.shape[0], encoded.shape[1]))
    out[constant] = encoded[which]
    out[rest] = encoded[len(values):]
    return out


class FoldedBackbone:
    """An eval-mode copy of `backbone` with each BatchNorm that follows a convolution (or a linear
    layer) folded into it, by torch.fx; `refresh()` copies the live weights and running statistics
    in, so the copy computes what the live module computes in eval mode.

    Not an nn.Module attribute of the pipeline on purpose: it is no part of the state dict.
    Raises whatever torch.fx raises for a network it cannot trace (callers fall back to the live one).
    """

    def __init__(self, backbone: nn.Module):
        from torch.fx.experimental.optimization import fuse

        self.live = backbone
        was_training = backbone.training
        try:
            self.module = fuse(backbone.eval(), inplace=False)  # copies; the folded layers carry a bias
        finally:
            backbone.train(was_training)
        live = dict(backbone.named_modules())
        kept = dict(self.module.named_modules())
        norms = {name for name, m in live.items() if isinstance(m, nn.modules.batchnorm._BatchNorm)}
        import torch.fx as fx

        nodes = fx.symbolic_trace(backbone).graph.nodes  # which layer feeds each folded norm
        self.folds = [(node.args[0].target, node.target) for node in nodes
                      if node.op == "call_module" and node.target in norms - set(kept)]
        folded = {layer for layer, _ in self.folds}
        self.copies = [(kept[name], live[name]) for name in kept
                       if name and name in live and name not in folded and _own_state(live[name])]
        self.refresh()

    @torch.no_grad()
    def refresh(self) -> nn.Module:
        from torch.nn.utils.fusion import fuse_conv_bn_weights, fuse_linear_bn_weights

        live, kept = dict(self.live.named_modules()), dict(self.module.named_modules())
        for layer, norm in self.folds:
            src, bn, dst = live[layer], live[norm], kept[layer]
            fuse_weights = fuse_linear_bn_weights if isinstance(src, nn.Linear) else fuse_conv_bn_weights
            weight, bias = fuse_weights(src.weight, src.bias, bn.running_mean, bn.running_var, bn.eps, bn.weight,
                                        bn.bias)
            dst.weight.copy_(weight)
            dst.bias.copy_(bias)
        for dst, src in self.copies:
            for name, value in [*src.named_parameters(recurse=False), *src.named_buffers(recurse=False)]:
                if value is not None:
                    getattr(dst, name).copy_(value)
        return self.module

    def matches(self, backbone: nn.Module) -> bool:
        """Still a copy of `backbone` as it is now (same module, device and dtype)?"""
        live = next(backbone.parameters(), None)
        mine = next(self.module.parameters(), None)
        return backbone is self.live and (live is None or (mine is not None and live.device == mine.device
                                                          and live.dtype == mine.dtype))


def _own_state(module: nn.Module) -> bool:
    return any(True for _ in module.parameters(recurse=False)) or any(
        b is not None for b in module.buffers(recurse=False))

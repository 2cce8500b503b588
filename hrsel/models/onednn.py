"""Routes around a oneDNN bug that corrupts the heap in training on x86 CPUs.

oneDNN's 1x1 convolution, backward by weights, with a stride > 1, a channels_last (nhwc)
source and fewer input channels than the kernel's channel block writes past its
"reduce to unit stride" workspace: uxlfoundation/oneDNN#6035 (open; seen in torch 2.14.1,
oneDNN v3.12.0). The block is 16 channels where oneDNN runs AVX-512 (with or without AMX)
and 8 under AVX2, so a narrow ResNet's strided 1x1 shortcut (8 channels) aborts training
with "double free or corruption" on an AVX-512 machine, and a 4-channel one returns wrong
weight gradients, segfaults or hangs under AVX2. Other shapes, other kernels and NCHW
sources are not affected; neither is CUDA.

The route around: such a convolution subsamples its input first, then runs at stride 1,
which computes the same thing (a 1x1 kernel with no padding reads only the strided pixels)
without the workspace. Only those convolutions change, only on an x86 CPU; parameters,
state-dict keys and every other layer stay as they are.
"""
from __future__ import annotations

import platform

import torch
import torch.nn.functional as F
from torch import nn

UPSTREAM_ISSUE = "uxlfoundation/oneDNN#6035"
CHANNEL_BLOCK = 16  # the widest f32 channel block of oneDNN's x86 1x1 kernels (AVX-512; AVX2: 8)
_X86 = {"x86_64", "amd64", "i386", "i686", "x86"}


class SubsampledPointwiseConv2d(nn.Conv2d):
    """A strided 1x1 convolution computed as a subsample then a stride-1 convolution (same result)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (n, C, h, w) -> (n, C', ceil(h / sh), ceil(w / sw))
        sh, sw = self.stride
        return F.conv2d(x[..., ::sh, ::sw], self.weight, self.bias, 1, 0, 1, self.groups)


def is_affected(conv: nn.Module) -> bool:
    """A convolution of the shape the oneDNN bug corrupts: 1x1, strided, unpadded, few input channels."""
    return (type(conv) is nn.Conv2d and conv.kernel_size == (1, 1) and conv.stride != (1, 1)
            and conv.padding in ((0, 0), "valid") and conv.padding_mode == "zeros"
            and conv.in_channels // conv.groups < CHANNEL_BLOCK)


def route_around_strided_pointwise(model: nn.Module) -> list[str]:
    """Make every affected convolution of `model` a `SubsampledPointwiseConv2d`, in place.

    The module objects and their parameters are kept (an optimiser built before still holds
    them): only their class changes, as `torch.nn.utils.parametrize` changes a module's class.
    Returns the names of the convolutions changed.
    """
    changed = []
    for name, module in model.named_modules():
        if is_affected(module):
            module.__class__ = SubsampledPointwiseConv2d
            changed.append(name)
    return changed


def needs_route_around(device: torch.device) -> bool:
    """On an x86 CPU: where oneDNN runs the convolutions."""
    return device.type == "cpu" and platform.machine().lower() in _X86

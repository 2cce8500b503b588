"""Feature networks: (n, C, p, p) float patches in [0, 1] -> (n, D) embeddings.

torchvision ResNets (random init; ImageNet weights only from a local file, never
downloaded), optionally truncated after a stage and with a rebuilt stem for gray
images, and the narrow ResNet of ATS for traffic signs.
"""
from __future__ import annotations

import logging
import os

import torch
from torch import nn
from torchvision.models import resnet18, resnet34, resnet50
from torchvision.models.resnet import BasicBlock

from hrsel.errors import ConfigError
from hrsel.registry import Registry

logger = logging.getLogger(__name__)

BACKBONES = Registry("backbone")
_STAGES = ("layer1", "layer2", "layer3", "layer4")
_IMAGENET_MEAN, _IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)


class ResNetBackbone(nn.Module):
    """A torchvision ResNet up to `last_stage`, global-average pooled.

    Args:
        arch: resnet18 | resnet34 | resnet50.
        in_chans: input channels; 1 rebuilds the stem (pretrained RGB filters are summed).
        last_stage: layer1..layer4; IPS MNIST uses ResNet18 up to layer2 (D = 128).
        weights_path: a local torchvision state dict (e.g. ImageNet); None = random init.
        imagenet_norm: normalise inputs with the ImageNet mean/std (use with ImageNet weights).
    """

    def __init__(self, *, arch: str = "resnet18", in_chans: int = 3, last_stage: str = "layer4",
                 weights_path: str | None = None, imagenet_norm: bool = False):
        super().__init__()
        makers = {"resnet18": resnet18, "resnet34": resnet34, "resnet50": resnet50}
        if arch not in makers:
            raise ConfigError(f"backbone arch {arch!r} is unknown; valid: {', '.join(makers)}")
        if last_stage not in _STAGES:
            raise ConfigError(f"backbone last_stage {last_stage!r} is unknown; valid: {', '.join(_STAGES)}")
        net = makers[arch](weights=None)
        if weights_path is not None:
            if not os.path.isfile(weights_path):
                raise ConfigError(f"backbone weights_path {weights_path!r} does not exist; give a local "
                                  f"torchvision state dict or None for random init")
            net.load_state_dict(torch.load(weights_path, map_location="cpu", weights_only=True))
            logger.info("loaded %s weights from %s", arch, weights_path)
        if in_chans != 3:
            old = net.conv1
            net.conv1 = nn.Conv2d(in_chans, 64, 7, 2, 3, bias=False)
            if weights_path is not None and in_chans == 1:
                net.conv1.weight.data.copy_(old.weight.data.sum(dim=1, keepdim=True))
        stages = _STAGES[: _STAGES.index(last_stage) + 1]
        self.body = nn.Sequential(net.conv1, net.bn1, net.relu, net.maxpool, *(getattr(net, s) for s in stages))
        expansion = 4 if arch == "resnet50" else 1
        self.out_dim = 64 * 2 ** (len(stages) - 1) * expansion
        self.in_chans = in_chans
        self.imagenet_norm = imagenet_norm and in_chans == 3
        self.register_buffer("mean", torch.tensor(_IMAGENET_MEAN).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(_IMAGENET_STD).view(1, 3, 1, 1), persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.imagenet_norm:
            x = (x - self.mean) / self.std
        return self.body(x).mean(dim=(2, 3))  # (n, D)


class NarrowResNet(nn.Module):
    """The ATS traffic-sign feature net: a ResNet18 layout with `width` filters in every stage.

    Args:
        in_chans: input channels.
        width: filters per stage (ATS paper 16; its JAX code 32).
        strides: stride of each of the four stages.
        blocks: basic blocks per stage.
        stem_stride: stride of the first 3x3 conv (1 in ATS; larger makes a cheap feature net).
    """

    def __init__(self, *, in_chans: int = 3, width: int = 32, strides: tuple[int, ...] = (1, 2, 2, 2),
                 blocks: tuple[int, ...] = (2, 2, 2, 2), stem_stride: int = 1):
        super().__init__()
        layers: list[nn.Module] = [nn.Conv2d(in_chans, width, 3, stem_stride, 1, bias=False),
                                   nn.BatchNorm2d(width), nn.ReLU(inplace=True)]
        for stride, count in zip(strides, blocks):
            for i in range(count):
                s = stride if i == 0 else 1
                down = None
                if s != 1:
                    down = nn.Sequential(nn.Conv2d(width, width, 1, s, bias=False), nn.BatchNorm2d(width))
                layers.append(BasicBlock(width, width, s, down))
        self.body = nn.Sequential(*layers)
        self.out_dim = width
        self.in_chans = in_chans

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.body(x).mean(dim=(2, 3))  # (n, D)


@BACKBONES.register("resnet18")
def _resnet18(**kwargs) -> ResNetBackbone:
    return ResNetBackbone(arch="resnet18", **kwargs)


@BACKBONES.register("resnet34")
def _resnet34(**kwargs) -> ResNetBackbone:
    return ResNetBackbone(arch="resnet34", **kwargs)


@BACKBONES.register("resnet50")
def _resnet50(**kwargs) -> ResNetBackbone:
    return ResNetBackbone(arch="resnet50", **kwargs)


BACKBONES.register("narrow_resnet")(NarrowResNet)


def build_backbone(name: str, **kwargs) -> nn.Module:
    """`build_backbone("resnet18", in_chans=1, last_stage="layer2")`; the module has `.out_dim`."""
    return BACKBONES.build(name, **kwargs)

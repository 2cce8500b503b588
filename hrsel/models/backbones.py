"""Feature networks: (n, C, p, p) float patches in [0, 1] -> (n, D) embeddings.

torchvision ResNets (random init; ImageNet weights only from a local file, never
downloaded), optionally truncated after a stage and with a stem for any channel count,
any timm model by name (`timm/resnet50`, hrsel.models.timm_backbone), the pre-activation feature net of ATS for traffic signs (also DPS's), and a
narrow ResNet18 layout.
"""
from __future__ import annotations

import functools
import logging

import torch
from torch import nn
from torchvision.models import resnet18, resnet34, resnet50
from torchvision.models.resnet import BasicBlock

from hrsel.errors import ConfigError
from hrsel.models import timm_backbone
from hrsel.models.norms import NormChoice, check_norm, norm_layer
from hrsel.models.weights import adapt_stem_weight, channel_stats, load_strict, read_state_dict
from hrsel.registry import Registry

logger = logging.getLogger(__name__)

BACKBONES = Registry("backbone")
_STAGES = ("layer1", "layer2", "layer3", "layer4")
_IMAGENET_MEAN, _IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)


class ResNetBackbone(NormChoice, nn.Module):
    """A torchvision ResNet up to `last_stage`, global-average pooled.

    Args:
        arch: resnet18 | resnet34 | resnet50.
        in_chans: input channels; != 3 rebuilds the stem, pretrained RGB filters adapted as timm does
            (1: summed; N: repeated and scaled by 3 / N; `adapt_stem_weight`).
        last_stage: layer1..layer4; IPS MNIST uses ResNet18 up to layer2 (D = 128).
        weights_path: a local torchvision state dict (.pt/.pth) or .safetensors (e.g. ImageNet), loaded
            strictly (the `fc` head may be absent); None = random init.
        imagenet_norm: normalise inputs with the ImageNet mean/std (use with ImageNet weights); for
            in_chans != 3: 1 channel takes the mean of the RGB values, N repeat R, G, B (`channel_stats`).
        norm: batch | group | frozen (`hrsel.models.norms`): at data.batch_size 1, group from scratch,
            frozen with weights_path; group cannot load BatchNorm weights.
    """

    def __init__(self, *, arch: str = "resnet18", in_chans: int = 3, last_stage: str = "layer4",
                 weights_path: str | None = None, imagenet_norm: bool = False, norm: str = "batch"):
        super().__init__()
        self.norm = check_norm(norm)
        makers = {"resnet18": resnet18, "resnet34": resnet34, "resnet50": resnet50}
        if arch not in makers:
            raise ConfigError(f"backbone arch {arch!r} is unknown; valid: {', '.join(makers)}")
        if last_stage not in _STAGES:
            raise ConfigError(f"backbone last_stage {last_stage!r} is unknown; valid: {', '.join(_STAGES)}")
        if weights_path is not None and norm == "group":
            raise ConfigError(f"backbone {arch} with norm=group cannot load weights_path={weights_path}: its "
                              f"BatchNorm statistics have no GroupNorm counterpart; use norm=frozen with weights")
        net = makers[arch](weights=None, norm_layer=norm_layer(norm))
        if in_chans != 3:
            net.conv1 = nn.Conv2d(in_chans, 64, 7, 2, 3, bias=False)
        if weights_path is not None:
            state = read_state_dict(weights_path)
            if "conv1.weight" in state:
                state["conv1.weight"] = adapt_stem_weight(state["conv1.weight"], in_chans, key="conv1.weight",
                                                          path=weights_path)
            load_strict(net, state, path=weights_path, ignore=("fc",))
            logger.info("loaded %s weights from %s", arch, weights_path)
        stages = _STAGES[: _STAGES.index(last_stage) + 1]
        self.body = nn.Sequential(net.conv1, net.bn1, net.relu, net.maxpool, *(getattr(net, s) for s in stages))
        expansion = 4 if arch == "resnet50" else 1
        self.out_dim = 64 * 2 ** (len(stages) - 1) * expansion
        self.in_chans = in_chans
        self.imagenet_norm = imagenet_norm
        mean, std = channel_stats(_IMAGENET_MEAN, in_chans), channel_stats(_IMAGENET_STD, in_chans)
        self.register_buffer("mean", torch.tensor(mean).view(1, in_chans, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(std).view(1, in_chans, 1, 1), persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.imagenet_norm:
            x = (x - self.mean) / self.std
        return self.body(x).mean(dim=(2, 3))  # (n, D)


class NarrowResNet(NormChoice, nn.Module):
    """A ResNet18 layout (post-activation blocks) with `width` filters in every stage.

    Not the ATS/DPS traffic net (that is `ATSResNet`, "ats_resnet"): at width 32 this has
    ~2.5x its parameters and ~7x its MACs. Kept as a cheap general-purpose option.

    Args:
        in_chans: input channels.
        width: filters per stage.
        strides: stride of each of the four stages.
        blocks: basic blocks per stage.
        stem_stride: stride of the first 3x3 conv (1 in ATS; larger makes a cheap feature net).
        weights_path: a state dict of this same layout (e.g. from `hrsel.engine.warm_start`), loaded strictly.
        norm: batch | group | frozen (`hrsel.models.norms`; group for data.batch_size 1 from scratch).
    """

    def __init__(self, *, in_chans: int = 3, width: int = 32, strides: tuple[int, ...] = (1, 2, 2, 2),
                 blocks: tuple[int, ...] = (2, 2, 2, 2), stem_stride: int = 1, weights_path: str | None = None,
                 norm: str = "batch"):
        super().__init__()
        self.norm = check_norm(norm)
        make_norm = norm_layer(norm)
        layers: list[nn.Module] = [nn.Conv2d(in_chans, width, 3, stem_stride, 1, bias=False),
                                   make_norm(width), nn.ReLU(inplace=True)]
        for stride, count in zip(strides, blocks):
            for i in range(count):
                s = stride if i == 0 else 1
                down = None
                if s != 1:
                    down = nn.Sequential(nn.Conv2d(width, width, 1, s, bias=False), make_norm(width))
                layers.append(BasicBlock(width, width, s, down, norm_layer=make_norm))
        self.body = nn.Sequential(*layers)
        self.out_dim = width
        self.in_chans = in_chans
        if weights_path is not None:
            load_strict(self, read_state_dict(weights_path), path=weights_path)
            logger.info("loaded narrow_resnet weights from %s", weights_path)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.body(x).mean(dim=(2, 3))  # (n, D)


class PreActBlock(nn.Module):
    """ATS's pre-activation basic block: BN-ReLU, then conv3x3(stride)-BN-ReLU-conv3x3, plus shortcut.

    As in ATS (`scripts/speed_limits.py`) and its DPS JAX port (`BasicBlockv2`), the shortcut
    starts after the first BN-ReLU: the activated input itself, or a strided 1x1 conv of it
    (no BN) when the stride or the width changes. No conv has a bias.
    """

    def __init__(self, *, in_chans: int, width: int, stride: int):
        super().__init__()
        self.pre = nn.Sequential(nn.BatchNorm2d(in_chans), nn.ReLU(inplace=True))
        self.residual = nn.Sequential(nn.Conv2d(in_chans, width, 3, stride, 1, bias=False),
                                      nn.BatchNorm2d(width), nn.ReLU(inplace=True),
                                      nn.Conv2d(width, width, 3, 1, 1, bias=False))
        self.shortcut = (nn.Conv2d(in_chans, width, 1, stride, bias=False)
                         if stride != 1 or in_chans != width else nn.Identity())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.pre(x)
        return self.residual(x) + self.shortcut(x)


class ATSResNet(nn.Module):
    """The ATS traffic-sign feature net, also DPS's traffic feature net (JAX `ATSFeatureNetwork`).

    conv3x3(width, stem_stride) -> one PreActBlock per stride -> BN-ReLU -> global average pool.
    Defaults: 32 filters, strides 1 then 2, 2, 2: 59,680 parameters and 72.7M MACs per
    100x100 RGB patch (10 convs), D = 32. ATS L2-normalises these features inside its net;
    the DPS JAX port does not, so here it is the pipeline's option (`ATSPipeline`).

    Padding is symmetric (1 for 3x3): TF/Flax "SAME" pads one more pixel at the bottom/right
    of an even input at stride 2, a one-pixel shift of the sampling grid with the same
    output sizes and cost. Batch norm uses torch's defaults (= the DPS JAX port: momentum
    0.9, eps 1e-5; ATS's Keras layers: 0.99, 1e-3).

    Args:
        in_chans: input channels.
        width: filters of the stem and of every block (ATS code and DPS JAX: 32; the papers say 16).
        strides: stride of each block (ATS: 2, 2, 2).
        stem_stride: stride of the first conv (ATS: 1).
    """

    def __init__(self, *, in_chans: int = 3, width: int = 32, strides: tuple[int, ...] = (2, 2, 2),
                 stem_stride: int = 1):
        super().__init__()
        blocks = [PreActBlock(in_chans=width, width=width, stride=s) for s in strides]
        self.body = nn.Sequential(nn.Conv2d(in_chans, width, 3, stem_stride, 1, bias=False), *blocks,
                                  nn.BatchNorm2d(width), nn.ReLU(inplace=True))
        self.out_dim = width
        self.in_chans = in_chans

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.body(x).mean(dim=(2, 3))  # (n, D)


for _arch in ("resnet18", "resnet34", "resnet50"):  # a partial keeps ResNetBackbone's keywords checkable by name
    BACKBONES.register(_arch)(functools.partial(ResNetBackbone, arch=_arch))


BACKBONES.register("narrow_resnet")(NarrowResNet)
BACKBONES.register("ats_resnet")(ATSResNet)
BACKBONES.register_prefix(timm_backbone.PREFIX)(timm_backbone.resolve)  # timm/<any timm model name>


def build_backbone(name: str, **kwargs) -> nn.Module:
    """`build_backbone("resnet18", in_chans=1, last_stage="layer2")` or `build_backbone("timm/resnet50")`.

    The module has `.out_dim`.
    """
    return BACKBONES.build(name, **kwargs)


class FeatureProjector(nn.Module):
    """Pre-extracted features (n, in_dim) -> (n, dim): the IPS CAMELYON16 patch "encoder".

    LayerNorm without affine parameters, Linear(in_dim, dim), BatchNorm1d, ReLU (IPS: 2048 -> 512).

    Args:
        in_dim: width of the cached features (2048 for ResNet50 features).
        dim: embedding width D of the aggregator (512).
        in_chans: ignored (the pipelines pass it to every backbone).
    """

    def __init__(self, *, in_dim: int = 2048, dim: int = 512, in_chans: int | None = None):
        super().__init__()
        self.body = nn.Sequential(nn.LayerNorm(in_dim, elementwise_affine=False), nn.Linear(in_dim, dim),
                                  nn.BatchNorm1d(dim), nn.ReLU(inplace=True))
        self.in_dim, self.out_dim = in_dim, dim

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dim() != 2 or x.shape[1] != self.in_dim:
            raise ValueError(f"feature_projector expects features (n, {self.in_dim}), got {tuple(x.shape)}; "
                             f"set backbone_options.in_dim to the width of the feature cache")
        return self.body(x)


BACKBONES.register("feature_projector")(FeatureProjector)

"""Scorer networks: a small CNN that gives one relevance score per patch of a (downscaled) image.

Every scorer maps (B, C, h, w) float images to (B, rows, cols) raw scores. Without
`grid_shape` a scorer uses its native pooling (the DPS scorer: 8x8 max-pool, stride 8,
so rows = (h - 8) // 8); with `grid_shape` the dense score map is max-pooled adaptively
to that grid, and `grid_shape=(1, 1)` scores a whole input (one patch) at once.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from torchvision.models import resnet18

from hrsel.registry import Registry

SCORERS = Registry("scorer")


class _Scorer(nn.Module):
    pool = 8  # native max-pool window and stride over the dense score map
    min_input = 9  # smallest input side giving a non-empty score map (four valid 3x3 convs)

    def score_map(self, x: torch.Tensor) -> torch.Tensor:
        """(B, C, h, w) -> (B, 1, h', w') dense raw scores."""
        raise NotImplementedError

    def hidden_kernels(self) -> list[torch.Tensor]:
        """The weights of every convolution but the last, the one-channel score conv (ATS regularises these)."""
        convs = [m for m in self.modules() if isinstance(m, nn.Conv2d)]
        return [m.weight for m in convs[:-1]]

    def forward(self, x: torch.Tensor, grid_shape: tuple[int, int] | None = None) -> torch.Tensor:
        if x.dim() != 4 or x.shape[1] != self.in_chans:
            raise ValueError(f"{type(self).__name__} expects (B, {self.in_chans}, h, w), got {tuple(x.shape)}")
        if min(x.shape[-2:]) < self.min_input:
            raise ValueError(
                f"{type(self).__name__} needs inputs of at least {self.min_input}x{self.min_input} pixels, got "
                f"{tuple(x.shape[-2:])}; use a smaller downscale factor or larger patches"
            )
        dense = self.score_map(x)
        if grid_shape is None:
            if min(dense.shape[-2:]) < self.pool:
                raise ValueError(
                    f"{type(self).__name__}: input {tuple(x.shape[-2:])} is too small for the native "
                    f"{self.pool}x{self.pool} pooling; use a larger image, a smaller downscale, or grid_shape"
                )
            pooled = F.max_pool2d(dense, self.pool, self.pool)
        else:
            pooled = F.adaptive_max_pool2d(dense, grid_shape)
        return pooled[:, 0]  # (B, rows, cols)


def _conv_stack(in_chans: int, widths: tuple[int, ...]) -> list[nn.Module]:
    layers: list[nn.Module] = []
    for c_in, c_out in zip((in_chans,) + widths[:-1], widths):
        layers += [nn.Conv2d(c_in, c_out, 3), nn.ReLU(inplace=True)]
    return layers


@SCORERS.register("dps")
class DPSScorer(_Scorer):
    """DPS / ATS scorer: four 3x3 valid convs (8, 16, 32, 1 channels), ReLU between, 8x8 max-pool.

    Args:
        in_chans: image channels.
        widths: hidden widths of the first three convs.
    """

    def __init__(self, *, in_chans: int = 3, widths: tuple[int, int, int] = (8, 16, 32)):
        super().__init__()
        self.in_chans = in_chans
        self.net = nn.Sequential(*_conv_stack(in_chans, tuple(widths)), nn.Conv2d(widths[-1], 1, 3))

    def score_map(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


class SqueezeExcite(nn.Module):
    """Channel gating from globally pooled features (Hu et al. 2018): x * sigmoid(MLP(mean(x)))."""

    def __init__(self, *, channels: int, reduction: int = 4):
        super().__init__()
        hidden = max(1, channels // reduction)
        self.fc1, self.fc2 = nn.Linear(channels, hidden), nn.Linear(hidden, channels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate = torch.sigmoid(self.fc2(F.relu(self.fc1(x.mean(dim=(2, 3))))))  # (B, C)
        return x * gate[:, :, None, None]


@SCORERS.register("se")
class SEScorer(_Scorer):
    """The DPS scorer with a squeeze-excitation block before the last conv (DPS on CUB-200).

    The global gate lets every location see crude image context.

    Args:
        in_chans: image channels.
        widths: hidden widths of the first three convs.
        reduction: squeeze-excitation bottleneck ratio.
    """

    def __init__(self, *, in_chans: int = 3, widths: tuple[int, int, int] = (8, 16, 32), reduction: int = 4):
        super().__init__()
        self.in_chans = in_chans
        self.body = nn.Sequential(*_conv_stack(in_chans, tuple(widths)))
        self.se = SqueezeExcite(channels=widths[-1], reduction=reduction)
        self.out = nn.Conv2d(widths[-1], 1, 3)

    def score_map(self, x: torch.Tensor) -> torch.Tensor:
        return self.out(self.se(self.body(x)))


@SCORERS.register("resnet_stem")
class ResNetStemScorer(_Scorer):
    """ResNet18 stem + layer1 (stride 4) and a 1x1 conv to one score map (as in benbergner/dps).

    Native pooling is 2x2 on the stride-4 map, i.e. one score per 8x8 input pixels.

    Args:
        in_chans: image channels (the stem conv is rebuilt for in_chans != 3).
    """

    pool = 2
    min_input = 1

    def __init__(self, *, in_chans: int = 3):
        super().__init__()
        self.in_chans = in_chans
        net = resnet18(weights=None)
        if in_chans != 3:
            net.conv1 = nn.Conv2d(in_chans, 64, 7, 2, 3, bias=False)
        self.body = nn.Sequential(net.conv1, net.bn1, net.relu, net.maxpool, net.layer1)
        self.out = nn.Conv2d(64, 1, 1)

    def score_map(self, x: torch.Tensor) -> torch.Tensor:
        return self.out(self.body(x))


def build_scorer(name: str, **kwargs) -> _Scorer:
    """`build_scorer("dps", in_chans=1)`; an unknown name lists the valid ones."""
    return SCORERS.build(name, **kwargs)

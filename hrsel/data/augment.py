"""Train-time augmentation of the papers, on small tensors or lazily on image sources.

- ATS / DPS traffic: random translation (pad, random crop) and, with probability p,
  a random linear colour transform x -> a x + b (a in [0.8, 1.2], b in [-0.1, 0.1]).
- DPS billiard: pad to 1100 and random crop back to 1000 (a random translation).
- CUB (NTS-Net): random crop after resizing, horizontal flip.

Tensors are (C, H, W) uint8. For images that must not be materialised,
`AugmentedSource` wraps an `ImageSource` and applies the same translation and colour
change to every region read, so patches are augmented one at a time.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from hrsel.io.base import ImageSource, Pyramid


@dataclass(frozen=True)
class AugmentParams:
    """One draw of the augmentation: shift (dx, dy) in pixels, colour x -> a x + b (b in [0, 1] units)."""

    dx: int = 0
    dy: int = 0
    a: float = 1.0
    b: float = 0.0
    flip: bool = False


def sample_params(generator: torch.Generator | None, *, max_shift: tuple[int, int] = (0, 0),
                  colour_p: float = 0.0, a_range: tuple[float, float] = (0.8, 1.2),
                  b_range: tuple[float, float] = (-0.1, 0.1), flip_p: float = 0.0) -> AugmentParams:
    """Draw shifts uniformly in [-max_shift, max_shift] (x, y) and the colour transform with prob. `colour_p`."""
    u = torch.rand(6, generator=generator).tolist()
    dx = round((2 * u[0] - 1) * max_shift[0])
    dy = round((2 * u[1] - 1) * max_shift[1])
    a, b = 1.0, 0.0
    if u[2] < colour_p:
        a = a_range[0] + u[3] * (a_range[1] - a_range[0])
        b = b_range[0] + u[4] * (b_range[1] - b_range[0])
    return AugmentParams(dx=dx, dy=dy, a=a, b=b, flip=u[5] < flip_p)


def colour_affine(pixels: np.ndarray | torch.Tensor, a: float, b: float):
    """x -> clip(a x + 255 b) on uint8 pixels of any layout; identity when a=1, b=0."""
    if a == 1.0 and b == 0.0:
        return pixels
    if isinstance(pixels, torch.Tensor):
        return (pixels.float() * a + 255.0 * b).round_().clamp_(0, 255).to(torch.uint8)
    return np.clip(np.rint(pixels.astype(np.float32) * a + 255.0 * b), 0, 255).astype(np.uint8)


def translate(image: torch.Tensor, dx: int, dy: int, *, fill: int = 0) -> torch.Tensor:
    """Shift (C, H, W) by (dx, dy) pixels, filling the uncovered border: pad + crop without the pad."""
    _, h, w = image.shape
    out = torch.full_like(image, fill)
    ys, yd = (slice(0, h - dy), slice(dy, h)) if dy >= 0 else (slice(-dy, h), slice(0, h + dy))
    xs, xd = (slice(0, w - dx), slice(dx, w)) if dx >= 0 else (slice(-dx, w), slice(0, w + dx))
    if abs(dx) < w and abs(dy) < h:
        out[:, yd, xd] = image[:, ys, xs]
    return out


def apply_params(image: torch.Tensor, params: AugmentParams, *, fill: int = 0) -> torch.Tensor:
    """Apply one draw to a (C, H, W) uint8 tensor."""
    image = translate(image, params.dx, params.dy, fill=fill)
    if params.flip:
        image = image.flip(-1)
    return colour_affine(image, params.a, params.b)


def pad_random_crop(image: torch.Tensor, padded: tuple[int, int], generator: torch.Generator | None = None,
                    *, fill: int = 0) -> torch.Tensor:
    """Pad (C, H, W) centred to `padded` (H', W') and crop a random H x W window (DPS billiard/traffic)."""
    _, h, w = image.shape
    max_shift = (max(padded[1] - w, 0) // 2, max(padded[0] - h, 0) // 2)
    return apply_params(image, sample_params(generator, max_shift=max_shift), fill=fill)


class AugmentedSource(ImageSource):
    """An image source seen through one augmentation draw: every region read is shifted and recoloured.

    Pixel (x, y) of the augmented image is pixel (x - dx, y - dy) of `source` (level-0
    shift, scaled per level); pixels shifted in from outside are `source.fill`.
    Horizontal flips are not supported lazily.
    """

    backend = "augmented"

    def __init__(self, source: ImageSource, params: AugmentParams):
        if params.flip:
            raise ValueError("AugmentedSource does not flip; flip the selected patches instead")
        super().__init__(source.path, fill=source.fill)
        self.source, self.params = source, params

    def _open(self) -> Any:
        return self.source

    def _describe(self, source: ImageSource) -> Pyramid:
        return source.pyramid

    def _read(self, source: ImageSource, level: int, x: int, y: int, width: int, height: int) -> np.ndarray:
        d = source.level_downsamples[level]
        sx, sy = round(self.params.dx / d), round(self.params.dy / d)
        region = source.read_level_region(x - sx, y - sy, width, height, level)
        return colour_affine(region, self.params.a, self.params.b)

    def _close(self, source: ImageSource) -> None:
        pass  # the wrapped source belongs to the caller

"""Patch extraction on a regular grid: hard gathers and streaming soft extraction.

A soft patch is an indicator-weighted sum over all grid patches,

    out[b, k] = sum_n Y[b, k, n] * P[b, n]        (B, K, N) x (B, N, C, p, p) -> (B, K, C, p, p)

Materialising P costs O(N x patch) memory. `StreamingSoftExtract` walks the grid in
chunks instead: the forward accumulates chunk by chunk, the backward recomputes each
chunk's patches and contracts it with the upstream gradient, so extraction needs
O(K x patch + chunk x patch) memory whatever the image size (the DPS JAX code scans
over grid cells for the same reason).

Grid geometry follows the DPS JAX release: the patch of cell (r, c) has its
top-left corner at (r * stride_y - pad_y, c * stride_x - pad_x) and pixels outside the
image are zeros; `GridGeometry.centred` centres patches on the cells of a score grid.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn.functional as F

from hrsel.errors import SelectionError
from hrsel.select._checks import check_positive_int

ReadChunk = Callable[[torch.Tensor | None, int, int], torch.Tensor]


@dataclass(frozen=True)
class GridGeometry:
    """Where the patches of a regular grid lie in an image; patches are numbered in raster order."""

    patch_size: int
    stride: tuple[int, int]  # (stride_y, stride_x)
    padding: tuple[int, int]  # (pad_y, pad_x): the first patch starts at (-pad_y, -pad_x)
    shape: tuple[int, int]  # (rows, cols)

    @property
    def num_patches(self) -> int:
        return self.shape[0] * self.shape[1]

    @classmethod
    def regular(cls, image_hw: tuple[int, int], *, patch_size: int, stride: int | None = None,
                padding: int = 0) -> "GridGeometry":
        """Every patch that fits in the image padded by `padding` on each side."""
        stride = patch_size if stride is None else stride
        check_positive_int(patch_size, "patch_size")
        check_positive_int(stride, "stride")
        h, w = image_hw
        rows = (h + 2 * padding - patch_size) // stride + 1
        cols = (w + 2 * padding - patch_size) // stride + 1
        if rows < 1 or cols < 1:
            raise SelectionError(
                f"image of (height, width)={image_hw} is smaller than patch_size={patch_size} "
                f"(padding={padding}); use a smaller patch or pad the image"
            )
        return cls(patch_size, (stride, stride), (padding, padding), (rows, cols))

    @classmethod
    def centred(cls, image_hw: tuple[int, int], grid_shape: tuple[int, int], *, patch_size: int) -> "GridGeometry":
        """DPS: one patch per score-grid cell, centred on it: stride = H // rows, pad = (patch - stride) // 2."""
        check_positive_int(patch_size, "patch_size")
        (h, w), (rows, cols) = image_hw, grid_shape
        if rows < 1 or cols < 1 or rows > h or cols > w:
            raise SelectionError(f"score grid {grid_shape} does not fit an image of (height, width)={image_hw}")
        sy, sx = h // rows, w // cols
        return cls(patch_size, (sy, sx), ((patch_size - sy) // 2, (patch_size - sx) // 2), (rows, cols))

    def top_left(self, indices: torch.Tensor) -> torch.Tensor:
        """(...,) patch indices -> (..., 2) (y, x) top-left corners in image pixels (may be negative)."""
        rows, cols = indices // self.shape[1], indices % self.shape[1]
        y = rows * self.stride[0] - self.padding[0]
        x = cols * self.stride[1] - self.padding[1]
        return torch.stack([y, x], dim=-1)

    def pad_image(self, image: torch.Tensor) -> tuple[torch.Tensor, tuple[int, int]]:
        """Zero-pad (B, C, H, W) so that every patch lies inside; returns (padded, (off_y, off_x)).

        Patch n then starts at top_left(n) + offset in the padded image.
        """
        p, (rows, cols) = self.patch_size, self.shape
        h, w = image.shape[-2:]
        top, left = max(0, self.padding[0]), max(0, self.padding[1])
        bottom = max(0, (rows - 1) * self.stride[0] - self.padding[0] + p - h)
        right = max(0, (cols - 1) * self.stride[1] - self.padding[1] + p - w)
        if top or left or bottom or right:
            image = F.pad(image, (left, right, top, bottom))
        return image, (top, left)


def grid_chunk(padded: torch.Tensor, geometry: GridGeometry, offset: tuple[int, int],
               start: int, stop: int) -> torch.Tensor:
    """Patches start..stop-1 of a padded (B, C, H', W') image -> (B, n, C, p, p), differentiable.

    Walks the grid rows the chunk touches; each row is a strided view (`unfold`) of one band.
    """
    p, cols = geometry.patch_size, geometry.shape[1]
    (sy, sx), (py, px) = geometry.stride, geometry.padding
    parts = []
    for row in range(start // cols, (stop - 1) // cols + 1):
        c_lo = max(start - row * cols, 0)
        c_hi = min(stop - row * cols, cols)
        y = row * sy - py + offset[0]
        x0 = c_lo * sx - px + offset[1]
        x1 = (c_hi - 1) * sx - px + offset[1] + p
        band = padded[:, :, y:y + p, x0:x1]  # (B, C, p, width of the strip)
        strip = band.unfold(3, p, sx)  # (B, C, p, n, p)
        parts.append(strip.permute(0, 3, 1, 2, 4))  # (B, n, C, p, p)
    return torch.cat(parts, dim=1)


def gather_patches(image: torch.Tensor, geometry: GridGeometry, indices: torch.Tensor) -> torch.Tensor:
    """Hard extraction: (B, C, H, W) image, (B, K) patch indices -> (B, K, C, p, p), differentiable."""
    if indices.dim() != 2 or indices.shape[0] != image.shape[0]:
        raise SelectionError(f"indices must be (batch={image.shape[0]}, k), got shape {tuple(indices.shape)}")
    padded, (oy, ox) = geometry.pad_image(image)
    corners = geometry.top_left(indices.cpu()).tolist()  # (B, K, 2)
    p = geometry.patch_size
    out = [
        torch.stack([padded[b, :, y + oy:y + oy + p, x + ox:x + ox + p] for y, x in row])
        for b, row in enumerate(corners)
    ]
    return torch.stack(out)  # (B, K, C, p, p)


class StreamingSoftExtract(torch.autograd.Function):
    """out = einsum('bkn,bnchw->bkchw', Y, P) with P read chunk by chunk, recomputed in backward.

    `read_chunk(image, start, stop) -> (B, n, C, p, p)` returns patches start..stop-1; it
    must be differentiable in `image` when the image needs a gradient, and may ignore
    `image` (None) when the patches come from a lazy reader.
    """

    @staticmethod
    def forward(ctx, indicators, image, read_chunk: ReadChunk, num_patches: int, chunk_size: int):
        out = None
        for start in range(0, num_patches, chunk_size):
            stop = min(start + chunk_size, num_patches)
            patches = read_chunk(image, start, stop)
            weights = indicators[:, :, start:stop].to(patches.dtype)
            part = torch.einsum("bkn,bnchw->bkchw", weights, patches)
            out = part if out is None else out.add_(part)
        ctx.save_for_backward(indicators, image)
        ctx.read_chunk, ctx.num_patches, ctx.chunk_size = read_chunk, num_patches, chunk_size
        return out.to(indicators.dtype) if indicators.is_floating_point() else out

    @staticmethod
    def backward(ctx, grad_out):
        indicators, image = ctx.saved_tensors
        want_y = ctx.needs_input_grad[0]
        want_image = image is not None and ctx.needs_input_grad[1]
        grad_y = torch.zeros_like(indicators) if want_y else None
        grad_image = torch.zeros_like(image) if want_image else None
        for start in range(0, ctx.num_patches, ctx.chunk_size):
            stop = min(start + ctx.chunk_size, ctx.num_patches)
            if want_image:
                with torch.enable_grad():
                    leaf = image.detach().requires_grad_()
                    patches = ctx.read_chunk(leaf, start, stop)
                    weights = indicators[:, :, start:stop].to(patches.dtype)
                    grad_patches = torch.einsum("bkn,bkchw->bnchw", weights, grad_out.to(patches.dtype))
                    (part,) = torch.autograd.grad(patches, leaf, grad_patches)
                grad_image += part
                patches = patches.detach()
            else:
                with torch.no_grad():
                    patches = ctx.read_chunk(image, start, stop)
            if want_y:
                grad_y[:, :, start:stop] = torch.einsum(
                    "bkchw,bnchw->bkn", grad_out.to(patches.dtype), patches
                ).to(grad_y.dtype)
        return grad_y, grad_image, None, None, None


def streaming_soft_extract(indicators: torch.Tensor, read_chunk: ReadChunk, *, num_patches: int,
                           chunk_size: int, image: torch.Tensor | None = None) -> torch.Tensor:
    """(B, K, N) indicators -> (B, K, C, p, p) soft patches, reading the grid in chunks.

    See `StreamingSoftExtract` for `read_chunk`. Gradients flow to the indicators and,
    when given and requiring grad, to `image`.
    """
    if indicators.dim() != 3 or indicators.shape[2] != num_patches:
        raise SelectionError(
            f"indicators must be (batch, k, num_patches={num_patches}), got shape {tuple(indicators.shape)}"
        )
    check_positive_int(chunk_size, "chunk_size")
    return StreamingSoftExtract.apply(indicators, image, read_chunk, num_patches, chunk_size)


def soft_extract(indicators: torch.Tensor, image: torch.Tensor, geometry: GridGeometry, *,
                 chunk_size: int = 64) -> torch.Tensor:
    """Streaming soft extraction from an in-memory (B, C, H, W) float image -> (B, K, C, p, p)."""
    if image.dim() != 4 or not image.is_floating_point():
        raise SelectionError(f"image must be a float (B, C, H, W) tensor, got {image.dtype} {tuple(image.shape)}")
    padded, offset = geometry.pad_image(image)

    def read_chunk(img: torch.Tensor | None, start: int, stop: int) -> torch.Tensor:
        return grid_chunk(img, geometry, offset, start, stop)

    return streaming_soft_extract(indicators, read_chunk, num_patches=geometry.num_patches,
                                  chunk_size=chunk_size, image=padded)

"""Bags of pre-extracted patch features: what IPS selects from when the patches were encoded once.

The CAMELYON16 setup of IPS (and CLAM's) encodes every tissue patch of a slide once with a
frozen network and trains on the (N, D) feature bags. A batch holds B bags, as one (B, N, D)
tensor or a list of (N_i, D) tensors of different lengths; `FeatureBags` gives them the chunk /
gather interface that `ImageBatch` gives images, so the IPS driver is the same.
"""
from __future__ import annotations

from typing import Any, Iterator

import torch


def is_feature_bags(images: Any) -> bool:
    """True for a (B, N, D) float tensor or a non-empty list of (N_i, D) float tensors."""
    if isinstance(images, torch.Tensor):
        return images.dim() == 3 and images.is_floating_point()
    return (isinstance(images, (list, tuple)) and len(images) > 0
            and all(isinstance(b, torch.Tensor) and b.dim() == 2 for b in images))


def takes_feature_bags(pipeline: torch.nn.Module) -> bool:
    """True for a pipeline whose patch encoder reads cached features (`feature_projector`), not pixels."""
    from hrsel.models.backbones import FeatureProjector

    return any(isinstance(module, FeatureProjector) for module in pipeline.modules())


class FeatureBags:
    """B feature bags on `device`: `chunks` streams them I items at a time, `gather` picks M of each."""

    def __init__(self, bags: torch.Tensor | list[torch.Tensor], *, device: torch.device | str | None = None):
        if not is_feature_bags(bags):
            shapes = [tuple(b.shape) for b in bags] if isinstance(bags, (list, tuple)) else tuple(bags.shape)
            raise ValueError(f"feature bags must be a (B, N, D) float tensor or a list of (N_i, D) tensors, "
                             f"got shapes {shapes}")
        self.bags = list(bags)  # B x (N_i, D)
        dims = {b.shape[1] for b in self.bags}
        if len(dims) != 1:
            raise ValueError(f"the bags of a batch have different feature widths {sorted(dims)}; "
                             f"compute every cache with the same encoder")
        self.dim = dims.pop()
        self.device = torch.device(device) if device is not None else self.bags[0].device
        self.sizes = [b.shape[0] for b in self.bags]

    @property
    def batch_size(self) -> int:
        return len(self.bags)

    @property
    def equal_sizes(self) -> bool:
        return len(set(self.sizes)) == 1

    def split(self) -> list["FeatureBags"]:
        """One FeatureBags per bag (the eager-sequential mode, and bags of different lengths)."""
        return [FeatureBags([b], device=self.device) for b in self.bags]

    def chunks(self, chunk_size: int) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """Yields (indices (B, n) int64, features (B, n, D) float) over equal-length bags."""
        if not self.equal_sizes:
            raise ValueError(f"chunks need bags of one length, got {self.sizes}; split() them first")
        n = self.sizes[0]
        for start in range(0, n, chunk_size):
            stop = min(start + chunk_size, n)
            idx = torch.arange(start, stop, device=self.device).expand(self.batch_size, -1)
            items = torch.stack([b[start:stop] for b in self.bags]).to(self.device, non_blocking=True)
            yield idx, items.float()

    def gather(self, indices: torch.Tensor) -> torch.Tensor:
        """(B, M) item indices (-1 = absent, zeros) -> (B, M, D) float on the device."""
        rows = [bag[idx.clamp_min(0).to(bag.device)] for bag, idx in zip(self.bags, indices)]
        out = torch.stack(rows).to(self.device).float()
        return out * (indices >= 0).to(self.device)[..., None].to(out.dtype)

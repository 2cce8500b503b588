"""Batch data set items: small tensors are stacked, lazy image sources stay a list.

Multiclass targets become int64 (B,), multilabel float (B, C), binary float (B,).
Only images that are already small tensors are copied, so memory stays bounded.
Feature bags (N_i, D) of different lengths stay a list; other item keys become lists.
"""
from __future__ import annotations

from typing import Any

import torch

from hrsel.errors import DataError


def collate(items: list[dict[str, Any]]) -> dict[str, Any]:
    """`[{"image", "targets", "id"}, ...]` -> `{"images", "targets", "ids"}`."""
    if not items:
        raise DataError("collate got an empty batch")
    ids = [str(item["id"]) for item in items]
    images = [item["image"] for item in items]
    if all(isinstance(image, torch.Tensor) for image in images):
        shapes = {tuple(image.shape) for image in images}
        if len(shapes) != 1 and all(image.ndim == 2 for image in images):
            batch_images: Any = images  # feature bags (N_i, D) of different lengths stay a list
        elif len(shapes) != 1:
            raise DataError(f"images of batch {ids[:4]}... have different shapes {sorted(shapes)}; "
                            "resize them in the data set (e.g. image_size=...) or return image sources")
        else:
            batch_images = torch.stack(images)  # (B, C, H, W), or (B, N, D) for equal-length bags
    elif any(isinstance(image, torch.Tensor) for image in images):
        raise DataError(f"batch {ids[:4]}... mixes tensors and image sources; use one kind per data set")
    else:
        batch_images = images  # list of B lazy ImageSource
    tasks = items[0]["targets"].keys()
    targets = {}
    for task in tasks:
        try:
            values = [torch.as_tensor(item["targets"][task]) for item in items]
        except KeyError as exc:
            raise DataError(f"item {ids[[task in i['targets'] for i in items].index(False)]} "
                            f"has no target {task!r}") from exc
        stacked = torch.stack(values)
        targets[task] = stacked.long() if not stacked.is_floating_point() else stacked.float()
    extras = {key: [item[key] for item in items] for key in items[0] if key not in ("image", "targets", "id")}
    return {"images": batch_images, "targets": targets, "ids": ids, **extras}

"""Decode ordinary image files (JPEG, PNG) into (3, H, W) uint8 tensors with named errors."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from hrsel.errors import DataError


def load_rgb(path: Path, *, expected: tuple[int, int] | None = None) -> torch.Tensor:
    """(3, H, W) uint8 from an image file; DataError naming the file when unreadable or not `expected` (H, W)."""
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(path) as image:
            array = np.array(image.convert("RGB"))
    except (OSError, UnidentifiedImageError, ValueError) as exc:
        raise DataError(f"cannot read image {path}: {exc}; re-extract or re-download it") from exc
    if expected is not None and array.shape[:2] != tuple(expected):
        raise DataError(f"image {path} is {array.shape[1]}x{array.shape[0]} (WxH), expected "
                        f"{expected[1]}x{expected[0]}")
    return torch.from_numpy(array).permute(2, 0, 1).contiguous()


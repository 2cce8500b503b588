"""Labelled patches as a patch encoder sees Megapixel MNIST: one whole digit, or none, among noise strokes.

    x, y = digit_patches(rng, images, labels, noise, patch_size=56, n=128)   # (128, 1, 56, 56) uint8, (128,)

A patch holds one whole 28x28 digit at a random offset (label: its class) or no digit (label
`NO_DIGIT`: the empty canvas, or noise strokes alone). Noise patterns, clipped at the patch border,
are laid over a share of the patches, the brighter pixel winning as when the generator paints.
Used to warm-start the patch encoder (`hrsel.engine.warm_start`) on single digits of the train pool.
"""
from __future__ import annotations

import numpy as np

from hrsel.data.megapixel_mnist_gen import DIGIT
from hrsel.errors import DataError

NO_DIGIT = 10  # the label of a patch without a whole digit
NUM_CLASSES = 11


def digit_patches(rng: np.random.Generator, images: np.ndarray, labels: np.ndarray, noise: np.ndarray, *,
                  patch_size: int, n: int, p_digit: float = 0.6, p_noise: float = 0.5) -> tuple[np.ndarray, np.ndarray]:
    """n patches (n, 1, P, P) uint8 and their labels (n,) int64 in 0..9 or NO_DIGIT.

    images (D, 28, 28) uint8 and labels (D,) are a digit pool; noise (Q, 28, 28) uint8 the noise
    patterns. A share `p_digit` of the patches holds a digit; `p_noise` of all patches get one
    noise pattern, placed so that at least half of it lies inside the patch.
    """
    if patch_size < DIGIT:
        raise DataError(f"digit patches: patch_size {patch_size} is smaller than a {DIGIT}x{DIGIT} digit; "
                        f"use patches of at least {DIGIT} px")
    if len(images) == 0 or len(images) != len(labels):
        raise DataError(f"digit patches: the pool holds {len(images)} images and {len(labels)} labels; "
                        f"give a non-empty pool with one label per digit")
    patches = np.zeros((n, 1, patch_size, patch_size), dtype=np.uint8)
    targets = np.full(n, NO_DIGIT, dtype=np.int64)
    has_digit = rng.random(n) < p_digit
    has_noise = rng.random(n) < p_noise
    for i in np.flatnonzero(has_digit):
        j = int(rng.integers(len(images)))
        y, x = rng.integers(0, patch_size - DIGIT + 1, size=2)
        patches[i, 0, y:y + DIGIT, x:x + DIGIT] = images[j]
        targets[i] = labels[j]
    for i in np.flatnonzero(has_noise):
        paint_clipped(patches[i, 0], noise[int(rng.integers(len(noise)))],
                      *rng.integers(-DIGIT // 2, patch_size - DIGIT // 2, size=2))
    return patches, targets


def paint_clipped(canvas: np.ndarray, pattern: np.ndarray, top: int, left: int) -> None:
    """Lay `pattern` (h, w) over `canvas` (H, W) at (top, left), in place, clipped at the border; max wins."""
    h, w = pattern.shape
    y0, x0 = max(top, 0), max(left, 0)
    y1, x1 = min(top + h, canvas.shape[0]), min(left + w, canvas.shape[1])
    if y0 >= y1 or x0 >= x1:
        return
    window = canvas[y0:y1, x0:x1]
    np.maximum(window, pattern[y0 - top:y1 - top, x0 - left:x1 - left], out=window)

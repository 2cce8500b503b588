"""Labelled patches as a patch encoder sees billiard: one ball's number, or none.

    images, tables = billiard_pool("data/billiard_500", "train", n_images=400, seed=0)
    x, y = ball_patches(rng, images, tables, patch_size=50, n=128)   # (128, 3, 50, 50) uint8, (128,)

A patch is cut near a random ball (its centre offset at random, at most as far as keeps the
number disc inside: the grid patch nearest a ball sees it so) or anywhere on the table. Its label
is the number (1-9) of the ball whose number disc lies wholly inside the patch, the one nearest the
patch centre when several do, else `NO_BALL`. Used to warm-start the billiard patch encoder
(`hrsel.engine.warm_start`) from the ball annotations of the train split.
"""
from __future__ import annotations

import os
from pathlib import Path

import numpy as np

from hrsel.data.billiard_gen import DISC
from hrsel.errors import DataError

NO_BALL = 0  # the label of a patch without a whole number disc; ball numbers are 1-9
NUM_CLASSES = 10


def billiard_pool(root: str | os.PathLike, split: str, *, n_images: int,
                  seed: int = 0) -> tuple[list[np.ndarray], list[list[dict]]]:
    """n_images images (3, H, W) uint8 of a billiard split, drawn at random, and their ball lists."""
    from hrsel.data.billiard import ensure_billiard, list_samples, read_balls
    from hrsel.data.image_file import load_rgb

    folder = ensure_billiard(root, split)
    ids = list_samples(folder)
    rng = np.random.default_rng(seed)
    chosen = [ids[i] for i in sorted(rng.choice(len(ids), size=min(n_images, len(ids)), replace=False))]
    tables = [read_balls(folder / f"{sample_id}.json") for sample_id in chosen]
    for sample_id, balls in zip(chosen, tables):
        if any("radius" not in ball for ball in balls):
            raise DataError(f"{folder / sample_id}.json: a ball has no 'radius'; ball patches need the pixel centres "
                            f"and radii of hrsel's generator (tools/make_billiard.py), not the DPS release's 3-D "
                            f"positions. Generate the data set, or drop the warm start")
    images = [load_rgb(folder / f"{sample_id}.png").numpy() for sample_id in chosen]
    return images, tables


def ball_patches(rng: np.random.Generator, images: list[np.ndarray], tables: list[list[dict]], *,
                 patch_size: int, n: int, p_ball: float = 0.7) -> tuple[np.ndarray, np.ndarray]:
    """n patches (n, 3, P, P) uint8 and their labels (n,) int64 in 0..9 (NO_BALL = 0).

    A share `p_ball` of the patches is cut near a ball of the image, the rest anywhere on it.
    """
    if not images or len(images) != len(tables):
        raise DataError(f"ball patches: the pool holds {len(images)} images and {len(tables)} ball lists; "
                        f"give a non-empty pool with one ball list per image")
    small = [i for i, image in enumerate(images) if min(image.shape[1:]) < patch_size]
    if small:
        raise DataError(f"ball patches: image {small[0]} of the pool is {images[small[0]].shape[2]}x"
                        f"{images[small[0]].shape[1]}, smaller than a {patch_size} px patch; use smaller patches")
    patches = np.empty((n, images[0].shape[0], patch_size, patch_size), dtype=np.uint8)
    targets = np.empty(n, dtype=np.int64)
    near_ball = rng.random(n) < p_ball
    for i in range(n):
        j = int(rng.integers(len(images)))
        image, balls = images[j], tables[j]
        height, width = image.shape[1:]
        if near_ball[i]:
            ball = balls[int(rng.integers(len(balls)))]
            reach = max(0.0, patch_size / 2 - DISC * ball["radius"] - 1)
            cx, cy = np.asarray(ball["position"][:2]) + rng.uniform(-reach, reach, size=2)
        else:
            cx, cy = rng.uniform(patch_size / 2, (width - patch_size / 2, height - patch_size / 2))
        left = int(np.clip(round(cx - patch_size / 2), 0, width - patch_size))
        top = int(np.clip(round(cy - patch_size / 2), 0, height - patch_size))
        patches[i] = image[:, top:top + patch_size, left:left + patch_size]
        targets[i] = number_in_view(balls, left, top, patch_size)
    return patches, targets


def number_in_view(balls: list[dict], left: int, top: int, size: int) -> int:
    """The number of the ball whose disc lies wholly in the square patch (nearest its centre), else NO_BALL."""
    centre = np.array([left + size / 2, top + size / 2])
    best, best_distance = NO_BALL, np.inf
    for ball in balls:
        x, y = ball["position"][:2]
        disc = DISC * ball["radius"]
        inside = left <= x - disc and x + disc <= left + size and top <= y - disc and y + disc <= top + size
        distance = float(np.hypot(*(np.array([x, y]) - centre)))
        if inside and distance < best_distance:
            best, best_distance = int(ball["number"]), distance
    return best

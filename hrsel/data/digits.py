"""Pools of 28x28 digits for Megapixel MNIST: real MNIST, or digits drawn from a font offline.

`load_digit_pools` tries, in order: the full MNIST (train + t10k files) in the usual
folders, a download, and the t10k files alone split into disjoint train/test pools.
`digits="rendered"` skips MNIST and draws digits with Pillow's built-in font: an
offline fallback whose images are *not* MNIST; callers must announce it.
"""
from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from hrsel.data import mnist_idx
from hrsel.errors import DataError

log = logging.getLogger(__name__)

DIGIT_SOURCES = ("mnist", "rendered")
T10K_TRAIN_FRACTION = 0.8  # share of the t10k digits given to the train pool when only t10k exists
_T10K_SPLIT_SEED = 20231  # fixed: the t10k train/test pools never depend on the data set seed


@dataclass(frozen=True)
class DigitPools:
    train_images: np.ndarray  # (n_train, 28, 28) uint8
    train_labels: np.ndarray  # (n_train,) int64
    test_images: np.ndarray  # (n_test, 28, 28) uint8
    test_labels: np.ndarray  # (n_test,) int64
    source: str  # "mnist" | "mnist-t10k-split" | "rendered"
    note: str  # one human-readable sentence on where the digits came from

    def split(self, split: str) -> tuple[np.ndarray, np.ndarray]:
        if split not in ("train", "test"):
            raise DataError(f"digit pool split must be 'train' or 'test', got {split!r}")
        return (self.train_images, self.train_labels) if split == "train" else (self.test_images, self.test_labels)


def load_digit_pools(*, digits: str = "mnist", mnist_dir: str | os.PathLike | None = None,
                     download: bool = True, progress: bool = True) -> DigitPools:
    """Digit pools for the generator; raises DataError saying where to put the files.

    A given `mnist_dir` is the only folder searched (no download, no other folder): it must
    exist and hold at least the t10k pair.
    """
    check_digits(digits)
    if digits == "rendered":
        return rendered_pools()
    if mnist_dir is not None:
        return _pools_from_folder(Path(mnist_dir))
    train, test = mnist_idx.load_split("train"), mnist_idx.load_split("test")
    if train is None and download:
        try:
            folder = mnist_idx.download_mnist(progress=progress)
            train, test = mnist_idx.load_split("train", folder), mnist_idx.load_split("test", folder)
        except DataError as exc:
            log.warning("MNIST download failed: %s", exc)
    if train is not None and test is not None:
        return DigitPools(*train, *test, source="mnist",
                          note="digits from the MNIST train split (train) and t10k split (test)")
    if test is not None:
        return _split_t10k(*test)
    raise DataError(
        "MNIST IDX files not found. Put train-images-idx3-ubyte.gz, train-labels-idx1-ubyte.gz, "
        "t10k-images-idx3-ubyte.gz and t10k-labels-idx1-ubyte.gz in a folder and pass it with "
        f"--mnist-dir (or set ${mnist_idx.ENV_VAR}, or use {mnist_idx.CACHE_DIR}); the t10k pair "
        "alone also works. Offline without MNIST, --digits rendered draws digits from a font."
    )


def generator_pools(*, digits: str = "mnist", mnist_dir: str | os.PathLike | None = None,
                    download: bool = False) -> DigitPools:
    """The pools a generator draws from: `load_digit_pools`, or digits rendered from a font (with a
    warning) when no MNIST is found and none was asked for by folder. Raises DataError otherwise."""
    try:
        return load_digit_pools(digits=digits, mnist_dir=mnist_dir, download=download, progress=False)
    except DataError as e:
        if mnist_dir is not None or digits != "mnist":
            raise
        log.warning("no MNIST digits (%s); falling back to digits rendered from a font", e)
        return load_digit_pools(digits="rendered")


def check_digits(digits: str) -> None:
    if digits not in DIGIT_SOURCES:
        raise DataError(f"unknown digits source {digits!r}; valid: {', '.join(DIGIT_SOURCES)} (--digits)")


def _pools_from_folder(folder: Path) -> DigitPools:
    """Pools from the IDX files in `folder` alone."""
    if not folder.is_dir():
        raise DataError(f"--mnist-dir {folder} does not exist (or is not a folder); pass the folder that holds "
                        f"{', '.join(mnist_idx.MD5)}")
    train = mnist_idx.load_split("train", folder, only=True)
    test = mnist_idx.load_split("test", folder, only=True)
    if test is None:
        raise DataError(f"--mnist-dir {folder} holds no MNIST t10k pair ({', '.join(mnist_idx.FILES['test'])}, "
                        f".gz or plain); put the IDX files there, or leave --mnist-dir out to search "
                        f"${mnist_idx.ENV_VAR} and the usual folders")
    if train is None:
        return _split_t10k(*test)
    return DigitPools(*train, *test, source="mnist",
                      note=f"digits from the MNIST train split (train) and t10k split (test) in {folder}")


def _split_t10k(images: np.ndarray, labels: np.ndarray) -> DigitPools:
    order = np.random.default_rng(_T10K_SPLIT_SEED).permutation(len(labels))
    cut = int(round(T10K_TRAIN_FRACTION * len(labels)))
    train, test = np.sort(order[:cut]), np.sort(order[cut:])
    note = (f"only the MNIST t10k files were found: split into disjoint pools of {len(train)} train "
            f"and {len(test)} test digits (fixed permutation); the MNIST train split was not used")
    log.warning(note)
    return DigitPools(images[train], labels[train], images[test], labels[test],
                      source="mnist-t10k-split", note=note)


def rendered_pools(*, train_per_class: int = 600, test_per_class: int = 100) -> DigitPools:
    """Digits drawn with Pillow's built-in font; train and test use different random streams."""
    train = render_digits(n_per_class=train_per_class, seed=1)
    test = render_digits(n_per_class=test_per_class, seed=2)
    note = "digits RENDERED FROM A FONT (offline fallback), not MNIST: results are not comparable to the papers"
    log.warning(note)
    return DigitPools(*train, *test, source="rendered", note=note)


def render_digits(*, n_per_class: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """(10 * n_per_class, 28, 28) uint8 digits with random size, stroke, rotation and shift."""
    from PIL import Image, ImageDraw, ImageFont

    rng = np.random.default_rng(seed)
    fonts = {size: ImageFont.load_default(size=size) for size in range(17, 25)}
    labels = np.repeat(np.arange(10, dtype=np.int64), n_per_class)
    images = np.empty((len(labels), 28, 28), dtype=np.uint8)
    for i, label in enumerate(labels):
        canvas = Image.new("L", (40, 40), 0)
        font = fonts[int(rng.integers(17, 25))]
        ImageDraw.Draw(canvas).text((20, 20), str(label), fill=int(rng.integers(200, 256)), font=font,
                                    anchor="mm", stroke_width=int(rng.integers(1, 3)),
                                    stroke_fill=255)
        canvas = canvas.rotate(float(rng.uniform(-15, 15)), resample=Image.BILINEAR,
                               translate=tuple(int(t) for t in rng.integers(-2, 3, size=2)))
        images[i] = np.asarray(canvas)[6:34, 6:34]
    return images, labels

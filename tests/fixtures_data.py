"""Tiny data sets in each data set's exact on-disk format, shared by the data tests and the config runs.

One writer per data set: Megapixel MNIST (IDX files -> the real generator's zarr images),
Swedish traffic signs (Set1/Set2 with annotations.txt and 960x1280 JPEGs), Billiard (PNG +
JSON per sample), CAMELYON16 (pyramidal TIFF slides, reference.csv) and its feature caches
(the HDF5 caches `python -m hrsel.features` writes), and CUB-200-2011 (the official folder layout).
"""
from __future__ import annotations

import gzip
import json
from pathlib import Path

import numpy as np
from PIL import Image

from hrsel.io.writer import write_pyramid

# ---- Megapixel MNIST ------------------------------------------------------------------------


def write_idx(path: Path, array: np.ndarray, *, gz: bool) -> Path:
    header = bytes([0, 0, 0x08, array.ndim]) + np.asarray(array.shape, ">u4").tobytes()
    data = header + array.astype(np.uint8).tobytes()
    (gzip.open if gz else open)(path, "wb").write(data)
    return path


def write_mnist_idx(folder: Path, *, n_train: int = 60, n_test: int = 30, seed: int = 0) -> Path:
    """The four gzipped MNIST IDX files, named as the real ones, holding random 28x28 blobs."""
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    for prefix, n in (("train", n_train), ("t10k", n_test)):
        images = (rng.random((n, 28, 28)) > 0.7) * rng.integers(100, 256, (n, 1, 1))
        images[:, :4], images[:, -4:] = 0, 0  # MNIST digits have a blank border
        write_idx(folder / f"{prefix}-images-idx3-ubyte.gz", images, gz=True)
        write_idx(folder / f"{prefix}-labels-idx1-ubyte.gz", np.arange(n) % 10, gz=True)
    return folder


def make_megapixel_mnist(root: Path, *, size: int = 140, n_train: int = 2, n_test: int = 2) -> Path:
    """Megapixel MNIST through the trainer's generator (hrsel.engine.datagen), from IDX files made here."""
    from hrsel.engine.datagen import generate_megapixel_mnist

    idx = write_mnist_idx(root / "mnist_idx")
    out = root / "megapixel_mnist"
    generate_megapixel_mnist(str(out), width=size, height=size, n_train=n_train, n_test=n_test, n_noise=1,
                             digits="mnist", mnist_dir=str(idx), download=False)
    return out


# ---- Swedish traffic signs --------------------------------------------------------------------

TRAFFIC_SIGNS = {  # file -> (annotation after the colon, label)
    "1277382001Image000001.jpg": ("VISIBLE, 400.0, 300.0, 380.0, 280.0, PROHIBITORY, 50_SIGN;", 1),
    "1277382002Image000002.jpg": ("", 0),
}


def write_set(root, name, entries, *, size=(960, 1280)):
    folder = root / name
    folder.mkdir(parents=True, exist_ok=True)
    lines = [f"{file}:{text}" for file, (text, _) in entries.items()]
    (folder / "annotations.txt").write_text("\n".join(lines) + "\n", encoding="utf-8")
    rng = np.random.default_rng(len(entries))
    for i, file in enumerate(entries):
        pixels = np.full((*size, 3), 20 * i, np.uint8)
        pixels[:8, :8] = rng.integers(0, 255, (8, 8, 3))
        Image.fromarray(pixels).save(folder / file, quality=95)
    return folder


def make_traffic(root: Path, entries: dict = TRAFFIC_SIGNS) -> Path:
    """Set1 and Set2 (annotations.txt + full-size JPEGs) under root."""
    write_set(root, "Set1", entries)
    write_set(root, "Set2", entries)
    return root


# ---- Billiard ---------------------------------------------------------------------------------

BALLS = [  # x grows to the right: leftmost is number 3, rightmost number 7
    {"position": [0.9, 0.1, 0.3], "number": 7, "color": "red"},
    {"position": [-1.2, 0.5, 0.3], "number": 3, "color": "blue"},
    {"position": [0.1, -0.4, 0.3], "number": 9, "color": "yellow"},
    {"position": [0.4, 0.9, 0.3], "number": 1, "color": "green"},
]


def write_release(root: Path, split: str, samples: list[list[dict]], size: int = 64) -> Path:
    folder = root / split
    folder.mkdir(parents=True)
    for i, balls in enumerate(samples):
        Image.fromarray(np.full((size, size, 4), 20 * i, np.uint8)).save(folder / f"{i}.png")  # RGBA like Kubric
        (folder / f"{i}.json").write_text(json.dumps(balls, indent=1))
    return folder


def make_billiard(root: Path, *, size: int = 160, n: int = 2) -> Path:
    """The release's train / valid / test folders of `n` size x size samples each."""
    for split in ("train", "valid", "test"):
        write_release(root, split, [BALLS[i % 2:] for i in range(n)], size=size)  # labels 6, 2, 6, ...
    return root


# ---- CAMELYON16 ---------------------------------------------------------------------------------

SLIDE_SIZE = (384, 512)  # (height, width)
CAMELYON_SLIDES = {  # path under root -> (has a tissue block, (height, width))
    "training/tumor/tumor_001.tif": (True, SLIDE_SIZE),
    "training/normal/normal_001.tif": (True, SLIDE_SIZE),
    "testing/images/test_001.tif": (True, SLIDE_SIZE),
    "testing/images/test_002.tif": (False, SLIDE_SIZE),
}
CAMELYON_REFERENCE = "test_001,Tumor,Macro,Primary\ntest_002,Normal\n"


def make_slide(path, *, tissue: bool, size=SLIDE_SIZE):
    image = np.full((*size, 3), 240, np.uint8)  # white glass
    if tissue:
        image[64:256, 128:384] = (150, 60, 140)  # a pink-purple block of "tissue"
    else:
        image[:64, :64] = (200, 150, 190)
    write_pyramid(path, image, levels=2, tile=128)


def make_camelyon(root: Path, slides: dict[str, tuple[bool, tuple[int, int]]] = CAMELYON_SLIDES,
                  reference: str = CAMELYON_REFERENCE) -> Path:
    """Slides in the challenge's folders and testing/reference.csv."""
    for rel, (tissue, size) in slides.items():
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        make_slide(root / rel, tissue=tissue, size=size)
    (root / "testing" / "reference.csv").write_text(reference)
    return root


def make_camelyon_features(root: Path, *, dim: int = 2048, patch_size: int = 64) -> Path:
    """Slides and their HDF5 feature caches `root/features/<slide>.h5` (hrsel.data.feature_cache).

    Every slide has tissue; the narrower second slide of each split gives a shorter bag (9 vs 12).
    """
    import torch

    from hrsel.data import camelyon

    narrow = (SLIDE_SIZE[0], 320)  # cuts the tissue block from 4 to 3 patch columns
    make_camelyon(root, slides={rel: (True, SLIDE_SIZE if i % 2 == 0 else narrow)
                                for i, rel in enumerate(CAMELYON_SLIDES)})
    projection = torch.randn(3, dim, generator=torch.Generator().manual_seed(0))

    def encoder(x):  # (b, 3, p, p) in [0, 1] -> (b, dim): a fixed projection of the channel means
        return x.mean((2, 3)) @ projection

    for split in ("train", "test"):
        slides = camelyon.Camelyon16(root=root, split=split, patch_size=patch_size)
        camelyon.cache_features(slides, encoder, root / "features", chunk_size=8)
    return root


# ---- CUB-200-2011 -------------------------------------------------------------------------------


def make_cub(root, n_per_class=2, classes=3, size=(80, 100)):
    folder = root / "CUB_200_2011"
    (folder / "images").mkdir(parents=True)
    images, labels, split = [], [], []
    image_id = 0
    for c in range(1, classes + 1):
        cls = f"{c:03d}.Bird_{c}"
        (folder / "images" / cls).mkdir()
        for k in range(n_per_class):
            image_id += 1
            rel = f"{cls}/Bird_{c}_{k:04d}.jpg"
            Image.fromarray(np.full((*size, 3), 40 * c, np.uint8)).save(folder / "images" / rel)
            images.append(f"{image_id} {rel}")
            labels.append(f"{image_id} {c}")
            split.append(f"{image_id} {int(k % 2 == 0)}")
    (folder / "images.txt").write_text("\n".join(images) + "\n")
    (folder / "image_class_labels.txt").write_text("\n".join(labels) + "\n")
    (folder / "train_test_split.txt").write_text("\n".join(split) + "\n")
    (folder / "classes.txt").write_text("\n".join(f"{c} {c:03d}.Bird_{c}" for c in range(1, classes + 1)) + "\n")
    return folder


# ---- manifest (your own images listed in a CSV) -------------------------------------------------

MANIFEST_ROWS = [  # (file, label, split): two of each split, both classes in each
    ("slides/a.tif", "tumor", "train"), ("slides/b.tif", "normal", "train"),
    ("slides/c.tif", "tumor", "val"), ("slides/d.tif", "normal", "val"),
    ("slides/e.tif", "tumor", "test"), ("slides/f.tif", "normal", "test"),
]


def make_manifest(root: Path, rows=MANIFEST_ROWS, *, size: int = 256, mpp: float = 0.25) -> Path:
    """Pyramidal JPEG TIFFs (2 levels, `mpp` microns per pixel at level 0) and root/slides.csv
    (path,label,split); the label's class sets a tissue block's colour."""
    for i, (rel, label, _) in enumerate(rows):
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        image = np.full((size, size, 3), 235, np.uint8)
        image[size // 4:size // 2, size // 4 + 8 * i:size // 2 + 8 * i] = (150, 60, 140) if label == "tumor" \
            else (200, 160, 190)
        write_pyramid(root / rel, image, levels=2, tile=128, compression="jpeg", mpp=mpp)
    lines = ["path,label,split"] + [",".join(row) for row in rows]
    (root / "slides.csv").write_text("\n".join(lines) + "\n")
    return root

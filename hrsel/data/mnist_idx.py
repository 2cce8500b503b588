"""MNIST in its original IDX files: read, locate on disk, download.

Search order for the files (first folder that has them wins):
`mnist_dir` argument, `$HRSEL_MNIST_DIR`, `~/.cache/hrsel/mnist`, `~/.cache/mnist`,
`./data/mnist`, `./data/MNIST/raw` (torchvision's layout). Gzipped (`.gz`) and
plain files are both accepted.
"""
from __future__ import annotations

import gzip
import logging
import os
from pathlib import Path

import numpy as np

from hrsel.errors import DataError

log = logging.getLogger(__name__)

ENV_VAR = "HRSEL_MNIST_DIR"
CACHE_DIR = Path.home() / ".cache" / "hrsel" / "mnist"
MIRRORS = (
    "https://ossci-datasets.s3.amazonaws.com/mnist/",
    "http://yann.lecun.com/exdb/mnist/",
)
# split -> (images file, labels file); md5 of the gzipped files.
FILES = {
    "train": ("train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz"),
    "test": ("t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz"),
}
MD5 = {
    "train-images-idx3-ubyte.gz": "f68b3c2dcbeaaa9fbdd348bbdeb94873",
    "train-labels-idx1-ubyte.gz": "d53e105ee54ea40749a09fcbcd1e9432",
    "t10k-images-idx3-ubyte.gz": "9fb629c4189551a2d022fa330f9573f3",
    "t10k-labels-idx1-ubyte.gz": "ec29112dd5afa0611ce80d1b7f02629c",
}
_IDX_DTYPES = {0x08: np.uint8, 0x09: np.int8, 0x0B: ">i2", 0x0C: ">i4", 0x0D: ">f4", 0x0E: ">f8"}


def read_idx(path: str | os.PathLike) -> np.ndarray:
    """Read an IDX file (optionally gzipped) into a numpy array of its declared shape."""
    path = Path(path)
    opener = gzip.open if path.suffix == ".gz" else open
    try:
        with opener(path, "rb") as f:
            raw = f.read()
    except (OSError, EOFError) as exc:
        raise DataError(f"cannot read IDX file {path}: {exc}") from exc
    if len(raw) < 4 or raw[0] != 0 or raw[1] != 0 or raw[2] not in _IDX_DTYPES:
        raise DataError(f"{path} is not an IDX file (bad magic {raw[:4].hex()})")
    ndim = raw[3]
    header = 4 + 4 * ndim
    shape = tuple(int(d) for d in np.frombuffer(raw[4:header], dtype=">u4"))
    dtype = np.dtype(_IDX_DTYPES[raw[2]])
    expected = header + int(np.prod(shape)) * dtype.itemsize
    if len(raw) != expected:
        raise DataError(
            f"IDX file {path} is truncated or padded: header says shape {shape} "
            f"({expected} bytes) but the file has {len(raw)} bytes"
        )
    return np.frombuffer(raw, dtype=dtype, offset=header).reshape(shape).astype(dtype.newbyteorder("="))


def _candidate_dirs(mnist_dir: str | os.PathLike | None, *, only: bool = False) -> list[Path]:
    dirs = [Path(mnist_dir)] if mnist_dir is not None else []
    if only:
        return dirs
    if os.environ.get(ENV_VAR):
        dirs.append(Path(os.environ[ENV_VAR]))
    dirs += [CACHE_DIR, Path.home() / ".cache" / "mnist", Path("data/mnist"), Path("data/MNIST/raw")]
    return dirs


def _find_file(folder: Path, name: str) -> Path | None:
    for candidate in (folder / name, folder / name.removesuffix(".gz")):
        if candidate.is_file():
            return candidate
    return None


def find_split(split: str, mnist_dir: str | os.PathLike | None = None, *,
               only: bool = False) -> tuple[Path, Path] | None:
    """(images, labels) paths of an MNIST split ("train" or "test") or None when absent.

    `only`: look in `mnist_dir` alone, not in $HRSEL_MNIST_DIR and the usual folders.
    """
    for folder in _candidate_dirs(mnist_dir, only=only):
        images, labels = (_find_file(folder, name) for name in FILES[split])
        if images is not None and labels is not None:
            return images, labels
    return None


def load_split(split: str, mnist_dir: str | os.PathLike | None = None, *,
               only: bool = False) -> tuple[np.ndarray, np.ndarray] | None:
    """Images (n, 28, 28) uint8 and labels (n,) int64 of a split, or None when the files are absent."""
    found = find_split(split, mnist_dir, only=only)
    if found is None:
        return None
    images, labels = read_idx(found[0]), read_idx(found[1])
    if images.ndim != 3 or labels.ndim != 1 or len(images) != len(labels):
        raise DataError(
            f"MNIST files {found[0]} and {found[1]} disagree: images {images.shape}, labels {labels.shape}"
        )
    bad = np.flatnonzero((labels < 0) | (labels > 9))
    if images.shape[1:] != (28, 28) or len(bad):
        raise DataError(f"MNIST files {found[0]} and {found[1]}: expected 28x28 digits labelled 0..9, got images "
                        f"{images.shape}" + (f" and label {labels[bad[0]]} at item {bad[0]}" if len(bad) else ""))
    log.info("MNIST %s split from %s (%d digits)", split, found[0].parent, len(labels))
    return images, labels.astype(np.int64)


def download_mnist(folder: str | os.PathLike | None = None, *, progress: bool = True) -> Path:
    """Download the four IDX files into `folder` (default `CACHE_DIR`), md5-checked; DataError offline."""
    from hrsel.data.download import download_url

    folder = Path(folder) if folder is not None else CACHE_DIR
    for name in (n for pair in FILES.values() for n in pair):
        errors = []
        for mirror in MIRRORS:
            try:
                download_url(mirror + name, folder / name, md5=MD5[name], progress=progress, timeout=10.0)
                break
            except DataError as exc:
                errors.append(str(exc))
        else:
            raise DataError(
                f"cannot download MNIST file {name} from {', '.join(MIRRORS)}. "
                f"Place the four IDX files ({', '.join(MD5)}) in {folder} or in a folder named by "
                f"${ENV_VAR} or --mnist-dir. Errors: {' | '.join(errors)}"
            )
    return folder

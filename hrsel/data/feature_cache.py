"""Per-image feature caches: one HDF5 file `<id>.h5` of tissue-patch embeddings (the CLAM / IPS workflow).

A cache holds datasets `features` (N, D) float16 or float32 and `coords` (N, 2) int64, the
level-0 (x, y) top-left corner of each patch, and attrs `patch_size` (level-0 px), `level`,
`source` (the image path), `complete` (True once every row is written) and the settings it was
made with (`patch_size_level`, `min_tissue_fraction`, `encoder`, `dim`, `n`).

`write_bag` streams a grid's patches through an encoder `batch_size` at a time (memory is
O(batch), never the whole image) into `<id>.h5.partial`, then renames it, so a killed run
leaves either a complete file or none under the final name. `cache_bag` skips a complete file
made with the same settings and redoes a partial one (no `complete` attr). `read_bag` loads one.
"""
from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any, Callable

import numpy as np

from hrsel.errors import DataError

log = logging.getLogger(__name__)

SUFFIX = ".h5"
PARTIAL = ".partial"
CHECKED_ATTRS = ("patch_size_level", "level", "min_tissue_fraction", "encoder")  # a complete file must match these

Encoder = Callable[["torch.Tensor"], "torch.Tensor"]  # noqa: F821  (b, C, p, p) float in [0, 1] -> (b, D)


def bag_name(image_id: str) -> str:
    """The file name of an image's cache: its id with path separators made safe, plus `.h5`."""
    safe = str(image_id).replace("/", "__").replace("\\", "__")
    if not safe or safe in (".", ".."):
        raise DataError(f"image id {image_id!r} cannot name a feature cache file")
    return safe + SUFFIX


def read_attrs(path: str | os.PathLike) -> dict[str, Any] | None:
    """The attrs of a readable cache file, or None when it is missing or unreadable (a torn write)."""
    import h5py

    try:
        with h5py.File(path, "r") as f:
            return {k: _plain(v) for k, v in f.attrs.items()}
    except (OSError, KeyError):
        return None


def is_complete(path: str | os.PathLike) -> bool:
    attrs = read_attrs(path)
    return bool(attrs and attrs.get("complete"))


def read_bag(path: str | os.PathLike) -> tuple[np.ndarray, np.ndarray, dict[str, Any]]:
    """(features (N, D) float32, coords (N, 2) int64, attrs) of a complete cache; DataError names the file."""
    import h5py

    try:
        with h5py.File(path, "r") as f:
            attrs = {k: _plain(v) for k, v in f.attrs.items()}
            if not attrs.get("complete"):
                raise DataError(f"feature cache {path} is incomplete (no 'complete' attr): rerun "
                                f"python -m hrsel.features with the same --out, which redoes partial files")
            features = np.asarray(f["features"][...], dtype=np.float32)
            coords = np.asarray(f["coords"][...], dtype=np.int64)
    except (OSError, KeyError) as e:
        raise DataError(f"feature cache {path} cannot be read ({e}); delete it and rerun python -m hrsel.features") \
            from None
    if features.ndim != 2 or coords.shape != (features.shape[0], 2):
        raise DataError(f"feature cache {path}: features {features.shape} and coords {coords.shape} should be "
                        f"(N, D) and (N, 2); delete it and rerun python -m hrsel.features")
    return features, coords, attrs


def write_bag(path: str | os.PathLike, source: Any, grid: Any, encoder: Encoder, *, batch_size: int = 256,
              device: str = "cpu", dtype: str = "float16", workers: int = 2,
              attrs: dict[str, Any] | None = None, on_batch: Callable[[int], None] | None = None) -> Path:
    """Encode every patch of `grid` (uint8 -> float in [0, 1] -> encoder) into the cache file `path`.

    Rows follow `grid.coords`. `on_batch(n)` is called after each batch of n patches (a progress bar).
    """
    import h5py
    import torch

    from hrsel.tiling import stream_patches

    path = Path(path)
    tmp = path.with_name(path.name + PARTIAL)
    n, p = len(grid), int(grid.patch_size)
    meta = {**(attrs or {}), "patch_size": int(round(grid.patch_size * grid.downsample)), "patch_size_level": p,
            "level": int(grid.level), "source": str(getattr(source, "path", "") or ""), "n": n}
    path.parent.mkdir(parents=True, exist_ok=True)
    with h5py.File(tmp, "w") as f, torch.no_grad():
        f.attrs.update(meta)
        f.create_dataset("coords", data=np.asarray(grid.coords, dtype=np.int64).reshape(n, 2))
        features = None
        if n == 0:
            log.warning("%s: no tissue patches in %r; the cache holds an empty bag", path.name, source)
            dim = encode(encoder, torch.zeros(1, source.channels, p, p, dtype=torch.uint8), device).shape[1]
            features = f.create_dataset("features", shape=(0, dim), dtype=dtype)
        for chunk in stream_patches(source, grid, chunk_size=batch_size, workers=workers):
            emb = encode(encoder, chunk.patches, device, getattr(source, "band_norm", None))  # (b, D) float32
            if features is None:
                features = f.create_dataset("features", shape=(n, emb.shape[1]), dtype=dtype,
                                            chunks=(min(batch_size, n), emb.shape[1]))
            start = int(chunk.indices[0])  # chunks are consecutive rows of the grid
            features[start:start + len(emb)] = emb.astype(dtype)
            if on_batch is not None:
                on_batch(len(emb))
        f.attrs["dim"] = int(features.shape[1])
        f.attrs["complete"] = True
    os.replace(tmp, path)
    return path


def encode(encoder: Encoder, patches: "torch.Tensor", device: str,  # noqa: F821
           normalizer: Any = None) -> np.ndarray:
    """(b, C, p, p) patches -> (b, D) float32 numpy embeddings; a feature map is average-pooled.

    Pixels become float as in `ImageBatch` (`hrsel.io.bands.to_float`: uint8 / 255, uint16 / 65535,
    or `normalizer`)."""
    from hrsel.io.bands import to_float

    x = to_float(patches.to(device), normalizer)
    out = encoder(x)
    if out.ndim == 4:  # (b, D, h, w) feature map
        out = out.mean(dim=(2, 3))
    if out.ndim != 2 or out.shape[0] != x.shape[0]:
        raise DataError(f"the encoder returned shape {tuple(out.shape)} for {x.shape[0]} patches; it must return "
                        f"(b, D) embeddings (or a (b, D, h, w) map, which is averaged)")
    return out.float().cpu().numpy()


def cache_bag(path: str | os.PathLike, open_source: Callable[[], Any], make_grid: Callable[[Any], Any],
              encoder: Encoder, *, attrs: dict[str, Any] | None = None, **options: Any) -> bool:
    """Write the cache at `path` unless a complete one made with the same settings is there.

    Returns True when written, False when skipped. A complete file made with other settings
    (`CHECKED_ATTRS` in `attrs`) raises DataError naming the file and both values.
    """
    path = Path(path)
    old = read_attrs(path) if path.exists() else None
    if old and old.get("complete"):
        for key in CHECKED_ATTRS:
            if key in (attrs or {}) and key in old and old[key] != attrs[key]:
                raise DataError(f"feature cache {path} was made with {key}={old[key]!r}, this run asks for "
                                f"{attrs[key]!r}; write to another --out folder or delete the old caches")
        return False
    if old is not None or path.exists():
        log.info("redoing the partial feature cache %s", path)
    source = open_source()
    try:
        write_bag(path, source, make_grid(source), encoder, attrs=attrs, **options)
    finally:
        close = getattr(source, "close", None)
        if close is not None:
            close()
    return True


def _plain(value: Any) -> Any:
    """h5py attrs -> plain Python values (numpy scalars and bytes become int/float/bool/str)."""
    if isinstance(value, bytes):
        return value.decode()
    if isinstance(value, np.generic):
        return value.item()
    return value

"""Per-image feature caches: one HDF5 file `<id>.h5` of tissue-patch embeddings (the CLAM / IPS workflow).

A cache holds datasets `features` (N, D) float16 or float32 and `coords` (N, 2) int64, the
level-0 (x, y) top-left corner of each patch in the image's own pixels (also when the patches
were read from a `LevelView`: a level, or a resampling to a target mpp), and attrs saying at
what resolution the patches were encoded: `patch_size_level` (pixels encoded), `downsample`
(level-0 pixels per encoded pixel), `patch_size` (level-0 px), `level` (the pyramid level read),
`mpp` (microns per encoded pixel, when the image says) and `target_mpp` (when one was asked:
`hrsel.data.bag_resolution` checks bags against the config with these); then `source` (the
image path), `complete` (True once every row is written) and the settings it was made with
(`min_tissue_fraction`, `tissue_size`, `tissue_rule`, `encoder`, `dim`, `n`).

`write_bag` streams a grid's patches through an encoder `batch_size` at a time (memory is
O(batch), never the whole image) into `<id>.h5.partial`, then renames it, so a killed run
leaves either a complete file or none under the final name; a failed write (disk full) removes
the partial file and is one `RunFolderError` naming it. `cache_bag` skips a complete file made
from the same image (`source`, an absolute path) with the same settings (`CHECKED_ATTRS`),
refuses one made from another image or with other settings (naming both), and redoes a partial
one (no `complete` attr). `read_bag` loads one.
"""
from __future__ import annotations

import errno
import logging
import os
import shutil
from pathlib import Path
from typing import Any, Callable

import numpy as np

from hrsel.errors import DataError, HrselError, RunFolderError

log = logging.getLogger(__name__)

SUFFIX = ".h5"
PARTIAL = ".partial"
# A complete file is kept only when these match the run's (a missing attr reads as None: a cache
# from before `downsample`, `target_mpp` or `tissue_rule` were recorded is made again).
CHECKED_ATTRS = ("patch_size_level", "downsample", "target_mpp", "min_tissue_fraction", "tissue_size", "tissue_rule",
                 "encoder")

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
    path = Path(path)
    tmp = path.with_name(path.name + PARTIAL)
    meta = {key: value for key, value in {**(attrs or {}), **grid_attrs(source, grid)}.items() if value is not None}
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        _check_space(path, len(grid), _feature_dim(encoder, source, int(grid.patch_size), device), dtype)
        _encode_into(tmp, meta, source, grid, encoder, batch_size=batch_size, device=device, dtype=dtype,
                     workers=workers, on_batch=on_batch)
        os.replace(tmp, path)
    except (OSError, RuntimeError) as e:
        if not is_write_failure(e):
            raise
        raise RunFolderError(f"cannot write feature cache {path}: {_reason(e)}; the partial file was removed and "
                             f"the complete caches in {path.parent} are kept. Free space there (or choose another "
                             f"--out), then run python -m hrsel.features again: it continues with this image") \
            from None
    return path


def _encode_into(tmp: Path, meta: dict[str, Any], source: Any, grid: Any, encoder: Encoder, *, batch_size: int,
                 device: str, dtype: str, workers: int, on_batch: Callable[[int], None] | None) -> None:
    """`write_bag`'s file: attrs, coords, then the features batch by batch (each flushed); `complete` last.

    A failed write (a full disk) surfaces at that write or flush; the file is then emptied before
    HDF5 closes it (closing a file with writes pending on a full disk crashes the process) and
    removed. Any other error (a kill, a bad image) closes it and leaves the partial file, which the
    next run redoes."""
    import h5py
    import torch

    f = h5py.File(tmp, "w", rdcc_nbytes=0)  # no chunk cache: a failed write fails at once, nothing is left pending
    try:
        with torch.no_grad():
            _fill(f, meta, source, grid, encoder, batch_size=batch_size, device=device, dtype=dtype,
                  workers=workers, on_batch=on_batch)
    except BaseException as e:
        if is_write_failure(e):
            _abandon(f, tmp)
        else:
            f.close()
        raise
    f.close()


def _fill(f: Any, meta: dict[str, Any], source: Any, grid: Any, encoder: Encoder, *, batch_size: int, device: str,
          dtype: str, workers: int, on_batch: Callable[[int], None] | None) -> None:
    import torch

    from hrsel.tiling import stream_patches

    n = len(grid)
    f.attrs.update(meta)
    f.create_dataset("coords", data=level0_coords(source, grid))
    features = None
    if n == 0:
        log.warning("%s: no tissue patches in %r; the cache holds an empty bag", Path(f.filename).name, source)
        dim = _feature_dim(encoder, source, int(grid.patch_size), device)
        features = f.create_dataset("features", shape=(0, dim), dtype=dtype)
    f.flush()
    for chunk in stream_patches(source, grid, chunk_size=batch_size, workers=workers):
        emb = encode(encoder, chunk.patches, device, getattr(source, "band_norm", None))  # (b, D) float32
        if features is None:
            features = f.create_dataset("features", shape=(n, emb.shape[1]), dtype=dtype,
                                        chunks=(min(batch_size, n), emb.shape[1]))
        start = int(chunk.indices[0])  # chunks are consecutive rows of the grid
        features[start:start + len(emb)] = emb.astype(dtype)
        f.flush()  # a full disk fails here, on this batch, not when the file is closed
        if on_batch is not None:
            on_batch(len(emb))
    f.attrs["dim"] = int(features.shape[1])
    f.attrs["complete"] = True
    f.flush()


def grid_attrs(source: Any, grid: Any) -> dict[str, Any]:
    """The resolution a cache of `grid` over `source` (an image or a `LevelView` of it) records (module doc)."""
    from hrsel.io.level_view import LevelView, level0_scale

    downsample = float(grid.downsample) * level0_scale(source)  # the image's level-0 px per encoded px
    mpp = source.mpp * float(grid.downsample) if source.mpp else None
    level = int(grid.level) + (source.level if isinstance(source, LevelView) else 0)
    return {"patch_size": int(round(grid.patch_size * downsample)), "patch_size_level": int(grid.patch_size),
            "level": level, "downsample": downsample, "mpp": mpp, "source": source_name(source), "n": len(grid)}


def level0_coords(source: Any, grid: Any) -> np.ndarray:
    """(n, 2) int64 top-left corners of `grid`'s patches in level-0 pixels of the image under `source`."""
    from hrsel.io.level_view import level0_scale

    corners = np.asarray(grid.boxes()[:, :2], dtype=np.float64).reshape(len(grid), 2)  # level 0 of `source`
    return np.rint(corners * level0_scale(source)).astype(np.int64)


def _feature_dim(encoder: Encoder, source: Any, patch_size: int, device: str) -> int:
    """D, from the encoder on one blank patch."""
    import torch

    blank = torch.zeros(1, source.channels, patch_size, patch_size, dtype=torch.uint8)
    return int(encode(encoder, blank, device).shape[1])


def _check_space(path: Path, n: int, dim: int, dtype: str) -> None:
    """Refuse, before writing, a cache the disk of its folder has no room for (RunFolderError naming both)."""
    need = n * (dim * np.dtype(dtype).itemsize + 16) + (1 << 20)  # features, coords, HDF5's own
    free = shutil.disk_usage(path.parent).free
    if free < need:
        raise RunFolderError(f"cannot write feature cache {path}: no space left on the device for it (it needs "
                             f"about {need / 2**20:.1f} MiB for {n} patches of {dim} {dtype} features, "
                             f"{free / 2**20:.1f} MiB are free in {path.parent}); nothing was written. Free space "
                             f"there (or choose another --out), then run python -m hrsel.features again")


def is_write_failure(error: BaseException) -> bool:
    """An error of writing a cache file (h5py reports a failed flush as a RuntimeError), not of hrsel or torch."""
    if isinstance(error, HrselError):
        return False
    return isinstance(error, OSError) or (isinstance(error, RuntimeError) and "write failed" in str(error))


def _reason(error: BaseException) -> str:
    text = str(error)
    if getattr(error, "errno", None) in (errno.ENOSPC, errno.EDQUOT) or "errno = 28" in text or "No space" in text:
        return "no space left on the device"
    return getattr(error, "strerror", None) or text.splitlines()[0][:200]


def _abandon(f: Any, tmp: Path) -> None:
    """Free the disk the partial file holds, let HDF5 close it (its pending writes now fit), remove it."""
    try:
        os.truncate(tmp, 0)
    except OSError:
        pass
    try:
        f.close()
    except Exception:  # noqa: BLE001 - the file is being thrown away
        pass
    _discard(tmp)


def source_name(source: Any) -> str:
    """The image a cache is made from, as stored in its `source` attr: the absolute path ("" if none)."""
    name = str(getattr(source, "path", "") or "")
    return os.path.abspath(name) if name else ""


def _same_image(stored: str, current: str) -> bool:
    """A cache's `source` attr names the image `current` (equal paths, or one file reached two ways)."""
    if not stored or not current or stored == current or os.path.abspath(stored) == current:
        return True
    try:
        return os.path.samefile(stored, current)
    except OSError:
        return False


def _discard(tmp: Path) -> None:
    try:
        tmp.unlink(missing_ok=True)
    except OSError:
        log.warning("could not remove the partial feature cache %s; delete it by hand", tmp)


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
    (`CHECKED_ATTRS` in `attrs`) raises DataError naming the file and both values. With `attrs`,
    grids are read at level 0 of the source (a `LevelView` for another level or resolution),
    whose downsample is checked too.
    """
    from hrsel.io.level_view import level0_scale

    path = Path(path)
    old = read_attrs(path) if path.exists() else None
    source = open_source()
    try:
        if old and old.get("complete"):
            _check_same_settings(path, old, {**attrs, "downsample": level0_scale(source)} if attrs else {}, source)
            return False
        if old is not None or path.exists():
            log.info("redoing the partial feature cache %s", path)
        write_bag(path, source, make_grid(source), encoder, attrs=attrs, **options)
    finally:
        close = getattr(source, "close", None)
        if close is not None:
            close()
    return True


def _check_same_settings(path: Path, old: dict[str, Any], attrs: dict[str, Any], source: Any) -> None:
    """A complete cache is kept only if made from this image with these settings; else DataError naming both."""
    for key in CHECKED_ATTRS:
        if key in attrs and not _same_value(old.get(key), attrs[key]):
            raise DataError(f"feature cache {path} was made with {key}={old.get(key)!r}, this run asks for "
                            f"{attrs[key]!r}; write to another --out folder or delete the old caches")
    current = source_name(source)
    if not _same_image(str(old.get("source") or ""), current):
        raise DataError(f"feature cache {path} was made from image {old['source']!r}, but this run's image with "
                        f"the same id is {current!r}; nothing was overwritten. Give the images distinct file "
                        f"names (or ids), write to another --out folder, or delete {path.name} to encode the new "
                        f"image")


def _same_value(old: Any, new: Any) -> bool:
    if isinstance(old, (int, float)) and isinstance(new, (int, float)) and not isinstance(old, bool):
        return bool(np.isclose(float(old), float(new), rtol=1e-6, atol=0.0))
    return old == new


def _plain(value: Any) -> Any:
    """h5py attrs -> plain Python values (numpy scalars and bytes become int/float/bool/str)."""
    if isinstance(value, bytes):
        return value.decode()
    if isinstance(value, np.generic):
        return value.item()
    return value

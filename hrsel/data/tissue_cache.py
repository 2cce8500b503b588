"""Tissue masks of a data set's images, computed once per image and cached on disk with a QC picture.

    cache = TissueCache("data/my_slides/tissue_masks", min_fraction=0.5)
    item["tissue"] = cache.get("slides/a", source, path="data/my_slides/slides/a.tif")

`<folder>/<id>.npz` holds the mask (`hrsel.tiling.tissue.TissueMask.save`) with a key made of
the image's path, size on disk, modification time, pixel dimensions and the mask options: a
changed image or option recomputes it. `<folder>/<id>_tissue.png` is the QC picture (the
thumbnail, glass dimmed, the mask outlined), drawn when the mask is computed. An unwritable
folder keeps the masks in memory only (one warning); folder None keeps them there by design.
"""
from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any

from hrsel.errors import DataError
from hrsel.tiling.tissue import RULE_VERSION as VERSION  # a cached mask of another rule is computed again

log = logging.getLogger(__name__)


def check_tissue_options(*, min_tissue_fraction: float, tissue_size: int) -> None:
    if not 0.0 <= min_tissue_fraction <= 1.0:
        raise DataError(f"config key 'data.min_tissue_fraction' = {min_tissue_fraction!r} must be in [0, 1] (the "
                        "share of a patch that must be tissue for it to be scored, e.g. 0.5)")
    if tissue_size < 16:
        raise DataError(f"config key 'data.tissue_size' = {tissue_size!r} must be >= 16 (the longer side of the "
                        "thumbnail the tissue mask is computed on, e.g. 1024)")


def safe_name(item_id: str) -> str:
    return "".join(c if c.isalnum() or c in "-_.+" else "_" for c in str(item_id).replace("/", "__")) or "image"


class TissueCache:
    """One `TissueMask` per image id, from memory, the cache folder or the image's thumbnail."""

    def __init__(self, folder: str | os.PathLike | None, *, min_fraction: float = 0.5, max_size: int = 1024):
        self.folder = None if folder is None else Path(folder)
        self.min_fraction, self.max_size = float(min_fraction), int(max_size)
        self._memo: dict[str, Any] = {}
        self._writable = self.folder is not None

    def key(self, source: Any, path: str | None) -> str:
        stat = ""
        if path:
            try:
                info = os.stat(path)
                stat = f"{info.st_size}:{info.st_mtime_ns}"
            except OSError:
                pass
        return f"v{VERSION}|{path}|{stat}|{tuple(source.dimensions)}|{self.max_size}"

    def get(self, item_id: str, source: Any, *, path: str | None = None) -> Any:
        from hrsel.tiling.tissue import TissueMask, compute_tissue_mask

        if item_id in self._memo:
            return self._memo[item_id]
        name, key = safe_name(item_id), self.key(source, path)
        file = None if self.folder is None else self.folder / f"{name}.npz"
        mask = None if file is None else TissueMask.load(file, min_fraction=self.min_fraction, key=key)
        if mask is None:
            thumbnail = source.thumbnail(self.max_size)
            mask = compute_tissue_mask(source, thumbnail=thumbnail, min_fraction=self.min_fraction)
            log.info("tissue mask of %s: %.1f%% tissue", item_id, 100 * mask.tissue_share)
            self._write(mask, thumbnail, file, key, item_id)
        self._memo[item_id] = mask
        return mask

    def _write(self, mask: Any, thumbnail: Any, file: Path, key: str, item_id: str) -> None:
        if not self._writable:
            return
        try:
            mask.save(file, key=key)
            mask.save_picture(thumbnail, file.with_name(f"{file.stem}_tissue.png"),
                              title=f"{item_id}: {100 * mask.tissue_share:.0f}% tissue")
        except OSError as e:
            self._writable = False
            log.warning("tissue masks cannot be cached in %s (%s): they stay in memory; set data.tissue_cache to "
                        "a writable folder", self.folder, e)

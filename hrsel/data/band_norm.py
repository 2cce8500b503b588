"""`data.band_norm`: give every item's image source the run's `BandNormalizer` (`hrsel.io.bands`).

    normalizer = resolve_band_norm(cfg.data.band_norm, train_set, saved=run_dir / "band_norm.json")
    train_set = with_band_norm(train_set, normalizer)     # items' sources now carry .band_norm

`ImageBatch` turns pixels into float with the normaliser its sources carry, so pipelines need no
option for it. Statistics (percentiles, mean/std auto) are computed once over a sample of the
training images; `hrsel.train` saves them as `band_norm.json` in the run folder and a resumed
run reloads that file. In-memory tensor images keep the dtype default (uint8 / 255, uint16 / 65535).
"""
from __future__ import annotations

import logging
from pathlib import Path
from typing import Any, Iterator

import numpy as np
from torch.utils.data import Dataset

from hrsel.errors import ConfigError
from hrsel.io.bands import BandNormalizer, needs_data, normalizer_from_spec

log = logging.getLogger(__name__)


def _is_source(x: Any) -> bool:
    return hasattr(x, "read_region") and hasattr(x, "dimensions")


class BandNormDataset(Dataset):
    """`dataset` whose items' image sources carry `normalizer` as `band_norm`; other attributes pass through."""

    def __init__(self, dataset: Any, normalizer: BandNormalizer):
        self.dataset, self.normalizer = dataset, normalizer

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, index: int) -> Any:
        item = self.dataset[index]
        image = item.get("image") if isinstance(item, dict) else None
        if _is_source(image):
            image.band_norm = self.normalizer
        return item

    def __getattr__(self, name: str) -> Any:  # tasks, class_names, split_record, ... of the data set
        if name in ("dataset", "normalizer") or name.startswith("__"):
            raise AttributeError(name)
        return getattr(self.dataset, name)


def with_band_norm(dataset: Any, normalizer: BandNormalizer | None) -> Any:
    """`dataset` unchanged without a normaliser, else wrapped in `BandNormDataset`."""
    if normalizer is None or dataset is None:
        return dataset
    return BandNormDataset(dataset, normalizer)


def sample_sources(dataset: Any, count: int) -> Iterator[Any]:
    """The image sources of up to `count` items spread evenly over `dataset`; `ConfigError` for tensor items."""
    n = len(dataset)
    for index in np.unique(np.linspace(0, max(n - 1, 0), num=min(count, n)).round().astype(int)):
        image = dataset[int(index)]["image"]
        if not _is_source(image):
            raise ConfigError(
                f"config key 'data.band_norm' computes statistics of lazy image sources, but this data set's items "
                f"are {type(image).__name__}s; use a data set of image files (e.g. manifest) or remove data.band_norm"
            )
        yield image


def resolve_band_norm(spec: dict[str, Any] | None, train_set: Any, *,
                      saved: Path | None = None) -> BandNormalizer | None:
    """The run's normaliser: None for the dtype default, `saved` (band_norm.json) when it exists and the
    spec is computed from data, else built from the spec (reading up to `sample` training images)."""
    spec = spec or {}
    if needs_data(spec) and saved is not None and Path(saved).is_file():
        normalizer = BandNormalizer.load(saved)
        log.info("band normalisation reloaded from %s: %s", saved, normalizer.rule)
        return normalizer
    return normalizer_from_spec(spec, sample_sources(train_set, int(spec.get("sample", 16))) if needs_data(spec)
                                else ())

"""`build_dataset(name, split=..., root=..., **options)`: data sets by name, imported lazily."""
from __future__ import annotations

import importlib
from typing import Any, Callable

from hrsel.registry import Registry

DATASETS = Registry("dataset")


def _lazy(module: str, attribute: str) -> Callable[..., Any]:
    def build(**kwargs: Any) -> Any:
        return getattr(importlib.import_module(f"hrsel.data.{module}"), attribute)(**kwargs)

    build.__name__ = f"build_{attribute}"
    build.__doc__ = f"Build `hrsel.data.{module}.{attribute}` (imported on first use)."
    return build


for _name, _module, _attribute in (
    ("megapixel_mnist", "megapixel_mnist", "MegapixelMNIST"),
    ("traffic", "traffic", "TrafficSigns"),
    ("billiard", "billiard", "Billiard"),
    ("camelyon16", "camelyon", "Camelyon16"),
    ("features", "features", "FeatureBags"),
    ("camelyon16_features", "features", "Camelyon16Features"),  # features with layout camelyon16
    ("cub200", "cub", "CUB200"),
    ("manifest", "manifest", "ManifestDataset"),
):
    DATASETS.register(_name)(_lazy(_module, _attribute))

# The validation split a data set ships with (data.val_split=auto uses it; the others hold out
# part of their training split, see hrsel.data.split). A data set whose validation split depends on its
# files (manifest: the CSV's `val` rows) says so in its `validation_split` attribute (hrsel.train).
VALIDATION_SPLITS = {"billiard": "valid"}  # the DPS release: 8k train / 2k valid / 10k test


def build_dataset(name: str, *, split: str, root: str, **options: Any) -> Any:
    """The data set `name` ("megapixel_mnist", "traffic", "billiard", "camelyon16", "features",
    "camelyon16_features", "cub200", "manifest") for `split` under `root`; options go to its class."""
    return DATASETS.build(name, split=split, root=root, **options)


def validation_split(name: str) -> str | None:
    """The data set's own validation split, or None when it has none (hold out part of train instead)."""
    return VALIDATION_SPLITS.get(name)

"""Layer 5: data sets (one module each), their augmentation and collate, and `build_dataset`.

Importing this package is cheap: data set modules (and torch) load on first use.
"""
from hrsel.data.registry import DATASETS, build_dataset

__all__ = ["DATASETS", "build_dataset"]

"""Image ids from file names: one rule for manifests, feature caches, tissue masks and predictions.

    strip_image_suffix("slides/case_018.ome.tiff")  # "slides/case_018"
    image_stem("slides/case_018.ome.tiff")          # "case_018"
    image_ids(["a/x.svs", "a/x.tif", "b/y.svs"])     # ["a/x.svs", "a/x.tif", "b/y"]

The suffix of an image is its last one, and `.ome` before it with it (OME-TIFF `.ome.tif`,
`.ome.tiff`, `.ome.btf`, OME-Zarr `.ome.zarr`), so `case_018.ome.tiff` and `case_018.svs` are
both `case_018`. Other dots stay (`case.2024.svs` -> `case.2024`).
"""
from __future__ import annotations

import os
from collections import Counter
from pathlib import PurePath
from typing import Sequence

DOUBLE = ".ome"  # the first half of OME's two-part suffixes


def strip_image_suffix(name: str | os.PathLike) -> str:
    """`name` (a file name or a path as written) without its image suffix; folders are kept."""
    text = str(name).rstrip("/\\")
    path = PurePath(text)
    stem = path.stem if path.suffix else path.name
    if stem.lower().endswith(DOUBLE) and len(stem) > len(DOUBLE):
        stem = stem[: -len(DOUBLE)]
    parent = text[: len(text) - len(path.name)]
    return parent + stem if stem else text


def image_stem(path: str | os.PathLike) -> str:
    """The file name of `path` without its image suffix."""
    return strip_image_suffix(PurePath(str(path).rstrip("/\\")).name)


def image_ids(paths: Sequence[str | os.PathLike]) -> list[str]:
    """One id per image path as written: the path without its image suffix, or with it where two
    paths would otherwise share an id (`a.tif` and `a.svs` side by side)."""
    short = [strip_image_suffix(p) for p in paths]
    counts = Counter(short)
    return [s if counts[s] == 1 else str(p) for s, p in zip(short, paths)]

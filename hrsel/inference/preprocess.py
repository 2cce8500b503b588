"""The run's preprocessing of one input, as its training data set applied it; `hrsel.predict` and
`LoadedModel.predict` both go through here.

    prepare = RunPreprocessing.of(model, tissue_folder="preds/tissue")   # None: masks in memory only
    entry = prepare.entry(PredictInput(path=Path("slide.svs"), kind="image"))
    entry["image"], entry.get("tissue")          # what the pipeline takes: pipeline([image], tissue=[mask])

For an image (a path, an `ImageSource` or an array):

- `data.target_mpp`: the `LevelView` of the level serving it (resampled to exactly target_mpp
  when no level has it), so `model.patch_size` counts pixels at the trained resolution;
- `data.band_norm`: the run's `BandNormalizer` (its `band_norm.json`, else the static spec) is set
  as the source's `band_norm`, so pixels become the floats training saw;
- `data.tissue`: the image's tissue mask (`hrsel.data.tissue_cache`), the candidate cells.

A feature cache (`.h5`) is its bag: features (N, D), level-0 coordinates and attributes; its recorded
resolution (target_mpp, level, patch size) must be the run's (`hrsel.data.bag_resolution`).
"""
from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from hrsel.errors import DataError
from hrsel.inference.inputs import PredictInput


@dataclass
class RunPreprocessing:
    target_mpp: float | None = None  # the run's data.target_mpp (None: level 0)
    band_norm: Any = None  # the run's BandNormalizer (None: the dtype's default)
    tissue: Any = None  # a TissueCache with the run's data.tissue options (None: every patch is scored)
    bag_resolution: dict[str, Any] = field(default_factory=dict)  # target_mpp / level / patch_size of the run's bags

    @classmethod
    def of(cls, model: Any, *, tissue_folder: str | os.PathLike | None = None) -> "RunPreprocessing":
        """The preprocessing of `model`'s run (a `LoadedModel`); tissue masks are cached in `tissue_folder`."""
        from hrsel.models.bags import takes_feature_bags

        options = _data_options(model)
        bag_resolution = {k: options[k] for k in ("target_mpp", "level", "patch_size")
                          if takes_feature_bags(model.pipeline) and options.get(k) is not None}
        return cls(target_mpp=options.get("target_mpp"), band_norm=run_band_norm(model),
                   tissue=tissue_cache(model, tissue_folder), bag_resolution=bag_resolution)

    def image(self, image: Any, *, key: str | None = None) -> tuple[Any, Any]:
        """(the image as the pipeline reads it, its tissue mask or None); `key` names the mask in the cache
        (default: the image's path)."""
        from hrsel.io import open_image

        path = str(image) if isinstance(image, (str, os.PathLike)) else getattr(image, "path", None)
        source = open_image(path if isinstance(image, (str, os.PathLike)) else image)
        if self.target_mpp:
            from hrsel.io.level_view import view_at_mpp

            source = view_at_mpp(source, self.target_mpp)
        if self.band_norm is not None:
            source.band_norm = self.band_norm
        if self.tissue is None:
            return source, None
        if not path:  # an array: no file to key a cached mask on, so it is computed afresh
            from hrsel.data.tissue_cache import TissueCache

            fresh = TissueCache(None, min_fraction=self.tissue.min_fraction, max_size=self.tissue.max_size)
            return source, fresh.get("array", source)
        return source, self.tissue.get(key or str(path), source, path=str(path))

    def entry(self, item: PredictInput, *, index: int = 0, image: Any = None) -> dict[str, Any]:
        """{"index", "input", "image" and, for a bag, "coords" and "attrs", for a run with data.tissue,
        "tissue"}: one input opened as `hrsel.predict` hands it to the pipeline (`image`: an already opened
        source or array for `item`, instead of its path)."""
        entry: dict[str, Any] = {"index": index, "input": item}
        if item.kind == "bag":
            from hrsel.data.feature_cache import read_bag

            from hrsel.data.bag_resolution import check_resolution

            features, coords, attrs = read_bag(item.path)
            check_resolution(item.path, attrs, asker="the run's config", **self.bag_resolution)
            entry.update(image=torch.from_numpy(features), coords=coords, attrs=attrs)
            return entry
        entry["image"], tissue = self.image(item.path if image is None else image, key=str(item.path))
        if tissue is not None:
            entry["tissue"] = tissue
        return entry


def run_band_norm(model: Any) -> Any:
    """The BandNormalizer the run trained with: its band_norm.json, else its static data.band_norm, else None."""
    from hrsel.io.bands import BandNormalizer, needs_data, normalizer_from_spec

    saved = Path(model.checkpoint_path).parent / "band_norm.json"
    if saved.is_file():
        return BandNormalizer.load(saved)
    spec = getattr(getattr(model.config, "data", None), "band_norm", None) or None
    if spec and needs_data(spec):
        raise DataError(f"the run trained with data.band_norm={spec} computed from its images, but {saved} is "
                        f"missing; copy it from the run folder next to the checkpoint")
    return normalizer_from_spec(spec) if spec else None


def tissue_cache(model: Any, folder: str | os.PathLike | None) -> Any:
    """A TissueCache with the run's data.tissue options, writing into `folder` (None: in memory only), or
    None when the run scored every patch."""
    options = _data_options(model)
    if not options.get("tissue"):
        return None
    from hrsel.data.tissue_cache import TissueCache

    return TissueCache(folder, min_fraction=float(options.get("min_tissue_fraction", 0.5)),
                       max_size=int(options.get("tissue_size", 1024)))


def _data_options(model: Any) -> dict[str, Any]:
    return getattr(getattr(model.config, "data", None), "options", None) or {}

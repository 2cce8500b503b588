"""Predict with a trained pipeline over images or feature caches, and write what it looked at.

    model = load_model("runs/camelyon16")
    result = predict_sources(model, ["slides/", "extra.svs"], out_dir="predictions")
    result = predict_sources(model, ["slides.csv"], out_dir="predictions", split="test")   # test rows only
    one = predict_image(model, "extra.svs")      # = model.predict("extra.svs"): no files written

Per image, in `out_dir`: a row of `predictions.csv` (the predicted class of every task and the
probability of every class, `<task>/prob/<class>`, and the row's `split`), `<stem>.geojson` (the
patches that carry information for QuPath, see `geojson.py` and `informative.py`; `all_patches=True`:
every scored one), `<stem>_scores.zarr` (the score map as OME-Zarr for napari, in micrometres when the
image knows its mpp, see `scoremap.py`) and `<stem>_heatmap.png` (see `heatmap.py`; `pictures=False`
skips it). With labels (a manifest), `metrics.json` holds the metrics of `hrsel.engine.metrics` per task and
per split, never pooled across splits: `{"metrics": {"test": {...}, "train": {...}}, ...}`, rows
without a split under "unsplit" (`inputs.manifest_splits` says which rows are which).
`out_dir` is locked while a predict runs, and both tables are written when every image is done,
atomically (`outputs.py`); the files predict writes are never read back as inputs. Each input
goes through the run's preprocessing (`preprocess.py`: target_mpp, band_norm, tissue masks).

Memory is the training pipeline's: images are lazy sources streamed in chunks by the pipeline,
the picture reads a thumbnail and the K selected patches, and the outputs are built from the
(N,) scores. Predictions are those of the trainer's evaluation: eval mode, no grad, the same
autocast and the same RNG seed (`seed + 1`).
"""
from __future__ import annotations

import csv
import io
import json
import logging
import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

from hrsel.engine.colorscale import check_scale
from hrsel.errors import DataError, SelectionError
from hrsel.inference.informative import TOP_PATCHES
from hrsel.inference.inputs import PredictInput, check_input_kinds, expand_inputs
from hrsel.inference.outputs import (MAP_SUFFIXES, METRICS, PREDICTIONS, TISSUE, claim_output_folder, write_table,
                                     writing)
from hrsel.inference.preprocess import RunPreprocessing
from hrsel.inference.rows import (csv_columns, encode_labels, prediction_row, probabilities, split_metrics,
                                  task_prediction)
from hrsel.models.bags import takes_feature_bags

log = logging.getLogger(__name__)

TOP_PATCH_INK = "top_patch/ink"  # predictions.csv: pen-ink share of the top-ranked patch (runs with data.tissue)

__all__ = ["ImagePrediction", "PredictResult", "predict_image", "predict_sources", "probabilities", "output_stem"]

SPLITS = ("train", "val", "test")
UNSPLIT = "unsplit"  # the metrics.json group of inputs without a split (images, folders, CSVs without one)


@dataclass
class PredictResult:
    out_dir: Path
    rows: list[dict[str, Any]]  # one per image, as in predictions.csv
    metrics: dict[str, dict[str, float]] | None = None  # split -> metrics over its labelled images, when any
    files: dict[str, list[Path]] = field(default_factory=dict)  # "geojson" | "zarr" | "picture" -> paths


@dataclass
class ImagePrediction:
    """One image predicted with the run's preprocessing (`predict_image`, `LoadedModel.predict`)."""

    probabilities: dict[str, dict[str, float]]  # task -> {class name: probability}, as predictions.csv
    predicted: dict[str, str]  # task -> the predicted class name (multilabel: the names over 0.5, `a|b`)
    logits: dict[str, torch.Tensor]  # task -> (1, C) (binary: (1, 1))
    output: Any  # the pipeline's PipelineOutput for the batch of one: scores (1, N), indices (1, K)
    image: Any  # the image as the pipeline read it (a LevelView at the run's data.target_mpp), or a bag (N, D)
    tissue: Any = None  # its tissue mask (runs with data.tissue)


# ---------------------------------------------------------------------------------------- the loop

def predict_sources(model: Any, inputs: Sequence[str | Path | PredictInput], *, out_dir: str | Path,
                    batch_size: int = 1, num_workers: int = 0, pictures: bool = True, gallery: int = 8,
                    progress: bool = False, claim: bool = True, split: str | None = None,
                    all_patches: bool = False, top_patches: int = TOP_PATCHES,
                    color_scale: str = "auto") -> PredictResult:
    """Predict every input (files, folders, manifest CSVs, .h5 caches; see `inputs.expand_inputs`).

    `model`: a `LoadedModel` (`hrsel.inference.load_model`). Images of one batch are run together
    when they have the same size and channels (the pipelines batch images of one size). `out_dir` is
    locked for the run (`outputs.claim_output_folder`; `claim=False`: the caller holds the lock) and
    its tables are written at the end, atomically. `split` ("train", "val" or "test"): only the
    manifest rows of that split; an input without a split is then a DataError naming it. The GeoJSON
    holds the patches that carry information and the `top_patches` highest scores (`informative.py`),
    or every scored patch with `all_patches`; `color_scale` colours the heatmaps
    (`hrsel.engine.colorscale.SCALES`).
    """
    if batch_size < 1 or num_workers < 0:
        raise DataError(f"batch_size={batch_size} must be >= 1 and num_workers={num_workers} >= 0")
    if split is not None and split not in SPLITS:
        raise DataError(f"split {split!r} is not one of {', '.join(SPLITS)} (the manifest rows to predict)")
    if top_patches < 0:
        raise DataError(f"top_patches={top_patches} must be >= 0 (the highest-scoring patches always written)")
    maps = {"pictures": pictures, "gallery": gallery, "all_patches": all_patches, "top_patches": top_patches,
            "color_scale": check_scale(color_scale)}
    out_dir = Path(out_dir)
    lock = claim_output_folder(out_dir) if claim else None
    try:
        items: list[PredictInput] = []
        for given in inputs:
            items.extend([given] if isinstance(given, PredictInput) else
                         expand_inputs([given], tasks=model.tasks, class_names=model.class_names, out_dir=out_dir,
                                       config=model.config))
        return _predict(model, rows_of_split(items, split), out_dir, batch_size=batch_size,
                        num_workers=num_workers, maps=maps, progress=progress, split=split)
    finally:
        if lock is not None:
            lock.release()


def rows_of_split(items: list[PredictInput], split: str | None) -> list[PredictInput]:
    """The items of `split` (all of them for None); an input without a split cannot be told apart: DataError."""
    if split is None:
        return items
    unsplit = [item for item in items if item.split is None]
    if unsplit:
        shown = ", ".join(str(item.path) for item in unsplit[:3]) + (" ..." if len(unsplit) > 3 else "")
        raise DataError(f"--split {split} keeps the manifest rows of split {split!r}, but {len(unsplit)} input(s) "
                        f"have no split ({shown}): images, folders and CSVs without a split column. Give a CSV "
                        f"with a split column (or the run's own manifest), or leave --split out")
    kept = [item for item in items if item.split == split]
    if not kept:
        counts = {name: sum(item.split == name for item in items) for name in SPLITS}
        raise DataError(f"--split {split}: no input row is in split {split!r} (rows per split: {counts})")
    log.info("--split %s: predicting the %d row(s) of split %r, leaving out %d", split, len(kept), split,
             len(items) - len(kept))
    return kept


def _predict(model: Any, items: list[PredictInput], out_dir: Path, *, batch_size: int, num_workers: int,
             maps: dict[str, Any], progress: bool, split: str | None = None) -> PredictResult:
    targets = {i: encode_labels(item, model.tasks, model.class_names) for i, item in enumerate(items)}
    stems = unique_stems([item.path for item in items])
    columns = csv_columns(model, labelled=any(item.labels for item in items),
                          split=any(item.split for item in items))
    _check_kinds(model, items)
    prepare = RunPreprocessing.of(model, tissue_folder=out_dir / TISSUE)
    if prepare.tissue is not None:
        columns.append(TOP_PATCH_INK)
    loader = DataLoader(_Inputs(items, prepare), batch_size=batch_size, num_workers=num_workers,
                        collate_fn=_as_list)
    result = PredictResult(out_dir=out_dir, rows=[], files={"geojson": [], "zarr": [], "picture": []})
    kept: dict[str, tuple[dict, dict]] = {}  # split -> ({task: [logits]}, {task: [targets]})
    cuda = model.device.type == "cuda"
    with torch.random.fork_rng(devices=[model.device] if cuda else [], device_type="cuda" if cuda else "cpu"), \
            _bar(len(items), "images", progress) as overall:
        torch.manual_seed(model.config.seed + 1)  # as the trainer's evaluation
        for batch in loader:
            for group in _groups(batch):
                out = _forward(model, group, progress=progress)
                for j, entry in enumerate(group):
                    k = entry["index"]
                    logits = {t: out.logits[t][j:j + 1].float().cpu() for t in model.tasks}
                    row = prediction_row(entry["input"], logits, model.tasks, model.class_names)
                    result.rows.append(row)
                    kept_logits, kept_targets = kept.setdefault(entry["input"].split or UNSPLIT, (
                        {t: [] for t in model.tasks}, {t: [] for t in model.tasks}))
                    for t, target in targets[k].items():
                        kept_logits[t].append(logits[t])
                        kept_targets[t].append(target)
                    _write_maps(model, entry, out, j, out_dir / stems[k], row, result, **maps)
                    overall.update(1)
    write_table(out_dir / PREDICTIONS, _csv_text(columns, result.rows))
    result.metrics = _write_metrics(model, items, kept, out_dir, split=split)
    log.info("predicted %d image(s) into %s", len(items), out_dir)
    return result


def _write_metrics(model: Any, items: list[PredictInput], kept: dict[str, tuple[dict, dict]], out_dir: Path, *,
                   split: str | None) -> dict[str, dict[str, float]] | None:
    """metrics.json: the metrics of every split with labelled rows, each on its own, and what was asked for."""
    order = [*SPLITS, UNSPLIT]
    metrics = {name: split_metrics(*kept[name], model.tasks) for name in order if name in kept}
    metrics = {name: values for name, values in metrics.items() if values is not None}
    if not metrics:
        return None
    rows = (f"only the rows of split {split!r} (--split {split})" if split is not None else
            "every input, each split on its own (never pooled); 'unsplit': inputs without a split")
    write_table(out_dir / METRICS, json.dumps(
        {"rows": rows, "metrics": metrics,
         "num_images": {name: sum((item.split or UNSPLIT) == name for item in items) for name in metrics},
         "num_labelled": {name: {t: len(v) for t, v in kept[name][1].items()} for name in metrics},
         "checkpoint": str(model.checkpoint_path)}, indent=2))
    for name, values in metrics.items():
        log.info("metrics of %s (%d labelled row(s)): %s", name, max(len(v) for v in kept[name][1].values()),
                 ", ".join(f"{k} {v:.4g}" for k, v in values.items()))
    seen = [name for name in ("train", "val") if name in metrics]
    if seen:
        log.warning("metrics.json also holds the %s rows: the run trained on train and chose best.pt on val, so "
                    "only 'test' (or new images) says how the model does on images it has not seen. "
                    "--split test predicts the test rows alone", " and ".join(seen))
    return metrics


def _csv_text(columns: list[str], rows: list[dict[str, Any]]) -> str:
    """predictions.csv: a header of `columns`, one line per row."""
    text = io.StringIO(newline="")
    writer = csv.DictWriter(text, fieldnames=columns)
    writer.writeheader()
    writer.writerows(rows)
    return text.getvalue()


def predict_image(model: Any, image: Any, *, tissue_folder: str | Path | None = None) -> ImagePrediction:
    """One input through the run's preprocessing and pipeline, exactly as `predict_sources` predicts it, with
    no file written: a path (an image file, or an .h5 feature cache), an opened `ImageSource` or an array.
    Tissue masks (runs with data.tissue) are cached in `tissue_folder` (None: computed, kept in memory)."""
    path = Path(image) if isinstance(image, (str, os.PathLike)) else Path(str(getattr(image, "path", "") or "image"))
    item = PredictInput(path=path, kind=_kind_of(image))
    _check_kinds(model, [item])
    prepare = RunPreprocessing.of(model, tissue_folder=tissue_folder)
    entry = prepare.entry(item, image=None if isinstance(image, (str, os.PathLike)) else image)
    cuda = model.device.type == "cuda"
    with torch.random.fork_rng(devices=[model.device] if cuda else [], device_type="cuda" if cuda else "cpu"):
        torch.manual_seed(model.config.seed + 1)  # as the trainer's evaluation and predict_sources
        out = _forward(model, [entry], progress=False)
    logits = {t: out.logits[t][:1].float().cpu() for t in model.tasks}
    probs, predicted = {}, {}
    for task, spec in model.tasks.items():
        predicted[task], probs[task] = task_prediction(logits[task], spec, model.class_names[task])
    return ImagePrediction(probabilities=probs, predicted=predicted, logits=logits, output=out,
                           image=entry["image"], tissue=entry.get("tissue"))


def _check_kinds(model: Any, items: list[PredictInput]) -> None:
    """A bag model takes feature caches and a pixel model images: the other kind is a named DataError."""
    check_input_kinds(items, takes_bags=takes_feature_bags(model.pipeline), run=str(model.checkpoint_path),
                      data_name=getattr(getattr(model.config, "data", None), "name", "?"))


def _kind_of(image: Any) -> str:
    from hrsel.inference.inputs import BAG_SUFFIXES

    is_path = isinstance(image, (str, os.PathLike))
    return "bag" if is_path and Path(image).suffix.lower() in BAG_SUFFIXES else "image"


class _Inputs(Dataset):
    """Opens each input lazily (an image source: its header only; a feature cache: its bag), through the
    run's preprocessing (`preprocess.RunPreprocessing`)."""

    def __init__(self, items: list[PredictInput], prepare: RunPreprocessing):
        self.items, self.prepare = items, prepare

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, index: int) -> dict[str, Any]:
        return self.prepare.entry(self.items[index], index=index)


def _as_list(entries: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return entries


def _groups(batch: list[dict[str, Any]]) -> list[list[dict[str, Any]]]:
    """Consecutive runs of a batch that one forward call takes: bags together, images of one size."""
    groups: list[list[dict[str, Any]]] = []
    for entry in batch:
        image = entry["image"]
        key = ("bag",) if isinstance(image, torch.Tensor) else ("image", image.dimensions, image.channels)
        if groups and groups[-1][0]["_key"] == key:
            groups[-1].append(entry)
        else:
            groups.append([entry])
        entry["_key"] = key
    return groups


@torch.no_grad()
def _forward(model: Any, group: list[dict[str, Any]], *, progress: bool) -> Any:
    pipeline = model.pipeline
    pipeline.eval()
    images = [entry["image"] for entry in group]
    if not isinstance(images[0], torch.Tensor) and getattr(pipeline, "in_chans", None) is not None:
        from hrsel.models.patches import check_channels

        check_channels(images, in_chans=pipeline.in_chans)  # ChannelMismatchError naming the image
    from hrsel.models.candidates import pipeline_inputs

    inputs = pipeline_inputs(pipeline, {"tissue": [entry.get("tissue") for entry in group]})
    try:
        with _autocast(model), _patch_bar(pipeline, group, progress):
            return pipeline(images, **inputs)
    except SelectionError as e:  # an image the run's grid does not fit (smaller than a patch, fewer than K)
        names = ", ".join(str(entry["input"].path) for entry in group)
        raise DataError(f"{names}: the run's pipeline cannot select patches of this image: {e}. Predict on images "
                        f"like the run's training images (size, level), or train a run for these") from None


def _autocast(model: Any):
    import contextlib

    precision = model.config.train.precision
    if model.device.type != "cuda" or precision == "fp32":
        return contextlib.nullcontext()
    return torch.autocast("cuda", dtype=torch.bfloat16 if precision == "bf16" else torch.float16)


# ---------------------------------------------------------------------------------------- stems

def unique_stems(paths: Sequence[Path]) -> list[str]:
    """A file stem per input, made unique with -2, -3, ... (`slide.ome.tif` -> `slide`)."""
    seen: dict[str, int] = {}
    stems = []
    for path in paths:
        stem = output_stem(path)
        seen[stem] = seen.get(stem, 0) + 1
        stems.append(stem if seen[stem] == 1 else f"{stem}-{seen[stem]}")
    return stems


def output_stem(path: Path) -> str:
    from hrsel.io.names import image_stem

    return "".join(c if c.isalnum() or c in "-_.+" else "_" for c in image_stem(path)) or "image"


# ---------------------------------------------------------------------------------------- maps

def _write_maps(model: Any, entry: dict[str, Any], out: Any, j: int, base: Path, row: dict[str, Any],
                result: PredictResult, *, pictures: bool, gallery: int, all_patches: bool = False,
                top_patches: int = TOP_PATCHES, color_scale: str = "auto") -> None:
    from hrsel.inference.geojson import write_geojson
    from hrsel.inference.informative import informative
    from hrsel.inference.scoremap import score_grid, write_ome_zarr

    if out.scores is None:
        log.warning("%s: the %s pipeline gives no patch scores; no GeoJSON, score map or heatmap",
                    entry["input"].path, type(model.pipeline).__name__)
        return
    name = entry["input"].path.name
    source, coords, patch, image_wh = _geometry(model, entry, out, j)
    scores = out.scores[j].float().cpu().numpy()[: len(coords)]
    ink = top_patch_ink(entry.get("tissue"), coords, patch, scores)
    if ink is not None:
        row[TOP_PATCH_INK] = f"{ink:.4f}"
        if ink > 0:
            log.warning("%s: its top-ranked patch holds %.1f%% pen ink: a pen edge can drive a prediction (on "
                        "synthetic slides, pen edges made pen-marked normal slides tumour); look at rank 1 of its "
                        "GeoJSON before trusting its prediction", name, 100 * ink)
    selected = np.array([], dtype=np.int64) if out.indices is None else out.indices[j].cpu().numpy()
    selected = selected[selected >= 0]
    f = float(getattr(source, "downsample", 1.0))  # a LevelView's pixels -> the slide's level-0 pixels
    slide_wh = tuple(source.source.dimensions) if f != 1.0 else image_wh
    stride = _stride(model.pipeline)
    blank = _blank_patches(source, coords, patch, image_wh, name) if pictures or not all_patches else None
    keep = None if all_patches else informative(scores, selected, blank=blank, top=top_patches)
    geojson, zarr_path, picture = (base.with_name(base.name + suffix) for suffix in MAP_SUFFIXES)
    with writing(geojson):
        result.files["geojson"].append(write_geojson(geojson, coords * f, (patch[0] * f, patch[1] * f), scores,
                                                     selected, image_wh=slide_wh, keep=keep))
    if keep is not None and not keep.all():
        log.info("%s: the GeoJSON holds the %s of %s patches that carry information (scored%s, the top %d and "
                 "the selected); --all-patches writes every scored patch", name, f"{int(keep.sum()):,}",
                 f"{len(keep):,}", "" if blank is None else " and not blank", top_patches)
    mpp = _level0_mpp(source)
    grid = score_grid(coords * f, scores, patch_size=(patch[0] * f, patch[1] * f), selected=selected,
                      stride=None if stride is None else stride * f, mpp=mpp)
    if mpp:
        log.info("%s: score map in micrometres (%.4g um per level-0 pixel)", name, mpp)
    else:
        log.info("%s: score map in level-0 pixels: the image has no microns-per-pixel metadata", name)
    with writing(zarr_path):
        result.files["zarr"].append(write_ome_zarr(zarr_path, grid))
    if pictures:
        from hrsel.inference.heatmap import save_heatmap_picture

        title = f"{name}\n" + "\n".join(
            f"{t}: {row[f'{t}/predicted'] or '(none)'} ({_top_prob(row, t)})" for t in model.tasks)
        show = np.isfinite(scores) if blank is None else np.isfinite(scores) & ~blank
        show[selected[selected < len(show)]] = True
        with writing(picture):
            result.files["picture"].append(save_heatmap_picture(
                picture, source, image_wh=image_wh, coords=coords, patch_size=patch, scores=scores,
                selected=selected, title=title, gallery=gallery, color_scale=color_scale, show=show))


def top_patch_ink(tissue: Any, coords: np.ndarray, patch: tuple[float, float], scores: np.ndarray) -> float | None:
    """Share of the top-scoring patch covered by pen ink, by its tissue mask (in the pixels the pipeline read,
    as `coords`); None without a mask, or without a finite score."""
    finite = np.isfinite(scores)
    if tissue is None or not finite.any():
        return None
    top = int(np.argmax(np.where(finite, scores, -np.inf)))
    return float(tissue.ink_fractions(coords[top:top + 1], patch)[0])


def _blank_patches(source: Any, coords: np.ndarray, patch: tuple[float, float], image_wh: tuple[int, int],
                   name: str) -> np.ndarray | None:
    """(N,) bool: blank patches judged on a thumbnail (`informative.blank_patches`); None without one."""
    from hrsel.errors import ImageTooLargeError
    from hrsel.inference.informative import THUMB_SIDE, blank_patches
    from hrsel.io.pixels import to_display

    if source is None:
        return None
    try:
        thumbnail = to_display(np.asarray(source.thumbnail(THUMB_SIDE)))  # every band, 0..255
    except ImageTooLargeError as error:
        log.info("%s: blank patches not judged (%s); every scored patch counts as informative", name, error)
        return None
    return blank_patches(thumbnail, image_wh=image_wh, coords=coords, patch_size=patch)


def _level0_mpp(source: Any) -> float | None:
    """Microns per pixel of the slide's level 0 (a LevelView: of the slide it views); None when unknown."""
    slide = getattr(source, "source", None) if source is not None and hasattr(source, "downsample") else source
    mpp = getattr(slide, "mpp", None)
    return float(mpp) if mpp else None


def _top_prob(row: dict[str, Any], task: str) -> str:
    probs = {k.rsplit("/", 1)[1]: float(v) for k, v in row.items() if k.startswith(f"{task}/prob/")}
    name = max(probs, key=probs.get)
    return f"p({name})={probs[name]:.3f}"


def _stride(pipeline: Any) -> float | None:
    """The grid step of a pipeline that declares one (IPS `stride`); None: read it off the patch corners."""
    stride = getattr(pipeline, "stride", None)
    return float(stride) if isinstance(stride, (int, float)) and not isinstance(stride, bool) else None


def _geometry(model: Any, entry: dict[str, Any], out: Any, j: int):
    """(source or None, coords (N, 2) (x, y), patch (w, h), image (w, h)) of one item, in the pixels of the
    image the pipeline read (a `LevelView`'s level for a run with target_mpp, else level 0)."""
    if entry["input"].kind == "bag":
        coords = np.asarray(entry["coords"], dtype=np.float64)
        size = float(entry["attrs"].get("patch_size", 1))
        source = _bag_source(entry)
        if source is not None:
            image_wh = tuple(source.dimensions)
        else:
            image_wh = (int(math.ceil(coords[:, 0].max() + size)), int(math.ceil(coords[:, 1].max() + size)))
        return source, coords, (size, size), image_wh
    from hrsel.engine.visualize import layout_for

    source = entry["image"]
    n = int(out.scores.shape[1])
    layout = layout_for(model.pipeline, source, n)
    return source, layout.coords, (layout.width, layout.height), tuple(source.dimensions)


def _bag_source(entry: dict[str, Any]) -> Any:
    """The slide a feature cache was made from, when it is still where the cache says (for the picture)."""
    path = entry["attrs"].get("source")
    if not path:
        return None
    candidate = Path(path) if Path(path).is_absolute() else entry["input"].path.parent / path
    if not candidate.exists():
        log.info("%s: its source %s is not at hand; the heatmap is drawn without the image", entry["input"].path,
                 path)
        return None
    from hrsel.io import open_image

    return open_image(str(candidate))


# ---------------------------------------------------------------------------------------- progress

class _NoBar:
    def update(self, n: int = 1) -> None:
        pass

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False


def _bar(total: int | None, desc: str, enabled: bool, *, unit: str = "it", leave: bool = True):
    if not enabled:
        return _NoBar()
    import sys

    from tqdm.auto import tqdm

    return tqdm(total=total, desc=desc, unit=unit, leave=leave, dynamic_ncols=True, file=sys.stderr)


class _patch_bar:
    """A per-image bar of patches encoded: forward hooks on the pipeline's backbone (and IPS's scoring copy
    of it, which encodes a blank patch once) count their inputs."""

    def __init__(self, pipeline: Any, group: list[dict[str, Any]], enabled: bool):
        self.module = getattr(getattr(pipeline, "classifier", None), "backbone", None)
        scoring = getattr(pipeline, "_scoring_backbone", None)  # IPS scores with a folded copy of it
        self.modules = [m for m in (self.module, scoring() if callable(scoring) else None)
                        if isinstance(m, torch.nn.Module)]
        self.enabled = enabled and bool(self.modules)
        self.desc = group[0]["input"].path.name if len(group) == 1 else f"{len(group)} images"
        self.handle = None

    def __enter__(self):
        if self.enabled:
            self.bar = _bar(None, self.desc, True, unit="patch", leave=False)

            def count(module, args, output):
                self.bar.update(int(np.prod(args[0].shape[:-3])) if args and args[0].dim() >= 4 else 1)

            self.handle = [m.register_forward_hook(count) for m in self.modules]
        return self

    def __exit__(self, *exc):
        if self.handle is not None:
            for handle in self.handle:
                handle.remove()
            self.bar.close()
        return False

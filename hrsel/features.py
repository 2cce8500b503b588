"""Encode every tissue patch of every image once: one HDF5 feature cache per image (CLAM / IPS workflow).

    python -m hrsel.features slides.yaml --backbone resnet50 --weights resnet50.pth --out data/camelyon16/features
    python -m hrsel.features cohort.csv --backbone timm/resnet50 --patch-size 256 --level 1 --out features/
    python -m hrsel.train configs/camelyon16.yaml data.root=data/camelyon16     # then train on the bags

CONFIG is a YAML whose data set yields lazy image sources (e.g. `data: {name: camelyon16, root:
data/camelyon16, patch_size: 256}`; key=value overrides as in hrsel.train), MANIFEST a CSV with
a `path` column. Each image becomes `<out>/<id>.h5` (hrsel.data.feature_cache): the embeddings of
the patches of its Otsu tissue mask and their level-0 coordinates. A complete file is skipped, a
partial one redone, so a killed run continues where it stopped; a complete one made from another
image with the same id is refused, naming both. `--out` is locked while a run writes there (a
second run into it stops at once). Memory is O(batch of patches). Bad input (a key, a file,
an `--out` that is a file or read-only, a full disk) stops with exit status 2 and a message
naming it.
"""
from __future__ import annotations

import argparse
import json
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

from hrsel.errors import ConfigError



def _out_use() -> Any:
    from hrsel.engine.rundir import FolderUse

    return FolderUse("output folder", "features.lock", "feature caches", "--out DIR",
                     "give this run another folder with --out DIR")


@dataclass
class ImageEntry:
    """One image to encode: its id (the cache's name), how to open it, and its data set's grid defaults."""

    id: str
    open: Callable[[], Any]
    defaults: dict[str, Any]  # patch_size, level, min_tissue_fraction of the data set, where it has them


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m hrsel.features", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__.split("\n\n", 2)[2])
    p.add_argument("args", nargs="+", metavar="CONFIG_OR_MANIFEST [key.sub=value ...]")
    p.add_argument("--backbone", required=True, help="a backbone name of hrsel.models (resnet50, timm/NAME, ...)")
    p.add_argument("--backbone-options", default="{}", metavar="JSON", help='e.g. \'{"imagenet_norm": true}\'')
    p.add_argument("--weights", help="a local weights file (.pt/.pth/.safetensors) for the backbone")
    p.add_argument("--patch-size", type=int, help="patch side in pixels of --level (default: the data set's, or 256)")
    p.add_argument("--level", type=int, help="pyramid level to read (default: the data set's, or 0)")
    p.add_argument("--min-tissue-fraction", type=float,
                   help="keep patches at least this much on tissue (default: the data set's, or 0.5)")
    p.add_argument("--split", action="append", help="CONFIG: the splits to encode (default: train and eval split)")
    p.add_argument("--batch-size", type=int, default=256, help="patches per encoder call (memory is O(this))")
    p.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:1 ...")
    p.add_argument("--dtype", default="float16", choices=("float16", "float32"), help="stored feature type")
    p.add_argument("--workers", type=int, default=2, help="reader threads")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.add_argument("--out", required=True, help="folder of the <id>.h5 caches")
    args = p.parse_args(argv)
    if args.batch_size <= 0 or args.workers < 0 or (args.patch_size is not None and args.patch_size <= 0):
        p.error("--batch-size and --patch-size must be positive, --workers >= 0")
    return args


def build_encoder(name: str, options: dict[str, Any], weights: str | None, device: Any) -> Any:
    """The backbone `name` in eval mode on `device`; `weights` go to its weights_path, else load strictly."""
    import inspect

    from hrsel.models.backbones import BACKBONES, build_backbone

    builder = BACKBONES.get(name)
    target = builder.func if hasattr(builder, "func") else builder
    try:
        takes_path = "weights_path" in inspect.signature(target).parameters
    except (TypeError, ValueError):
        takes_path = False
    if weights is not None and takes_path:
        options = {**options, "weights_path": weights}
    try:
        net = build_backbone(name, **options)
    except TypeError as e:
        raise ConfigError(f"--backbone-options {json.dumps(options)} do not fit backbone {name!r}: {e}") from None
    if weights is not None and not takes_path:
        from hrsel.models.weights import load_strict, read_state_dict

        load_strict(net, read_state_dict(weights), path=weights)
    return net.eval().to(device)


def config_entries(args: list[str], splits: list[str] | None) -> list[ImageEntry]:
    """The images of a config's data set (train and eval split unless `splits`)."""
    from hrsel.config import load_config
    from hrsel.train import open_split, preflight

    config, overrides = args[0], [a for a in args[1:] if "=" in a]
    extra = [a for a in args[1:] if "=" not in a]
    if extra:
        raise ConfigError(f"unexpected arguments {extra}; give one CONFIG, then key.sub=value overrides")
    cfg = load_config(config, overrides)
    preflight(cfg)
    entries, seen = [], set()
    for split in splits or dict.fromkeys([cfg.data.train_split, cfg.data.eval_split]):
        dataset = open_split(cfg, split, for_eval=True)
        defaults = {k: getattr(dataset, k) for k in ("patch_size", "level", "min_tissue_fraction")
                    if getattr(dataset, k, None) is not None}
        for i in range(len(dataset)):
            item = dataset[i]
            if not hasattr(item["image"], "read_region"):
                raise ConfigError(f"{config}: data set {cfg.data.name!r} yields {type(item['image']).__name__} "
                                  f"images, not lazy image sources; give a config of the image data set "
                                  f"(e.g. data.name: camelyon16)")
            close = getattr(item["image"], "close", None)
            if close is not None:
                close()
            if item["id"] not in seen:
                seen.add(item["id"])
                entries.append(ImageEntry(str(item["id"]), lambda d=dataset, i=i: d[i]["image"], defaults))
    return entries


def manifest_entries(path: str) -> list[ImageEntry]:
    """The images of a manifest CSV (`path` column); the id is the file stem (the path where stems repeat)."""
    try:
        from hrsel.data.manifest import read_manifest
    except ImportError:  # the data set module not there yet: its table reader
        from hrsel.data.manifest_table import read_manifest
    from hrsel.io import open_image

    table = read_manifest(path, tasks=[])  # the images only: label columns (or notes) are not read
    stems = [Path(row.rel).stem for row in table.rows]
    ids = [s if stems.count(s) == 1 else str(Path(row.rel).with_suffix("")) for s, row in zip(stems, table.rows)]
    return [ImageEntry(i, lambda p=row.path: open_image(str(p)), {}) for i, row in zip(ids, table.rows)]


def run(args: argparse.Namespace) -> dict[str, int]:
    import torch

    from hrsel.data.feature_cache import bag_name, cache_bag
    from hrsel.engine.distributed import check_device, resolve_device
    from hrsel.tiling import PatchGrid

    try:
        options = json.loads(args.backbone_options)
    except json.JSONDecodeError as e:
        raise ConfigError(f"--backbone-options {args.backbone_options!r} is not JSON: {e}") from None
    if not isinstance(options, dict):
        raise ConfigError(f"--backbone-options must be a JSON object, got {args.backbone_options!r}")
    check_device(args.device)
    device = resolve_device(args.device)
    if args.args[0].lower().endswith(".csv"):
        if len(args.args) > 1:
            raise ConfigError(f"a MANIFEST takes no overrides, got {args.args[1:]}")
        entries = manifest_entries(args.args[0])
    else:
        entries = config_entries(args.args, args.split)
    encoder = build_encoder(args.backbone, options, args.weights, device)
    tag = f"{args.backbone} {json.dumps(options, sort_keys=True)} weights={args.weights or 'none'}"
    counts = {"written": 0, "skipped": 0}
    bar = _bar(len(entries), "images", args.no_progress)
    for entry in entries:
        grid_opts = {"patch_size": args.patch_size or entry.defaults.get("patch_size", 256),
                     "level": args.level if args.level is not None else entry.defaults.get("level", 0),
                     "min_tissue_fraction": args.min_tissue_fraction if args.min_tissue_fraction is not None
                     else entry.defaults.get("min_tissue_fraction", 0.5)}
        attrs = {"patch_size_level": grid_opts["patch_size"], "level": grid_opts["level"],
                 "min_tissue_fraction": float(grid_opts["min_tissue_fraction"]), "encoder": tag}
        patches = _bar(None, "patches", args.no_progress, leave=False)
        with torch.inference_mode():
            written = cache_bag(Path(args.out) / bag_name(entry.id), entry.open,
                                lambda source, o=grid_opts: PatchGrid.for_source(source, **o), encoder, attrs=attrs,
                                batch_size=args.batch_size, device=device, dtype=args.dtype, workers=args.workers,
                                on_batch=patches.update)
        patches.close()
        counts["written" if written else "skipped"] += 1
        bar.set_postfix(counts)
        bar.update(1)
    bar.close()
    return counts


def _bar(total: int | None, unit: str, disable: bool, leave: bool = True) -> Any:
    from tqdm import tqdm

    return tqdm(total=total, unit=f" {unit}", disable=disable, leave=leave, file=sys.stderr, dynamic_ncols=True)


def main(argv: list[str] | None = None) -> int:
    from hrsel.cli import log_to_stderr, run_command

    args = parse_args(argv)
    log_to_stderr("%(levelname)s %(name)s: %(message)s")
    return run_command(lambda: features_command(args))


def features_command(args: argparse.Namespace) -> int:
    from hrsel.engine.rundir import RunLock

    with RunLock.acquire(args.out, use=_out_use()):  # a file, a read-only folder, a busy one: named before any work
        counts = run(args)
    print(f"{counts['written']} feature cache(s) written, {counts['skipped']} complete one(s) kept, in {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

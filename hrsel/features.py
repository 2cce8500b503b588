"""Encode every tissue patch of every image once: one HDF5 feature cache per image (CLAM / IPS workflow).

    python -m hrsel.features my_slides.yaml --backbone timm/resnet50 --weights resnet50.safetensors --out features/
    python -m hrsel.features cohort.csv --backbone timm/resnet50 --target-mpp 0.5 --patch-size 256 --out features/
    python -m hrsel.train configs/camelyon16.yaml data.root=data/camelyon16     # then train on the bags

CONFIG is a YAML whose data set yields lazy image sources (e.g. a `manifest` config, or `data: {name:
camelyon16, root: data/camelyon16, patch_size: 256}`; key=value overrides as in hrsel.train), MANIFEST a
CSV with a `path` column. Both read each image the same way: at `--target-mpp` or `--level` (default:
the config's data.target_mpp or data.level, else level 0) in patches of `--patch-size` pixels of that
resolution (default: the config's data.patch_size or model.patch_size, else 256), keeping the patches
with at least `--min-tissue-fraction` of tissue (default: data.min_tissue_fraction, else 0.5) by the
tissue mask every data set uses (`hrsel.tiling.tissue`, pen ink left out; data.tissue_size). So a bag
holds the patches a pixel model with the same config scores. Each image becomes `<out>/<id>.h5`
(hrsel.data.feature_cache; the id is the manifest data set's, the path without its image suffix):
embeddings, level-0 coordinates of the image itself and the resolution they were read at, which the
`features` data set and hrsel.predict check. A complete file is skipped, a partial one redone, so a
killed run continues where it stopped; a complete one made from another image with the same id, or
with other settings, is refused, naming both. `--out` is locked while a run writes there (a second run
into it stops at once, naming the first). Memory is O(batch of patches). Bad input (a key, a file, an
`--out` that is a file or read-only, a full disk) stops with exit status 2 and a message naming it.
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
    """One image to encode: its id (the cache's name), how to open it (level 0) and its config's grid settings."""

    id: str
    open: Callable[[], Any]
    defaults: dict[str, Any]  # target_mpp, level, patch_size, min_tissue_fraction, tissue_size the config sets


@dataclass(frozen=True)
class GridSettings:
    """How an image is read for its cache: the resolution, the patch size there, the tissue options."""

    target_mpp: float | None
    level: int
    patch_size: int
    min_tissue_fraction: float
    tissue_size: int

    def view(self, image: Any) -> Any:
        from hrsel.io.level_view import view_at

        return view_at(image, target_mpp=self.target_mpp, level=self.level)

    def grid(self, view: Any) -> Any:
        from hrsel.tiling import PatchGrid

        return PatchGrid.for_source(view, patch_size=self.patch_size, min_tissue_fraction=self.min_tissue_fraction,
                                    mask_size=self.tissue_size)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m hrsel.features", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__.split("\n\n", 2)[2])
    p.add_argument("args", nargs="+", metavar="CONFIG_OR_MANIFEST [key.sub=value ...]")
    p.add_argument("--backbone", required=True, help="a backbone name of hrsel.models (resnet50, timm/NAME, ...)")
    p.add_argument("--backbone-options", default="{}", metavar="JSON", help='e.g. \'{"imagenet_norm": true}\'')
    p.add_argument("--weights", help="a local weights file (.pt/.pth/.safetensors) for the backbone")
    p.add_argument("--target-mpp", type=float, help="read each image at this many microns per pixel (default: "
                   "the config's data.target_mpp); images need mpp metadata")
    p.add_argument("--level", type=int, help="or read this pyramid level (default: the config's data.level, or 0)")
    p.add_argument("--patch-size", type=int, help="patch side in pixels of that resolution (default: the config's "
                   "data.patch_size or model.patch_size, or 256)")
    p.add_argument("--min-tissue-fraction", type=float,
                   help="keep patches at least this much on tissue (default: the config's, or 0.5)")
    p.add_argument("--split", action="append", help="CONFIG: the splits to encode (default: train, val and test)")
    p.add_argument("--batch-size", type=int, default=256, help="patches per encoder call (memory is O(this))")
    p.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:1 ...")
    p.add_argument("--dtype", default="float16", choices=("float16", "float32"), help="stored feature type")
    p.add_argument("--workers", type=int, default=2, help="reader threads")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.add_argument("--out", required=True, help="folder of the <id>.h5 caches")
    args = p.parse_args(argv)
    if args.batch_size <= 0 or args.workers < 0 or (args.patch_size is not None and args.patch_size <= 0):
        p.error("--batch-size and --patch-size must be positive, --workers >= 0")
    if args.target_mpp is not None and args.level is not None:
        p.error("give --target-mpp or --level, not both: the level serving --target-mpp is chosen per image")
    if (args.target_mpp is not None and not args.target_mpp > 0) or (args.level is not None and args.level < 0):
        p.error("--target-mpp must be a positive number of microns per pixel (e.g. 0.5), --level >= 0")
    return args


def grid_settings(args: argparse.Namespace, defaults: dict[str, Any]) -> GridSettings:
    """The command line's settings, else the config's (`defaults`), else level 0, 256 px, 0.5, 1024."""
    if args.target_mpp is not None or args.level is not None:
        target_mpp, level = args.target_mpp, args.level or 0
    else:
        target_mpp, level = defaults.get("target_mpp"), int(defaults.get("level") or 0)
    fraction = args.min_tissue_fraction if args.min_tissue_fraction is not None else \
        defaults.get("min_tissue_fraction", 0.5)
    return GridSettings(target_mpp=None if target_mpp is None else float(target_mpp), level=level,
                        patch_size=int(args.patch_size or defaults.get("patch_size") or 256),
                        min_tissue_fraction=float(fraction), tissue_size=int(defaults.get("tissue_size", 1024)))


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
    """The images of a config's data set (its train, validation and test splits unless `splits`)."""
    from hrsel.config import load_config
    from hrsel.io.level_view import base_image
    from hrsel.train import open_split, preflight, validation_mode

    config, overrides = args[0], [a for a in args[1:] if "=" in a]
    extra = [a for a in args[1:] if "=" not in a]
    if extra:
        raise ConfigError(f"unexpected arguments {extra}; give one CONFIG, then key.sub=value overrides")
    cfg = load_config(config, overrides)
    preflight(cfg)
    defaults = config_defaults(cfg)
    if not splits:
        train = open_split(cfg, cfg.data.train_split, for_eval=True)
        own = validation_mode(cfg, train)
        splits = [cfg.data.train_split, *([own] if own not in ("holdout", "none") else []), cfg.data.eval_split]
    entries, seen = [], set()
    for split in dict.fromkeys(splits):
        dataset = open_split(cfg, split, for_eval=True)
        for i in range(len(dataset)):
            item = dataset[i]
            if not hasattr(item["image"], "read_region"):
                raise ConfigError(f"{config}: data set {cfg.data.name!r} yields {type(item['image']).__name__} "
                                  f"images, not lazy image sources; give a config of an image data set "
                                  f"(e.g. data.name: manifest or camelyon16)")
            close = getattr(item["image"], "close", None)
            if close is not None:
                close()
            if item["id"] not in seen:
                seen.add(item["id"])
                entries.append(ImageEntry(str(item["id"]), lambda d=dataset, i=i: base_image(d[i]["image"]),
                                          defaults))
    return entries


def config_defaults(cfg: Any) -> dict[str, Any]:
    """The grid settings a config sets: data.target_mpp / level / min_tissue_fraction / tissue_size and the
    patch size (data.patch_size, the data set's grid, or model.patch_size, the pixel pipelines': one of them)."""
    data, model = cfg.data.options, cfg.model.options
    sizes = {f"{section}.patch_size": options["patch_size"] for section, options in (("data", data), ("model", model))
             if options.get("patch_size") is not None}
    if len(set(sizes.values())) > 1:
        raise ConfigError(f"the config sets {' and '.join(f'{k}={v}' for k, v in sizes.items())}: feature caches "
                          f"have one patch size; make them equal or pass --patch-size")
    found = {key: data.get(key) for key in ("target_mpp", "level", "min_tissue_fraction", "tissue_size")}
    found["patch_size"] = next(iter(sizes.values()), None)
    return {key: value for key, value in found.items() if value is not None}


def manifest_entries(path: str) -> list[ImageEntry]:
    """The images of a manifest CSV (`path` column), with the manifest data set's ids."""
    try:
        from hrsel.data.manifest import read_manifest
    except ImportError:  # the data set module not there yet: its table reader
        from hrsel.data.manifest_table import read_manifest
    from hrsel.io import open_image

    table = read_manifest(path, tasks=[])  # the images only: label columns (or notes) are not read
    return [ImageEntry(i, lambda p=row.path: open_image(str(p)), {}) for i, row in zip(table.ids, table.rows)]


def run(args: argparse.Namespace) -> dict[str, int]:
    import torch

    from hrsel.data.feature_cache import bag_name, cache_bag
    from hrsel.engine.distributed import check_device, resolve_device
    from hrsel.tiling.tissue import RULE_VERSION

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
        settings = grid_settings(args, entry.defaults)
        attrs = {"patch_size_level": settings.patch_size, "target_mpp": settings.target_mpp,
                 "min_tissue_fraction": settings.min_tissue_fraction, "tissue_size": settings.tissue_size,
                 "tissue_rule": RULE_VERSION, "encoder": tag}
        patches = _bar(None, "patches", args.no_progress, leave=False)
        with torch.inference_mode():
            written = cache_bag(Path(args.out) / bag_name(entry.id), lambda e=entry, s=settings: s.view(e.open()),
                                settings.grid, encoder, attrs=attrs, batch_size=args.batch_size, device=device,
                                dtype=args.dtype, workers=args.workers, on_batch=patches.update)
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

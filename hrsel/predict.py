"""Predict with a trained run: class probabilities, QuPath GeoJSON, OME-Zarr score maps, heatmaps.

    python -m hrsel.predict runs/mnist data/new_images/ --out predictions/
    python -m hrsel.predict runs/camelyon16 slides.csv --split test --checkpoint last --device cuda --out preds/
    python -m hrsel.predict runs/camelyon16 features/*.h5 --out preds/ --no-pictures

INPUT: image files (any format hrsel reads), folders (every readable image and .h5 feature cache
inside, sorted), manifest CSVs (a `path` column; label columns named after the tasks add
metrics.json, per split: a `split` column, or the run's own split of its manifest; `--split test`
predicts only the test rows) or feature caches (.h5). Writes OUT/predictions.csv and, per image,
OUT/<stem>.geojson (the patches that carry information; --all-patches: every scored one),
OUT/<stem>_scores.zarr (in micrometres when the image knows its mpp) and OUT/<stem>_heatmap.png
(cropped to what was scored, colours 0 to 1 for probabilities and attention: --color-scale); the
tables are written when every image is done, atomically, and OUT is locked meanwhile (a second
predict into it stops at once). A bad input (an image, a run folder, an OUT that is a file, read-only or full) exits with status 2
and names it.
"""
from __future__ import annotations

import argparse
import sys

from hrsel.engine.colorscale import SCALES
from hrsel.inference.informative import TOP_PATCHES


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m hrsel.predict", description=__doc__.split("\n\n")[0])
    p.add_argument("run", metavar="RUN_DIR", help="a run folder (runs/NAME) or a checkpoint file")
    p.add_argument("inputs", metavar="INPUT", nargs="+", help="image files, folders, manifest .csv, .h5 caches")
    p.add_argument("--out", required=True, metavar="DIR", help="folder for predictions.csv and the maps")
    p.add_argument("--checkpoint", default="best", help="best (default), last, or a checkpoint path")
    p.add_argument("--split", choices=("train", "val", "test"), default=None,
                   help="only the manifest rows of this split (default: every row; metrics.json keeps the splits "
                        "apart)")
    p.add_argument("--device", default="cpu", help="cpu (default), cuda, cuda:1, mps, auto")
    p.add_argument("--batch-size", type=int, default=1, help="images per forward pass (same-size images)")
    p.add_argument("--num-workers", type=int, default=0, help="processes opening inputs (default 0)")
    p.add_argument("--no-pictures", action="store_true", help="skip the <stem>_heatmap.png pictures")
    p.add_argument("--gallery", type=int, default=8, help="selected patches shown in full resolution (8)")
    p.add_argument("--all-patches", action="store_true",
                   help="write every scored patch into the GeoJSON (default: on tissue, not blank, the top "
                        "--top-patches and the selected ones)")
    p.add_argument("--top-patches", type=int, default=TOP_PATCHES, metavar="N",
                   help=f"the N highest-scoring patches always written, blank or not ({TOP_PATCHES})")
    p.add_argument("--color-scale", choices=SCALES, default="auto",
                   help="heatmap colours: auto (0 to 1 for scores in [0, 1], else their range), fixed (0 to 1), "
                        "range (min to max), rank, log")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    from hrsel.cli import log_to_stderr, run_command

    args = parse_args(argv)
    log_to_stderr("%(message)s")
    return run_command(lambda: predict_command(args))


def predict_command(args: argparse.Namespace) -> int:
    from hrsel.inference import load_model, predict_sources
    from hrsel.inference.outputs import claim_output_folder

    with claim_output_folder(args.out):  # a file, a read-only folder, a busy one: named before any work
        model = load_model(args.run, checkpoint=args.checkpoint, device=args.device)
        result = predict_sources(model, args.inputs, out_dir=args.out, batch_size=args.batch_size,
                                 num_workers=args.num_workers, pictures=not args.no_pictures,
                                 gallery=args.gallery, progress=not args.no_progress, claim=False,
                                 split=args.split, all_patches=args.all_patches,
                                 top_patches=args.top_patches, color_scale=args.color_scale)
    print(f"predictions: {result.out_dir / 'predictions.csv'} ({len(result.rows)} image(s))")
    for split, metrics in (result.metrics or {}).items():
        print(f"metrics of the {split} rows: " + ", ".join(f"{k} {v:.4f}" for k, v in metrics.items()))
    if result.files.get("geojson"):
        print(f"maps: {len(result.files['geojson'])} GeoJSON, {len(result.files['zarr'])} OME-Zarr, "
              f"{len(result.files['picture'])} heatmap(s) in {result.out_dir}")
    return 0

if __name__ == "__main__":
    sys.exit(main())

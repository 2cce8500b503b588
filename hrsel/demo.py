"""`make demo`: train on small Megapixel MNIST canvases, then classify one huge canvas streamed from disk.

    python -m hrsel.demo                                  # configs/demo.yaml, a 20000x20000 canvas
    python -m hrsel.demo configs/demo.yaml --big-side 30000
    python -m hrsel.demo configs/demo.yaml --skip-train   # reuse the trained run
    python -m hrsel.demo configs/demo.yaml train.epochs=2 # overrides as for hrsel.train

0. Warm-starts the patch encoder on single digits of the train pool when the config names a
   model.backbone_options.weights_path that does not exist yet (`hrsel.engine.warm_start`; IPS
   trains it from scratch, which takes far longer than a demo). 1. Trains as
   `python -m hrsel.train CONFIG` does (a finished run of the same config is reused;
   `--overwrite` trains it again). 2. Writes one side x side Megapixel MNIST canvas (5 digits
   and IPS's noise density) as a tiled TIFF into the data folder, once. 3. Classifies it and one
   test image of the training size with the trained model, each in a fresh process so that each
   peak memory is its own, and prints labels, peak memories, times and where the pictures are.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any

DEFAULT_CONFIG = "configs/demo.yaml"


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m hrsel.demo", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("args", nargs="*", metavar="[CONFIG] [key.sub=value ...]",
                   help=f"a megapixel_mnist config (default {DEFAULT_CONFIG}) and hrsel.train overrides")
    p.add_argument("--big-side", type=int, default=20000, help="side of the big canvas in pixels (20000)")
    p.add_argument("--skip-train", action="store_true", help="use the run folder's trained model as it is")
    p.add_argument("--overwrite", action="store_true", help="train again over a finished run (hrsel.train's flag)")
    p.add_argument("--warm-steps", type=int, default=300,
                   help="steps of the patch encoder's warm start on single digits, when the config's "
                        "model.backbone_options.weights_path does not exist yet (300)")
    p.add_argument("--classify", nargs=3, metavar=("RUN", "IMAGE", "OUT"), help=argparse.SUPPRESS)  # worker mode
    return p.parse_intermixed_args(argv)


def main(argv: list[str] | None = None) -> int:
    from hrsel.cli import run_command

    args = parse_args(argv)
    if args.classify:
        return run_command(lambda: classify_worker(*args.classify))
    return run_command(lambda: demo_command(args))


def demo_command(args: argparse.Namespace) -> int:
    from hrsel.config import load_config
    from hrsel.errors import ConfigError, RunFolderError

    config = next((a for a in args.args if "=" not in a), DEFAULT_CONFIG)
    overrides = [a for a in args.args if "=" in a]
    extra = [a for a in args.args if "=" not in a and a != config]
    if extra:
        raise ConfigError(f"unexpected arguments {extra}; give one CONFIG file, then key.sub=value overrides")
    if args.big_side < 100:
        raise ConfigError(f"--big-side {args.big_side}: the big canvas needs at least 100 px")
    cfg = load_config(config, overrides)
    if cfg.data.name != "megapixel_mnist":
        raise ConfigError(f"{config}: data.name is {cfg.data.name!r}; the demo needs a megapixel_mnist config")
    pos = (cfg.model.options or {}).get("pos_encoding", "none")
    if pos not in (None, "none"):
        raise ConfigError(f"{config}: model.pos_encoding is {pos!r}: its table of model.num_positions grid cells "
                          f"fits the training canvas only, not a {args.big_side}x{args.big_side} one; the demo "
                          f"needs model.pos_encoding=none")
    run_dir = Path(cfg.run_dir)
    if args.skip_train:
        if not (run_dir / "best.pt").is_file():
            raise RunFolderError(f"--skip-train: {run_dir} holds no best.pt; run the demo without --skip-train")
    elif not args.overwrite and finished_run_of(cfg, run_dir):
        print(f"{run_dir} holds a finished run of this config: reusing it (--overwrite trains it again)")
    else:
        from hrsel import train
        from hrsel.engine.rundir import previous_results

        replace = args.overwrite or bool(previous_results(run_dir))
        if replace and not args.overwrite:  # e.g. the demo of an earlier hrsel: kept beside, never deleted
            print(f"{run_dir} holds an unfinished run or a run of another config: it moves to "
                  f"{run_dir.name}.replaced-<time>/ beside it and the demo trains again", flush=True)
        warm_start_if_missing(cfg, steps=args.warm_steps)
        status = train.train_command(train.parse_args([config, *overrides] + ["--overwrite"] * replace))
        if status:
            return status
    print_curve(run_dir)
    show_big_canvas(cfg, run_dir, side=args.big_side)
    return 0


def warm_start_if_missing(cfg: Any, *, steps: int) -> None:
    """Build the patch encoder's warm start the config names (model.backbone_options.weights_path) if absent."""
    from hrsel.engine.warm_start import ensure_warm_start, warm_start_path

    path = warm_start_path(cfg)
    if path is None or path.is_file():
        return
    print(f"warm start: the patch encoder learns to name single digits of the train pool ({steps} steps)",
          flush=True)
    report = ensure_warm_start(cfg, steps=steps, progress=True)
    print(f"warm start: {report['test_patch_accuracy']:.1%} of {report['test_patches']} patches of held-out "
          f"digits named right after {report['seconds']:.0f} s -> {path}", flush=True)


CURVE_TASKS = (("majority", "majority/accuracy"), ("max", "max/accuracy"), ("top", "top/accuracy"),
               ("multi exact", "multi/exact_match"))


def print_curve(run_dir: Path) -> None:
    """The learning curve of the run: held-out accuracy per evaluated epoch, then the test set's once."""
    import csv

    from hrsel.data.jsonfile import read_json

    rows = list(csv.DictReader((run_dir / "metrics.csv").open()))
    split = "val" if any(f"val/{CURVE_TASKS[0][1]}" in row for row in rows) else "test"
    tasks = [(name, key) for name, key in CURVE_TASKS if rows and f"{split}/{key}" in rows[0]]
    evaluated = [row for row in rows if row.get(f"{split}/{tasks[0][1]}")] if tasks else []
    if not evaluated:
        return
    which = "validation (held out of train)" if split == "val" else "test"
    print(f"learning curve, {which} accuracy after each evaluated epoch:")
    print(f"{'epoch':>7}{'minutes':>9}" + "".join(f"{name:>13}" for name, _ in tasks))
    minutes = 0.0
    for row in rows:
        minutes += float(row.get("epoch_s") or 0) / 60
        if row in evaluated:
            print(f"{row['epoch']:>7}{minutes:>9.1f}" + "".join(f"{float(row[f'{split}/{key}']):>13.3f}"
                                                              for _, key in tasks))
    final = run_dir / "test_metrics.json"
    if final.is_file():
        test = read_json(final, fix="train the demo again with --overwrite")
        values = test.get("metrics") or {}
        print(f"{'test':>16}" + "".join(f"{float(values.get(key) or 'nan'):>13.3f}" for _, key in tasks)
              + f"   ({test.get('weights', 'best.pt')}, once, on the {test.get('items', '?')} test images)")


def finished_run_of(cfg: Any, run_dir: Path) -> bool:
    """True when `run_dir` holds a finished run (best.pt, test_metrics.json) whose config.yaml is `cfg`."""
    from hrsel.config import dump_config, load_config

    saved = run_dir / "config.yaml"
    if not ((run_dir / "best.pt").is_file() and (run_dir / "test_metrics.json").is_file() and saved.is_file()):
        return False
    return dump_config(load_config(saved)) == dump_config(cfg)


# ---------------------------------------------------------------------------------------- the big canvas

def big_canvas(cfg: Any, side: int) -> tuple[Path, dict, float | None]:
    """(path, sidecar, seconds to write or None when reused) of the data folder's side x side canvas."""
    from hrsel.data.megapixel_mnist import read_parameters
    from hrsel.data.megapixel_mnist_gen import BIG_CANVAS_FORMAT, big_canvas_sidecar, write_big_canvas

    root = Path(cfg.data.root)
    path = root / f"big_canvas_{side}.tif"
    digits = "rendered" if read_parameters(root).get("digits") == "rendered" else "mnist"
    sidecar = big_canvas_sidecar(path)
    if path.is_file() and sidecar.is_file():
        meta = json.loads(sidecar.read_text())
        if meta.get("format") == BIG_CANVAS_FORMAT and meta.get("side") == side and meta.get("seed") == cfg.seed \
                and (meta.get("digits") == "rendered") == (digits == "rendered"):
            return path, meta, None
    start = time.perf_counter()
    mnist_dir = (cfg.data.generate or {}).get("mnist_dir")
    write_big_canvas(path, side=side, digits=digits, mnist_dir=mnist_dir, seed=cfg.seed, progress=True)
    return path, json.loads(sidecar.read_text()), time.perf_counter() - start


def show_big_canvas(cfg: Any, run_dir: Path, *, side: int) -> None:
    """Write (or reuse) the big canvas, classify it and a training-size test image, print the comparison."""
    from hrsel.data.jsonfile import read_json

    path, meta, wrote = big_canvas(cfg, side)
    how = "reused" if wrote is None else f"written in {wrote:.0f} s"
    print(f"big canvas: {path} ({side}x{side} px, 5 digits, {meta['n_noise']} noise patterns; {how})", flush=True)
    root = Path(cfg.data.root)
    small = root / "test" / "images.zarr" / "00000"
    small_labels = read_json(root / "test" / "labels.json", fix="regenerate the data set")
    out = run_dir / "demo"
    big = classify(run_dir, path, out / path.stem)
    little = classify(run_dir, small, out / "test_00000")
    tasks = [t for t in ("majority", "max", "top") if f"{t}/predicted" in big["row"]]
    print(f"{'':>22}" + "".join(f"{t:>10}" for t in tasks))
    print(f"{'big canvas predicted':>22}" + "".join(f"{big['row'][f'{t}/predicted']:>10}" for t in tasks))
    print(f"{'true':>22}" + "".join(f"{meta['labels'][t]:>10}" for t in tasks))
    (w, h), (sw, sh) = big["size"], little["size"]
    right = sum(str(little["row"].get(f"{t}/predicted")) == str(small_labels[t][0]) for t in tasks)
    print(f"test image {sw}x{sh} ({small}): {right} of {len(tasks)} labels right")
    print(f"peak memory classifying: {big['peak_mb']:.0f} MB for the {w}x{h} canvas, {little['peak_mb']:.0f} MB for a "
          f"{sw}x{sh} training image: {big['peak_mb'] / little['peak_mb']:.2f}x the memory for "
          f"{w * h / (sw * sh):.0f}x the pixels (resident memory of each process)")
    print(f"time: {big['seconds']:.0f} s for the {w}x{h} canvas ({big['patches']} patches), "
          f"{little['seconds']:.1f} s for the {sw}x{sh} image")
    print(f"heatmap, GeoJSON, score map of the big canvas: {out / path.stem}")
    print(f"selected patches of the training run: {run_dir / 'pictures'}")


def classify(run_dir: Path, image: Path, out: Path) -> dict:
    """Classify `image` in a fresh `python -m hrsel.demo --classify` process; its JSON report."""
    import subprocess

    from hrsel.errors import HrselError

    done = subprocess.run([sys.executable, "-m", "hrsel.demo", "--classify", str(run_dir), str(image), str(out)],
                          stdout=subprocess.PIPE, text=True)  # stderr (progress bars, errors) goes to the terminal
    lines = done.stdout.strip().splitlines()
    if done.returncode or not lines:
        raise HrselError(f"classifying {image} failed (exit status {done.returncode}); its output: "
                         f"{done.stdout.strip()[-500:]}")
    return json.loads(lines[-1])


def scored_patches(score_map: str | Path) -> int:
    """The patches with a score in a predict's `_scores.zarr` (the GeoJSON holds only the informative ones)."""
    import numpy as np
    import zarr

    return int(np.isfinite(zarr.open_group(str(score_map), mode="r")["0"][0]).sum())


def classify_worker(run: str, image: str, out: str) -> int:
    """Worker mode: predict one image into `out` and print one JSON line (row, size, seconds, peak RSS)."""
    from hrsel.inference import load_model, predict_sources
    from hrsel.io import open_image

    model = load_model(run, device=_device(run))
    start = time.perf_counter()
    result = predict_sources(model, [image], out_dir=out, progress=True)
    seconds = time.perf_counter() - start
    peak_mb = peak_rss_mb()
    maps = result.files.get("zarr") or []
    patches = scored_patches(maps[0]) if maps else 0
    row = {k: v for k, v in result.rows[0].items() if k.endswith("/predicted")}
    print(json.dumps({"row": row, "size": list(open_image(image).dimensions), "seconds": seconds,
                      "peak_mb": peak_mb, "patches": patches}))
    return 0


def peak_rss_mb() -> float:
    """This process's peak resident memory. On Linux from VmHWM: ru_maxrss survives exec, so a child
    of the (big) training process would report at least the parent's size at the fork."""
    import resource

    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024  # kB
    except OSError:
        pass
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # kilobytes on Linux
    return peak / 1024 if sys.platform == "darwin" else peak  # bytes on macOS


def _device(run: str) -> str:
    """The device of the run's config ("auto" when it says so); the demo runs on the CPU by default."""
    from hrsel.config import load_config

    saved = Path(run) / "config.yaml"
    return load_config(saved).device if saved.is_file() else "cpu"


if __name__ == "__main__":
    sys.exit(main())

"""Evaluate a run's checkpoint on its test or validation split.

    python -m hrsel.evaluate runs/mnist                          # best.pt on the test split
    python -m hrsel.evaluate runs/mnist --split val --checkpoint last
    python -m hrsel.evaluate runs/mnist --checkpoint runs/mnist/best.pt --device cuda --batch-size 32 --out eval/
    python -m hrsel.evaluate runs/mnist data.root=/mnt/data/megapixel_mnist    # the data moved

Writes RUN_DIR/eval_<split>_<checkpoint>.json (or into --out) with accuracy, balanced accuracy,
macro F1, AUC (binary tasks), the confusion matrices, and one confusion matrix picture per
multiclass task, and prints the metrics. The split is built and scored as the trainer does, so
`--split test --checkpoint best` reproduces test_metrics.json. `data.*` overrides (dotted keys as
in hrsel.train) change where and how the data is read, never the model. A bad run folder,
checkpoint, override or option stops with exit status 2.
"""
from __future__ import annotations

import argparse
import math
import sys




def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m hrsel.evaluate", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("run_dir", metavar="RUN_DIR", help="the run folder (output_dir/experiment, e.g. runs/mnist)")
    p.add_argument("overrides", nargs="*", metavar="data.key=value",
                   help="data.* overrides of the run's config, typed like the YAML value (e.g. data.root=PATH)")
    p.add_argument("--split", choices=("test", "val"), default="test",
                   help="test: the run's test split (data.eval_split); val: the set best.pt was selected on")
    p.add_argument("--checkpoint", default="best", metavar="best|last|PATH",
                   help="best.pt (default), last.pt or a checkpoint file")
    p.add_argument("--device", default="cpu", help="cpu (default), cuda, cuda:1, auto ...")
    p.add_argument("--batch-size", type=int, default=None,
                   help="images per forward pass (default: the run's data.eval_batch_size)")
    p.add_argument("--out", default=None, metavar="DIR", help="folder for the JSON and pictures (default: RUN_DIR)")
    return p.parse_intermixed_args(argv)


def print_report(report) -> None:
    record = report.record
    print(f"{record['checkpoint']} (step {record['checkpoint_step']}) on the {record['split']} split "
          f"{record['split_name']!r}: {record['items']} items")
    rows = [(key.rpartition("/")[0] or "-", key.rpartition("/")[2], value) for key, value in report.metrics.items()]
    width = max(len(r[0]) for r in rows)
    print(f"{'task':<{width}}  {'metric':<18}  value")
    for task, metric, value in rows:
        print(f"{task:<{width}}  {metric:<18}  {'n/a' if not math.isfinite(value) else f'{value:.4f}'}")
    print(f"metrics: {report.json_path}")
    for task, path in report.pictures.items():
        print(f"confusion matrix of {task}: {path}")


def main(argv: list[str] | None = None) -> int:
    from hrsel.cli import run_command

    args = parse_args(argv)
    return run_command(lambda: evaluate_command(args))


def evaluate_command(args: argparse.Namespace) -> int:
    from hrsel.engine.logbook import setup_logging
    from hrsel.inference.evaluate import evaluate_run

    setup_logging(None, is_main=True)
    report = evaluate_run(args.run_dir, split=args.split, checkpoint=args.checkpoint, device=args.device,
                          batch_size=args.batch_size, out_dir=args.out, overrides=args.overrides)
    print_report(report)
    return 0

if __name__ == "__main__":
    sys.exit(main())

"""Training speed of the demo's run: this checkout vs an older revision, at equal settings.

Both train the same config on the same data folder for `--steps` updates (`python -m hrsel.train`,
one fresh process per run, rounds interleaved, the order alternating); the older revision runs
from a `git worktree` of it. Per run: `ms_per_batch` (the trainer's step time: forward, backward,
update) and `epoch_s` (the epoch's wall clock, data loading included) from metrics.csv; the table
gives medians over rounds and the ratio head / base.

    python benchmarks/demo_speed.py --base 8ea8ef4 --json benchmarks/results/demo_speed_cpu.json
    python benchmarks/demo_speed.py --base 8ea8ef4 --set model.skip_blank=false --config configs/demo.yaml

`--config` is read from this checkout; keys the older revision does not know must be left out or
overridden (`--drop KEY` removes a model option before both runs).
"""
from __future__ import annotations

import argparse
import csv
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parents[1]


def settings(config: Path, drop: list[str], out: Path) -> Path:
    """A copy of `config` without the model options in `drop`, its data root made absolute."""
    raw = yaml.safe_load(config.read_text())
    for key in drop:
        raw.get("model", {}).pop(key, None)
    raw["data"]["root"] = str((REPO / raw["data"]["root"]).resolve())
    path = out / "settings.yaml"
    path.write_text(yaml.safe_dump(raw, sort_keys=False))
    return path


def run_once(tree: Path, config: Path, out: Path, name: str, steps: int, overrides: list[str]) -> dict:
    cmd = [sys.executable, "-m", "hrsel.train", str(config), f"experiment={name}", f"output_dir={out}",
           f"train.max_steps={steps}", "train.epochs=1", "train.progress_bar=false", "eval.pictures=0",
           "data.limit_eval=20", *overrides]
    env = dict(os.environ, PYTHONPATH=str(tree))
    start = time.perf_counter()
    done = subprocess.run(cmd, cwd=tree, env=env, capture_output=True, text=True)
    wall = time.perf_counter() - start
    if done.returncode:
        raise SystemExit(f"{name} failed (exit {done.returncode}):\n{done.stderr[-3000:]}")
    row = list(csv.DictReader((out / name / "metrics.csv").open()))[0]
    return {"ms_per_batch": float(row["ms_per_batch"]), "epoch_s": float(row["epoch_s"]), "process_s": wall}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--base", required=True, help="the older revision (a commit, tag or branch)")
    p.add_argument("--config", default="configs/demo.yaml")
    p.add_argument("--drop", action="append", default=[], help="a model option to leave out (repeatable)")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override for both runs")
    p.add_argument("--steps", type=int, default=60)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--json", default=str(REPO / "benchmarks/results/local/demo_speed_cpu.json"))
    args = p.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        base_tree = tmp / "base"
        subprocess.run(["git", "worktree", "add", "--detach", "-q", str(base_tree), args.base], cwd=REPO, check=True)
        try:
            config = settings(REPO / args.config, args.drop, tmp)
            trees = {"base": base_tree, "head": REPO}
            runs: dict[str, list[dict]] = {"base": [], "head": []}
            for r in range(args.rounds):
                for impl in (("base", "head") if r % 2 == 0 else ("head", "base")):
                    result = run_once(trees[impl], config, tmp / "runs", f"{impl}{r}", args.steps, args.set)
                    runs[impl].append(result)
                    print(f"round {r} {impl:5} {result['ms_per_batch']:8.1f} ms/batch  epoch {result['epoch_s']:6.1f} s",
                          flush=True)
        finally:
            subprocess.run(["git", "worktree", "remove", "--force", str(base_tree)], cwd=REPO, check=False)
    med = {impl: {k: statistics.median(r[k] for r in rows) for k in rows[0]} for impl, rows in runs.items()}
    record = {
        "config": args.config, "dropped": args.drop, "overrides": args.set, "steps": args.steps,
        "base": args.base, "head": subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=REPO,
                                                  capture_output=True, text=True).stdout.strip() + "+worktree",
        "machine": {"cpu_count": os.cpu_count(), "python": platform.python_version(),
                    "date": time.strftime("%Y-%m-%d %H:%M"), "load_avg": os.getloadavg()},
        "runs": runs, "median": med,
        "speedup_ms_per_batch": med["base"]["ms_per_batch"] / med["head"]["ms_per_batch"],
        "speedup_epoch_s": med["base"]["epoch_s"] / med["head"]["epoch_s"],
    }
    print(f"head is {record['speedup_ms_per_batch']:.2f}x faster per batch, {record['speedup_epoch_s']:.2f}x per epoch "
          f"(medians of {args.rounds} rounds)")
    Path(args.json).parent.mkdir(parents=True, exist_ok=True)
    Path(args.json).write_text(json.dumps(record, indent=1) + "\n")


if __name__ == "__main__":
    main()

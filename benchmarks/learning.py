"""Learning record: train named CPU-scale tasks through the real trainer, curves against steps and minutes.

    python benchmarks/learning.py --task mnist-s-ips                       # one task, its seeds, its time budget
    python benchmarks/learning.py --task billiard-s --minutes 100 --runs-dir runs/learning
    python benchmarks/learning.py --task sigma-ablation --seeds 0 1 2
    python benchmarks/learning.py --task mnist-s-ips --seeds 1 --add                # one more seed into its entry
    python benchmarks/learning.py --plot                                   # PNG of every task in the JSON
    python benchmarks/learning.py --task mnist-s-ips --dry-run --json /tmp/l.json   # tiny data, seconds

Each run is one subprocess `python -m hrsel.train CONFIG key=value ...` (one at a time, in sequence;
its output goes to RUNS_DIR/<experiment>.log). While it runs, its metrics.csv is polled and every
new row (one per epoch) is stamped with the minutes since the run started; rows that appear
together are spread back over their `epoch_s`. When the task's minutes are up (`--minutes`, the
task's budget shared by the runs still to go) the run gets SIGINT: the trainer saves last.pt and
stops, and the test split is then scored with best.pt (`python -m hrsel.evaluate`, not counted in
the run's minutes); the record says `"status": "time_limit"`. Data sets are built before the clock
starts (Megapixel MNIST by its generator, billiard by `hrsel.data.billiard_gen`).

The JSON (`--json`, default benchmarks/results/local/learning_cpu.json) is keyed by task, so tasks
run one by one accumulate; a task run again replaces its entry, unless `--add`: then the entry keeps its
recorded runs of the other seeds made with the same resolved config (`config_digest`), so that a task's
seeds can be trained in separate sittings (a seed run again replaces its run). Per task: target, metric, budget,
machine, date, `runs` (config, seed, command, status, minutes, rows [{step, epoch, minutes,
train_minutes, val/... , ...}], test metrics from test_metrics.json), `summary` (mean +- std of
the test metric over seeds, per config) and `met` (None until every config has as many seeds as the
task's own); the entry is written after every run (`"partial": true`
until the task's last), so stopping a task keeps its finished runs. `--dry-run` runs the tasks at tiny size into a
temporary folder (for tests); it never touches the configs' data folders.
"""
from __future__ import annotations

import argparse
import csv
import json
import math
import os
import platform
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Callable

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "benchmarks"))
from machine import describe  # noqa: E402

DEFAULT_JSON = REPO / "benchmarks" / "results" / "local" / "learning_cpu.json"
DRY_JSON = REPO / "benchmarks" / "results" / "local" / "learning_dry.json"  # --dry-run never mixes into the record
POLL_S = 2.0  # seconds between reads of metrics.csv
STOP_GRACE_S = 600.0  # seconds a run may take to save and leave after SIGINT (an evaluation in flight ends first)


def _in_repo(text: str) -> str:
    """Paths under the repository written relative to it: the record is committed, the checkout's place is not."""
    return text.replace(f"{REPO}{os.sep}", "")


# ----------------------------------------------------------------------------- the tasks

@dataclass(frozen=True)
class Target:
    """What a task must reach: `text` for people, `check(summary)` -> True / False (None: not enough runs).

    `summary`: config stem -> {"mean", "std", "n"} of the task metric on the test split.
    """

    text: str
    check: Callable[[dict[str, dict[str, float]]], bool | None]
    line: float | None = None  # drawn on the plot


def at_least(value: float) -> Target:
    def check(summary):
        means = [s["mean"] for s in summary.values() if s["n"]]
        return None if not means else all(m >= value for m in means)
    return Target(f">= {value:.0%} (test, mean over seeds)", check, value)


def billiard_target(summary) -> bool | None:
    tr, mean = summary.get("billiard_s_transformer", {}), summary.get("billiard_s_mean", {})
    if not tr.get("n") or not mean.get("n"):
        return None
    return tr["mean"] >= 0.80 and tr["mean"] - mean["mean"] >= 0.10


# DPS supplement table 1 (billiard, transformer): no decay + perturbed at test 91.5 +- 0.4 < no decay + hard
# 92.8 +- 0.4 < decay + hard 94.2 +- 0.2.
SIGMA_ORDER = ("billiard_s_nodecay_perturbed", "billiard_s_nodecay_hard", "billiard_s_decay_hard")


def in_order(summary, order=SIGMA_ORDER) -> bool | None:
    if not all(summary.get(name, {}).get("n") for name in order):
        return None
    means = [summary[name]["mean"] for name in order]
    return all(a < b for a, b in zip(means, means[1:]))


BILLIARD_TARGET = Target("transformer >= 80% and >= 10 points above mean", billiard_target, 0.80)
SIGMA_TARGET = Target("DPS supplement table 1 order: no decay + perturbed < no decay + hard < decay + hard "
                      "(mean of 3 seeds)", in_order)


@dataclass(frozen=True)
class Task:
    configs: tuple[str, ...]  # config stems under configs/
    target: Target
    metric: str  # task/metric, as in metrics.csv (val/<metric>) and test_metrics.json
    seeds: tuple[int, ...] = (0,)
    minutes: float = 120.0  # budget of the task's runs (configs x seeds), shared; --seeds pays its share
    overrides: tuple[str, ...] = ()  # added to every run
    data: dict[str, Any] = field(default_factory=dict)  # billiard: BilliardParameters to generate the data with
    note: str = ""
    suffix: str = ""  # of the run folders, where another task trains the same configs
    warm_steps: int = 300  # of the warm start its overrides name, when nobody built it yet


WARM_KEY = "model.backbone_options.weights_path"
WARM_MNIST_S = "data/warm_start/mnist_s_narrow_resnet16_patch50.pt"  # hrsel.engine.warm_start, seed of the first run
WARM_BILLIARD_S = "data/warm_start/billiard_s_narrow_resnet32_patch50.pt"
BILLIARD_S = {"size": 500, "n_train": 4000, "n_valid": 500, "n_test": 1000}
TASKS: dict[str, Task] = {
    "mnist-s-ips": Task(("mnist_s_ips",), at_least(0.90), "majority/accuracy", seeds=(0, 1, 2), minutes=360.0,
                        note="IPS, Megapixel MNIST 500x500, N = 100, M = 18; max/top/multi-exact reported"),
    "mnist-s-ips-warm": Task(("mnist_s_ips",), at_least(0.90), "majority/accuracy",
                             overrides=(f"{WARM_KEY}={WARM_MNIST_S}",), suffix="_warm",
                             note="mnist-s-ips with the patch encoder warm-started on single train-pool digits "
                                  "(hrsel.engine.warm_start, 300 steps, built before the clock starts); IPS "
                                  "trains it from scratch"),
    "mnist-s-dps": Task(("mnist_s_dps",), at_least(0.85), "majority/accuracy",
                        note="DPS perturbed top-K, sigma decayed, same data"),
    "mnist-s-dps-candidates": Task(("mnist_s_dps_candidates",), at_least(0.85), "majority/accuracy",
                                   note="perturbed top-K over streamed candidates, same data"),
    "billiard-s": Task(("billiard_s_transformer", "billiard_s_mean", "billiard_s_max", "billiard_s_ats"),
                       BILLIARD_TARGET, "max-left-right/accuracy", data=BILLIARD_S,
                       note="DPS + transformer vs mean vs max vs ATS on 500x500 billiard"),
    "billiard-s-warm": Task(("billiard_s_transformer", "billiard_s_mean", "billiard_s_max", "billiard_s_ats"),
                            BILLIARD_TARGET, "max-left-right/accuracy", data=BILLIARD_S,
                            overrides=(f"{WARM_KEY}={WARM_BILLIARD_S}",),
                            suffix="_warm", warm_steps=1500,  # 300 steps: 65% of held-out patches, 1500: 99.7%
                            note="billiard-s with the patch encoder warm-started on ball numbers of train images "
                                 "(hrsel.engine.warm_start, 1500 steps, built before the clock starts), every run "
                                 "from the same file; DPS trains its ResNet18 from the image labels alone"),
    "sigma-ablation": Task(SIGMA_ORDER, SIGMA_TARGET, "max-left-right/accuracy", seeds=(0, 1, 2), data=BILLIARD_S,
                           # 9 runs share 120 minutes: a shorter schedule, so that sigma's decay ends within a run
                           overrides=("train.epochs=6",),
                           note="sigma decay ablation on 500x500 billiard, 3 seeds per variant"),
    # From scratch, billiard-s stays at the prior within a CPU budget, so the ablation above could only compare
    # priors; this one starts every run from billiard-s-warm's ball-number encoder. (On 2026-12-03, at 0.9-1.1 s
    # per update, the budget stopped each run after 500 of its 750 updates: REPRODUCTION.md.)
    "sigma-ablation-warm": Task(SIGMA_ORDER, SIGMA_TARGET, "max-left-right/accuracy", seeds=(0, 1, 2), data=BILLIARD_S,
                                overrides=("train.epochs=6", f"{WARM_KEY}={WARM_BILLIARD_S}"),
                                suffix="_warm", warm_steps=1500,
                                note="sigma-ablation with the patch encoder warm-started on ball numbers (the file "
                                     "of billiard-s-warm), 3 seeds per variant, 6 epochs each"),
}

# --dry-run: tiny data in a temporary folder (200x200 images), two epochs (two rows), cheap operators.
DRY_SIDE = 200
DRY_DATA = {"megapixel_mnist": ("data.generate.n_train=8", "data.generate.n_test=2",
                                f"data.generate.width={DRY_SIDE}", f"data.generate.height={DRY_SIDE}"),
            "billiard": (f"data.padded_size={DRY_SIDE + 20}",)}
DRY_BILLIARD = {"size": DRY_SIDE, "n_train": 8, "n_valid": 2, "n_test": 2}
DRY_COMMON = ("data.batch_size=8", "data.eval_batch_size=8", "data.num_workers=0", "train.epochs=2",
              "train.eval_every=1", "eval.pictures=0")
DRY_WARM_STEPS = 3
DRY_MODEL = {"num_samples": 20}  # model option -> value, where the config has the option


def dry_grid(cfg) -> list[str]:
    """model.num_positions for the DRY_SIDE image (the scorer's cells or the patch grid), and a model.k that fits it."""
    if not cfg.model.options.get("num_positions"):
        return []
    cells = dry_cells(cfg)
    k = cfg.model.options.get("k")
    return [f"model.num_positions={cells}"] + ([f"model.k={cells // 2}"] if k is not None and k >= cells else [])


def dry_cells(cfg) -> int:
    """The scorer's cells (DPS, ATS) or the patch grid's cells of a DRY_SIDE image."""
    opts = cfg.model.options
    if cfg.model.name in ("dps", "ats"):
        import torch

        from hrsel.models.scorers import build_scorer

        scorer = build_scorer(opts.get("scorer", "dps"), in_chans=opts.get("in_chans", 3),
                              **(opts.get("scorer_options") or {}))
        side = DRY_SIDE // opts.get("downscale", 1)
        cells = scorer(torch.zeros(1, opts.get("in_chans", 3), side, side)).shape[1:].numel()
    else:
        stride = opts.get("stride") or opts["patch_size"]
        cells = ((DRY_SIDE - opts["patch_size"]) // stride + 1) ** 2
    return cells


# ----------------------------------------------------------------------------- one run

@dataclass
class RunPlan:
    task: str
    config: str  # stem
    seed: int
    overrides: list[str]
    run_dir: Path
    billiard: dict[str, Any] | None = None
    warm_steps: int = 300  # of a warm start the run's overrides name and nobody built yet

    @property
    def experiment(self) -> str:
        return self.run_dir.name

    def command(self) -> list[str]:
        return [sys.executable, "-m", "hrsel.train", str(Path("configs") / f"{self.config}.yaml"), *self.overrides,
                f"seed={self.seed}", f"experiment={self.experiment}", f"output_dir={self.run_dir.parent}",
                "train.progress_bar=false"]


def plan_runs(name: str, task: Task, *, seeds: list[int] | None, runs_dir: Path, dry_run: bool,
              dry_root: Path | None = None, extra: tuple[str, ...] = ()) -> list[RunPlan]:
    """The runs of a task in order: every config, each seed."""
    from hrsel.config import load_config

    plans = []
    for config in task.configs:
        cfg = load_config(REPO / "configs" / f"{config}.yaml")
        overrides = list(task.overrides)
        billiard = dict(task.data) if cfg.data.name == "billiard" else None
        if dry_run:
            root = dry_root / Path(cfg.data.root).name
            overrides += [f"data.root={root}", *DRY_DATA.get(cfg.data.name, ()), *DRY_COMMON]
            overrides += [f"model.{k}={v}" for k, v in DRY_MODEL.items() if k in cfg.model.options]
            overrides += dry_grid(cfg)
            billiard = dict(DRY_BILLIARD) if billiard is not None else None
            overrides = [f"{WARM_KEY}={dry_root / 'warm_start.pt'}" if o.startswith(WARM_KEY + "=") else o
                         for o in overrides]
        overrides += list(extra)  # --set: last, so they win
        for seed in seeds if seeds is not None else (task.seeds[:1] if dry_run else task.seeds):
            plans.append(RunPlan(name, config, seed, overrides, runs_dir / f"{config}{task.suffix}_s{seed}", billiard,
                                 warm_steps=DRY_WARM_STEPS if dry_run else task.warm_steps))
    return plans


def config_digest(plan: RunPlan) -> str:
    """12 hex digits of the run's resolved config without its seed and run folder: the seeds of one recipe
    share it, and `--add` keeps only runs that have it."""
    import hashlib

    from hrsel.config import load_config
    from hrsel.config.schema import to_dict

    resolved = to_dict(load_config(REPO / "configs" / f"{plan.config}.yaml", plan.overrides))
    for key in ("seed", "experiment", "output_dir"):
        resolved.pop(key, None)
    text = json.dumps(resolved, sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:12]


def prepare_data(plan: RunPlan) -> str:
    """Build the run's data set if its folder has none (before the clock starts); a note on what was done."""
    from hrsel.config import load_config
    from hrsel.engine.datagen import generate_dataset, needs_generation

    cfg = load_config(REPO / "configs" / f"{plan.config}.yaml", plan.overrides)
    root = cfg.data.root if os.path.isabs(cfg.data.root) else str(REPO / cfg.data.root)
    cfg.data.root = root  # a warm start reads the data where the trainer will
    note = f"{cfg.data.name} data in {root}"
    if cfg.data.name == "billiard":
        if not (Path(root) / "parameters.json").is_file():
            from hrsel.data.billiard_gen import BilliardParameters, generate_billiard

            generate_billiard(root, params=BilliardParameters(**(plan.billiard or {})),
                              workers=min(2, os.cpu_count() or 1), progress=False)
            note = f"billiard data generated into {root} ({plan.billiard})"
    elif cfg.data.generate_if_missing and needs_generation(cfg.data.name, root):
        workers = min(2, os.cpu_count() or 1)
        note = f"{cfg.data.name} generated into {root}: " + generate_dataset(
            cfg.data.name, root=root, **{**cfg.data.generate, "workers": workers})
    return note + warm_start_note(cfg, steps=plan.warm_steps)


def warm_start_note(cfg, *, steps: int) -> str:
    """Build the warm start the run's config names if it is missing (hrsel.engine.warm_start); a note on it."""
    from hrsel.engine.warm_start import ensure_warm_start, sidecar, warm_start_path

    path = warm_start_path(cfg)
    if path is None:
        return ""
    if not path.is_absolute():  # the trainer runs in REPO; build the file where it will look
        path = REPO / path
        cfg.model.options["backbone_options"]["weights_path"] = str(path)
    built = ensure_warm_start(cfg, steps=steps)
    report = built or (json.loads(sidecar(path).read_text()) if sidecar(path).is_file() else None)
    if report is None:
        return f"; patch encoder warm-started from {_in_repo(str(path))} (reused, no report beside it)"
    return (f"; patch encoder warm-started from {_in_repo(str(path))} ({'built' if built else 'reused'}: "
            f"{report['steps']} steps in {report['seconds']:.0f} s, {report['test_patch_accuracy']:.1%} of held-out "
            f"patches named right)")


def read_rows(path: Path) -> list[dict[str, Any]]:
    """metrics.csv -> rows of floats (empty cells dropped); [] while the file does not exist."""
    try:
        with open(path, newline="") as f:
            raw = list(csv.DictReader(f))
    except FileNotFoundError:
        return []
    rows = []
    for r in raw:
        row = {}
        for k, v in r.items():
            try:
                row[k] = float(v)
            except (TypeError, ValueError):
                continue
        rows.append(row)
    return rows


class FreshRows:
    """The rows of this run's metrics.csv: a file an earlier run left in the folder (the trainer's --overwrite
    moves it aside once it starts) is not read, or its rows would be stamped as this run's first minutes."""

    def __init__(self, path: Path) -> None:
        self.path, self.stale = path, _identity(path)

    def read(self) -> list[dict[str, Any]]:
        if self.stale is not None and _identity(self.path) == self.stale:
            return []
        return read_rows(self.path)


def _identity(path: Path) -> tuple[int, int, int] | None:
    try:
        st = path.stat()
    except FileNotFoundError:
        return None
    return st.st_ino, st.st_mtime_ns, st.st_size


class RowClock:
    """Stamps each new metrics.csv row with minutes since the run started.

    Rows that appear in one poll are spread back over the `epoch_s` of the rows after them, so minutes
    grow row by row; a row rewritten later (the final test/... columns) keeps its first stamp.
    """

    def __init__(self) -> None:
        self.stamps: dict[tuple[float, float], float] = {}

    def observe(self, rows: list[dict[str, Any]], minutes: float) -> None:
        new = [r for r in rows if (r.get("epoch"), r.get("step")) not in self.stamps]
        later = 0.0
        for r in reversed(new):
            self.stamps[(r.get("epoch"), r.get("step"))] = max(minutes - later / 60.0, 0.0)
            later += r.get("epoch_s", 0.0)

    def stamped(self, rows: list[dict[str, Any]], end_minutes: float) -> list[dict[str, Any]]:
        self.observe(rows, end_minutes)
        out, train_s = [], 0.0
        for r in rows:
            train_s += r.get("epoch_s", 0.0)
            out.append({"step": int(r.get("step", 0)), "epoch": int(r.get("epoch", 0)),
                        "minutes": round(self.stamps[(r.get("epoch"), r.get("step"))], 3),
                        "train_minutes": round(train_s / 60.0, 3),
                        **{k: v for k, v in r.items() if k not in ("step", "epoch")}})
        return out


def run_one(plan: RunPlan, *, limit_minutes: float | None, overwrite: bool, poll_s: float = POLL_S) -> dict[str, Any]:
    """Train one run in a subprocess, watching its metrics.csv; the run's record."""
    command = plan.command() + (["--overwrite"] if overwrite else [])
    plan.run_dir.parent.mkdir(parents=True, exist_ok=True)
    log_path = plan.run_dir.parent / f"{plan.experiment}.log"
    record: dict[str, Any] = {"config": f"configs/{plan.config}.yaml", "seed": plan.seed,
                              "config_digest": config_digest(plan),
                              "command": _in_repo(" ".join(["python"] + command[1:])),
                              "run_dir": _in_repo(str(plan.run_dir)), "log": _in_repo(str(log_path)),
                              "date": _now(), "data": _in_repo(prepare_data(plan)),
                              "limit_minutes": None if limit_minutes is None else round(limit_minutes, 2)}
    clock, metrics = RowClock(), FreshRows(plan.run_dir / "metrics.csv")
    started = time.monotonic()
    with open(log_path, "w") as log:
        child = subprocess.Popen(command, cwd=REPO, stdout=log, stderr=subprocess.STDOUT)
        status = "finished"
        try:
            while child.poll() is None:
                time.sleep(poll_s)
                minutes = (time.monotonic() - started) / 60.0
                clock.observe(metrics.read(), minutes)
                if limit_minutes is not None and minutes > limit_minutes and status == "finished":
                    status = "time_limit"
                    child.send_signal(signal.SIGINT)  # the trainer saves last.pt and stops between batches
                    stop_by = time.monotonic() + STOP_GRACE_S
                if status == "time_limit" and time.monotonic() > stop_by:
                    child.kill()  # did not stop within the grace period; last checkpoint kept
                    status = "killed"
        except KeyboardInterrupt:
            child.send_signal(signal.SIGINT)
            child.wait()
            status = "interrupted"
    minutes = (time.monotonic() - started) / 60.0
    rows = clock.stamped(metrics.read(), minutes)
    record.update(status=status, returncode=child.returncode, minutes=round(minutes, 3), rows=rows,
                  steps=rows[-1]["step"] if rows else 0)
    if status == "finished" and child.returncode != 0:
        record["status"] = "failed"
        record["error"] = _in_repo(_tail(log_path))  # the record is committed: no checkout paths
    record.update(test_metrics(plan.run_dir, log_path, scored_by_trainer=record["status"] == "finished"))
    return record


def test_metrics(run_dir: Path, log_path: Path, *, scored_by_trainer: bool) -> dict[str, Any]:
    """The run's test metrics: test_metrics.json, or (a run stopped early) best.pt scored by hrsel.evaluate."""
    done = run_dir / "test_metrics.json"
    if scored_by_trainer and done.is_file():
        data = json.loads(done.read_text())
        return {"test": data.get("metrics", {}), "test_source": "test_metrics.json", "best": data.get("best")}
    if not (run_dir / "best.pt").is_file():
        return {"test": {}, "test_source": "none: no best.pt (the run stopped before its first evaluation)"}
    started = time.monotonic()
    with open(log_path, "a") as log:
        code = subprocess.call([sys.executable, "-m", "hrsel.evaluate", str(run_dir), "--split", "test",
                                "--checkpoint", "best"], cwd=REPO, stdout=log, stderr=subprocess.STDOUT)
    out = run_dir / "eval_test_best.json"
    if code != 0 or not out.is_file():
        return {"test": {}, "test_source": f"hrsel.evaluate failed (exit {code}); see {_in_repo(str(log_path))}"}
    data = json.loads(out.read_text())
    return {"test": data.get("metrics", {}), "best": {"step": data.get("checkpoint_step"),
                                                        "epoch": data.get("checkpoint_epoch")},
            "test_source": f"best.pt scored by hrsel.evaluate after the stop "
                           f"({(time.monotonic() - started) / 60.0:.1f} min, not in the run's minutes)"}


# ----------------------------------------------------------------------------- a task

def summarize(runs: list[dict[str, Any]], metric: str) -> dict[str, dict[str, float]]:
    """config stem -> mean, std (sample, 0 for one run), n and values of the test metric over seeds."""
    values: dict[str, list[float]] = {}
    for r in runs:
        stem = Path(r["config"]).stem
        v = (r.get("test") or {}).get(metric)
        values.setdefault(stem, [])
        if v is not None and math.isfinite(v):
            values[stem].append(float(v))
    out = {}
    for stem, vs in values.items():
        n = len(vs)
        mean = sum(vs) / n if n else float("nan")
        std = math.sqrt(sum((v - mean) ** 2 for v in vs) / (n - 1)) if n > 1 else 0.0
        out[stem] = {"mean": mean if n else None, "std": std if n else None, "n": n, "values": vs}
    return out


def machine() -> dict[str, Any]:
    """benchmarks/machine.py's record (CPU model, ISA flags, oneDNN cap, ...): the trainings ran on this CPU."""
    return describe(processor=platform.processor() or platform.machine())


def run_task(name: str, *, seeds: list[int] | None, minutes: float | None, time_limit: bool, runs_dir: Path,
             dry_run: bool, overwrite: bool, dry_root: Path | None = None, poll_s: float = POLL_S,
             extra: tuple[str, ...] = (), save: Callable[[dict[str, Any]], None] | None = None,
             earlier: dict[str, Any] | None = None) -> dict[str, Any]:
    """Every run of the task in turn; `save` gets the entry so far after each run (a stopped task keeps
    its finished runs, with `"partial": true` until the last). `earlier`: the task's recorded entry, whose
    runs of other seeds with the same config digest are kept (`--add`)."""
    task = TASKS[name]
    plans = plan_runs(name, task, seeds=seeds, runs_dir=runs_dir, dry_run=dry_run, dry_root=dry_root, extra=extra)
    kept = kept_runs(earlier, plans)
    busy = [str(p.run_dir) for p in plans if (p.run_dir / "metrics.csv").exists()]
    if busy and not overwrite:
        raise SystemExit(_user_error(f"run folders already hold runs: {', '.join(busy)}; pass --overwrite (the "
                                     f"trainer moves them to <folder>.replaced-<time>) or choose --runs-dir"))
    budget = budget_share(task, len(plans)) if minutes is None else minutes
    entry = {"task": name, "note": task.note, "configs": [f"configs/{c}.yaml" for c in task.configs],
             "metric": task.metric, "target": task.target.text, "seeds": sorted({p.seed for p in plans}),
             "budget_minutes": budget if time_limit else None, "dry_run": dry_run, "extra_overrides": list(extra),
             "machine": machine(),
             "date": _now(), "runs": kept}
    if kept:
        entry["seeds"] = sorted({r["seed"] for r in kept} | set(entry["seeds"]))
        entry["added_to"] = earlier.get("date")
    spent, spent_before = 0.0, sum(r["minutes"] for r in kept)  # the budget is this sitting's
    for i, plan in enumerate(plans):
        limit = (budget - spent) / (len(plans) - i) if time_limit else None  # what is left, shared by the runs to go
        print(f"[{name}] {plan.experiment}: seed {plan.seed}"
              + (f", up to {limit:.1f} min" if limit is not None else ""), flush=True)
        record = run_one(plan, limit_minutes=limit, overwrite=overwrite, poll_s=poll_s)
        spent += record["minutes"]
        entry["runs"].append(record)
        value = record["test"].get(task.metric)
        print(f"[{name}] {plan.experiment}: {record['status']} after {record['minutes']:.1f} min, "
              f"{record['steps']} steps, test {task.metric} "
              + ("-" if value is None else f"{value:.4f}"), flush=True)
        last = i == len(plans) - 1 or record["status"] == "interrupted"
        conclude(entry, task, spent_before + spent, partial=not last, seeds_needed=1 if dry_run else len(task.seeds))
        if save is not None:
            save(entry)
        if record["status"] == "interrupted":
            break
    return entry


def budget_share(task: Task, runs: int) -> float:
    """Minutes for `runs` of the task's runs: its budget over its configs x seeds, so that --seeds pays its share."""
    return task.minutes * runs / (len(task.configs) * len(task.seeds))


def kept_runs(earlier: dict[str, Any] | None, plans: list[RunPlan]) -> list[dict[str, Any]]:
    """The runs of `earlier` made with a planned config's digest whose seed is not planned again."""
    if not earlier:
        return []
    digests = {f"configs/{p.config}.yaml": config_digest(p) for p in plans}
    planned = {(f"configs/{p.config}.yaml", p.seed) for p in plans}
    kept, dropped = [], []
    for r in earlier.get("runs", []):
        if (r["config"], r["seed"]) in planned:
            continue  # run again: its new run replaces it
        same = r.get("config_digest") == digests.get(r["config"])
        (kept if same else dropped).append(dict(r))
    for r in kept:  # made in another sitting, perhaps on another CPU
        r.setdefault("machine", earlier.get("machine"))
    if dropped:  # a recipe changed since (config file, overrides or a new config key's default): say so
        print(f"--add: not keeping {len(dropped)} recorded run(s) made with another resolved config: "
              + ", ".join(f"{Path(r['config']).stem} seed {r['seed']} (digest {r.get('config_digest') or 'none'}, "
                          f"now {digests.get(r['config'], 'not planned')})" for r in dropped)
              + "; rerun their seeds with this config to include them", flush=True)
    return kept


def conclude(entry: dict[str, Any], task: Task, spent: float, *, partial: bool, seeds_needed: int = 1) -> None:
    """Summary, target and minutes of the runs in `entry` so far; the target is open (None) while a config
    has fewer than `seeds_needed` seeds with a test value (the task's own count, 1 in a dry run)."""
    entry["summary"] = summarize(entry["runs"], task.metric)
    enough = all(entry["summary"].get(c, {}).get("n", 0) >= seeds_needed for c in task.configs)
    entry["met"] = None if partial or not enough else task.target.check(entry["summary"])
    entry["partial"] = partial
    for record in entry["runs"]:  # a single-config task's target applies to each run
        value = record["test"].get(task.metric)
        record["target"] = task.target.text
        record["met"] = (None if value is None or task.target.line is None or len(task.configs) > 1
                         else value >= task.target.line)
    entry["minutes"] = round(spent, 2)


def recorded(path: Path, task: str) -> dict[str, Any] | None:
    """The task's entry in the JSON at `path`, if any."""
    return json.loads(path.read_text()).get(task) if path.is_file() else None


def merge_json(path: Path, entry: dict[str, Any]) -> None:
    """Replace the task's entry in the JSON (keyed by task), keeping the others; written atomically."""
    data = json.loads(path.read_text()) if path.is_file() else {}
    data[entry["task"]] = entry
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps(data, indent=1, allow_nan=False, default=_finite) + "\n")
    os.replace(tmp, path)


# ----------------------------------------------------------------------------- the figure

def plot(path: Path, out: Path) -> Path:
    """One row of panels per task: the validation metric against steps and against minutes."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    data = json.loads(path.read_text())
    tasks = [t for t in data.values() if t.get("runs")]
    if not tasks:
        raise SystemExit(_user_error(f"{path} holds no runs to plot; run a task first"))
    fig, axes = plt.subplots(len(tasks), 2, figsize=(11, 3.2 * len(tasks)), squeeze=False)
    for row, task in zip(axes, tasks):
        key = f"val/{task['metric']}"
        for run in task["runs"]:
            points = [(r["step"], r["minutes"], r[key]) for r in run["rows"] if r.get(key) is not None]
            label = f"{Path(run['config']).stem} s{run['seed']}"
            test = run["test"].get(task["metric"])
            if test is not None:
                label += f" (test {test:.3f})"
            for ax, i in zip(row, (0, 1)):
                ax.plot([p[i] for p in points], [p[2] for p in points], marker=".", label=label)
        line = TASKS[task["task"]].target.line if task["task"] in TASKS else None
        for ax, xlabel in zip(row, ("step", "minutes")):
            if line is not None:
                ax.axhline(line, color="grey", ls="--", lw=0.8)
            ax.set_xlabel(xlabel)
            ax.set_ylabel(key)
            ax.set_ylim(0, 1.02)
            ax.grid(alpha=0.3)
        met = {True: "met", False: "not met", None: "open"}[task.get("met")]
        row[0].set_title(f"{task['task']}: target {task['target']} ({met})", fontsize=9, loc="left")
        row[1].legend(fontsize=7, loc="lower right")
    fig.tight_layout()
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return out


# ----------------------------------------------------------------------------- CLI

def _now() -> str:
    return datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


def _tail(path: Path, chars: int = 3000) -> str:
    try:
        return path.read_text(errors="replace")[-chars:]
    except OSError:
        return ""


def _finite(value: Any) -> Any:
    raise TypeError(f"not JSON serialisable: {value!r}")


def _user_error(message: str) -> int:
    print(f"error: {message}", file=sys.stderr)
    return 2


def _clean(entry: Any) -> Any:
    """NaN / inf -> None, so that the JSON stays strict."""
    if isinstance(entry, float):
        return entry if math.isfinite(entry) else None
    if isinstance(entry, dict):
        return {k: _clean(v) for k, v in entry.items()}
    if isinstance(entry, list):
        return [_clean(v) for v in entry]
    return entry


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter,
                                epilog="tasks: " + "; ".join(f"{k} ({', '.join(t.configs)})" for k, t in TASKS.items()))
    p.add_argument("--task", nargs="+", default=[], metavar="NAME", help=f"task(s) to run: {', '.join(TASKS)}, or all")
    p.add_argument("--seeds", nargs="+", type=int, default=None,
                   help="seeds (default: the task's; --dry-run: its first)")
    p.add_argument("--minutes", type=float, default=None,
                   help="time budget of each task, shared by its runs (default: the task's share for the runs "
                        "asked for; mnist-s-ips: 120 per seed, the others 120 for all their runs)")
    p.add_argument("--time-limit", action=argparse.BooleanOptionalAction, default=True,
                   help="stop a run with SIGINT when its share of the budget is spent (default on)")
    p.add_argument("--runs-dir", type=Path, default=Path("runs/learning"), help="parent of the run folders")
    p.add_argument("--json", type=Path, default=None,
                   help=f"the record, keyed by task (merged into; default {DEFAULT_JSON.relative_to(REPO)}, "
                        f"--dry-run: {DRY_JSON.relative_to(REPO)})")
    p.add_argument("--plot", action="store_true", help="write the curves of every task in --json as a PNG")
    p.add_argument("--png", type=Path, default=None, help="where --plot writes (default: --json with .png)")
    p.add_argument("--set", nargs="+", default=[], metavar="KEY=VALUE",
                   help="overrides added to every run of the task(s), after the task's own (e.g. optim.lr=3e-3)")
    p.add_argument("--dry-run", action="store_true", help="tiny data in a temporary folder, 2 epochs: a smoke test")
    p.add_argument("--overwrite", action="store_true", help="start over in run folders that hold runs")
    p.add_argument("--add", action="store_true",
                   help="keep the task's recorded runs of other seeds made with the same resolved config")
    p.add_argument("--poll", type=float, default=POLL_S, help="seconds between reads of metrics.csv")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    args.json = args.json or (DRY_JSON if args.dry_run else DEFAULT_JSON)
    names = list(TASKS) if args.task == ["all"] else args.task
    unknown = [n for n in names if n not in TASKS]
    if unknown:
        return _user_error(f"unknown task(s) {unknown}; valid: {', '.join(TASKS)}, all")
    if not names and not args.plot:
        return _user_error("nothing to do: give --task NAME (and/or --plot)")
    bad = [o for o in args.set if "=" not in o]
    if bad:
        return _user_error(f"--set takes KEY=VALUE overrides; got {bad}")
    if args.minutes is not None and args.minutes <= 0:
        return _user_error(f"--minutes {args.minutes} must be positive")
    runs_dir = args.runs_dir if args.runs_dir.is_absolute() else REPO / args.runs_dir
    status = 0
    with tempfile.TemporaryDirectory(prefix="hrsel_learning_") as tmp:
        if args.dry_run and args.runs_dir == Path("runs/learning"):
            runs_dir = Path(tmp) / "runs"
        for name in names:
            try:
                entry = run_task(name, seeds=args.seeds, minutes=args.minutes, time_limit=args.time_limit,
                                 runs_dir=runs_dir, dry_run=args.dry_run, overwrite=args.overwrite or args.dry_run,
                                 dry_root=Path(tmp) / "data", poll_s=args.poll, extra=tuple(args.set),
                                 save=lambda e: merge_json(args.json, _clean(e)),
                                 earlier=recorded(args.json, name) if args.add else None)
            except SystemExit as e:
                return int(e.code or 2)
            print(f"[{name}] target {entry['target']}: {({True: 'met', False: 'not met', None: 'open'})[entry['met']]}"
                  f"; {args.json}", flush=True)
            for stem, s in entry["summary"].items():
                if s["n"]:
                    print(f"  {stem}: {s['mean']:.4f} +- {s['std']:.4f} over {s['n']} seed(s)")
            if any(r["status"] in ("failed", "killed") for r in entry["runs"]):
                status = 1
            if any(r["status"] == "interrupted" for r in entry["runs"]):
                return 130
    if args.plot:
        if not args.json.is_file():
            return _user_error(f"{args.json} does not exist; run a task first (--task NAME)")
        print(f"wrote {plot(args.json, args.png or args.json.with_suffix('.png'))}")
    return status


if __name__ == "__main__":
    sys.exit(main())

"""benchmarks/learning.py: the learning record's dry run through the real trainer, its JSON, PNG and summaries."""
from __future__ import annotations

import importlib.util
import json
import math
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


def load_learning():
    spec = importlib.util.spec_from_file_location("bench_learning", REPO / "benchmarks" / "learning.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up while the file runs
    spec.loader.exec_module(module)
    return module


learning = load_learning()


@pytest.fixture
def single_thread(monkeypatch):
    """The trainer subprocesses inherit one thread each: tiny runs on a shared 2-core machine go faster."""
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    monkeypatch.setenv("MKL_NUM_THREADS", "1")


def check_runs(entry: dict, metric: str, configs: list[str]) -> None:
    assert [Path(r["config"]).stem for r in entry["runs"]] == configs
    for run in entry["runs"]:
        assert run["status"] == "finished" and run["returncode"] == 0, run.get("error")
        rows = run["rows"]
        assert len(rows) == 2, rows  # two epochs, one row each
        steps, minutes = [r["step"] for r in rows], [r["minutes"] for r in rows]
        assert steps == sorted(steps) and steps[0] < steps[-1] and steps[0] > 0, steps
        assert all(m > 0 for m in minutes) and minutes[0] < minutes[-1], minutes
        assert [r["train_minutes"] for r in rows] == sorted(r["train_minutes"] for r in rows)
        for r in rows:
            assert 0.0 <= r[f"val/{metric}"] <= 1.0, r
        assert run["test_source"] == "test_metrics.json"
        assert 0.0 <= run["test"][metric] <= 1.0
        assert run["command"].startswith("python -m hrsel.train configs/") and f"seed={run['seed']}" in run["command"]
        assert run["minutes"] >= minutes[-1]


def test_dry_run_mnist_and_billiard_write_json_and_png(tmp_path, single_thread, capsys):
    out = tmp_path / "learning.json"
    out.write_text(json.dumps({"earlier-task": {"task": "earlier-task", "runs": []}}))  # kept by the merge
    code = learning.main(["--task", "mnist-s-ips", "mnist-s-ips-warm", "--dry-run", "--json", str(out),
                          "--poll", "0.2", "--runs-dir", str(tmp_path / "runs")])
    assert code == 0, capsys.readouterr().err[-3000:]
    code = learning.main(["--task", "billiard-s", "--dry-run", "--json", str(out), "--poll", "0.2", "--seeds", "1",
                          "--runs-dir", str(tmp_path / "runs"), "--plot"])
    assert code == 0, capsys.readouterr().err[-3000:]

    data = json.loads(out.read_text())
    assert set(data) == {"earlier-task", "mnist-s-ips", "mnist-s-ips-warm", "billiard-s"}
    warm = data["mnist-s-ips-warm"]  # the same config from a warm-started encoder, in its own run folder
    check_runs(warm, "majority/accuracy", ["mnist_s_ips"])
    assert warm["runs"][0]["run_dir"].endswith("mnist_s_ips_warm_s0")
    assert "patch encoder warm-started from" in warm["runs"][0]["data"] and "(built: 3 steps" in warm["runs"][0]["data"]
    weights = next(a for a in warm["runs"][0]["command"].split() if a.startswith(learning.WARM_KEY + "="))
    weights = Path(weights.split("=", 1)[1])  # built in the dry run's folder, not the repository's data/
    assert weights.is_absolute() and REPO not in weights.parents and weights.name == "warm_start.pt", weights
    ips = data["mnist-s-ips"]
    check_runs(ips, "majority/accuracy", ["mnist_s_ips"])
    assert {"max/accuracy", "top/accuracy", "multi/exact_match"} <= set(ips["runs"][0]["test"])
    assert ips["machine"]["cpu_count"] >= 1 and ips["machine"]["torch"] and ips["dry_run"] is True
    assert ips["machine"]["cpu_model"] and "isa_flags" in ips["machine"]  # figures depend on the CPU's ISA
    assert ips["met"] in (True, False) and ips["runs"][0]["met"] in (True, False) and ips["partial"] is False
    billiard = data["billiard-s"]
    check_runs(billiard, "max-left-right/accuracy",
               ["billiard_s_transformer", "billiard_s_mean", "billiard_s_max", "billiard_s_ats"])
    assert {r["seed"] for r in billiard["runs"]} == {1}
    assert set(billiard["summary"]) == {"billiard_s_transformer", "billiard_s_mean", "billiard_s_max",
                                        "billiard_s_ats"}
    png = out.with_suffix(".png")
    assert png.stat().st_size > 10_000 and png.read_bytes()[:4] == b"\x89PNG"
    for run in ips["runs"] + billiard["runs"]:  # a dry run never writes into the configs' data folders
        root = next(a for a in run["command"].split() if a.startswith("data.root="))
        assert not root.startswith(f"data.root={REPO}") and "data/" not in root[:15], root


def test_summary_and_sigma_order():
    def run(stem, seed, value):
        return {"config": f"configs/{stem}.yaml", "seed": seed, "test": {"m": value}}

    runs = [run("billiard_s_nodecay_perturbed", s, v) for s, v in enumerate((0.50, 0.52, 0.54))]
    runs += [run("billiard_s_nodecay_hard", s, v) for s, v in enumerate((0.60, 0.62, 0.64))]
    runs += [run("billiard_s_decay_hard", s, v) for s, v in enumerate((0.70, 0.72, None))]
    summary = learning.summarize(runs, "m")
    assert summary["billiard_s_nodecay_hard"]["mean"] == pytest.approx(0.62)
    assert summary["billiard_s_nodecay_hard"]["std"] == pytest.approx(0.02)
    assert summary["billiard_s_decay_hard"]["n"] == 2  # a run without a test value is not counted
    assert learning.in_order(summary) is True
    assert learning.TASKS["sigma-ablation"].target.check(summary) is True
    summary["billiard_s_nodecay_hard"]["mean"] = 0.80
    assert learning.in_order(summary) is False
    del summary["billiard_s_decay_hard"]
    assert learning.in_order(summary) is None  # not all variants ran: open

    billiard = learning.TASKS["billiard-s"].target.check
    assert billiard({"billiard_s_transformer": {"mean": 0.85, "n": 1}, "billiard_s_mean": {"mean": 0.70, "n": 1}})
    assert not billiard({"billiard_s_transformer": {"mean": 0.85, "n": 1}, "billiard_s_mean": {"mean": 0.80, "n": 1}})
    assert not billiard({"billiard_s_transformer": {"mean": 0.79, "n": 1}, "billiard_s_mean": {"mean": 0.5, "n": 1}})


def test_row_clock_spreads_rows_seen_together():
    clock = learning.RowClock()
    rows = [{"epoch": 1.0, "step": 10.0, "epoch_s": 60.0}, {"epoch": 2.0, "step": 20.0, "epoch_s": 120.0}]
    clock.observe(rows[:0], 0.5)
    clock.observe(rows, 5.0)  # both appeared in one poll: the first was written 2 minutes before the second
    final = clock.stamped(rows + [{"epoch": 3.0, "step": 30.0, "epoch_s": 60.0}], 7.0)
    assert [r["minutes"] for r in final] == [3.0, 5.0, 7.0]
    assert [r["train_minutes"] for r in final] == [1.0, 3.0, 4.0]
    assert [r["step"] for r in final] == [10, 20, 30]


def test_every_task_config_exists_and_bad_arguments_exit_2(tmp_path, capsys):
    for name, task in learning.TASKS.items():
        for config in task.configs:
            assert (REPO / "configs" / f"{config}.yaml").is_file(), (name, config)
        assert task.metric and task.minutes / (len(task.configs) * len(task.seeds)) <= 120  # per run
    assert learning.TASKS["sigma-ablation"].seeds == (0, 1, 2)
    assert learning.main(["--task", "no-such-task"]) == 2
    assert "no-such-task" in capsys.readouterr().err
    assert learning.main([]) == 2
    assert learning.main(["--plot", "--json", str(tmp_path / "missing.json")]) == 2
    assert learning.main(["--task", "mnist-s-ips", "--set", "optim.lr"]) == 2
    assert not math.isnan(learning.TASKS["mnist-s-ips"].target.line)


def test_fresh_rows_skip_the_metrics_an_earlier_run_left(tmp_path):
    # --overwrite: the old metrics.csv stays until the trainer moves its folder aside; its rows are not this run's
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    (run_dir / "metrics.csv").write_text("epoch,step,epoch_s\n1,10,60\n2,20,60\n3,30,60\n")
    rows = learning.FreshRows(run_dir / "metrics.csv")
    assert rows.read() == []
    run_dir.rename(tmp_path / "run.replaced-1")  # what the trainer does, then it writes its own file
    run_dir.mkdir()
    assert rows.read() == []
    (run_dir / "metrics.csv").write_text("epoch,step,epoch_s\n1,10,55\n")
    assert rows.read() == [{"epoch": 1.0, "step": 10.0, "epoch_s": 55.0}]
    assert learning.FreshRows(tmp_path / "none" / "metrics.csv").read() == []


def test_billiard_warm_task_builds_its_ball_warm_start_from_the_runs_data(tmp_path, single_thread):
    task = learning.TASKS["billiard-s-warm"]
    plans = learning.plan_runs("billiard-s-warm", task, seeds=[1], runs_dir=tmp_path / "runs", dry_run=True,
                               dry_root=tmp_path / "dry")
    assert [p.config for p in plans] == list(task.configs) and plans[0].run_dir.name == "billiard_s_transformer_warm_s1"
    note = learning.prepare_data(plans[0])  # generates the tiny billiard set, then the warm start on it
    weights = tmp_path / "dry" / "warm_start.pt"
    assert f"{learning.WARM_KEY}={weights}" in plans[0].command()
    assert weights.is_file() and "billiard data generated into" in note and "(built: 3 steps" in note, note
    report = json.loads((tmp_path / "dry" / "warm_start.pt.json").read_text())
    assert report["billiard_root"] == str(tmp_path / "dry" / "billiard_500") and report["train_images"] == 8
    assert "(reused:" in learning.prepare_data(plans[1])  # the other configs start from the same file


def test_each_task_trains_into_run_folders_of_its_own(tmp_path):
    # two tasks sharing a folder would refuse (or, with --overwrite, replace) each other's runs
    owner = {}
    for name, task in learning.TASKS.items():
        for plan in learning.plan_runs(name, task, seeds=None, runs_dir=tmp_path, dry_run=False):
            assert plan.run_dir not in owner, (name, owner.get(plan.run_dir), plan.run_dir.name)
            owner[plan.run_dir] = name
    warm = learning.plan_runs("sigma-ablation-warm", learning.TASKS["sigma-ablation-warm"], seeds=None,
                              runs_dir=tmp_path, dry_run=False)
    assert len(warm) == 9 and {p.seed for p in warm} == {0, 1, 2}
    for plan in warm:  # the ablation's short schedule, from the encoder billiard-s-warm uses
        assert "train.epochs=6" in plan.command() and plan.warm_steps == learning.TASKS["billiard-s-warm"].warm_steps
        assert f"{learning.WARM_KEY}={learning.WARM_BILLIARD_S}" in plan.command()


def test_dry_runs_fit_every_config_s_selection_into_the_small_grid(tmp_path):
    # a 200x200 dry image has 16 patches of 50: a config keeping more (mnist_s_ips: M = 18) would refuse to start
    from hrsel.config import load_config

    for name, task in learning.TASKS.items():
        for plan in learning.plan_runs(name, task, seeds=None, runs_dir=tmp_path, dry_run=True, dry_root=tmp_path):
            cfg = load_config(REPO / "configs" / f"{plan.config}.yaml", list(plan.overrides))
            cells, k = cfg.model.options.get("num_positions"), cfg.model.options.get("k")
            if cells and k is not None:
                assert k < cells, (name, plan.config, k, cells)
    ips = learning.plan_runs("mnist-s-ips", learning.TASKS["mnist-s-ips"], seeds=[0], runs_dir=tmp_path,
                             dry_run=True, dry_root=tmp_path)[0]
    assert "model.num_positions=16" in ips.overrides and "model.k=8" in ips.overrides


def test_a_task_is_saved_after_every_run_so_a_stopped_task_keeps_its_seeds(tmp_path, monkeypatch):
    values = iter([0.5, 0.7, 0.9])

    def fake_run(plan, **_):
        return {"config": f"configs/{plan.config}.yaml", "seed": plan.seed, "status": "finished", "minutes": 2.0,
                "steps": 10, "rows": [], "test": {"majority/accuracy": next(values)}}

    monkeypatch.setattr(learning, "run_one", fake_run)
    saved = []
    learning.run_task("mnist-s-ips", seeds=[0, 1, 2], minutes=None, time_limit=True, runs_dir=tmp_path,
                      dry_run=False, overwrite=False, save=lambda e: saved.append(json.loads(json.dumps(e))))
    assert [len(e["runs"]) for e in saved] == [1, 2, 3]
    assert [e["partial"] for e in saved] == [True, True, False]
    assert [e["met"] for e in saved] == [None, None, False]  # mean 0.7 < 0.9, judged only when all ran
    assert saved[1]["summary"]["mnist_s_ips"]["values"] == [0.5, 0.7] and saved[1]["minutes"] == 4.0


def test_add_keeps_other_seeds_of_the_same_recipe_only(tmp_path, capsys):
    # --add: a task's seeds trained in separate sittings land in one entry; a changed recipe does not mix in
    task = learning.TASKS["mnist-s-ips"]
    plan = lambda seeds, extra=(): learning.plan_runs("mnist-s-ips", task, seeds=seeds, runs_dir=tmp_path,
                                                       dry_run=True, dry_root=tmp_path, extra=extra)
    (seed0,), (seed1,) = plan([0]), plan([1])
    digest = learning.config_digest(seed0)
    assert digest == learning.config_digest(seed1)  # the seed is not part of the recipe
    assert digest != learning.config_digest(plan([0], ("optim.lr=0.003",))[0])

    def run(seed, digest, minutes=10.0, value=0.5):
        return {"config": "configs/mnist_s_ips.yaml", "seed": seed, "config_digest": digest, "minutes": minutes,
                "test": {"majority/accuracy": value}}

    earlier = {"date": "then", "machine": {"cpu_model": "elsewhere"},
               "runs": [run(0, digest), run(1, digest), run(2, "0" * 12)]}
    kept = learning.kept_runs(earlier, [seed1])
    assert [r["seed"] for r in kept] == [0]  # seed 1 is run again; seed 2 was another recipe
    assert "not keeping 1 recorded run(s)" in capsys.readouterr().out  # the dropped seed 2 is named
    assert kept[0]["machine"] == {"cpu_model": "elsewhere"} and "machine" not in earlier["runs"][0]
    assert learning.kept_runs(None, [seed1]) == []
    assert learning.budget_share(task, 1) == 120.0 and learning.budget_share(task, 3) == 360.0  # 120 per seed
    assert learning.budget_share(learning.TASKS["billiard-s"], 4) == 120.0  # 4 configs share 120

    entry = {"runs": [run(0, digest, value=0.95), run(1, digest, value=0.93)]}
    learning.conclude(entry, task, 20.0, partial=False, seeds_needed=3)
    assert entry["met"] is None and entry["summary"]["mnist_s_ips"]["n"] == 2  # 2 of the task's 3 seeds: open
    entry["runs"].append(run(2, digest, value=0.91))
    learning.conclude(entry, task, 30.0, partial=False, seeds_needed=3)
    assert entry["met"] is True and entry["minutes"] == 30.0
    entry["runs"][2]["test"]["majority/accuracy"] = 0.5
    learning.conclude(entry, task, 30.0, partial=False, seeds_needed=3)
    assert entry["met"] is False

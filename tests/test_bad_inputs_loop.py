"""Faults inside the training loop: signals, non-finite losses and models, failed writes, crashes.

Each case runs a tiny in-process Trainer (16 training items, 4 batches an epoch, a
BatchNorm layer whose running statistics make a missed or doubled batch visible) and
asserts the error type, that the message names the run folder / file / config key,
and that nothing on disk was lost: the checkpoint files are byte-identical to what
they were before the fault, and a resumed run writes the same metrics.csv rows, test
metrics and weights as an uninterrupted one.
"""
from __future__ import annotations

import csv
import errno
import json
import logging
import os
import signal
from pathlib import Path

import pytest
import torch
from torch import nn

from hrsel.config import Config, load_config
from hrsel.engine import checkpoint as ckpt
from hrsel.engine import logbook
from hrsel.engine.distributed import DistInfo
from hrsel.engine.loop import Interrupted, NonFiniteLossError, Trainer
from hrsel.errors import ConfigError, HrselError, RunWriteError
from hrsel.models.pipeline import Pipeline, PipelineOutput
from hrsel.tasks import TaskSpec

TASKS = {"c": TaskSpec("multiclass", 2)}
TIMING = {"ms_per_batch", "images_per_s", "patches_per_s", "peak_memory_mb", "epoch_s"}
FILES = (ckpt.LAST, ckpt.BEST, "metrics.csv")


class _Net(Pipeline):
    """(B, 3) -> Linear -> BatchNorm -> ReLU -> Dropout -> Linear; `spare` is never used in forward."""

    def __init__(self, *, nan_input_at=(), poison_spare_at=0, bn=True):
        super().__init__()
        self.lin1, self.drop, self.lin2 = nn.Linear(3, 8), nn.Dropout(0.2), nn.Linear(8, 2)
        self.norm = nn.BatchNorm1d(8) if bn else nn.Identity()
        self.spare = nn.Linear(2, 2)  # a parameter that can turn inf while the loss stays finite
        self.nan_input_at, self.poison_spare_at, self.calls = set(nan_input_at), poison_spare_at, 0

    def forward(self, images):
        if self.training:
            self.calls += 1
            if self.calls in self.nan_input_at:
                images = images * float("nan")  # nan reaches the BatchNorm running statistics
            if self.calls == self.poison_spare_at:
                with torch.no_grad():
                    self.spare.weight.fill_(float("inf"))
        return PipelineOutput(logits={"c": self.lin2(self.drop(torch.relu(self.norm(self.lin1(images)))))})


class _Items(torch.utils.data.Dataset):
    """n items of 3 features, class = sign of the first; `events[k]()` runs when the k-th item is read."""

    def __init__(self, n: int, seed: int, events: dict | None = None):
        self.x = torch.randn(n, 3, generator=torch.Generator().manual_seed(seed))
        self.events, self.reads = dict(events or {}), 0

    def __len__(self):
        return len(self.x)

    def __getitem__(self, i):
        self.reads += 1
        if self.reads in self.events:
            self.events[self.reads]()
        return {"image": self.x[i], "targets": {"c": torch.tensor(int(self.x[i, 0] > 0))}, "id": f"item{i}"}


def _collate(items):
    return {"images": torch.stack([it["image"] for it in items]),
            "targets": {"c": torch.stack([it["targets"]["c"] for it in items])}, "ids": [it["id"] for it in items]}


class _Scripted(Trainer):
    """Validation accuracy follows SCRIPT (per epoch); the rest of evaluation is the real one."""

    script: list[float] = []

    def evaluate(self, dataset, *, pictures=None):
        metrics = super().evaluate(dataset, pictures=pictures)
        if pictures != "test/":
            metrics["c/accuracy"] = self.script[self.state.epoch]
        return metrics


def build(run_dir: Path, *, events: dict | None = None, net: dict | None = None, cls=Trainer, **keys) -> Trainer:
    """A Trainer on tiny data; keys like train__grad_accum=2 set config keys."""
    cfg = Config(device="cpu")
    cfg.data.batch_size, cfg.train.epochs, cfg.train.progress_bar, cfg.eval.pictures = 4, 2, False, 0
    cfg.optim.lr = 0.05
    for key, value in keys.items():
        section, name = key.split("__")
        setattr(getattr(cfg, section), name, value)
    events = events or {}
    torch.manual_seed(0)
    return cls(cfg=cfg, pipeline=_Net(**(net or {})), tasks=TASKS, train_set=_Items(16, 1, events.get("train")),
               val_set=_Items(8, 2, events.get("val")), test_set=_Items(8, 3, events.get("test")),
               device=torch.device("cpu"), info=DistInfo(), run_dir=run_dir, collate_fn=_collate)


def resume(run_dir: Path, **keys) -> dict:
    trainer = build(run_dir, **keys)
    trainer.resume(ckpt.load_checkpoint(run_dir))
    return trainer.fit()


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """Tiny tensors: one thread is fastest, and the machine is shared."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """reference(**keys): the folder of an uninterrupted run with those config keys (each run once)."""
    runs: dict = {}

    def get(**keys) -> Path:
        name = tuple(sorted(keys.items()))
        if name not in runs:
            runs[name] = tmp_path_factory.mktemp("reference")
            build(runs[name], **keys).fit()
        return runs[name]

    return get


@pytest.fixture
def train_log(tmp_path):
    """hrsel's logging set up for tmp_path (train.log); removed again afterwards."""
    root, level = logging.getLogger(), logging.getLogger().level
    logbook.setup_logging(tmp_path, is_main=True)
    yield tmp_path / "train.log"
    for handler in [h for h in root.handlers if getattr(h, "_hrsel", False)]:
        root.removeHandler(handler)
        handler.close()
    root.setLevel(level)


def rows(run_dir: Path) -> list[dict]:
    with open(run_dir / "metrics.csv", newline="") as f:
        return list(csv.DictReader(f))


def snapshot(run_dir: Path) -> dict[str, bytes | None]:
    return {name: (run_dir / name).read_bytes() if (run_dir / name).exists() else None for name in FILES}


def train_state(run_dir: Path) -> dict:
    return torch.load(run_dir / ckpt.LAST, weights_only=False)["train_state"]


def assert_same_run(a: Path, b: Path) -> None:
    """Same metrics.csv (all but timings), test metrics, weights and BatchNorm statistics."""
    rows_a, rows_b = rows(a), rows(b)
    assert [r["epoch"] for r in rows_a] == [r["epoch"] for r in rows_b]
    for ra, rb in zip(rows_a, rows_b):
        assert ra.keys() == rb.keys()
        for key in ra.keys() - TIMING:
            assert ra[key] == rb[key], (ra["epoch"], key)
    test_a, test_b = (json.loads((d / "test_metrics.json").read_text()) for d in (a, b))
    assert test_a == test_b
    wa, wb = (torch.load(d / ckpt.LAST, weights_only=False)["model"] for d in (a, b))
    assert "norm.running_mean" in wa
    for name in wa:
        torch.testing.assert_close(wa[name], wb[name], rtol=0, atol=0, msg=name)


def no_temp_files(run_dir: Path) -> bool:
    return not [p.name for p in run_dir.iterdir() if ".tmp" in p.name]


# ----------------------------------------------------------------------------- signals

def _signal(signum: int, run_dir: Path, kept: list) -> callable:
    def send():
        kept.append(snapshot(run_dir))  # the files as they are when the signal arrives
        os.kill(os.getpid(), signum)
    return send


SIGNALS = [  # id, config keys, (data set, k-th read), signal, message part, (epoch, batch_in_epoch, step, pending)
    ("sigint-mid-epoch", {}, ("train", 7), signal.SIGINT, "after 1 batches of epoch 1", (0, 1, 1, False)),
    ("sigterm-mid-epoch-2", {}, ("train", 23), signal.SIGTERM, "after 1 batches of epoch 2", (1, 1, 5, False)),
    ("sigint-between-accumulated-batches", {"train__grad_accum": 2}, ("train", 14), signal.SIGINT,
     "after 2 batches of epoch 1", (0, 2, 1, False)),
    ("sigint-evaluating-epoch-1", {}, ("val", 1), signal.SIGINT, "while evaluating epoch 1", (0, 4, 4, True)),
    ("sigterm-evaluating-epoch-2", {}, ("val", 9), signal.SIGTERM, "while evaluating epoch 2", (1, 4, 8, True)),
    ("sigint-scoring-test", {}, ("test", 2), signal.SIGINT, "while scoring the test split", (2, 0, 8, False)),
]


@pytest.mark.parametrize("keys, at, signum, where, state", [s[1:] for s in SIGNALS], ids=[s[0] for s in SIGNALS])
def test_signal_stops_at_a_checkpoint_and_resume_is_exact(tmp_path, reference, keys, at, signum, where, state):
    kept: list = []
    trainer = build(tmp_path, events={at[0]: {at[1]: _signal(signum, tmp_path, kept)}}, **keys)
    with pytest.raises(Interrupted) as err:
        trainer.fit()
    assert err.value.signum == signum and isinstance(err.value, HrselError)
    message = str(err.value)
    assert signal.Signals(signum).name in message and where in message and str(tmp_path) in message
    assert "--resume" in message
    s = train_state(tmp_path)
    assert (s["epoch"], s["batch_in_epoch"], s["step"], s["eval_pending"]) == state
    if at[0] != "train":  # a stop while evaluating keeps the files as they were: no second write
        assert snapshot(tmp_path) == kept[0]
        assert getattr(trainer, f"{at[0]}_set").reads <= (at[1] + 3) // 4 * 4  # prompt: the batch it was in
    assert not (tmp_path / "test_metrics.json").exists()
    resume(tmp_path, **keys)
    assert_same_run(reference(**keys), tmp_path)


# ----------------------------------------------------------------------------- non-finite losses and models

LR_1E6 = {"optim__name": "sgd", "optim__lr": 1e6, "train__skip_nan_updates": True, "train__epochs": 3}


def test_lr_1e6_skipping_every_update_stops_at_max_nan_skips(tmp_path):
    """Without BatchNorm the weights overflow and every loss from step 5 on is nan."""
    trainer = build(tmp_path, net={"bn": False}, train__max_nan_skips=3, **LR_1E6)
    with pytest.raises(NonFiniteLossError) as err:
        trainer.fit()
    message = str(err.value)
    assert "train.max_nan_skips = 3" in message and "3 batches in a row" in message and str(tmp_path) in message
    assert trainer.state.nan_streak == 3
    if (tmp_path / ckpt.BEST).exists():  # best.pt, if any, is a finite model
        best = torch.load(tmp_path / ckpt.BEST, weights_only=False)["model"]
        assert all(torch.isfinite(v).all() for v in best.values() if v.is_floating_point())


def test_a_run_whose_every_batch_is_skipped_fails_though_max_nan_skips_is_larger(tmp_path):
    """8 batches (2 epochs of 4), all with a nan loss, under train.max_nan_skips = 20: nothing was trained."""
    trainer = build(tmp_path, net={"nan_input_at": range(1, 100)}, train__skip_nan_updates=True,
                    train__max_nan_skips=20)
    with pytest.raises(NonFiniteLossError) as err:
        trainer.fit()
    message = str(err.value)
    assert "every one of the 8 training batches" in message and "never updated" in message, message
    assert str(tmp_path) in message and trainer.state.step == 0
    assert not (tmp_path / "test_metrics.json").exists()  # no test metrics of an untrained model


@pytest.mark.parametrize("bn, why", [(False, "batches had a non-finite loss and were skipped"),
                                     (True, "norm.running_var holds nan/inf")],
                         ids=["nan-loss-skipped", "batchnorm-statistics-overflow"])
def test_lr_1e6_never_saves_best_pt_from_a_nan_model(tmp_path, caplog, bn, why):
    """Validation accuracy rises every epoch (scripted), but from epoch 2 on the model is broken: without
    BatchNorm its losses are nan and skipped, with it the loss stays finite but running_var overflows."""
    _Scripted.script = [0.5, 0.6, 0.7]
    trainer = build(tmp_path, cls=_Scripted, net={"bn": bn}, **LR_1E6)
    with caplog.at_level(logging.WARNING, logger="hrsel.engine.loop"):
        result = trainer.fit()
    assert result["best"]["epoch"] == 1  # not 3, the highest accuracy
    best = torch.load(tmp_path / ckpt.BEST, weights_only=False)
    assert best["train_state"]["step"] == result["best"]["step"] == 4
    assert all(torch.isfinite(v).all() for v in best["model"].values() if v.is_floating_point())
    assert "best.pt is not written from this model" in caplog.text and why in caplog.text


def test_nan_streak_resets_after_a_good_batch(tmp_path):
    trainer = build(tmp_path, net={"nan_input_at": (2, 4, 6)}, train__skip_nan_updates=True, train__max_nan_skips=2)
    trainer.fit()
    assert [int(r["nan_skips"]) for r in rows(tmp_path)] == [2, 3]
    assert [int(r["step"]) for r in rows(tmp_path)] == [2, 5]


def test_a_skipped_batch_leaves_no_nan_in_batchnorm_statistics(tmp_path):
    trainer = build(tmp_path, net={"nan_input_at": (3,)}, train__skip_nan_updates=True)
    trainer.fit()
    model = torch.load(tmp_path / ckpt.LAST, weights_only=False)["model"]
    for name in ("norm.running_mean", "norm.running_var"):
        assert torch.isfinite(model[name]).all(), name
    assert int(model["norm.num_batches_tracked"]) == 7  # 8 batches, the skipped one not counted


def test_an_epoch_ending_in_a_skipped_batch_is_not_best(tmp_path, caplog):
    _Scripted.script = [0.9, 0.5]  # epoch 1 would win, but its last batch was skipped
    trainer = build(tmp_path, cls=_Scripted, net={"nan_input_at": (4,)}, train__skip_nan_updates=True)
    with caplog.at_level(logging.WARNING, logger="hrsel.engine.loop"):
        result = trainer.fit()
    assert result["best"]["epoch"] == 2 and result["best"]["value"] == 0.5
    assert "its last 1 batches had a non-finite loss" in caplog.text


def test_a_model_with_an_inf_parameter_is_never_best(tmp_path, caplog):
    trainer = build(tmp_path, net={"poison_spare_at": 4})  # the loss stays finite
    with caplog.at_level(logging.WARNING, logger="hrsel.engine.loop"):
        result = trainer.fit()
    assert result["best"] is None and not (tmp_path / ckpt.BEST).exists()
    assert "spare.weight holds nan/inf" in caplog.text
    assert result["test_weights"].startswith("the last weights")


def test_non_finite_loss_without_skipping_keeps_the_last_checkpoint(tmp_path):
    kept: list = []
    events = {"train": {21: lambda: kept.append(snapshot(tmp_path))}}  # epoch 2, before the nan batch (call 6)
    trainer = build(tmp_path, events=events, net={"nan_input_at": (6,)})
    with pytest.raises(NonFiniteLossError) as err:
        trainer.fit()
    assert "loss is nan" in str(err.value) and "train.skip_nan_updates=true" in str(err.value)
    assert str(tmp_path) in str(err.value)
    assert snapshot(tmp_path) == kept[0] and train_state(tmp_path)["step"] == 4


@pytest.mark.parametrize("value", [0, -2])
def test_max_nan_skips_must_be_positive(tmp_path, value):
    config = tmp_path / "c.yaml"
    config.write_text("experiment: x\n")
    with pytest.raises(ConfigError) as err:
        load_config(config, [f"train.max_nan_skips={value}"])
    assert "'train.max_nan_skips'" in str(err.value) and str(value) in str(err.value)


# ----------------------------------------------------------------------------- failed writes (disk full)

def _failing_save(run_dir: Path, *, on_call: int, error: Exception, kept: list):
    real, calls = torch.save, [0]

    def save(obj, f, *args, **kwargs):
        calls[0] += 1
        if calls[0] == on_call:
            kept.append(snapshot(run_dir))
            f.write(b"partial")  # a half-written temp file must not survive
            raise error
        return real(obj, f, *args, **kwargs)
    return save


WRITE_FAILURES = [  # id, error raised by torch.save, what the message says
    ("enospc", OSError(errno.ENOSPC, "No space left on device"), "no space left on the device"),
    ("torch-zip-writer", RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 704 vs 598"),
     "no space left on the device"),
    ("quota", OSError(errno.EDQUOT, "Disk quota exceeded"), "no space left on the device"),
    ("permission", PermissionError(errno.EACCES, "Permission denied"), "permission denied; "),
]


@pytest.mark.parametrize("error, says", [w[1:] for w in WRITE_FAILURES], ids=[w[0] for w in WRITE_FAILURES])
def test_a_failed_checkpoint_write_is_one_named_error_and_the_run_resumes(tmp_path, reference, monkeypatch, error,
                                                                         says):
    kept: list = []
    # saves: epoch 1 before evaluating, epoch 1 end, epoch 2 before evaluating (fails)
    monkeypatch.setattr(torch, "save", _failing_save(tmp_path, on_call=3, error=error, kept=kept))
    with pytest.raises(RunWriteError) as err:
        build(tmp_path).fit()
    assert isinstance(err.value, OSError) and err.value.__suppress_context__
    message = str(err.value)
    assert f"cannot write {tmp_path / ckpt.LAST}" in message and f"run folder {tmp_path}" in message
    assert says in message and " free on the disk" in message and "previous last.pt is unchanged" in message
    assert snapshot(tmp_path) == kept[0] and no_temp_files(tmp_path)
    monkeypatch.undo()
    resume(tmp_path)
    assert_same_run(reference(), tmp_path)


def test_an_unrelated_runtime_error_of_torch_save_is_not_called_a_disk_problem(tmp_path, monkeypatch):
    kept: list = []
    monkeypatch.setattr(torch, "save", _failing_save(tmp_path, on_call=2, error=RuntimeError("cannot pickle x"),
                                                     kept=kept))
    with pytest.raises(RuntimeError, match="cannot pickle x") as err:
        build(tmp_path).fit()
    assert not isinstance(err.value, RunWriteError)
    assert snapshot(tmp_path) == kept[0] and no_temp_files(tmp_path)


def test_a_failed_best_pt_copy_leaves_the_old_best_pt(tmp_path, monkeypatch):
    ckpt.save_checkpoint(tmp_path, {"step": 1}, is_best=True)
    before = snapshot(tmp_path)

    def copy(src, dst, *args):
        dst.write(b"par")
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(ckpt.shutil, "copyfileobj", copy)
    with pytest.raises(RunWriteError) as err:
        ckpt.save_checkpoint(tmp_path, {"step": 2}, is_best=True)
    message = str(err.value)
    assert f"cannot write {tmp_path / ckpt.BEST}" in message and "previous best.pt is unchanged" in message
    assert snapshot(tmp_path)[ckpt.BEST] == before[ckpt.BEST] and no_temp_files(tmp_path)
    assert torch.load(tmp_path / ckpt.LAST, weights_only=False) == {"step": 2}


def test_a_failed_metrics_csv_write_keeps_the_rows_and_the_epoch_is_redone(tmp_path, reference, monkeypatch):
    real, calls, kept = logbook._write_csv, [0], []

    def write(f, columns, rows_):
        calls[0] += 1
        if calls[0] == 2:  # epoch 2's row
            kept.append(snapshot(tmp_path))
            raise OSError(errno.ENOSPC, "No space left on device")
        real(f, columns, rows_)

    monkeypatch.setattr(logbook, "_write_csv", write)
    with pytest.raises(RunWriteError) as err:
        build(tmp_path).fit()
    assert f"cannot write {tmp_path / 'metrics.csv'}" in str(err.value) and "unchanged" in str(err.value)
    assert snapshot(tmp_path) == kept[0] and [r["epoch"] for r in rows(tmp_path)] == ["1"]
    assert train_state(tmp_path)["eval_pending"]  # last.pt: epoch 2 trained, its row still to write
    monkeypatch.undo()
    resume(tmp_path)
    assert_same_run(reference(), tmp_path)


def test_disk_full_goes_to_train_log_once_and_not_as_tracebacks(tmp_path, monkeypatch, train_log, capsys):
    monkeypatch.setattr(torch, "save", _failing_save(tmp_path, on_call=1, error=OSError(errno.ENOSPC, "full"),
                                                     kept=[]))
    with pytest.raises(RunWriteError):
        build(tmp_path).fit()
    text = train_log.read_text()
    assert text.count("cannot write") == 1 and "Traceback" not in text and "run stopped at epoch 1" in text
    assert "cannot write" not in capsys.readouterr().err  # stderr: the CLI prints the message once


# ----------------------------------------------------------------------------- crashes while evaluating

def _boom():
    raise RuntimeError("boom in the data set")


@pytest.mark.parametrize("at, state", [(("val", 9), (1, 4, 8, True)), (("test", 1), (2, 0, 8, False))],
                         ids=["validation-epoch-2", "final-test"])
def test_a_crash_while_evaluating_keeps_the_epoch_and_its_traceback(tmp_path, reference, train_log, at, state):
    kept: list = []
    events = {at[0]: {at[1]: lambda: (kept.append(snapshot(tmp_path)), _boom())}}
    with pytest.raises(RuntimeError, match="boom in the data set"):
        build(tmp_path, events=events).fit()
    s = train_state(tmp_path)
    assert (s["epoch"], s["batch_in_epoch"], s["step"], s["eval_pending"]) == state
    assert snapshot(tmp_path) == kept[0]
    text = train_log.read_text()
    assert "run crashed at epoch" in text and "Traceback" in text and "boom in the data set" in text
    assert f"holds step {state[2]}" in text
    resume(tmp_path)
    assert_same_run(reference(), tmp_path)


# ----------------------------------------------------------------------------- through the command line

@pytest.fixture
def clean_logging():
    root, level = logging.getLogger(), logging.getLogger().level
    yield
    for handler in [h for h in root.handlers if getattr(h, "_hrsel", False)]:
        root.removeHandler(handler)
        handler.close()
    root.setLevel(level)


def test_cli_disk_full_is_one_line_exit_1_and_the_run_folder_named(tmp_path, monkeypatch, capsys, clean_logging):
    import hrsel.train as T

    class Split(_Items):
        tasks = TASKS

    monkeypatch.setattr(T, "preflight", lambda cfg: None)
    monkeypatch.setattr(T, "load_collate", lambda: _collate)
    monkeypatch.setattr(T, "open_split", lambda cfg, split, *, for_eval: Split(20 if split == "train" else 8, 1))
    monkeypatch.setattr(T, "build_pipeline", lambda cfg, tasks: _Net())
    config = tmp_path / "disk.yaml"
    config.write_text(f"experiment: disk\ndevice: cpu\ndata:\n  name: toy\n  root: {tmp_path}\n  batch_size: 4\n"
                      f"train:\n  progress_bar: false\neval:\n  pictures: 0\n")
    run_dir = tmp_path / "out" / "disk"
    monkeypatch.setattr(torch, "save", _failing_save(run_dir, on_call=1, error=OSError(errno.ENOSPC, "full"),
                                                     kept=[]))
    code = T.main([str(config), f"--output-dir={tmp_path / 'out'}"])
    err = capsys.readouterr().err
    assert code == 1 and "Traceback" not in err and "During handling" not in err
    assert err.count("cannot write") == 1 and f"error: cannot write {run_dir / ckpt.LAST}" in err
    assert " free on the disk of run folder " in err and not (run_dir / ckpt.LAST).exists()
    assert "cannot write" in (run_dir / "train.log").read_text() and no_temp_files(run_dir)

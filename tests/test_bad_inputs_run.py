"""Bad inputs to `python -m hrsel.train` never lose or overwrite a run: the run folder, the command line.

One tiny finished run (IPS on a 128 x 128 Megapixel MNIST, two updates) is built per module.
Each case then points a bad command at it (a rerun, a bad override, a bad --resume, a busy
folder, a broken checkpoint, a bad device) and checks (1) exit status 2 and the error type,
(2) that the message names the file / key / folder, and (3) that config.yaml, last.pt,
best.pt, metrics.csv, test_metrics.json and validation.json of the run kept their bytes and
mtimes, that no lock is left behind and nothing was moved aside.
"""
from __future__ import annotations

import os
import pickle
import shutil
import socket
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import pytest
import torch
import yaml
from torch import nn

import hrsel.train as T
from hrsel.engine import distributed, rundir
from hrsel.engine.probe import decide_find_unused, unused_parameters
from hrsel.errors import CheckpointError, ConfigError, RunFolderError
from hrsel.models.pipeline import Pipeline, PipelineOutput
from hrsel.tasks import TaskSpec

from fixtures_data import write_mnist_idx

REPO = Path(__file__).resolve().parents[1]
KEPT = ("config.yaml", "last.pt", "best.pt", "metrics.csv", "test_metrics.json", "validation.json")
SMALL_CNN = "{width: 8, strides: [2, 2, 2, 2], blocks: [1, 1, 1, 1]}"
CONFIG = """
experiment: done
output_dir: {runs}
device: cpu
data: {{name: megapixel_mnist, root: {root}, batch_size: 4, eval_batch_size: 4, tasks: [majority]}}
model: {{name: ips, in_chans: 1, backbone: narrow_resnet, backbone_options: {cnn}, patch_size: 32,
        k: 3, score_chunk: 4}}
optim: {{lr: 0.001}}
train: {{epochs: 1, progress_bar: false}}
eval: {{pictures: 0}}
"""


@dataclass
class Finished:
    """The module's finished run: its folder, the config that made it, the data folder."""

    run: Path
    config: Path
    root: Path
    base: Path
    files: dict[str, tuple[bytes, int]]  # its snapshot when it finished


@pytest.fixture(scope="module")
def finished(tmp_path_factory) -> Finished:
    from hrsel.engine.datagen import generate_megapixel_mnist

    base = tmp_path_factory.mktemp("bad_inputs")
    idx = write_mnist_idx(base / "idx")
    root = base / "megapixel"
    generate_megapixel_mnist(str(root), width=128, height=128, n_train=8, n_test=4, n_noise=1, digits="mnist",
                             mnist_dir=str(idx), download=False)
    config = base / "done.yaml"
    config.write_text(CONFIG.format(runs=base / "runs", root=root, cnn=SMALL_CNN))
    torch.set_num_threads(1)
    assert T.main([str(config)]) == 0
    run = base / "runs" / "done"
    assert all((run / name).is_file() for name in KEPT)
    return Finished(run, config, root, base, snapshot(run))


def snapshot(run: Path) -> dict[str, tuple[bytes, int]]:
    return {name: ((run / name).read_bytes(), (run / name).stat().st_mtime_ns) for name in KEPT
            if (run / name).exists()}


def assert_untouched(run: Path, before: dict[str, tuple[bytes, int]]) -> None:
    after = snapshot(run)
    assert after.keys() == before.keys(), f"files of {run} appeared or vanished"
    for name in before:
        assert after[name][0] == before[name][0], f"{name} of {run} changed"
        assert after[name][1] == before[name][1], f"{name} of {run} was rewritten"
    assert not (run / rundir.LOCK).exists(), "a run.lock was left behind"
    assert not list(run.parent.glob(f"{run.name}.replaced-*")), "the run was moved aside"


def copy_run(finished: Finished, tmp_path: Path, name: str = "done") -> Path:
    """A private copy of the finished run (for cases that break one of its files)."""
    copy = tmp_path / "runs" / name
    shutil.copytree(finished.run, copy)
    return copy


# ----------------------------------------------------------------------------- the cases

@dataclass
class Ctx:
    finished: Finished
    tmp: Path
    target: Path  # the run folder the case must leave untouched
    monkeypatch: pytest.MonkeyPatch
    held: list = field(default_factory=list)  # locks / processes to release after the case


@dataclass(frozen=True)
class Case:
    argv: Callable[[Ctx], list[str]]  # the command line
    words: Callable[[Ctx], list[str]]  # what the message must name
    error: type = ConfigError  # the error class main() turned into exit status 2
    prepare: Callable[[Ctx], None] | None = None  # e.g. break a copied checkpoint
    data_work: bool = False  # the case may build the data (its error comes from a dry run)


def _cfg(c: Ctx) -> str:
    return str(c.finished.config)


def _variant(c: Ctx, text_from: Callable[[str], str], name: str = "variant.yaml") -> str:
    """A config file derived from the finished run's config (same experiment and output_dir)."""
    path, text = c.tmp / name, c.finished.config.read_text()
    changed = text_from(text)
    assert changed != text, "the variant's text replacement found nothing to replace in the template"
    path.write_text(changed)
    return str(path)


def _on_copy(c: Ctx) -> None:
    """Resume cases that break a file work on a copy of the finished run."""
    c.target = copy_run(c.finished, c.tmp)


def _break_last(write: Callable[[Path], None]) -> Callable[[Ctx], None]:
    def prepare(c: Ctx) -> None:
        _on_copy(c)
        write(c.target / "last.pt")
        os.utime(c.target / "last.pt", ns=(1, 1))  # a fixed mtime: the snapshot is taken after this
    return prepare


def _truncate(path: Path) -> None:
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])


def _hold_lock(c: Ctx) -> None:
    c.held.append(rundir.RunLock.acquire(c.target))


def _hold_lock_elsewhere(c: Ctx) -> None:
    """Another process holds the lock of the finished run (a second run started while it trains)."""
    code = ("import sys; from hrsel.engine.rundir import RunLock; lock = RunLock.acquire(sys.argv[1]); "
            "print('locked', flush=True); sys.stdin.read(); lock.release()")
    proc = subprocess.Popen([sys.executable, "-c", code, str(c.target)], stdin=subprocess.PIPE,
                            stdout=subprocess.PIPE, text=True, env={**os.environ, "PYTHONPATH": str(REPO)})
    assert proc.stdout.readline().strip() == "locked"
    c.held.append(proc)


def _no_cuda(c: Ctx) -> None:
    c.monkeypatch.setattr(torch.cuda, "is_available", lambda: False)


def _one_gpu(c: Ctx) -> None:
    c.monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    c.monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)


RERUN = ["already holds a run", "--resume", "--overwrite"]
CASES = {
    # a rerun without --resume: refused, whatever else the command says
    "rerun_same_config": Case(lambda c: [_cfg(c)], lambda c: [str(c.target), *RERUN], RunFolderError),
    "rerun_other_seed": Case(lambda c: [_cfg(c), "--seed", "4"], lambda c: [str(c.target), *RERUN], RunFolderError),
    "rerun_more_epochs": Case(lambda c: [_cfg(c), "train.epochs=2"], lambda c: [str(c.target), *RERUN],
                              RunFolderError),
    # a bad config aimed at the finished run's folder: stops before the folder is touched
    "unknown_key": Case(lambda c: [_cfg(c), "optim.lrate=0.1"], lambda c: ["optim.lrate", "optim.lr"]),
    "wrong_type": Case(lambda c: [_cfg(c), "data.batch_size=big"], lambda c: ["data.batch_size", "big"]),
    "impossible_value": Case(lambda c: [_cfg(c), "data.batch_size=0"], lambda c: ["data.batch_size"]),
    "missing_data_root": Case(lambda c: [_cfg(c), f"data.root={c.tmp / 'nowhere'}"],
                              lambda c: ["data.root", str(c.tmp / "nowhere")]),
    "model_key_typo": Case(lambda c: [_cfg(c), "model.num_selectd=2"], lambda c: ["model.num_selectd",
                                                                                   "model.k"]),
    "data_option_typo": Case(lambda c: [_cfg(c), "data.taks=[majority]"], lambda c: ["data.taks", "data.tasks"]),
    "invalid_yaml": Case(lambda c: [_variant(c, lambda t: t + "\ntrain: [unclosed\n", "broken.yaml")],
                         lambda c: ["broken.yaml", "YAML"]),
    "yaml_not_a_mapping": Case(lambda c: [_variant(c, lambda t: "- a\n- b\n", "list.yaml")],
                               lambda c: ["list.yaml", "mapping"]),
    "missing_config_file": Case(lambda c: [str(c.tmp / "nope.yaml")], lambda c: ["nope.yaml"]),
    "two_config_files": Case(lambda c: [_cfg(c), "other.yaml"], lambda c: ["unexpected arguments", "other.yaml"]),
    "no_config": Case(lambda c: ["train.epochs=2"], lambda c: ["no CONFIG", "--resume"]),
    "k_larger_than_grid_with_overwrite": Case(lambda c: [_cfg(c), "--overwrite", "model.k=50"],
                                              lambda c: ["model.k", "50", "16 patches"],
                                              data_work=True),
    "patch_larger_than_image_with_overwrite": Case(lambda c: [_cfg(c), "--overwrite", "model.patch_size=256"],
                                                   lambda c: ["model.patch_size=256", "smaller than patch_size=256"],
                                                   data_work=True),
    "dps_k_larger_than_grid_with_overwrite": Case(
        lambda c: [_variant(c, lambda t: t.replace("name: ips", "name: dps").replace(
            "k: 3, score_chunk: 4", "k: 5000, num_samples: 4")), "--overwrite"],
        lambda c: ["model.k=5000", "k=5000 is larger than the number of patches"], data_work=True),
    "learned_positions_fewer_than_the_grid": Case(
        lambda c: [_cfg(c), "--overwrite", "model.pos_encoding=learned", "model.num_positions=4"],
        lambda c: ["model.num_positions=4", "pos_encoding 'learned'", "grid position"], data_work=True),
    "seed_override_and_flag": Case(lambda c: [_cfg(c), "seed=1", "--seed", "2"],
                                   lambda c: ["seed is given twice", "'seed=1'", "--seed 2"]),
    "output_dir_override_and_flag": Case(lambda c: [_cfg(c), f"output_dir={c.tmp}", "--output-dir", str(c.tmp)],
                                         lambda c: ["output_dir is given twice", "--output-dir"]),
    "output_dir_is_a_file": Case(lambda c: [_cfg(c), "--output-dir", str(c.finished.config)],
                                 lambda c: ["cannot create run folder", str(c.finished.config / "done")],
                                 RunFolderError),
    "overwrite_and_resume": Case(lambda c: [_cfg(c), "--overwrite", "--resume"],
                                 lambda c: ["--resume", "--overwrite"]),
    # devices
    "device_gpu7": Case(lambda c: [_cfg(c), "--device", "gpu7"], lambda c: ["device", "gpu7", "cuda:N"]),
    "device_override_tpu": Case(lambda c: [_cfg(c), "device=tpu"], lambda c: ["device", "tpu", "cpu"]),
    "device_cuda_without_gpu": Case(lambda c: [_cfg(c), "--device", "cuda"],
                                    lambda c: ["device", "'cuda'", "no CUDA GPU", "--device cpu"], prepare=_no_cuda),
    "device_cuda9_of_one": Case(lambda c: [_cfg(c), "--device", "cuda:9"], lambda c: ["cuda:9", "1 CUDA GPU"],
                                prepare=_one_gpu),
    "resume_device_gpu7": Case(lambda c: ["--resume", str(c.target), "--device", "gpu7"],
                               lambda c: ["device", "gpu7"]),
    # --print-config checks like a run does, and writes nothing
    "print_config_model_typo": Case(lambda c: [_cfg(c), "--print-config", "model.num_selectd=2"],
                                    lambda c: ["model.num_selectd", "model.k"]),
    "print_config_pipeline_option_typo": Case(lambda c: [_cfg(c), "--print-config", "model.chunk_sise=2"],
                                              lambda c: ["model.chunk_sise", "model.score_chunk"]),
    "print_config_missing_root": Case(lambda c: [_cfg(c), "--print-config", f"data.root={c.tmp / 'gone'}"],
                                      lambda c: ["data.root", "gone"]),
    "print_config_bad_device": Case(lambda c: [_cfg(c), "--print-config", "--device", "gpu7"],
                                    lambda c: ["device", "gpu7"]),
    # --resume of a folder that is not (or no longer) a run
    "resume_missing_folder": Case(lambda c: ["--resume", str(c.tmp / "runs" / "dnoe")],
                                  lambda c: ["dnoe", "no such run folder"], RunFolderError),
    "resume_not_a_run_folder": Case(lambda c: ["--resume", str(c.tmp)], lambda c: [str(c.tmp), "config.yaml"],
                                    RunFolderError),
    "resume_csv_file": Case(lambda c: ["--resume", str(c.target / "metrics.csv")],
                            lambda c: ["metrics.csv", ".pt", str(c.target)]),
    "resume_config_of_missing_run": Case(lambda c: [_cfg(c), "--resume", "experiment=elsewhere"],
                                         lambda c: ["elsewhere", "no such run folder"], RunFolderError),
    "resume_without_anything": Case(lambda c: ["--resume"], lambda c: ["--resume runs/NAME"]),
    "resume_without_last_pt": Case(lambda c: ["--resume", str(c.target)],
                                   lambda c: [str(c.target / "last.pt"), "best.pt"], CheckpointError,
                                   prepare=lambda c: (_on_copy(c), (c.target / "last.pt").unlink())),
    # --resume with hyper-parameters that differ from the run's
    "resume_lr_override": Case(lambda c: ["--resume", str(c.target), "optim.lr=0.5"],
                               lambda c: ["optim.lr", "0.001", "0.5", str(c.target / "config.yaml")]),
    "resume_seed_flag": Case(lambda c: ["--resume", str(c.target), "--seed", "7"], lambda c: ["seed", "7"]),
    "resume_model_option": Case(lambda c: ["--resume", str(c.target), "model.k=2"],
                                lambda c: ["model.k", "3", "2"]),
    "resume_safe_key_bad_value": Case(lambda c: ["--resume", str(c.target), "train.epochs=0"],
                                      lambda c: ["train.epochs", "0"]),
    "resume_model_typo": Case(lambda c: ["--resume", str(c.target), "model.num_selectd=2"],
                              lambda c: ["model.num_selectd"]),
    "resume_with_changed_config": Case(lambda c: [_variant(c, lambda t: t.replace("lr: 0.001", "lr: 0.01")),
                                                  "--resume"], lambda c: ["optim.lr", "0.01"]),
    "resume_run_with_other_config": Case(lambda c: ["--resume", str(c.target), _variant(
        c, lambda t: t.replace("batch_size: 4,", "batch_size: 2,"))], lambda c: ["data.batch_size", "2"]),
    # --resume of a broken checkpoint: named, before any data work
    "resume_truncated_last_pt": Case(lambda c: ["--resume", str(c.target)],
                                     lambda c: [str(c.target / "last.pt"), "truncated", "best.pt"], CheckpointError,
                                     prepare=_break_last(_truncate)),
    "resume_empty_last_pt": Case(lambda c: ["--resume", str(c.target)],
                                 lambda c: [str(c.target / "last.pt"), "empty", "best.pt"], CheckpointError,
                                 prepare=_break_last(lambda p: p.write_bytes(b""))),
    "resume_text_as_last_pt": Case(lambda c: ["--resume", str(c.target / "last.pt")],
                                   lambda c: [str(c.target / "last.pt"), "cannot be read"], CheckpointError,
                                   prepare=_break_last(lambda p: p.write_text("model: weights\n"))),
    "resume_foreign_dict": Case(lambda c: ["--resume", str(c.target)],
                                lambda c: [str(c.target / "last.pt"), "not a hrsel training checkpoint", "optimizer"],
                                CheckpointError,
                                prepare=_break_last(lambda p: torch.save({"weights": torch.zeros(2)}, p))),
    "resume_foreign_tensor": Case(lambda c: ["--resume", str(c.target)],
                                  lambda c: [str(c.target / "last.pt"), "Tensor"], CheckpointError,
                                  prepare=_break_last(lambda p: torch.save(torch.zeros(3), p))),
    "resume_truncated_best_pt": Case(lambda c: ["--resume", str(c.target / "best.pt")],
                                     lambda c: [str(c.target / "best.pt"), "last.pt"], CheckpointError,
                                     prepare=lambda c: (_on_copy(c), _truncate(c.target / "best.pt"),
                                                        os.utime(c.target / "best.pt", ns=(1, 1)))),
    "resume_checkpoint_of_another_model": Case(
        lambda c: ["--resume", str(c.target)], lambda c: [str(c.target / "last.pt"), "does not fit"],
        CheckpointError, data_work=True,
        prepare=_break_last(lambda p: torch.save({**torch.load(p, weights_only=False),
                                                  "model": {"other.weight": torch.zeros(1)}}, p))),
    # two runs in one folder
    "busy_rerun_other_process": Case(lambda c: [_cfg(c), "--overwrite"],
                                     lambda c: ["in use by pid", str(c.held[0].pid), socket.gethostname(), "started"],
                                     RunFolderError, prepare=_hold_lock_elsewhere),
    "busy_resume": Case(lambda c: ["--resume", str(c.target)],
                        lambda c: ["in use by pid", str(os.getpid()), socket.gethostname()], RunFolderError,
                        prepare=_hold_lock),
    "busy_overwrite": Case(lambda c: [_cfg(c), "--overwrite"], lambda c: ["in use by pid", str(c.target)],
                           RunFolderError, prepare=_hold_lock),
}


@pytest.mark.parametrize("name", list(CASES))
def test_bad_command_exits_2_names_it_and_keeps_the_run(name, finished, tmp_path, monkeypatch, capsys):
    case = CASES[name]
    ctx = Ctx(finished, tmp_path, finished.run, monkeypatch)
    if not case.data_work:
        monkeypatch.setattr(T, "prepare_data", _refuse_data_work)
        monkeypatch.setattr(T, "build_datasets", _refuse_data_work)
    raised: list[BaseException] = []
    monkeypatch.setattr(T, "run", _recording(T.run, raised))
    monkeypatch.setattr(T, "resolve_config", _recording(T.resolve_config, raised))
    monkeypatch.setattr(T, "preflight", _recording(T.preflight, raised))
    monkeypatch.setattr(distributed, "check_device", _recording(distributed.check_device, raised))
    try:
        if case.prepare is not None:
            case.prepare(ctx)
        before = snapshot(ctx.target)
        argv = case.argv(ctx)
        capsys.readouterr()
        code = T.main(argv)
        err = capsys.readouterr().err
        words = case.words(ctx)
    finally:
        _release(ctx.held)
    assert code == 2, err
    assert raised and isinstance(raised[-1], case.error), f"{name}: {raised!r}"
    assert ("\n" + err).count("\nerror: ") == 1 and "Traceback" not in err, err
    for word in words:
        assert word in err, f"{name}: {word!r} is not named in: {err}"
    assert_untouched(ctx.target, before)
    assert_untouched(finished.run, finished.files)


def _refuse_data_work(*args, **kwargs):
    raise AssertionError("the command reached the data stage; it must stop before")


def _recording(function: Callable, raised: list) -> Callable:
    """`function`, noting the hrsel error it raises (main() turns it into exit status 2)."""
    def wrapper(*args, **kwargs):
        try:
            return function(*args, **kwargs)
        except (ConfigError, RunFolderError, CheckpointError) as e:
            raised.append(e)
            raise
    return wrapper


def _release(held: list) -> None:
    for item in held:
        if isinstance(item, subprocess.Popen):
            item.stdin.close()
            item.wait(timeout=10)
        else:
            item.release()


# ----------------------------------------------------------------------------- what is allowed

@pytest.mark.parametrize("target", ["", "last.pt", "best.pt"])
def test_resume_takes_the_run_folder_or_a_checkpoint_in_it(target, finished, capsys):
    assert T.main(["--resume", str(finished.run / target), "--print-config", "train.epochs=3", "--device",
                   "cpu"]) == 0
    printed = yaml.safe_load(capsys.readouterr().out)
    assert printed["train"]["epochs"] == 3  # a safe change
    assert printed["optim"]["lr"] == 0.001 and printed["model"]["k"] == 3  # the run's own
    assert Path(printed["output_dir"]) / printed["experiment"] == finished.run
    assert_untouched(finished.run, finished.files)


def test_a_stale_lock_of_a_dead_process_is_taken_over_with_a_warning(finished, tmp_path, capsys):
    copy = copy_run(finished, tmp_path)
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True,
                          text=True).stdout.strip()
    (copy / rundir.LOCK).write_text(f'{{"pid": {dead}, "host": "{socket.gethostname()}", '
                                    f'"started": "2001-01-01 00:00:00 +0000"}}')
    best = (copy / "best.pt").read_bytes()
    assert T.main(["--resume", str(copy)]) == 0
    err = capsys.readouterr().err
    assert f"taking over the lock of pid {dead}" in err and "2001-01-01" in err
    assert not (copy / rundir.LOCK).exists() and (copy / "best.pt").read_bytes() == best


def test_overwrite_moves_the_previous_run_aside_byte_for_byte(finished, tmp_path, capsys):
    copy = copy_run(finished, tmp_path)
    before = snapshot(copy)
    config = tmp_path / "again.yaml"
    config.write_text(finished.config.read_text().replace(str(finished.base / "runs"), str(tmp_path / "runs")))
    assert T.main([str(config), "--overwrite", "--seed", "5"]) == 0
    assert "was moved to" in capsys.readouterr().err
    (moved,) = (tmp_path / "runs").glob("done.replaced-*")
    assert {name: (moved / name).read_bytes() for name in before} == {n: b for n, (b, _) in before.items()}
    assert yaml.safe_load((copy / "config.yaml").read_text())["seed"] == 5 and (copy / "last.pt").is_file()


def test_a_failed_dry_run_leaves_no_run_folder(finished, tmp_path, capsys):
    config = tmp_path / "fresh.yaml"
    config.write_text(finished.config.read_text().replace(str(finished.base / "runs"), str(tmp_path / "runs")))
    assert T.main([str(config), "model.k=50"]) == 2  # fails in the dry run, after the lock
    assert "model.k" in capsys.readouterr().err
    assert not (tmp_path / "runs" / "done").exists()  # the folder it created for its lock is gone again


# ----------------------------------------------------------------------------- the lock itself

def test_lock_names_its_holder_and_is_released(tmp_path):
    folder = tmp_path / "r"
    with rundir.RunLock.acquire(folder) as lock:
        holder = rundir.read_holder(lock.path)
        assert (holder.pid, holder.host) == (os.getpid(), socket.gethostname())
        with pytest.raises(RunFolderError, match=f"pid {os.getpid()}"):
            rundir.RunLock.acquire(folder)
    assert not folder.exists()  # created for the lock, empty: removed with it
    folder.mkdir()
    (folder / "last.pt").write_bytes(b"x")
    with pytest.raises(RunFolderError, match="already holds a run"):
        rundir.claim_run_folder(folder, mode="new")
    rundir.claim_run_folder(folder, mode="resume").release()
    assert (folder / "last.pt").read_bytes() == b"x" and not (folder / rundir.LOCK).exists()


# ----------------------------------------------------------------------------- DDP: find_unused_parameters

class _Toy(Pipeline):
    """A linear head on pooled pixels; a scorer that is used with gradient, or only without (`detached`)."""

    def __init__(self, *, detached: bool):
        super().__init__()
        self.detached = detached
        self.scorer = nn.Linear(4, 1)
        self.norm = nn.BatchNorm1d(4)
        self.head = nn.Linear(4, 3)

    def forward(self, images):
        x = self.norm(images.float().flatten(1))  # (B, 4)
        s = self.scorer(x)  # (B, 1)
        gate = torch.sigmoid(s.detach() if self.detached else s)
        return PipelineOutput(logits={"y": self.head(x * gate)})


TASKS = {"y": TaskSpec("multiclass", 3)}


@pytest.mark.parametrize("detached, unused", [(False, []), (True, ["scorer.weight", "scorer.bias"])])
def test_probe_names_parameters_without_gradient_and_restores_the_pipeline(detached, unused):
    model = _Toy(detached=detached)
    buffers = {k: v.clone() for k, v in model.named_buffers()}
    images, targets = torch.rand(4, 2, 2), {"y": torch.tensor([0, 1, 2, 0])}
    assert unused_parameters(model, images, targets, TASKS) == unused
    assert all(p.grad is None for p in model.parameters())
    for k, v in model.named_buffers():
        torch.testing.assert_close(v, buffers[k], msg=k)


@pytest.mark.parametrize("detached, declared, setting, expected", [
    (False, False, True, False),  # every parameter trained: no search, no DDP warning
    (True, False, True, True),  # a scorer run only without grad: DDP must search
    (False, True, True, True),  # the pipeline says its use of parameters varies
    (True, False, False, False),  # train.find_unused_parameters=false: never
])
def test_ddp_find_unused_parameters_is_decided_from_the_pipeline(detached, declared, setting, expected,
                                                                  monkeypatch, tmp_path):
    from hrsel.config import load_config

    monkeypatch.setattr(distributed, "all_reduce_sum", lambda values, info: values)  # a world of 2, rank 0
    model = _Toy(detached=detached)
    model.leaves_parameters_unused = declared
    data = [{"image": torch.rand(2, 2), "targets": {"y": torch.tensor(1)}}]
    def collate(items):  # two copies of the item: BatchNorm trains on batches of 2 or more
        return {"images": torch.stack([i["image"] for i in items * 2]),
                "targets": {"y": torch.stack([i["targets"]["y"] for i in items * 2])}}

    (tmp_path / "d").mkdir()
    config = tmp_path / "c.yaml"
    config.write_text(f"data: {{root: {tmp_path / 'd'}}}\ntrain: {{find_unused_parameters: {str(setting).lower()}}}")
    cfg = load_config(config)
    decided = decide_find_unused(cfg, model, data, collate, distributed.DistInfo(0, 2, 0), tasks=TASKS)
    assert decided.train.find_unused_parameters is expected
    assert decide_find_unused(cfg, model, data, collate, distributed.DistInfo(), tasks=TASKS) is cfg  # one process


# ----------------------------------------------------------------------------- a checkpoint that runs code

class _Payload:
    """What a crafted checkpoint holds: unpickling it opens (creates) `marker`, as os.system would run a command."""

    def __init__(self, marker: Path):
        self.marker = str(marker)

    def __reduce__(self):
        return open, (self.marker, "w")


def _crafted(path: Path, marker: Path, how: str) -> Path:
    if how == "torch.save":
        torch.save({"model": {"classifier.head.weight": _Payload(marker)}}, path)
    else:
        path.write_bytes(pickle.dumps(_Payload(marker)))
    return path


@pytest.mark.parametrize("how", ["torch.save", "pickle"])
@pytest.mark.parametrize("load", ["classifier_checkpoint", "policy_checkpoint", "resume"])
def test_a_checkpoint_holding_code_is_refused_before_anything_runs(tmp_path, how, load):
    from hrsel.cli import BAD_INPUT
    from hrsel.engine.checkpoint import load_checkpoint
    from hrsel.models import build_pipeline

    marker = tmp_path / "pwned"
    path = _crafted(tmp_path / "best.pt", marker, how)
    assert not marker.exists()
    with pytest.raises(CheckpointError) as err:
        if load == "resume":
            load_checkpoint(path)
        else:
            build_pipeline("patchdrop", tasks=TASKS, in_chans=1, backbone="narrow_resnet", patch_size=20,
                           downscale=2, backbone_options={"width": 8, "strides": (2, 2), "blocks": (1, 1)},
                           **{load: str(path)})
    message = str(err.value)
    assert not marker.exists(), "unpickling ran the payload"
    assert str(path) in message and "holds Python objects" in message and "truncated" not in message, message
    assert isinstance(err.value, BAD_INPUT)  # exit status 2 from hrsel.train
    if load != "resume":
        assert f"model.{load}" in message


# ----------------------------------------------------------------------------- hrsel.evaluate takes data.* overrides

def test_evaluate_takes_data_overrides_and_refuses_the_others(finished, tmp_path, capsys):
    from hrsel.evaluate import main as evaluate_main

    moved = tmp_path / "moved"
    shutil.copytree(finished.root, moved)
    run = copy_run(finished, tmp_path)
    config = yaml.safe_load((run / "config.yaml").read_text())
    assert config["data"]["root"] == str(finished.root)
    out = tmp_path / "eval"
    assert evaluate_main([str(run), f"data.root={moved}", "--out", str(out)]) == 0, capsys.readouterr().err
    assert (out / "eval_test_best.json").is_file()
    capsys.readouterr()
    assert evaluate_main([str(run), f"data.root={tmp_path / 'nowhere'}", "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert "data.root" in err and "nowhere" in err and "Traceback" not in err
    assert evaluate_main([str(run), "optim.lr=0.5", "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert "optim.lr=0.5" in err and "only data.*" in err


EDITABLE_INSTALL = r'''
import runpy, sys
from importlib.machinery import PathFinder

package, module = sys.argv[1], sys.argv[2]  # the repository's hrsel folder; the command's module


class EditableFinder:
    """What `pip install -e .` (setuptools) puts on sys.meta_path: after the path search, it finds hrsel."""

    @staticmethod
    def find_spec(name, path=None, target=None):
        if name == "hrsel" or name.rpartition(".")[0] == "hrsel":
            return PathFinder.find_spec(name, [package.rpartition("/")[0]] if name == "hrsel" else [package])
        return None


sys.meta_path.insert(sys.meta_path.index(PathFinder) + 1, EditableFinder)
sys.path.insert(0, "")  # python -m: the working folder first
sys.argv = [module, *sys.argv[3:]]
runpy.run_module(module, run_name="__main__", alter_sys=True)
'''


def test_a_hrsel_folder_in_the_working_folder_is_named_instead_of_a_missing_version(tmp_path):
    (tmp_path / "hrsel").mkdir()  # e.g. a folder of runs named after the project: no __init__.py
    script = tmp_path / "editable.py"
    script.write_text(EDITABLE_INSTALL)
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}  # the package comes from the finder only
    out = subprocess.run([sys.executable, str(script), str(REPO / "hrsel"), "hrsel.evaluate", "runs/x"],
                         capture_output=True, text=True, cwd=tmp_path, env=env, timeout=60)
    assert out.returncode == 2, out.stderr[-2000:]
    message = out.stderr
    assert "error: Python imported 'hrsel' from the folder" in message and str(tmp_path / "hrsel") in message
    assert str(REPO / "hrsel") in message and "Run the command from another folder, or rename" in message
    assert "Traceback" not in message and "__version__" not in message

"""Bad output folders of `hrsel.predict` and `hrsel.features`: never a corrupt or mixed result.

Two predicts into one `--out`, a predict whose `--out` is also its input, a failed predict
over a complete predictions.csv, an `--out` that is a file, impossible or read-only, a full
disk (simulated: the writer raises ENOSPC), and a feature cache of another image under the
same id. Each case checks the error type, that the message names the file or folder and the
fix, exit status 2 from the command line, and that what was complete before is intact.

Predict runs on two feature bags with an untrained IPS pipeline (no training: fast).
"""
from __future__ import annotations

import csv
import errno
import logging
import os
import types
from pathlib import Path

import h5py
import numpy as np
import pytest
import torch

from hrsel.cli import run_command
from hrsel.data import feature_cache
from hrsel.errors import DataError, RunFolderError
from hrsel.features import main as features_main
from hrsel.inference import outputs, predict_sources
from hrsel.inference.inputs import expand_inputs
from hrsel.inference.outputs import PREDICTIONS, claim_output_folder
from hrsel.predict import main as predict_main

from fixtures_data import make_slide
from toy_bright import one_torch_thread  # noqa: F401 (autouse fixture)

NO_SPACE = OSError(errno.ENOSPC, "No space left on device")


@pytest.fixture
def bags(tmp_path):
    """(model, folder): an untrained IPS pipeline on 6-d features and a folder of two bags (a.h5, b.h5)."""
    from PIL import Image

    from hrsel.inference.load import LoadedModel
    from hrsel.models import build_pipeline
    from hrsel.tasks import TaskSpec

    torch.manual_seed(0)
    tasks = {"tumor": TaskSpec("binary", 1)}
    pipeline = build_pipeline("ips", tasks=tasks, patch_size=32, k=2, score_chunk=4,
                              backbone="feature_projector", backbone_options={"in_dim": 6, "dim": 8},
                              aggregator_options={"heads": 2, "head_dim": 4, "mlp_dim": 8}).eval()
    config = types.SimpleNamespace(seed=0, train=types.SimpleNamespace(precision="fp32"))
    model = LoadedModel(pipeline=pipeline, tasks=tasks, class_names={"tumor": ["normal", "tumor"]}, config=config,
                        checkpoint_path=tmp_path / "none.pt", hrsel_version="test")
    (tmp_path / "src").mkdir()
    Image.fromarray(np.full((96, 160, 3), 200, np.uint8)).save(tmp_path / "src" / "slide.png")
    folder = tmp_path / "bags"
    folder.mkdir()
    coords = np.array([[x, y] for y in (0, 64) for x in (0, 32, 96)], dtype=np.int64)
    for seed, name in enumerate(("a.h5", "b.h5")):
        with h5py.File(folder / name, "w") as f:
            f.create_dataset("features", data=np.random.default_rng(seed).normal(size=(6, 6)).astype(np.float16))
            f.create_dataset("coords", data=coords)
            f.attrs.update({"patch_size": 32, "level": 0, "source": str(tmp_path / "src" / "slide.png"),
                            "complete": True})
    return model, folder


def _names(result) -> list[str]:
    return [Path(row["path"]).name for row in result.rows]


def _no_temp_files(folder: Path) -> bool:
    return not [p for p in folder.iterdir() if ".tmp" in p.name or p.name.endswith(".lock")]


# ----------------------------------------------------------------------------- predict: one run, one table

def test_a_second_predict_into_a_busy_out_stops_naming_the_first(bags, tmp_path, capsys):
    model, folder = bags
    out = tmp_path / "out"
    predict_sources(model, [folder], out_dir=out, pictures=False)
    before = (out / PREDICTIONS).read_bytes()
    with claim_output_folder(out):  # a predict still running there
        with pytest.raises(RunFolderError) as err:
            predict_sources(model, [folder], out_dir=out, pictures=False)
        assert run_command(lambda: predict_sources(model, [folder], out_dir=out, pictures=False)) == 2
    message = str(err.value)
    assert str(out) in message and f"in use by pid {os.getpid()}" in message and "--out" in message, message
    assert (out / PREDICTIONS).read_bytes() == before and _no_temp_files(out)


def test_a_failed_predict_leaves_the_complete_table_of_the_last_one(bags, tmp_path, monkeypatch):
    from hrsel.inference import predict as P

    model, folder = bags
    out = tmp_path / "out"
    predict_sources(model, [folder], out_dir=out, pictures=False)
    before = (out / PREDICTIONS).read_bytes()
    assert before.count(b"\n") == 3  # header and two rows
    forward, calls = P._forward, []

    def failing(*args, **kwargs):  # the second image fails (a corrupt file, a stop)
        calls.append(1)
        if len(calls) == 2:
            raise DataError("b.h5 cannot be read")
        return forward(*args, **kwargs)

    monkeypatch.setattr(P, "_forward", failing)
    with pytest.raises(DataError):
        predict_sources(model, [folder], out_dir=out, pictures=False)
    assert (out / PREDICTIONS).read_bytes() == before and _no_temp_files(out)


def test_a_predict_into_its_own_input_folder_reads_none_of_its_outputs(bags, tmp_path):
    model, folder = bags
    first = predict_sources(model, [folder], out_dir=folder)  # heatmap PNGs and score zarrs land among the inputs
    assert (folder / "a_heatmap.png").is_file() and (folder / "a_scores.zarr").is_dir()
    again = predict_sources(model, [folder], out_dir=folder, pictures=False)
    assert _names(first) == _names(again) == ["a.h5", "b.h5"]
    with open(folder / PREDICTIONS, newline="") as f:
        assert [Path(r["path"]).name for r in csv.DictReader(f)] == ["a.h5", "b.h5"]
    elsewhere = predict_sources(model, [folder], out_dir=tmp_path / "other", pictures=False)  # an earlier --out
    assert _names(elsewhere) == ["a.h5", "b.h5"]


def test_an_unreadable_file_in_a_folder_is_named_in_a_warning(bags, tmp_path, caplog):
    _, folder = bags
    (folder / "scan.svs").write_bytes(os.urandom(300))  # a corrupt slide
    with caplog.at_level(logging.WARNING, logger="hrsel.inference.inputs"):
        items = expand_inputs([folder])
    assert [item.path.name for item in items] == ["a.h5", "b.h5"]
    assert "scan.svs" in caplog.text and str(folder) in caplog.text and "skipping 1 file" in caplog.text


def test_an_image_smaller_than_a_patch_exits_2_naming_it(bags, tmp_path, capsys):
    from PIL import Image

    from hrsel.models import build_pipeline

    model, _ = bags
    torch.manual_seed(0)
    model.pipeline = build_pipeline("ips", tasks=model.tasks, in_chans=1, patch_size=32, k=2,
                                    score_chunk=4, backbone="narrow_resnet",
                                    backbone_options={"width": 8, "strides": [2, 2], "blocks": [1, 1]}).eval()
    Image.fromarray(np.zeros((16, 24), np.uint8)).save(tmp_path / "tiny.png")
    code = run_command(lambda: predict_sources(model, [tmp_path / "tiny.png"], out_dir=tmp_path / "out"))
    err = capsys.readouterr().err
    assert code == 2 and str(tmp_path / "tiny.png") in err and "patch_size=32" in err, err


def test_a_model_given_the_other_kind_of_input_exits_2_naming_it(bags, tmp_path, capsys):
    """A pixel model given an .h5 cache (a raw conv2d RuntimeError before) or a bag model given an image."""
    from hrsel.models import build_pipeline

    model, folder = bags
    code = run_command(lambda: predict_sources(model, [tmp_path / "src" / "slide.png"], out_dir=tmp_path / "o1"))
    err = capsys.readouterr().err
    assert code == 2 and "slide.png" in err and "trained on feature caches" in err and "hrsel.features" in err, err
    torch.manual_seed(0)
    model.pipeline = build_pipeline("ips", tasks=model.tasks, in_chans=3, patch_size=32, k=2,
                                    score_chunk=4, backbone="narrow_resnet",
                                    backbone_options={"width": 8, "strides": [2, 2], "blocks": [1, 1]}).eval()
    code = run_command(lambda: predict_sources(model, [folder / "a.h5"], out_dir=tmp_path / "o2"))
    err = capsys.readouterr().err
    assert code == 2 and "a.h5" in err and "trained on images" in err and "images themselves" in err, err
    assert "Traceback" not in err and not (tmp_path / "o2" / PREDICTIONS).exists()


def test_a_bag_at_another_resolution_than_the_runs_exits_2_naming_both(bags, tmp_path, capsys):
    model, folder = bags
    model.config.data = types.SimpleNamespace(name="features", options={"target_mpp": 0.5, "patch_size": 32})
    code = run_command(lambda: predict_sources(model, [folder], out_dir=tmp_path / "out"))
    err = capsys.readouterr().err
    assert code == 2 and "a.h5" in err and "no known um/px" in err and "data.target_mpp=0.5" in err, err
    assert "--target-mpp 0.5" in err and not (tmp_path / "out" / PREDICTIONS).exists()
    model.config.data.options = {"patch_size": 32}  # what these bags are: predicted
    assert len(predict_sources(model, [folder], out_dir=tmp_path / "out", pictures=False).rows) == 2


def test_a_second_features_run_into_a_busy_out_stops_naming_the_first(tmp_path, capsys):
    from hrsel.engine.rundir import RunLock
    from hrsel.features import _out_use

    make_slide(tmp_path / "s.tif", tissue=True)
    (tmp_path / "slides.csv").write_text("path\ns.tif\n")
    out = tmp_path / "bags"
    args = [str(tmp_path / "slides.csv"), "--backbone", "resnet18", "--backbone-options", '{"last_stage": "layer1"}',
            "--patch-size", "64", "--workers", "0", "--device", "cpu", "--no-progress", "--out", str(out)]
    assert features_main(args) == 0
    written = (out / "s.h5").read_bytes()
    with RunLock.acquire(out, use=_out_use()):  # a features run still writing there
        code = features_main(args)
    err = capsys.readouterr().err
    assert code == 2 and str(out) in err and f"in use by pid {os.getpid()}" in err and "--out" in err, err
    assert "Traceback" not in err and "BlockingIOError" not in err and (out / "s.h5").read_bytes() == written


# ----------------------------------------------------------------------------- --out that cannot be used

def _read_only(monkeypatch):
    """Simulate a read-only folder (the tests may run as root): creating a lock file fails with EACCES."""
    real = os.open

    def refusing(path, *args, **kwargs):
        if str(path).endswith(".lock"):
            raise PermissionError(errno.EACCES, "Permission denied", str(path))
        return real(path, *args, **kwargs)

    monkeypatch.setattr(os, "open", refusing)


OUT_CASES = {
    "a_file": (lambda t: (t / "taken.txt", t / "taken.txt"), "is a file, not a folder"),
    "under_a_file": (lambda t: (t / "taken.txt" / "sub", t / "taken.txt" / "sub"), "cannot create output folder"),
    "read_only": (lambda t: (t / "ro", t / "ro"), "cannot write in output folder"),
}


@pytest.mark.parametrize("command", ["predict", "features"])
@pytest.mark.parametrize("case", sorted(OUT_CASES))
def test_an_out_that_cannot_be_used_exits_2_before_any_work(tmp_path, monkeypatch, capsys, command, case):
    where, words = OUT_CASES[case]
    (tmp_path / "taken.txt").write_text("keep me")
    out, named = where(tmp_path)
    if case == "read_only":
        out.mkdir()
        _read_only(monkeypatch)
    missing = tmp_path / "no_such_input"  # never reached: the --out is checked first
    if command == "predict":
        code = predict_main([str(tmp_path / "no_such_run"), str(missing), "--out", str(out), "--no-progress"])
    else:
        code = features_main([f"{missing}.csv", "--backbone", "resnet18", "--out", str(out), "--no-progress"])
    err = capsys.readouterr().err
    assert code == 2 and words in err and str(named) in err and "--out" in err, err
    assert "no_such" not in err and "Traceback" not in err and err.count("error: ") == 1, err
    assert (tmp_path / "taken.txt").read_text() == "keep me"


# ----------------------------------------------------------------------------- a full disk

@pytest.mark.parametrize("where", ["map", "table"])
def test_disk_full_in_predict_is_one_named_error_and_the_old_table_is_kept(bags, tmp_path, monkeypatch, capsys,
                                                                            where):
    from hrsel.inference import geojson

    model, folder = bags
    out = tmp_path / "out"
    predict_sources(model, [folder], out_dir=out, pictures=False)
    before = (out / PREDICTIONS).read_bytes()
    if where == "map":
        def full(path, *args, **kwargs):
            Path(path).write_text('{"type": "Feat')  # what a full disk leaves
            raise NO_SPACE

        monkeypatch.setattr(geojson, "write_geojson", full)
        named = out / "a.geojson"
    else:
        atomic_write = outputs.atomic_write

        def full_table(path, write, **kwargs):
            def partial(f):
                f.write(b"path,")
                raise NO_SPACE
            atomic_write(path, partial, **kwargs)

        monkeypatch.setattr(outputs, "atomic_write", full_table)
        named = out / PREDICTIONS
    code = run_command(lambda: predict_sources(model, [folder], out_dir=out, pictures=False))
    err = capsys.readouterr().err
    assert code == 2 and f"cannot write {named}" in err and "no space left on the device" in err, err
    assert "--out" in err and "hrsel.predict again" in err and "Traceback" not in err
    assert (out / PREDICTIONS).read_bytes() == before and _no_temp_files(out)
    if where == "map":
        assert not named.exists()  # no partial map left


def _one_slide_manifest(tmp_path: Path) -> Path:
    (tmp_path / "img").mkdir()
    make_slide(tmp_path / "img" / "s.tif", tissue=True)
    (tmp_path / "cohort.csv").write_text("path\nimg/s.tif\n")
    return tmp_path / "cohort.csv"


@pytest.mark.parametrize("when", ["before", "write", "flush"])
def test_disk_full_in_features_is_one_named_error_and_no_partial_file(tmp_path, monkeypatch, capsys, when):
    """before: the free space is checked first; write / flush: the disk fills while writing (h5py raises
    OSError from a write, RuntimeError from a flush)."""
    manifest = _one_slide_manifest(tmp_path)
    out = tmp_path / "bags"
    out.mkdir()
    (out / "done.h5").write_bytes(b"an earlier, complete cache")
    if when == "before":
        usage = feature_cache.shutil.disk_usage(out)
        monkeypatch.setattr(feature_cache.shutil, "disk_usage", lambda p: usage._replace(free=300_000))
    else:
        monkeypatch.setattr(feature_cache, "_check_space", lambda *args: None)
    if when == "write":
        def full(self, key, value):
            raise NO_SPACE

        monkeypatch.setattr(h5py.Dataset, "__setitem__", full)
    if when == "flush":
        flush = h5py.File.flush

        def full_flush(self):
            if "features" in self:
                raise RuntimeError("Unable to synchronously flush file (file write failed: errno = 28, "
                                   "error message = 'No space left on device')")
            flush(self)

        monkeypatch.setattr(h5py.File, "flush", full_flush)
    code = features_main([str(manifest), "--backbone", "resnet18", "--backbone-options", '{"last_stage": "layer1"}',
                          "--patch-size", "64", "--workers", "0", "--device", "cpu", "--no-progress",
                          "--out", str(out)])
    err = capsys.readouterr().err
    assert code == 2 and f"cannot write feature cache {out / 'img__s.h5'}" in err, err
    assert "no space left on the device" in err and "--out" in err and "Traceback" not in err
    assert sorted(p.name for p in out.iterdir()) == ["done.h5"]  # no partial file, no lock, the old cache kept
    assert (out / "done.h5").read_bytes() == b"an earlier, complete cache"


# ----------------------------------------------------------------------------- feature caches of the same id

def test_a_cache_of_another_image_with_the_same_id_is_refused_naming_both(tmp_path, monkeypatch):
    from hrsel.io import open_image
    from hrsel.tiling import PatchGrid

    first, second = tmp_path / "site1" / "s.tif", tmp_path / "site2" / "s.tif"
    first.parent.mkdir()
    second.parent.mkdir()
    make_slide(first, tissue=True)
    make_slide(second, tissue=False)
    path = tmp_path / "bags" / "s.h5"

    def grid(source):
        return PatchGrid.for_source(source, patch_size=64, min_tissue_fraction=0.5)

    def cache(image):
        return feature_cache.cache_bag(path, lambda: open_image(str(image)), grid, lambda x: x.mean((2, 3)),
                                       batch_size=8, workers=0)

    assert cache(first) is True
    written = path.read_bytes()
    with pytest.raises(DataError) as err:
        cache(second)
    message = str(err.value)
    assert str(first) in message and str(second) in message and str(path) in message, message
    assert path.read_bytes() == written
    assert cache(first) is False  # the same image: kept
    monkeypatch.chdir(tmp_path)
    assert cache(Path("site1") / "s.tif") is False  # the same file by a relative path: kept

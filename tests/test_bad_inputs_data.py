"""Bad inputs to the data sets and generators: each error names the file, the item or the setting.

Loaders: a corrupt or deleted Megapixel MNIST chunk, broken metadata and label files, labels
out of range, a billiard sample missing a file, padding that crops the image away, CUB and
traffic annotations with unknown classes. Generators: bad settings, a missing --mnist-dir and
an occupied output folder are refused before anything on disk changes; --overwrite replaces
a data set only once the new one is complete.
"""
from __future__ import annotations

import importlib.util
import json
import logging
import re
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from hrsel.data import billiard, cub, traffic
from hrsel.data import billiard_gen, megapixel_mnist_gen
from hrsel.data.billiard_gen import BilliardParameters, generate_billiard
from hrsel.data.digits import load_digit_pools
from hrsel.data.megapixel_mnist import MegapixelMNIST, open_image_array
from hrsel.data.megapixel_mnist_gen import MegapixelParameters, generate_megapixel_mnist
from hrsel.data import mnist_idx
from hrsel.engine import datagen
from hrsel.errors import ConfigError, DataError, ImageReadError

from fixtures_data import BALLS, make_cub, make_megapixel_mnist, write_idx, write_mnist_idx, write_release, write_set

REPO = Path(__file__).resolve().parents[1]


def snapshot(folder: Path) -> dict[str, tuple[bytes, int]]:
    """Every file under `folder` with its bytes and mtime: equal snapshots mean nothing was touched."""
    return {str(p.relative_to(folder)): (p.read_bytes(), p.stat().st_mtime_ns)
            for p in sorted(folder.rglob("*")) if p.is_file()}


def error_naming(error_type, call, *patterns: str):
    with pytest.raises(error_type) as info:
        call()
    for pattern in patterns:
        assert re.search(pattern, str(info.value)), f"{pattern!r} not in: {info.value}"
    return info.value


def load_tool(name: str):
    spec = importlib.util.spec_from_file_location(name, REPO / "tools" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(autouse=True)
def no_mnist_elsewhere(tmp_path, monkeypatch):
    """Only the MNIST folders a test names: no $HRSEL_MNIST_DIR, no cache, no download."""
    monkeypatch.delenv(mnist_idx.ENV_VAR, raising=False)
    monkeypatch.setattr(mnist_idx, "CACHE_DIR", tmp_path / "no-cache")
    monkeypatch.setattr(mnist_idx, "MIRRORS", ())


# ---- Megapixel MNIST: the loader -------------------------------------------------------------------

@pytest.fixture(scope="module")
def megapixel_source(tmp_path_factory) -> Path:
    return make_megapixel_mnist(tmp_path_factory.mktemp("mm"), size=140, n_train=2, n_test=2)


@pytest.fixture
def megapixel(megapixel_source, tmp_path) -> Path:
    """A private copy of the tiny generated set, free to break."""
    return Path(shutil.copytree(megapixel_source, tmp_path / "megapixel_mnist"))


ZARR_METADATA = ("zarr.json", ".zarray", ".zattrs")  # zarr 3, zarr 2


def chunk_file(root: Path, split: str = "train", index: int = 1) -> Path:
    path = root / split / "images.zarr" / f"{index:05d}"
    (first, *_) = [f for f in sorted(path.rglob("*")) if f.is_file() and f.name not in ZARR_METADATA]
    return first


def test_corrupt_chunk_names_the_chunk_file_and_the_item(megapixel):
    chunk = chunk_file(megapixel)
    chunk.write_bytes(b"\x00garbage" * 8)
    error = error_naming(DataError, lambda: MegapixelMNIST(root=megapixel, split="train")[1],
                         re.escape(str(chunk)), r"item train/00001", "corrupt")
    assert "Zstd" in str(error) or "codec" in str(error).lower() or "decode" in str(error)


def test_corrupt_chunk_read_lazily_names_the_image(megapixel):
    chunk_file(megapixel).write_bytes(b"\x00garbage" * 8)
    source = MegapixelMNIST(root=megapixel, split="train", as_source=True)[1]["image"]
    error_naming(ImageReadError, lambda: source.read_region(0, 0, 20, 20),
                 re.escape(str(megapixel / "train" / "images.zarr" / "00001")), "corrupt")


@pytest.mark.parametrize("as_source", [False, True], ids=["tensor", "source"])
def test_deleted_chunk_is_an_error_not_a_blank_image(megapixel, as_source):
    chunk = chunk_file(megapixel, "test", 0)
    chunk.unlink()
    dataset = MegapixelMNIST(root=megapixel, split="test", as_source=as_source)
    error_naming(DataError, lambda: dataset[0], re.escape(str(chunk)), r"item test/00000", "blank")
    assert dataset[1]["image"] is not None  # the other items still load


def test_the_stored_chunk_list_matches_the_files_zarr_wrote(megapixel):
    array = open_image_array(megapixel / "train" / "images.zarr" / "00000", item="train/00000", shape=(140, 140, 1))
    stored = array.attrs["stored_chunks"]
    assert stored and len(stored) == array.nchunks_initialized


def test_corrupt_image_metadata_names_the_image(megapixel):
    (meta, *_) = [f for f in (megapixel / "train" / "images.zarr" / "00001").iterdir() if f.name in ZARR_METADATA[:2]]
    meta.write_text('{"zarr_format": 3, "node_type": "arr')
    error_naming(DataError, lambda: MegapixelMNIST(root=megapixel, split="train")[1],
                 re.escape(str(meta.parent)), r"item train/00001", "metadata")


PARAMETERS_DAMAGE = {
    "invalid-json": (lambda p: '{"format": "hrsel-megapixel-mnist/1", "width": 14', r"parameters.json:1: invalid JSON"),
    "a-list": (lambda p: "[1, 2]", "JSON list, not an object"),
    "no-width": (lambda p: json.dumps({k: v for k, v in p.items() if k != "width"}), r"'width'.*None"),
    "width-text": (lambda p: json.dumps(dict(p, width="140")), r"'width'.*'140'"),
}


@pytest.mark.parametrize("damage", sorted(PARAMETERS_DAMAGE))
def test_broken_parameters_json_names_the_file(megapixel, damage):
    path = megapixel / "parameters.json"
    rewrite, pattern = PARAMETERS_DAMAGE[damage]
    path.write_text(rewrite(json.loads(path.read_text())))
    error_naming(DataError, lambda: MegapixelMNIST(root=megapixel, split="train"), re.escape(str(path)), pattern)


LABELS_DAMAGE = {
    "missing-task": (lambda l: {k: v for k, v in l.items() if k != "top"}, r"no labels for task\(s\) \['top'\]"),
    "majority-12": (lambda l: dict(l, majority=[l["majority"][0], 12]), r"'majority', item 1: label 12"),
    "multi-2": (lambda l: dict(l, multi=[l["multi"][0], [2] + l["multi"][1][1:]]), r"'multi', item 1"),
    "short": (lambda l: dict(l, max=l["max"][:1]), r"'max' has 1 labels.*2 items"),
    "text": (lambda l: dict(l, top=["three", 1]), r"'top' labels are not integers"),
}


@pytest.mark.parametrize("damage", sorted(LABELS_DAMAGE))
def test_broken_labels_name_the_file_task_and_item(megapixel, damage):
    path = megapixel / "test" / "labels.json"
    rewrite, pattern = LABELS_DAMAGE[damage]
    path.write_text(json.dumps(rewrite(json.loads(path.read_text()))))
    error_naming(DataError, lambda: MegapixelMNIST(root=megapixel, split="test"), re.escape(str(path)), pattern)


def test_labels_json_not_json(megapixel):
    path = megapixel / "train" / "labels.json"
    path.write_text("{majority: [1, 2]")
    error_naming(DataError, lambda: MegapixelMNIST(root=megapixel, split="train"), re.escape(str(path)))


def test_font_digits_are_announced_when_the_set_is_loaded(megapixel, caplog):
    path = megapixel / "parameters.json"
    path.write_text(json.dumps(dict(json.loads(path.read_text()), digits="rendered")))
    with caplog.at_level(logging.INFO, logger="hrsel.data.megapixel_mnist"):
        MegapixelMNIST(root=megapixel, split="train")
    warned = [r for r in caplog.records if r.levelno == logging.WARNING]
    assert warned and "RENDERED FROM A FONT" in warned[0].getMessage() and str(megapixel) in warned[0].getMessage()


def test_mnist_digits_are_logged_too(megapixel, caplog):
    with caplog.at_level(logging.INFO, logger="hrsel.data.megapixel_mnist"):
        MegapixelMNIST(root=megapixel, split="train")
    assert "MNIST digits" in caplog.text and not [r for r in caplog.records if r.levelno >= logging.WARNING]


# ---- Megapixel MNIST: digits and the generator ----------------------------------------------------------

@pytest.fixture(scope="module")
def idx_dir(tmp_path_factory) -> Path:
    return write_mnist_idx(tmp_path_factory.mktemp("idx"), n_train=40, n_test=20)


@pytest.fixture(scope="module")
def pools(idx_dir):
    return load_digit_pools(mnist_dir=idx_dir, download=False, progress=False)


TINY = MegapixelParameters(width=100, height=100, n_train=2, n_test=1, noise=False, chunk=64)


def test_unknown_digits_source_lists_the_valid_ones():
    error_naming(DataError, lambda: load_digit_pools(digits="emnist"), "'emnist'", "mnist, rendered")


def test_unknown_digits_through_the_trainer_is_a_config_error_not_a_font_fallback(tmp_path):
    root = tmp_path / "mm"
    error_naming(ConfigError, lambda: datagen.generate_megapixel_mnist(str(root), digits="x", n_train=1, n_test=1),
                 "'x'", "mnist, rendered")
    assert not root.exists()


@pytest.mark.parametrize("kind", ["missing", "empty"])
def test_mnist_dir_without_digits_is_an_error(tmp_path, kind):
    folder = tmp_path / "mnist"
    if kind == "empty":
        folder.mkdir()
    error_naming(DataError, lambda: load_digit_pools(mnist_dir=folder), re.escape(str(folder)), "--mnist-dir",
                 "does not exist" if kind == "missing" else "t10k")


def test_mnist_dir_missing_through_the_trainer_does_not_fall_back_to_fonts(tmp_path):
    root = tmp_path / "mm"
    error_naming(ConfigError, lambda: datagen.generate_megapixel_mnist(str(root), mnist_dir=str(tmp_path / "nope"),
                                                                       n_train=1, n_test=1),
                 "mnist_dir", re.escape(str(tmp_path / "nope")))
    assert not root.exists()


def test_mnist_label_out_of_range_names_the_item(tmp_path):
    folder = write_mnist_idx(tmp_path / "idx", n_train=12, n_test=12)
    write_idx(folder / "t10k-labels-idx1-ubyte.gz", np.array([0] * 5 + [11] + [1] * 6), gz=True)
    error_naming(DataError, lambda: mnist_idx.load_split("test", folder, only=True), "label 11 at item 5",
                 "t10k-labels")


def test_generator_refuses_a_finished_set_without_overwrite(megapixel, pools):
    before = snapshot(megapixel)
    error_naming(DataError, lambda: generate_megapixel_mnist(megapixel, pools, params=TINY, progress=False),
                 re.escape(str(megapixel)), "already holds a finished", "--overwrite")
    assert snapshot(megapixel) == before


def test_generator_refuses_an_unfinished_set_without_overwrite(megapixel, pools):
    (megapixel / "parameters.json").unlink()
    before = snapshot(megapixel)
    error_naming(DataError, lambda: generate_megapixel_mnist(megapixel, pools, params=TINY, progress=False),
                 "unfinished", "--overwrite")
    assert snapshot(megapixel) == before


def test_generator_never_deletes_foreign_files_even_with_overwrite(megapixel, pools):
    (megapixel / "test" / "my_notes.txt").write_text("user data")
    before = snapshot(megapixel)
    error_naming(DataError, lambda: generate_megapixel_mnist(megapixel, pools, params=TINY, progress=False,
                                                             overwrite=True),
                 r"not Megapixel MNIST output \(test/my_notes.txt\)", "nothing was changed")
    assert snapshot(megapixel) == before


def test_overwrite_replaces_the_set_only_once_the_new_one_is_complete(megapixel, pools, monkeypatch):
    before = snapshot(megapixel)

    def crash(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(megapixel_mnist_gen, "_write_images", crash)
    with pytest.raises(KeyboardInterrupt):
        generate_megapixel_mnist(megapixel, pools, params=TINY, progress=False, overwrite=True)
    assert snapshot(megapixel) == before  # an interrupted overwrite keeps the old set ...
    assert not (megapixel.parent / ".megapixel_mnist.partial").exists()  # ... and leaves no litter
    monkeypatch.undo()
    generate_megapixel_mnist(megapixel, pools, params=TINY, progress=False, overwrite=True)
    assert json.loads((megapixel / "parameters.json").read_text())["n_train"] == 2
    assert sorted(p.name for p in (megapixel / "train" / "images.zarr").iterdir() if p.is_dir()) == ["00000", "00001"]
    assert not (megapixel.parent / ".megapixel_mnist.partial").exists()
    assert len(MegapixelMNIST(root=megapixel, split="test")) == 1


@pytest.mark.parametrize("argv,pattern", [
    (["--n-train", "0"], "n_train=0"),
    (["--n-test", "-1"], "n_test=-1"),
    (["--width", "20"], "width=20"),
    (["--mnist-dir", "{tmp}/does-not-exist"], "does-not-exist does not exist"),
], ids=["n-train-0", "n-test-negative", "width-20", "mnist-dir-missing"])
def test_megapixel_tool_rejects_bad_settings_before_writing(tmp_path, idx_dir, capsys, argv, pattern):
    out = tmp_path / "out"
    base = ["--mnist-dir", str(idx_dir), "--no-download", "--quiet", "--no-noise", "--width", "100",
            "--height", "100", "--n-train", "2", "--n-test", "1"]
    rc = load_tool("make_megapixel_mnist").main([str(out)] + base + [a.format(tmp=tmp_path) for a in argv])
    assert rc == 2
    assert re.search(pattern, capsys.readouterr().err)
    assert not out.exists() and not (tmp_path / ".out.partial").exists()


# ---- Billiard: the generator and its tool ------------------------------------------------------------

@pytest.fixture(scope="module")
def billiard_source(tmp_path_factory) -> Path:
    params = BilliardParameters(size=200, n_train=3, n_valid=1, n_test=1, seed=2)
    return generate_billiard(tmp_path_factory.mktemp("bil") / "billiard", params=params, progress=False)


@pytest.fixture
def generated(billiard_source, tmp_path) -> Path:
    return Path(shutil.copytree(billiard_source, tmp_path / "billiard"))


def run_billiard_tool(out: Path, *argv: str) -> int:
    return load_tool("make_billiard").main([str(out), "--size", "200", "--n-train", "1", "--n-valid", "1",
                                            "--n-test", "1", "--quiet", *argv])


@pytest.mark.parametrize("argv,pattern", [
    (["--n-train", "0"], r"n_train=0 \(--n-train\)"),
    (["--n-valid", "-2"], r"n_valid=-2"),
    (["--size", "20"], r"size=20 \(--size\)"),
    (["--min-balls", "5", "--max-balls", "3"], "min_balls <= max_balls"),
], ids=["n-train-0", "n-valid-negative", "size-20", "min-above-max"])
def test_billiard_tool_rejects_bad_settings_before_writing(tmp_path, capsys, argv, pattern):
    out = tmp_path / "out"
    assert run_billiard_tool(out, *argv) == 2
    assert re.search(pattern, capsys.readouterr().err)
    assert not out.exists() and not (tmp_path / ".out.partial").exists()


def test_billiard_tool_refuses_a_non_empty_folder_without_overwrite(generated, capsys):
    before = snapshot(generated)
    assert run_billiard_tool(generated) == 2
    err = capsys.readouterr().err
    assert str(generated) in err and "already holds a finished billiard" in err and "--overwrite" in err
    assert snapshot(generated) == before


def test_billiard_tool_refuses_foreign_files_even_with_overwrite(generated, capsys):
    (generated / "README.txt").write_text("my notes")
    (generated / "train" / "sub").mkdir()
    (generated / "train" / "sub" / "x.png").write_bytes(b"not ours")
    before = snapshot(generated)
    assert run_billiard_tool(generated, "--overwrite") == 2
    err = capsys.readouterr().err
    assert "README.txt" in err and "train/sub/x.png" in err and "nothing was changed" in err
    assert snapshot(generated) == before


def test_billiard_overwrite_empties_the_folder_so_sets_never_mix(generated, capsys):
    assert len(list((generated / "train").glob("*.png"))) == 3
    assert run_billiard_tool(generated, "--overwrite") == 0
    assert sorted(p.name for p in (generated / "train").iterdir()) == ["0.json", "0.png"]  # not 3 old + 1 new
    assert json.loads((generated / "parameters.json").read_text())["n_train"] == 1


def test_billiard_failed_overwrite_keeps_the_old_set(generated, monkeypatch):
    before = snapshot(generated)

    def failing(job):
        if job[2] == 1:
            raise OSError("disk full")
        return original(job)

    original = billiard_gen._write
    monkeypatch.setattr(billiard_gen, "_write", failing)
    params = BilliardParameters(size=200, n_train=2, n_valid=0, n_test=0)
    with pytest.raises(OSError, match="disk full"):
        generate_billiard(generated, params=params, progress=False, overwrite=True)
    assert snapshot(generated) == before
    assert not (generated.parent / ".billiard.partial").exists()
    monkeypatch.undo()
    generate_billiard(generated, params=params, progress=False, overwrite=True)
    assert sorted(p.name for p in (generated / "train").iterdir()) == ["0.json", "0.png", "1.json", "1.png"]


# ---- Billiard: the loader ----------------------------------------------------------------------------------

def test_default_padding_scales_with_the_image_size(generated):
    """--size 200 with the DPS pad of 1100 shifted most crops off the image (13 of 16 were blank)."""
    dataset = billiard.Billiard(root=generated, split="train")
    assert dataset.image_size == (200, 200) and dataset.padded_size == 220
    plain = billiard.Billiard(root=generated, split="train", augment=False)[0]["image"]
    torch.manual_seed(0)
    crops = [dataset[0]["image"] for _ in range(16)]
    assert any(not torch.equal(crop, plain) for crop in crops)  # shifted ...
    kept = [(crop.sum(dim=0) > 0).float().mean().item() for crop in crops]
    assert min(kept) > 0.8, f"fractions of the image kept: {kept}"  # ... but never mostly blank


def test_padding_that_would_blank_the_image_is_rejected(generated):
    error_naming(DataError, lambda: billiard.Billiard(root=generated, split="train", padded_size=1100),
                 "padded_size=1100", "200x200", r"200\.\.300", "220")


@pytest.mark.parametrize("content,pattern", [
    ('{"size": 200,\n "n_train": ', r"parameters.json:2: invalid JSON"),
    ('{"size": "big"}', r"parameters.json: 'size' must be a positive integer.*'big'"),
], ids=["invalid-json", "size-text"])
def test_broken_billiard_parameters_json_names_the_file(generated, content, pattern):
    (generated / "parameters.json").write_text(content)
    error_naming(DataError, lambda: billiard.Billiard(root=generated, split="train"), pattern)


@pytest.fixture
def release(tmp_path) -> Path:
    write_release(tmp_path, "valid", [BALLS, BALLS[1:], BALLS])
    return tmp_path / "valid"


def test_a_missing_image_is_listed_not_dropped(release):
    (release / "1.png").unlink()
    (release / "2.png").unlink()
    error_naming(DataError, lambda: billiard.Billiard(root=release.parent, split="valid", image_size=(64, 64)),
                 "2 billiard sample", r"1.json has no image 1.png", r"2.json has no image 2.png")


BALL_DAMAGE = {
    "no-numbers": ([{k: v for k, v in b.items() if k != "number"} for b in BALLS], r"ball 0 lacks 'number'"),
    "number-12": ([dict(BALLS[0], number=12)] + BALLS[1:], r"ball 0 number 12 is not an integer in 1\.\.9"),
    "number-text": (BALLS[:1] + [dict(BALLS[1], number="3")] + BALLS[2:], r"ball 1 number '3'"),
    "number-0": (BALLS[:2] + [dict(BALLS[2], number=0)], r"ball 2 number 0"),
    "position-text": ([dict(BALLS[0], position="left")] + BALLS[1:], r"ball 0 position 'left'"),
    "not-a-list": ({"balls": 3}, "expected a non-empty list of balls"),
}


@pytest.mark.parametrize("damage", sorted(BALL_DAMAGE))
def test_bad_ball_lists_name_the_file_and_ball(release, damage):
    balls, pattern = BALL_DAMAGE[damage]
    (release / "1.json").write_text(json.dumps(balls))
    error_naming(DataError, lambda: billiard.Billiard(root=release.parent, split="valid", image_size=(64, 64)),
                 re.escape(str(release / "1.json")), pattern)


# ---- CUB-200-2011 and traffic signs -------------------------------------------------------------------

@pytest.mark.parametrize("table,line,pattern", [
    ("image_class_labels.txt", "2 201", r"image id 2 .*class '201', not 1\.\.200"),
    ("image_class_labels.txt", "2 sparrow", r"image id 2 .*class 'sparrow'"),
    ("train_test_split.txt", "2 2", r"image id 2 .*split flag '2'"),
], ids=["class-201", "class-text", "split-flag-2"])
def test_cub_labels_out_of_range_name_the_file_and_image(tmp_path, table, line, pattern):
    folder = make_cub(tmp_path)
    path = folder / table
    lines = path.read_text().splitlines()
    lines[1] = line
    path.write_text("\n".join(lines) + "\n")
    error_naming(DataError, lambda: cub.CUB200(root=tmp_path, split="train"), re.escape(str(path)), pattern)


def test_cub_table_not_utf8_names_the_file(tmp_path):
    folder = make_cub(tmp_path)
    (folder / "images.txt").write_bytes(b"1 \xff\xfe.jpg\n")
    error_naming(DataError, lambda: cub.CUB200(root=tmp_path, split="train"), re.escape(str(folder / "images.txt")))


@pytest.mark.parametrize("sign,pattern", [
    ("VISIBLE, 400.0, 300.0, 380.0, 280.0, PROHIBITORY, 50_sign;", r"'50_sign'.*did you mean '50_SIGN'"),
    ("VISIBLE, 400.0, 300.0, 380.0, 280.0, PROHIBITORY, 80-SIGN;", r"'80-SIGN'.*did you mean '80_SIGN'"),
    ("VISIBLE, 400.0, 300.0, 380.0, 280.0, PROHIBITORY, ;", r"empty NAME"),
], ids=["lower-case", "dash", "empty"])
def test_traffic_unknown_class_names_the_line(tmp_path, sign, pattern):
    write_set(tmp_path, "Set1", {"1277382001Image000001.jpg": ("", 0), "1277382002Image000002.jpg": (sign, 1)},
              size=(48, 64))
    error_naming(DataError, lambda: traffic.build_index(tmp_path, "Set1"), r"Set1/annotations.txt:2", pattern)


def test_traffic_cache_with_labels_out_of_range_is_rebuilt(tmp_path, caplog):
    write_set(tmp_path, "Set2", {"1277382001Image000001.jpg": ("VISIBLE, 4, 3, 1, 1, PROHIBITORY, 70_SIGN;", 2)},
              size=(48, 64))
    index = traffic.load_index(tmp_path, "Set2")
    cache = tmp_path / "Set2" / "hrsel_index.json"
    cache.write_text(json.dumps(dict(index, labels=[7])))
    with caplog.at_level(logging.WARNING, logger="hrsel.data.traffic"):
        assert traffic.load_index(tmp_path, "Set2")["labels"] == [2]
    assert "outside 0..3" in caplog.text and str(cache) in caplog.text


# ---- the staging folder -----------------------------------------------------------------------------------

def test_a_killed_runs_staging_folder_is_cleared_but_a_foreign_one_is_not(tmp_path):
    params = BilliardParameters(size=200, n_train=1, n_valid=0, n_test=0)
    stage = tmp_path / ".billiard.partial"
    stage.mkdir()
    (stage / "sub").mkdir()
    (stage / "sub" / "mine.txt").write_text("not made by hrsel")
    before = snapshot(stage)
    error_naming(DataError, lambda: generate_billiard(tmp_path / "billiard", params=params, progress=False),
                 re.escape(str(stage)), "not made by hrsel")
    assert snapshot(stage) == before and not (tmp_path / "billiard").exists()
    shutil.rmtree(stage)
    stage.mkdir()
    (stage / ".hrsel-partial").write_text("")  # what a run killed with SIGKILL leaves
    (stage / "train").mkdir()
    generate_billiard(tmp_path / "billiard", params=params, progress=False)
    assert not stage.exists() and (tmp_path / "billiard" / "train" / "0.png").is_file()


def test_a_canvas_too_small_for_the_digits_writes_nothing(tmp_path, idx_dir, capsys):
    out = tmp_path / "out"
    rc = load_tool("make_megapixel_mnist").main([str(out), "--mnist-dir", str(idx_dir), "--no-noise", "--quiet",
                                                 "--width", "40", "--height", "40", "--n-train", "1"])
    assert rc == 2 and "cannot place 5" in capsys.readouterr().err
    assert list(tmp_path.iterdir()) == []


# ---- manifest CSVs (your own images) ------------------------------------------------------------------------

def _manifest(folder: Path, lines: list[str], name: str = "slides.csv", encoding: str = "utf-8") -> Path:
    path = folder / name
    path.write_bytes(("\n".join(lines) + "\n").encode(encoding))
    return path


def test_a_latin1_manifest_names_the_file_and_line_and_says_utf8(tmp_path):
    from hrsel.data.manifest import read_manifest
    from hrsel.inference.inputs import expand_inputs

    path = _manifest(tmp_path, ["path,label", "a.png,normal", "b.png,tumeur bénigne"], encoding="latin-1")
    for call in (lambda: read_manifest(path, check_images=False), lambda: expand_inputs([path])):
        message = str(error_naming(DataError, call, re.escape(str(path)), "line 3", "UTF-8"))
        assert "0xe9" in message and "UnicodeDecodeError" not in message


def test_a_free_text_column_is_refused_not_made_a_task_of_one_class_per_row(tmp_path):
    from hrsel.data.manifest import read_manifest

    rows = [f"s{i}.png,{'ab'[i % 2]},scanned on day {i}" for i in range(12)]
    path = _manifest(tmp_path, ["path,label,notes", *rows])
    error_naming(DataError, lambda: read_manifest(path, check_images=False), re.escape(str(path)), "'notes'",
                 "each of its 12 rows", r"data.tasks: \['label'\]")
    table = read_manifest(path, check_images=False, tasks=["label"])  # left out: fine
    assert list(table.tasks) == ["label"]
    declared = read_manifest(path, check_images=False, tasks={"label": None, "notes": "multiclass"})
    assert declared.tasks["notes"].num_classes == 12  # declared: the user asked for it


def test_labels_1_and_1_0_are_one_class(tmp_path):
    from hrsel.data.manifest import read_manifest

    path = _manifest(tmp_path, ["path,grade,tumor", "a.png,1,0", "b.png,1.0,1.0", "c.png,2.0,0.0", "d.png,2,1"])
    table = read_manifest(path, check_images=False)
    assert table.class_names["grade"] == ["1", "2"] and table.tasks["grade"].num_classes == 2
    assert [table.targets(i)["grade"].item() for i in range(4)] == [0, 0, 1, 1]
    assert table.tasks["tumor"].kind == "binary"
    assert [table.targets(i)["tumor"].item() for i in range(4)] == [0, 1, 0, 1]


def test_a_fold_column_without_data_fold_is_named_in_a_warning(tmp_path, caplog):
    from hrsel.data.manifest import assign_splits, read_manifest

    path = _manifest(tmp_path, ["path,label,fold", *[f"s{i}.png,{'ab'[i % 2]},{i % 3}" for i in range(9)]])
    table = read_manifest(path, check_images=False)
    with caplog.at_level(logging.WARNING, logger="hrsel.data.manifest"):
        assign_splits(table)
    assert "'fold' column" in caplog.text and "data.fold" in caplog.text and str(path) in caplog.text
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="hrsel.data.manifest"):
        assign_splits(table, fold=1)
    assert "'fold' column" not in caplog.text


def test_many_bad_rows_show_the_first_ones_and_count_the_rest(tmp_path):
    from hrsel.data.manifest import read_manifest
    from hrsel.data.manifest_table import SHOWN_PROBLEMS

    n = 5_000
    path = _manifest(tmp_path, ["path,label", *[f"s{i}.png," for i in range(n)]])  # every label empty
    message = str(error_naming(DataError, lambda: read_manifest(path, check_images=False), re.escape(str(path)),
                               f"{n} bad row", r"line 2 \(row 1\)", f"and {n - SHOWN_PROBLEMS} more problem"))
    assert len(message) < 5000 and message.count("empty 'label' label") == SHOWN_PROBLEMS

"""Megapixel MNIST: IDX reading, digit pools, layout rules, zarr output, data set, CLI."""
from __future__ import annotations

import importlib.util
import json
import os
from pathlib import Path

import numpy as np
import pytest
import torch

from hrsel.data import build_dataset, mnist_idx
from hrsel.data.collate import collate
from hrsel.data.digits import DigitPools, load_digit_pools, render_digits
from hrsel.data.megapixel_mnist import MegapixelMNIST
from hrsel.data.megapixel_mnist_gen import (
    DIGIT,
    MegapixelParameters,
    generate_megapixel_mnist,
    render_rows,
    sample_layout,
)
from hrsel.errors import ConfigError, DataError

from fixtures_data import write_idx, write_mnist_idx

REPO = Path(__file__).resolve().parents[1]
N_T10K = 200  # digits in the tiny t10k pair written by `t10k_dir`
# The real t10k files, when $HRSEL_MNIST_DIR names a folder that has them: extra checks only.
REAL_MNIST_DIR = os.environ.get(mnist_idx.ENV_VAR) or None
HAS_REAL_T10K = REAL_MNIST_DIR is not None and mnist_idx.find_split("test", REAL_MNIST_DIR) is not None
needs_real_t10k = pytest.mark.skipif(not HAS_REAL_T10K, reason="extra check: $HRSEL_MNIST_DIR has no real t10k files")


def isolated_from_mnist(monkeypatch: pytest.MonkeyPatch, home: Path) -> None:
    """No MNIST outside the folder a test names: no env var, empty home, cache and working directory."""
    monkeypatch.delenv(mnist_idx.ENV_VAR, raising=False)
    monkeypatch.setattr(mnist_idx, "CACHE_DIR", home / "cache")
    monkeypatch.setenv("HOME", str(home))
    monkeypatch.chdir(home)


@pytest.fixture
def no_mnist(tmp_path, monkeypatch):
    """A world without MNIST: no env var, an empty home and working directory."""
    isolated_from_mnist(monkeypatch, tmp_path)
    return tmp_path


@pytest.fixture(scope="module")
def t10k_dir(tmp_path_factory):
    """Only the t10k pair, in the exact IDX format (gzipped, real names), as when the train split is missing."""
    folder = write_mnist_idx(tmp_path_factory.mktemp("idx"), n_train=1, n_test=N_T10K, seed=4)
    for name in mnist_idx.FILES["train"]:
        (folder / name).unlink()
    return folder


def load_pools_from(folder: Path, home: Path) -> DigitPools:
    with pytest.MonkeyPatch.context() as monkeypatch:
        isolated_from_mnist(monkeypatch, home)
        return load_digit_pools(mnist_dir=folder, download=False, progress=False)


@pytest.fixture(scope="module")
def t10k_pools(t10k_dir, tmp_path_factory):
    return load_pools_from(t10k_dir, tmp_path_factory.mktemp("home"))


@pytest.fixture(scope="module")
def small_set(tmp_path_factory, t10k_pools):
    out = tmp_path_factory.mktemp("mm") / "megapixel"
    params = MegapixelParameters(width=320, height=240, n_train=6, n_test=4, n_noise=8, seed=3, chunk=64)
    generate_megapixel_mnist(out, t10k_pools, params=params, progress=False)
    return out


# ---- IDX files and digit pools ------------------------------------------------------------

@pytest.mark.parametrize("gz", [True, False])
def test_read_idx_round_trip(tmp_path, gz):
    images = np.random.default_rng(0).integers(0, 256, size=(3, 28, 28))
    path = write_idx(tmp_path / ("x.idx.gz" if gz else "x.idx"), images, gz=gz)
    np.testing.assert_array_equal(mnist_idx.read_idx(path), images)


def test_read_idx_truncated_names_file(tmp_path):
    path = write_idx(tmp_path / "bad-images-idx3-ubyte", np.zeros((3, 28, 28)), gz=False)
    path.write_bytes(path.read_bytes()[:-5])
    with pytest.raises(DataError, match="bad-images-idx3-ubyte.*truncated"):
        mnist_idx.read_idx(path)
    path.write_bytes(b"PK\x03\x04garbage")
    with pytest.raises(DataError, match="not an IDX file"):
        mnist_idx.read_idx(path)


def test_t10k_files_found_through_env(t10k_dir, tmp_path, monkeypatch):
    isolated_from_mnist(monkeypatch, tmp_path)
    assert mnist_idx.find_split("test") is None
    monkeypatch.setenv(mnist_idx.ENV_VAR, str(t10k_dir))
    assert mnist_idx.find_split("test") == tuple(t10k_dir / name for name in mnist_idx.FILES["test"])
    assert mnist_idx.find_split("train") is None
    images, labels = mnist_idx.load_split("test")
    assert images.shape == (N_T10K, 28, 28) and images.dtype == np.uint8 and labels.dtype == np.int64
    assert sorted(np.unique(labels)) == list(range(10))


def check_t10k_split(pools, n: int) -> None:
    assert pools.source == "mnist-t10k-split" and "t10k" in pools.note
    n_train = int(round(0.8 * n))
    assert len(pools.train_labels) == n_train and len(pools.test_labels) == n - n_train
    # disjoint: no test digit image appears in the train pool
    train_keys = {im.tobytes() for im in pools.train_images}
    in_both = sum(im.tobytes() in train_keys for im in pools.test_images)
    assert in_both <= 5, f"{in_both} test digits also in the train pool"  # t10k holds a few exact duplicates


def test_t10k_only_split_into_disjoint_pools(t10k_pools):
    check_t10k_split(t10k_pools, N_T10K)


@needs_real_t10k
def test_real_t10k_files_checksums_and_split(tmp_path):
    from hrsel.data.download import md5sum

    for path in mnist_idx.find_split("test", REAL_MNIST_DIR):
        assert md5sum(path) == mnist_idx.MD5[path.name]
    images, labels = mnist_idx.load_split("test", REAL_MNIST_DIR)
    assert images.shape == (10000, 28, 28) and images.dtype == np.uint8
    assert sorted(np.unique(labels)) == list(range(10))
    real_t10k_only = tmp_path / "t10k"
    real_t10k_only.mkdir()
    for path in mnist_idx.find_split("test", REAL_MNIST_DIR):
        (real_t10k_only / path.name).symlink_to(path)
    check_t10k_split(load_pools_from(real_t10k_only, tmp_path), 10000)


def test_no_mnist_fails_with_where_to_put_files(no_mnist):
    with pytest.raises(DataError, match="--mnist-dir.*rendered"):
        load_digit_pools(download=False)


def test_rendered_digits_cover_all_classes():
    images, labels = render_digits(n_per_class=3, seed=0)
    assert images.shape == (30, 28, 28) and images.dtype == np.uint8
    assert np.bincount(labels).tolist() == [3] * 10
    assert (images.reshape(30, -1).max(1) > 150).all(), "every rendered digit has ink"
    pools = load_digit_pools(digits="rendered")
    assert pools.source == "rendered" and "NOT MNIST" in pools.note.upper()


# ---- layout and rendering -------------------------------------------------------------------

def test_layout_rules():
    labels = np.repeat(np.arange(10), 20)
    layout = sample_layout(labels, n=200, height=150, width=130, noise=True, n_noise=10, seed=5)
    digits = layout.digit_label
    assert (digits[:, :3] == digits[:, :1]).all() and (digits[:, 3:] != digits[:, :1]).all()
    pos = layout.positions
    assert pos.min() >= 0 and (pos[..., 0] <= 150 - DIGIT).all() and (pos[..., 1] <= 130 - DIGIT).all()
    for p in pos:  # no two digits overlap
        d = np.abs(p[:, None] - p[None])
        overlap = (d < DIGIT).all(-1) & ~np.eye(5, dtype=bool)
        assert not overlap.any()
    assert layout.noise_positions.min() >= DIGIT and (layout.noise_positions[..., 0] < 150 - DIGIT).all()
    out = layout.labels()
    assert out["majority"] == digits[:, 0].tolist() and out["max"] == digits.max(1).tolist()
    top = [int(d[np.argmin(p[:, 0])]) for d, p in zip(digits, pos)]
    assert out["top"] == top
    multi = np.asarray(out["multi"])
    assert (multi.sum(1) == [len(set(d)) for d in digits.tolist()]).all()
    again = sample_layout(labels, n=200, height=150, width=130, noise=True, n_noise=10, seed=5)
    np.testing.assert_array_equal(again.positions, pos)


def test_canvas_too_small_raises():
    with pytest.raises(DataError, match="larger"):
        sample_layout(np.arange(10), n=1, height=56, width=56, noise=False, n_noise=0, seed=0)


def test_bands_equal_whole_image_and_digits_on_top():
    rng = np.random.default_rng(0)
    pool = rng.integers(1, 256, size=(10, 28, 28)).astype(np.uint8)
    layout = sample_layout(np.arange(10), n=1, height=200, width=170, noise=True, n_noise=30, seed=1)
    whole = render_rows(layout, pool, 0, (0, 200), 170)
    bands = np.concatenate([render_rows(layout, pool, 0, (a, min(a + 37, 200)), 170) for a in range(0, 200, 37)])
    np.testing.assert_array_equal(whole, bands)
    for (y, x), j in zip(layout.positions[0], layout.digit_index[0]):
        np.testing.assert_array_equal(whole[y:y + 28, x:x + 28], pool[j])


# ---- generated data set ---------------------------------------------------------------------

def test_generated_files_and_dataset(small_set):
    params = json.loads((small_set / "parameters.json").read_text())
    assert params["format"] == "hrsel-megapixel-mnist/1" and params["digits"] == "mnist-t10k-split"
    assert params["n_train"] == 6 and params["width"] == 320
    ds = MegapixelMNIST(root=small_set, split="train")
    assert len(ds) == 6 and set(ds.tasks) == {"majority", "max", "top", "multi"}
    item = ds[2]
    assert item["id"] == "train/00002"
    assert item["image"].shape == (1, 240, 320) and item["image"].dtype == torch.uint8
    t = item["targets"]
    assert t["majority"].dtype == torch.int64 and t["multi"].shape == (10,) and t["multi"].dtype == torch.float32
    digits = ds.labels["digits"][2]
    assert t["majority"].item() == digits[0] and t["max"].item() == max(digits)
    assert t["multi"][digits].min() == 1 and t["multi"].sum() == len(set(digits))
    # the stored digits are exactly the layout's pixels
    y, x = ds.labels["positions"][2][0]
    assert item["image"][0, y:y + 28, x:x + 28].max() > 100


def test_lazy_source_matches_tensor(small_set):
    ds_tensor = MegapixelMNIST(root=small_set, split="test")
    ds_lazy = MegapixelMNIST(root=small_set, split="test", max_tensor_pixels=1000)
    assert ds_lazy.as_source and not ds_tensor.as_source
    src = ds_lazy[1]["image"]
    assert src.dimensions == (320, 240) and src.channels == 1
    region = src.read_region(300, 200, 50, 50)  # partly outside: filled with 0 (black)
    full = ds_tensor[1]["image"][0].numpy()
    np.testing.assert_array_equal(region[:40, :20, 0], full[200:240, 300:320])
    assert (region[40:] == 0).all() and (region[:, 20:] == 0).all()


def test_dataloader_workers_and_collate(small_set):
    ds = build_dataset("megapixel_mnist", split="train", root=str(small_set), tasks=("majority", "multi"))
    first = ds[0]  # zarr used in the parent before the workers fork (the trainer's dry run does this)
    loader = torch.utils.data.DataLoader(ds, batch_size=3, num_workers=2, collate_fn=collate)
    batches = list(loader)
    assert len(batches) == 2
    b = batches[0]
    assert b["images"].shape == (3, 1, 240, 320) and b["images"].dtype == torch.uint8
    assert b["targets"]["majority"].dtype == torch.int64 and b["targets"]["majority"].shape == (3,)
    assert b["targets"]["multi"].shape == (3, 10) and b["targets"]["multi"].dtype == torch.float32
    assert b["ids"] == ["train/00000", "train/00001", "train/00002"]
    assert torch.equal(b["images"][0], first["image"])
    lazy = MegapixelMNIST(root=small_set, split="train", as_source=True)
    batch = collate([lazy[0], lazy[1]])
    assert isinstance(batch["images"], list) and len(batch["images"]) == 2


def test_dataset_errors(small_set, tmp_path):
    with pytest.raises(DataError, match="parameters.json.*make_megapixel_mnist"):
        MegapixelMNIST(root=tmp_path, split="train")
    with pytest.raises(DataError, match="split"):
        MegapixelMNIST(root=small_set, split="valid")
    with pytest.raises(DataError, match="unknown Megapixel MNIST task"):
        MegapixelMNIST(root=small_set, split="train", tasks=("majority", "sum"))
    with pytest.raises(ConfigError, match="megapixel_mnist"):
        build_dataset("megapixel_mnst", split="train", root=str(small_set))
    with pytest.raises(DataError, match="already holds"):
        generate_megapixel_mnist(small_set, load_digit_pools(digits="rendered"))
    (tmp_path / "other" / "train").mkdir(parents=True)
    (tmp_path / "other" / "train" / "notes.txt").write_text("user data")
    with pytest.raises(DataError, match="not Megapixel MNIST output"):
        generate_megapixel_mnist(tmp_path / "other", load_digit_pools(digits="rendered"),
                                 params=MegapixelParameters(width=100, height=100, n_train=1, n_test=1))
    assert (tmp_path / "other" / "train" / "notes.txt").exists()


def test_workers_give_the_same_data(tmp_path):
    pools = load_digit_pools(digits="rendered")
    params = MegapixelParameters(width=120, height=100, n_train=10, n_test=2, n_noise=3, chunk=32)
    a = generate_megapixel_mnist(tmp_path / "a", pools, params=params, progress=False)
    b = generate_megapixel_mnist(tmp_path / "b", pools, params=params, progress=False, workers=2)
    da, db = MegapixelMNIST(root=a, split="train"), MegapixelMNIST(root=b, split="train")
    for i in (0, 9):
        assert torch.equal(da[i]["image"], db[i]["image"])
    assert da.labels == db.labels


def test_large_canvas_stores_only_touched_chunks(tmp_path):
    pools = load_digit_pools(digits="rendered")
    params = MegapixelParameters(width=4096, height=4096, n_train=1, n_test=0, noise=False, chunk=256)
    out = generate_megapixel_mnist(tmp_path / "big", pools, params=params, progress=False)
    ds = MegapixelMNIST(root=out, split="train")
    chunks = [p for p in (out / "train" / "images.zarr" / "00000").rglob("*") if p.is_file() and "zarr" not in p.name
              and p.name != ".zarray"]
    assert 5 <= len(chunks) <= 20, f"{len(chunks)} chunk files for 5 digits on a 16x16-chunk canvas"
    src = MegapixelMNIST(root=out, split="train", as_source=True)[0]["image"]
    y, x = ds.labels["positions"][0][0]
    assert src.read_region(x, y, 28, 28).max() > 100


# ---- command line -----------------------------------------------------------------------------

def _cli():
    spec = importlib.util.spec_from_file_location("make_megapixel_mnist", REPO / "tools" / "make_megapixel_mnist.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_cli_rendered_digits_announced(tmp_path, capsys):
    rc = _cli().main(["--digits", "rendered", "--n-train", "2", "--n-test", "1", "--width", "150",
                      "--height", "150", "--n_noise", "2", "--quiet", str(tmp_path / "out")])
    assert rc == 0
    captured = capsys.readouterr()
    assert "RENDERED FROM A FONT" in captured.err and "images/s" in captured.out
    assert json.loads((tmp_path / "out" / "parameters.json").read_text())["digits"] == "rendered"


def test_cli_without_mnist_says_where_to_put_files(no_mnist, capsys):
    rc = _cli().main(["--no-download", "--quiet", str(no_mnist / "out")])
    assert rc == 2
    err = capsys.readouterr().err
    assert "--mnist-dir" in err and "t10k-images-idx3-ubyte.gz" in err
    assert not (no_mnist / "out" / "parameters.json").exists()


def test_mnist_download_offline_names_folder_and_files(tmp_path, monkeypatch):
    monkeypatch.setattr(mnist_idx, "MIRRORS", ((tmp_path / "no-mirror").as_uri() + "/",))
    with pytest.raises(DataError, match=r"cannot download MNIST file train-images-idx3-ubyte.gz") as info:
        mnist_idx.download_mnist(tmp_path / "cache", progress=False)
    assert str(tmp_path / "cache") in str(info.value) and "HRSEL_MNIST_DIR" in str(info.value)

"""`python -m hrsel.features`: HDF5 feature caches of tissue patches, resumable, then IPS trained on the bags."""
from __future__ import annotations

import csv
import json
import os

import h5py
import numpy as np
import pytest
import torch

from hrsel.data import build_dataset, feature_cache
from hrsel.errors import DataError
from hrsel.features import main as features_main
from hrsel.train import main as train_main

from fixtures_data import make_camelyon
from toy_bright import one_torch_thread  # noqa: F401 (autouse fixture)

TISSUE = (150, 60, 140)  # the colour of make_slide's tissue block
BACKBONE = ["--backbone", "resnet18", "--backbone-options", '{"last_stage": "layer1"}']  # D = 64
DIM = 64


@pytest.fixture
def slides(tmp_path):
    """The CAMELYON16 layout (4 slides) and a config of its slide data set with 64 px patches."""
    root = make_camelyon(tmp_path / "camelyon16")
    config = tmp_path / "slides.yaml"
    config.write_text(f"data:\n  name: camelyon16\n  root: {root}\n  patch_size: 64\n")
    return root, config


def run_features(config, out, *extra):
    return features_main([str(config), *BACKBONE, "--device", "cpu", "--batch-size", "5", "--workers", "0",
                          "--no-progress", "--out", str(out), *extra])


def test_config_caches_tissue_patches_with_coords_and_attrs(slides, tmp_path, capsys):
    import torchvision

    from hrsel.io import open_image
    from hrsel.models.backbones import build_backbone
    from hrsel.tiling import read_patches

    root, config = slides
    out, weights = tmp_path / "features", tmp_path / "resnet18.pth"
    torch.save(torchvision.models.resnet18().state_dict(), weights)
    assert run_features(config, out, "--weights", str(weights)) == 0
    assert "4 feature cache(s) written, 0 complete" in capsys.readouterr().out
    assert sorted(p.name for p in out.iterdir()) == ["normal_001.h5", "test_001.h5", "test_002.h5", "tumor_001.h5"]
    with h5py.File(out / "tumor_001.h5", "r") as f:
        feats, coords, attrs = f["features"][...], f["coords"][...], dict(f.attrs)
    assert feats.dtype == np.float16 and feats.shape == (12, DIM) and coords.dtype == np.int64
    assert attrs["complete"] and attrs["patch_size"] == 64 and attrs["level"] == 0 and attrs["n"] == 12
    assert attrs["source"].endswith("tumor_001.tif") and "resnet18" in attrs["encoder"]
    x, y = coords.T  # the tissue block spans x 128..384, y 64..256: 4 x 3 patches of 64 px
    assert set(x) == {128, 192, 256, 320} and set(y) == {64, 128, 192}
    with open_image(str(root / "training/tumor/tumor_001.tif")) as source:
        patches = read_patches(source, coords, 64)
    assert (patches == torch.tensor(TISSUE, dtype=torch.uint8).view(1, 3, 1, 1)).all(), "a patch off tissue"
    net = build_backbone("resnet18", last_stage="layer1", weights_path=str(weights)).eval()
    with torch.no_grad():
        direct = net(patches.float() / 255)
    torch.testing.assert_close(torch.from_numpy(feats).float(), direct, atol=2e-3, rtol=2e-3)
    with h5py.File(out / "test_002.h5", "r") as f:  # the slide with a small corner blob only
        assert f["coords"].shape[0] <= 1 and f.attrs["complete"]


def test_killed_and_partial_caches_are_redone_complete_ones_kept(slides, tmp_path, capsys):
    _, config = slides
    out = tmp_path / "features"
    assert run_features(config, out) == 0
    with h5py.File(out / "test_001.h5", "r+") as f:  # a partial file: `complete` missing
        del f.attrs["complete"]
    (out / "test_002.h5").unlink()
    (out / "test_002.h5.partial").write_bytes(b"torn write of a killed run")
    kept = {n: os.stat(out / n).st_mtime_ns for n in ("normal_001.h5", "tumor_001.h5")}
    capsys.readouterr()
    assert run_features(config, out) == 0
    assert "2 feature cache(s) written, 2 complete one(s) kept" in capsys.readouterr().out
    assert {n: os.stat(out / n).st_mtime_ns for n in kept} == kept
    assert feature_cache.is_complete(out / "test_001.h5") and feature_cache.is_complete(out / "test_002.h5")
    assert not list(out.glob("*.partial"))


def test_a_kill_mid_image_leaves_no_file_under_the_final_name(tmp_path):
    from hrsel.io import open_image
    from hrsel.tiling import PatchGrid

    from fixtures_data import make_slide

    make_slide(tmp_path / "s.tif", tissue=True)
    calls = []

    def dying(x):  # the second batch "kills" the run
        calls.append(len(x))
        if len(calls) == 2:
            raise KeyboardInterrupt
        return x.mean((2, 3))

    path = tmp_path / "out" / "s.h5"

    def grid(source):
        return PatchGrid.for_source(source, patch_size=64, min_tissue_fraction=0.5)

    with pytest.raises(KeyboardInterrupt):
        feature_cache.cache_bag(path, lambda: open_image(str(tmp_path / "s.tif")), grid, dying, batch_size=5,
                                workers=0)
    assert not path.exists() and (tmp_path / "out" / "s.h5.partial").exists()
    assert feature_cache.cache_bag(path, lambda: open_image(str(tmp_path / "s.tif")), grid,
                                   lambda x: x.mean((2, 3)), batch_size=5, workers=0)
    feats, coords, attrs = feature_cache.read_bag(path)
    assert feats.shape == (12, 3) and coords.shape == (12, 2) and attrs["complete"]
    np.testing.assert_allclose(feats, np.tile(np.array(TISSUE) / 255, (12, 1)), atol=1e-3)


def test_other_settings_on_a_complete_cache_stop_with_exit_2(slides, tmp_path, capsys):
    _, config = slides
    out = tmp_path / "features"
    assert run_features(config, out) == 0
    capsys.readouterr()
    assert run_features(config, out, "--patch-size", "32") == 2
    assert "patch_size_level=64" in capsys.readouterr().err
    assert run_features(config, out, "--backbone-options", "[1]") == 2  # the later flag wins: not an object


def test_manifest_csv_and_csv_labels(tmp_path, capsys):
    from fixtures_data import make_slide

    (tmp_path / "img").mkdir()
    rows = [("img/a.tif", "tumor", "train"), ("img/b.tif", "normal", "train"), ("img/c.tif", "tumor", "test")]
    for rel, _, _ in rows:
        make_slide(tmp_path / rel, tissue=True)
    with open(tmp_path / "cohort.csv", "w", newline="") as f:
        csv.writer(f).writerows([("path", "label", "split"), *rows])
    out = tmp_path / "bags"
    assert features_main([str(tmp_path / "cohort.csv"), *BACKBONE, "--patch-size", "64", "--workers", "0",
                          "--no-progress", "--dtype", "float32", "--out", str(out)]) == 0
    assert sorted(p.name for p in out.iterdir()) == ["a.h5", "b.h5", "c.h5"]
    train = build_dataset("features", split="train", root=str(tmp_path), features_dir=str(out),
                          labels_csv=str(tmp_path / "cohort.csv"))
    test = build_dataset("features", split="test", root=str(tmp_path), features_dir=str(out),
                         labels_csv=str(tmp_path / "cohort.csv"))
    assert train.class_names == {"label": ["normal", "tumor"]} and train.labels == [1, 0] and test.labels == [1]
    item = train[1]
    assert item["id"] == "b" and item["image"].dtype == torch.float32 and item["image"].shape == (12, DIM)
    assert item["coords"].shape == (12, 2) and item["targets"]["label"].item() == 0
    (out / "c.h5").unlink()
    with pytest.raises(DataError, match=r"no feature cache for 1 of 1 test .*c\.h5"):
        build_dataset("features", split="test", root=str(tmp_path), features_dir=str(out),
                      labels_csv=str(tmp_path / "cohort.csv"))
    with h5py.File(out / "a.h5", "r+") as f:
        del f.attrs["complete"]
    with pytest.raises(DataError, match=r"a\.h5 is incomplete.*hrsel\.features"):
        train[0]


def test_ips_trains_one_step_on_the_cached_bags(slides, tmp_path, capsys):
    root, config = slides
    assert run_features(config, root / "features") == 0
    code = train_main(["configs/camelyon16.yaml", f"data.root={root}", "data.batch_size=2", "data.eval_batch_size=2",
                       "data.num_workers=0", "data.val_split=none", "train.epochs=1", "train.max_steps=1",
                       "train.progress_bar=false", "model.num_selected=4", "model.chunk_size=4",
                       f"model.backbone_options={json.dumps({'in_dim': DIM, 'dim': 32})}",
                       f"--output-dir={tmp_path / 'runs'}", "--device=cpu"])
    assert code == 0, capsys.readouterr().err[-3000:]
    state = torch.load(tmp_path / "runs" / "camelyon16" / "last.pt", weights_only=False)
    assert state["train_state"]["step"] == 1

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
    assert sorted(p.name for p in out.iterdir()) == ["img__a.h5", "img__b.h5", "img__c.h5"]  # the manifest's ids
    train = build_dataset("features", split="train", root=str(tmp_path), features_dir=str(out),
                          labels_csv=str(tmp_path / "cohort.csv"))
    test = build_dataset("features", split="test", root=str(tmp_path), features_dir=str(out),
                         labels_csv=str(tmp_path / "cohort.csv"))
    assert train.class_names == {"label": ["normal", "tumor"]} and train.labels == [1, 0] and test.labels == [1]
    item = train[1]
    assert item["id"] == "img/b" and item["image"].dtype == torch.float32 and item["image"].shape == (12, DIM)
    assert item["coords"].shape == (12, 2) and item["targets"]["label"].item() == 0
    (out / "img__c.h5").unlink()
    with pytest.raises(DataError, match=r"no feature cache for 1 of 1 test .*img__c\.h5"):
        build_dataset("features", split="test", root=str(tmp_path), features_dir=str(out),
                      labels_csv=str(tmp_path / "cohort.csv"))
    with h5py.File(out / "img__a.h5", "r+") as f:
        del f.attrs["complete"]
    with pytest.raises(DataError, match=r"img__a\.h5 is incomplete.*hrsel\.features"):
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


# ---- both routes at a resolution: one grid, one id, level-0 coordinates, the resolution recorded and checked ----

H_OD, E_OD = np.array([0.5626, 0.7201, 0.4062]), np.array([0.2159, 0.8012, 0.5581])  # Macenko's H&E


def he_slide(path, *, seed: int, levels: int = 3) -> None:
    """1024 x 768 at 0.25 um/px: glass, an H&E block x 256..768, y 192..576, a black pen stroke y 320..384
    across glass and tissue (x 128..896)."""
    from hrsel.io.writer import write_pyramid

    rng = np.random.default_rng(seed)
    rgb = np.full((768, 1024, 3), (238.0, 238.0, 236.0))
    rgb[192:576, 256:768] *= 10.0 ** -(0.3 * H_OD + 0.5 * E_OD)
    rgb[320:384, 128:896] *= (0.27, 0.27, 0.3)
    rgb += rng.normal(0, 2, rgb.shape)
    path.parent.mkdir(parents=True, exist_ok=True)
    write_pyramid(path, np.clip(np.rint(rgb), 0, 255).astype(np.uint8), levels=levels, tile=128, mpp=0.25)


@pytest.fixture
def he_cohort(tmp_path):
    """Four slides in a manifest with train / val / test rows (one an OME-style name) and a config at 0.5 um/px."""
    rows = [("img/case_018.ome.tiff", "tumor", "train"), ("img/a.tif", "normal", "train"),
            ("img/b.tif", "tumor", "val"), ("img/c.tif", "normal", "test")]
    for seed, (rel, _, _) in enumerate(rows):
        he_slide(tmp_path / rel, seed=seed)
    with open(tmp_path / "slides.csv", "w", newline="") as f:
        csv.writer(f).writerows([("path", "label", "split"), *rows])
    config = tmp_path / "my_slides.yaml"
    config.write_text(f"data: {{name: manifest, root: {tmp_path}, manifest: slides.csv, target_mpp: 0.5, "
                      f"tissue: true, tissue_cache: {tmp_path / 'masks'}}}\nmodel: {{patch_size: 32}}\n")
    return tmp_path, config


def cache_contents(folder):
    out = {}
    for path in sorted(folder.glob("*.h5")):
        features, coords, attrs = feature_cache.read_bag(path)
        out[path.name] = (features, coords, attrs)
    return out


def test_config_and_csv_routes_share_grid_ids_and_level0_coords(he_cohort, tmp_path):
    from hrsel.data.manifest import ManifestDataset
    from hrsel.io import open_image
    from hrsel.models.candidates import cell_corners
    from hrsel.select.extract import GridGeometry
    from hrsel.tiling import read_patches

    import torchvision

    root, config = he_cohort
    weights = tmp_path / "resnet18.pth"  # one encoder for both runs
    torch.save(torchvision.models.resnet18().state_dict(), weights)
    assert run_features(config, tmp_path / "by_config", "--weights", str(weights)) == 0
    assert features_main([str(root / "slides.csv"), *BACKBONE, "--target-mpp", "0.5", "--patch-size", "32",
                          "--weights", str(weights), "--workers", "0", "--no-progress",
                          "--out", str(tmp_path / "by_csv")]) == 0
    by_config, by_csv = cache_contents(tmp_path / "by_config"), cache_contents(tmp_path / "by_csv")
    assert sorted(by_config) == sorted(by_csv) == ["img__a.h5", "img__b.h5", "img__c.h5", "img__case_018.h5"]
    for name, (features, coords, attrs) in by_config.items():
        np.testing.assert_array_equal(coords, by_csv[name][1])
        np.testing.assert_allclose(features, by_csv[name][0], atol=1e-2)
        assert (attrs["patch_size_level"], attrs["patch_size"], attrs["downsample"]) == (32, 64, 2.0)
        assert attrs["mpp"] == pytest.approx(0.5) and attrs["target_mpp"] == 0.5
        x, y = coords.T  # level-0 corners of the 64 px (32 px at 0.5 um/px) patches of the H&E block
        assert set(x) == set(range(256, 768, 64)) and set(y) == {192, 256, 384, 448, 512}, "ink row or glass kept"
    case = "img__case_018.h5"  # one level in the file: resampled to 0.5 um/px, not read at level 0
    with open_image(str(root / "img/case_018.ome.tiff")) as slide:
        patches = read_patches(slide, by_config[case][1], 64)  # level 0: every patch on the block
    assert (patches.float().mean((0, 2, 3)) < torch.tensor([200.0, 160.0, 190.0])).all()
    for split, name in (("train", case), ("val", "img__b.h5")):  # the pixel pipeline's candidate cells
        data = ManifestDataset(root=root, split=split, manifest="slides.csv", target_mpp=0.5, tissue=True,
                               tissue_cache=str(tmp_path / "masks"))
        item = data[0]
        geometry = GridGeometry.regular(item["image"].dimensions[::-1], patch_size=32)
        corners = cell_corners(geometry)
        on = item["tissue"].candidates(corners, 32)
        assert sorted(map(tuple, corners[on] * 2)) == sorted(map(tuple, by_config[name][1])), "other tissue"


def test_bags_at_another_resolution_are_refused_naming_both(he_cohort, tmp_path):
    from hrsel.data.features import FeatureBags

    root, config = he_cohort
    out = tmp_path / "bags"
    assert run_features(config, out) == 0
    options = dict(root=root, features_dir=str(out), labels_csv=str(root / "slides.csv"))
    train = FeatureBags(split="train", target_mpp=0.5, patch_size=32, **options)
    assert train.resolution.mpp == pytest.approx(0.5) and train.resolution.patch_size == 32
    with pytest.raises(DataError) as err:
        FeatureBags(split="train", target_mpp=0.25, **options)
    message = str(err.value)
    assert "img__case_018.h5" in message and "0.5 um/px" in message and "data.target_mpp=0.25" in message, message
    assert "--target-mpp 0.25" in message and "data.target_mpp=0.5" in message, message
    assert run_features(root / "slides.csv", tmp_path / "level0", "--level", "0", "--patch-size", "32") == 0
    (out / "img__a.h5").write_bytes((tmp_path / "level0" / "img__a.h5").read_bytes())  # a mixed folder
    mixed = r"different resolutions: img__case_018\.h5 holds .*0\.5 um/px.*img__a\.h5 holds .*0\.25 um/px"
    with pytest.raises(DataError, match=mixed):
        FeatureBags(split="train", **options)


def test_features_data_set_validates_on_the_csv_val_rows(he_cohort, tmp_path):
    from hrsel.config import load_config
    from hrsel.train import build_datasets

    root, config = he_cohort
    out = tmp_path / "bags"
    assert run_features(config, out) == 0
    bags = tmp_path / "bags.yaml"
    bags.write_text(f"data: {{name: features, root: {root}, features_dir: {out}, labels_csv: {root / 'slides.csv'}, "
                    f"target_mpp: 0.5}}\nmodel: {{name: ips, backbone: feature_projector}}\n")
    splits = build_datasets(load_config(bags, []))
    assert splits.record["val_split"] == "val" and splits.val.ids == ["img/b"]
    assert sorted(splits.train.ids) == ["img/a", "img/case_018"] and splits.test.ids == ["img/c"]


def test_predict_draws_a_bag_of_a_resampled_slide_where_its_patches_lie(he_cohort, tmp_path):
    """The symptom of level-0 labelled view coordinates: a bag's heatmap at 1/4 scale in the top-left corner."""
    import types

    from hrsel.inference import predict_sources
    from hrsel.inference.load import LoadedModel
    from hrsel.models import build_pipeline
    from hrsel.tasks import TaskSpec

    root, config = he_cohort
    out = tmp_path / "bags"
    assert run_features(config, out) == 0
    tasks = {"label": TaskSpec("multiclass", 2)}
    pipeline = build_pipeline("ips", tasks=tasks, patch_size=32, k=2, score_chunk=8, backbone="feature_projector",
                              backbone_options={"in_dim": DIM, "dim": 8},
                              aggregator_options={"heads": 2, "head_dim": 4, "mlp_dim": 8}).eval()
    data = types.SimpleNamespace(name="features", options={"target_mpp": 0.5, "patch_size": 32})
    model = LoadedModel(pipeline=pipeline, tasks=tasks, class_names={"label": ["normal", "tumor"]},
                        config=types.SimpleNamespace(seed=0, train=types.SimpleNamespace(precision="fp32"), data=data),
                        checkpoint_path=tmp_path / "none.pt", hrsel_version="test")
    predict_sources(model, [out / "img__case_018.h5"], out_dir=tmp_path / "preds", pictures=False)
    tiles = json.loads((tmp_path / "preds" / "img__case_018.geojson").read_text())["features"]
    boxes = np.array([np.r_[np.min(t["geometry"]["coordinates"][0], 0), np.max(t["geometry"]["coordinates"][0], 0)]
                      for t in tiles])  # (n, 4) x0, y0, x1, y1 in level-0 pixels
    assert len(tiles) == 40 and (boxes[:, 2:] - boxes[:, :2] == 64).all()
    assert boxes[:, [0, 1]].min(0).tolist() == [256, 192] and boxes[:, [2, 3]].max(0).tolist() == [768, 576]

"""CAMELYON16 (lazy slides, tissue grids, feature caches) and CUB-200-2011 (official layout)."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from hrsel.data import build_dataset, camelyon, cub, features as feature_bags
from hrsel.data.collate import collate
from hrsel.errors import DataError

from fixtures_data import make_camelyon, make_cub


@pytest.fixture
def camelyon_root(tmp_path):
    return make_camelyon(tmp_path)


def test_camelyon_slides_labels_and_lazy_items(camelyon_root):
    train = camelyon.Camelyon16(root=camelyon_root, split="train", patch_size=64)
    assert [s.name for s in train.slides] == ["normal_001.tif", "tumor_001.tif"] and train.labels == [0, 1]
    test = build_dataset("camelyon16", split="test", root=str(camelyon_root), patch_size=64)
    assert test.labels == [1, 0] and test.tasks["tumor"].kind == "binary"
    item = test[0]
    assert item["id"] == "test_001" and item["targets"]["tumor"].dtype == torch.float32
    src = item["image"]
    assert src.dimensions == (512, 384) and src.level_count == 2
    np.testing.assert_array_equal(src.read_region(128, 64, 8, 8)[0, 0], [150, 60, 140])
    grid = test.grid(0)
    assert 0 < len(grid) < 48, "the tissue grid keeps only patches on the tissue block"
    x, y = grid.coords.T
    assert (x >= 64).all() and (x < 384).all() and (y >= 0).all() and (y < 256).all()
    batch = collate([test[0], test[1]])
    assert isinstance(batch["images"], list) and batch["targets"]["tumor"].tolist() == [1.0, 0.0]


def test_camelyon_label_errors(camelyon_root):
    (camelyon_root / "testing" / "reference.csv").write_text("test_001,Tumor\ntest_002,maybe\n")
    with pytest.raises(DataError, match=r"reference.csv:2"):
        camelyon.Camelyon16(root=camelyon_root, split="test")
    (camelyon_root / "testing" / "reference.csv").write_text("test_001,Tumor\n")
    with pytest.raises(DataError, match="no label for slide .*test_002.tif"):
        camelyon.Camelyon16(root=camelyon_root, split="test")
    with pytest.raises(DataError, match="no CAMELYON16 train slides"):
        camelyon.Camelyon16(root=camelyon_root / "testing", split="train")


def test_feature_cache_matches_direct_encoding(camelyon_root, tmp_path):
    ds = camelyon.Camelyon16(root=camelyon_root, split="test", patch_size=64)

    def encoder(x):  # (b, 3, 64, 64) float -> (b, 4): channel means and a constant
        return torch.cat([x.mean((2, 3)), torch.ones(len(x), 1)], 1)

    paths = camelyon.cache_features(ds, encoder, tmp_path / "features", chunk_size=5, dtype="float32")
    assert [p.name for p in paths] == ["test_001.h5", "test_002.h5"]
    feats = feature_bags.Camelyon16Features(root=camelyon_root, split="test",
                                            features_dir=str(tmp_path / "features"))
    item = feats[0]
    grid = ds.grid(0)
    assert item["image"].shape == (len(grid), 4) and item["coords"].tolist() == grid.coords.tolist()
    from hrsel.tiling import read_patches

    direct = encoder(read_patches(ds.source(0), grid.coords, 64).float() / 255)
    torch.testing.assert_close(item["image"], direct)
    batch = collate([feats[0], feats[1]])
    lengths = [len(feats[0]["image"]), len(feats[1]["image"])]
    assert lengths[0] != lengths[1] and [len(b) for b in batch["images"]] == lengths  # bags stay a list
    assert len(batch["coords"]) == 2
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match="no CAMELYON16 test feature bags"):
        feature_bags.Camelyon16Features(root=camelyon_root, split="test", features_dir=str(tmp_path / "empty"))


def test_cub_official_layout_and_preprocessing(tmp_path):
    make_cub(tmp_path)
    train = cub.CUB200(root=tmp_path, split="train", resize=60, crop=48)
    test = build_dataset("cub200", split="test", root=str(tmp_path), resize=60, crop=48)
    assert len(train) == 3 and len(test) == 3 and train.labels == [0, 1, 2]
    item = test[2]
    assert item["image"].shape == (3, 48, 48) and item["targets"]["species"].item() == 2
    assert int(item["image"].float().mean().round()) == 120 and item["id"] == "Bird_3_0001"
    assert train.augment and not test.augment and train[0]["image"].shape == (3, 48, 48)


def test_cub_errors_name_file_and_line(tmp_path):
    folder = make_cub(tmp_path)
    (folder / "train_test_split.txt").write_text("1 1\n2\n")
    with pytest.raises(DataError, match=r"train_test_split.txt:2"):
        cub.CUB200(root=tmp_path, split="train")
    (folder / "train_test_split.txt").write_text("1 1\n")
    with pytest.raises(DataError, match="image id 2 .*no class or split"):
        cub.CUB200(root=tmp_path, split="train")
    with pytest.raises(DataError, match="no CUB-200-2011 release"):
        cub.CUB200(root=tmp_path / "elsewhere", split="train")

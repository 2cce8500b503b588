"""The `manifest` data set: a CSV over images in several formats, kinds, splits, folds, target_mpp, bad rows."""
from __future__ import annotations

import json
import pickle
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from hrsel.data import build_dataset
from hrsel.data.collate import collate
from hrsel.data.manifest import ManifestDataset, assign_splits, read_manifest
from hrsel.errors import DataError
from hrsel.io import open_image
from hrsel.io.level_view import LevelView, level_for_mpp
from hrsel.io.writer import write_pyramid
from hrsel.train import main

from fixtures_data import make_manifest
from toy_bright import one_torch_thread  # noqa: F401 (autouse fixture)

REPO = Path(__file__).resolve().parents[1]


def rgb(seed: int, size: int = 64) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (size, size, 3), dtype=np.uint8)


def write_ome_zarr(path: Path, image: np.ndarray, *, levels: int = 2, mpp: float = 0.5) -> None:
    import zarr

    group = zarr.open_group(str(path), mode="w")
    for i in range(levels):
        level = image[::2**i, ::2**i].transpose(2, 0, 1)  # (c, y, x)
        make = group.create_array if hasattr(group, "create_array") else group.create_dataset
        make(str(i), shape=level.shape, chunks=(3, 32, 32), dtype="uint8")[:] = level
    group.attrs["multiscales"] = [{
        "version": "0.4",
        "axes": [{"name": "c", "type": "channel"}, {"name": "y", "type": "space", "unit": "micrometer"},
                 {"name": "x", "type": "space", "unit": "micrometer"}],
        "datasets": [{"path": str(i), "coordinateTransformations": [{"type": "scale",
                                                                      "scale": [1, mpp * 2**i, mpp * 2**i]}]}
                     for i in range(levels)],
    }]


def write_csv(folder: Path, text: str, name: str = "slides.csv") -> Path:
    (folder / name).write_text(text.strip() + "\n")
    return folder / name


@pytest.fixture
def mixed(tmp_path):
    """A JPEG TIFF pyramid (0.25 um/px), an OME-Zarr (0.5 um/px) and two PNGs, in sub-folders."""
    (tmp_path / "img").mkdir()
    write_pyramid(tmp_path / "img/slide.tif", rgb(0, 128), levels=3, tile=64, compression="jpeg", mpp=0.25)
    write_ome_zarr(tmp_path / "img/scan.ome.zarr", rgb(1, 64))
    Image.fromarray(rgb(2)).save(tmp_path / "img/p1.png")
    Image.fromarray(rgb(3)).save(tmp_path / "img/p2.png")
    write_csv(tmp_path, """
path,label,tumor,grade,tags
img/slide.tif,lung,1,2,a|b
img/scan.ome.zarr,colon,0,10,b
img/p1.png,lung,0,1,c|a
img/p2.png,skin,1,2,a
""")
    return tmp_path


def test_formats_and_inferred_kinds(mixed):
    table = read_manifest(mixed / "slides.csv")
    kinds = {t: (s.kind, s.num_classes) for t, s in table.tasks.items()}
    assert kinds == {"label": ("multiclass", 3), "tumor": ("binary", 1), "grade": ("multiclass", 3),
                     "tags": ("multilabel", 3)}
    assert table.class_names == {"label": ["colon", "lung", "skin"], "tumor": ["0", "1"],
                                 "grade": ["1", "2", "10"], "tags": ["a", "b", "c"]}  # integers sort as numbers
    t = table.targets(0)
    assert t["label"].item() == 1 and t["tumor"].item() == 1.0 and t["grade"].item() == 1
    assert t["tags"].tolist() == [1.0, 1.0, 0.0] and table.targets(2)["tags"].tolist() == [1.0, 0.0, 1.0]

    data = build_dataset("manifest", root=str(mixed), split="train", test_fraction=0.25)
    test = ManifestDataset(root=mixed, split="test", test_fraction=0.25)
    assert len(data) == 3 and len(test) == 1 and data.validation_split is None
    every = [data[i] for i in range(len(data))] + [test[0]]
    assert sorted(item["id"] for item in every) == ["img/p1", "img/p2", "img/scan", "img/slide"]  # .ome.zarr: one
    for item in every:
        assert item["image"].read_region(0, 0, 8, 8).shape == (8, 8, 3)
        assert Path(item["path"]).exists()
    batch = collate([data[0], data[1]])
    assert isinstance(batch["images"], list) and batch["targets"]["tags"].shape == (2, 3)


def test_tasks_named_in_the_config(mixed):
    only = read_manifest(mixed / "slides.csv", tasks=["tumor", "grade"])
    assert list(only.tasks) == ["tumor", "grade"]
    typed = read_manifest(mixed / "slides.csv", tasks={"grade": "multiclass",
                                                        "label": {"kind": "multiclass",
                                                                  "classes": ["skin", "lung", "colon", "bone"]}})
    assert typed.class_names["label"] == ["skin", "lung", "colon", "bone"] and typed.tasks["label"].num_classes == 4
    assert typed.targets(1)["label"].item() == 2
    with pytest.raises(DataError, match="'nope'.*label columns"):
        read_manifest(mixed / "slides.csv", tasks=["nope"])
    with pytest.raises(DataError, match="data.tasks.grade"):
        read_manifest(mixed / "slides.csv", tasks={"grade": "regression"})


def many_pngs(folder: Path, n: int) -> list[str]:
    (folder / "img").mkdir(exist_ok=True)
    names = []
    for i in range(n):
        Image.fromarray(np.full((16, 16, 3), i, np.uint8)).save(folder / f"img/{i:02d}.png")
        names.append(f"img/{i:02d}.png")
    return names


def test_seeded_split_is_stratified_reproducible_and_order_free(tmp_path):
    names = many_pngs(tmp_path, 20)
    labels = ["a"] * 15 + ["b"] * 5
    rows = [f"{n},{c}" for n, c in zip(names, labels)]
    write_csv(tmp_path, "path,label\n" + "\n".join(rows))
    write_csv(tmp_path, "path,label\n" + "\n".join(reversed(rows)), name="reversed.csv")

    def test_paths(csv: str, seed: int) -> list[str]:
        data = ManifestDataset(root=tmp_path, split="test", manifest=csv, test_fraction=0.2, split_seed=seed)
        return sorted(data.row(i).rel for i in range(len(data)))

    first = test_paths("slides.csv", 0)
    assert len(first) == 4 and sum(p in names[15:] for p in first) == 1  # 3 of class a, 1 of class b
    assert test_paths("slides.csv", 0) == first == test_paths("reversed.csv", 0)  # rows reordered: same split
    assert test_paths("slides.csv", 1) != first
    train = ManifestDataset(root=tmp_path, split="train", test_fraction=0.2)
    assert len(train) == 16 and not set(train.row(i).rel for i in range(16)) & set(first)
    assert train.split_record["test"] == sorted(first, key=names.index) and train.split_record["seed"] == 0
    with pytest.raises(DataError, match="split 'val'.*no rows"):
        ManifestDataset(root=tmp_path, split="val")


def test_folds(tmp_path):
    names = many_pngs(tmp_path, 6)
    write_csv(tmp_path, "path,label,fold\n" + "\n".join(f"{n},{'ab'[i % 2]},{i // 2}" for i, n in enumerate(names)))
    test = ManifestDataset(root=tmp_path, split="test", fold=1)
    assert [test.row(i).rel for i in range(len(test))] == names[2:4]
    assert len(ManifestDataset(root=tmp_path, split="train", fold=1)) == 4
    with pytest.raises(DataError, match="no row .* has fold 7.*folds present: \\[0, 1, 2\\]"):
        ManifestDataset(root=tmp_path, split="train", fold=7)
    # a split column keeps its test rows; fold K picks the validation rows among the others
    write_csv(tmp_path, "path,label,split,fold\n" + "\n".join(
        f"{n},{'ab'[i % 2]},{'test' if i >= 4 else 'train'},{i // 2}" for i, n in enumerate(names)), name="s.csv")
    table = read_manifest(tmp_path / "s.csv")
    splits, _ = assign_splits(table, fold=0)
    assert splits == ["val", "val", "train", "train", "test", "test"]
    val = ManifestDataset(root=tmp_path, split="val", manifest="s.csv", fold=0)
    assert len(val) == 2 and val.validation_split == "val"
    write_csv(tmp_path, "path,label\n" + "\n".join(f"{n},{'ab'[i % 2]}" for i, n in enumerate(names)), name="n.csv")
    with pytest.raises(DataError, match="'data.fold' = 0 but .*n.csv has no 'fold' column"):
        ManifestDataset(root=tmp_path, split="train", manifest="n.csv", fold=0)


def test_target_mpp_picks_the_level_and_views_it(tmp_path):
    image = rgb(5, 256)
    write_pyramid(tmp_path / "s.tif", image, levels=3, tile=64, compression="zlib", mpp=0.25)
    with open_image(str(tmp_path / "s.tif")) as slide:
        assert slide.mpp == pytest.approx(0.25)
        picks = {t: level_for_mpp(slide, t) for t in (0.1, 0.25, 0.26, 0.5, 0.7, 1.0, 4.0)}
        assert picks == {0.1: 0, 0.25: 0, 0.26: 0, 0.5: 1, 0.7: 1, 1.0: 2, 4.0: 2}  # never coarser than asked
        view = LevelView(slide, 1)
        assert view.dimensions == (128, 128) and view.downsample == 2.0 and view.mpp == pytest.approx(0.5)
        assert view.level_count == 2 and view.level_downsamples == (1.0, 2.0)
        np.testing.assert_array_equal(view.read_region(10, 20, 30, 40), slide.read_level_region(10, 20, 30, 40, 1))
        back = pickle.loads(pickle.dumps(view))  # crosses DataLoader workers
        np.testing.assert_array_equal(back.read_region(0, 0, 16, 16), view.read_region(0, 0, 16, 16))
    Image.fromarray(rgb(6, 32)).save(tmp_path / "plain.png")
    write_csv(tmp_path, "path,label\ns.tif,a\nplain.png,b")
    with pytest.raises(DataError, match="line 3 .*plain.png.*no microns-per-pixel") as err:
        ManifestDataset(root=tmp_path, split="train", target_mpp=1.0)
    assert "line 2" not in str(err.value)
    assert len(ManifestDataset(root=tmp_path, split="train", test_fraction=0.5)) == 1  # no target_mpp: level 0


def test_target_mpp_between_levels_resamples_the_finer_level(tmp_path):
    """0.7 um/px on levels of 0.25 / 0.5 / 1.0: level 1 (0.5) shrunk by 0.5 / 0.7, so a patch covers P x 0.7 um."""
    from hrsel.io.level_view import resample_box, view_at_mpp

    image = rgb(5, 256)
    write_pyramid(tmp_path / "s.tif", image, levels=3, tile=64, compression="zlib", mpp=0.25)
    with open_image(str(tmp_path / "s.tif")) as slide:
        exact = view_at_mpp(slide, 0.5)
        assert exact.level == 1 and exact.scale == 1.0  # a level has the target: no resampling
        view = view_at_mpp(slide, 0.7)
        assert view.level == 1 and view.scale == pytest.approx(0.5 / 0.7)
        assert view.mpp == pytest.approx(0.7) and view.downsample == pytest.approx(2 / (0.5 / 0.7))
        assert view.dimensions == (round(128 * 0.5 / 0.7),) * 2
        patch = view.read_region(10, 20, 30, 40)  # (40, 30, 3): the box [10, 40) x [20, 60) / scale of level 1
        assert patch.shape == (40, 30, 3) and patch.dtype == np.uint8
        level1 = slide.read_level_region(0, 0, 128, 128, 1)
        s = view.scale
        expected = resample_box(level1, (10 / s, 20 / s, 40 / s, 60 / s), (30, 40))
        np.testing.assert_allclose(patch.astype(int), expected.astype(int), atol=1)
        flat = np.full((64, 64, 1), 1000, np.uint16)  # resampling keeps the dtype and a flat value
        assert (resample_box(flat, (0.5, 0.5, 40.2, 33.3), (17, 9)) == 1000).all()
        with pytest.raises(ValueError, match="scale"):
            LevelView(slide, 0, scale=1.5)


def test_dataset_with_target_mpp_yields_level_views_through_workers(tmp_path):
    make_manifest(tmp_path)
    data = ManifestDataset(root=tmp_path, split="train", target_mpp=0.5)
    loader = torch.utils.data.DataLoader(data, batch_size=2, num_workers=1, collate_fn=collate)
    batch = next(iter(loader))
    views = batch["images"]
    assert all(isinstance(v, LevelView) and v.level == 1 and v.dimensions == (128, 128) for v in views)
    assert views[0].read_region(0, 0, 128, 128).shape == (128, 128, 3)
    assert batch["ids"] == ["slides/a", "slides/b"] and batch["targets"]["label"].tolist() == [1, 0]


def test_every_bad_row_is_reported_at_once(tmp_path):
    names = many_pngs(tmp_path, 3)
    (tmp_path / "img/broken.png").write_bytes(b"\x89PNG\r\n\x1a\n not really")
    write_csv(tmp_path, f"""
path,label,split
{names[0]},a,train
img/missing.png,a,train
img/broken.png,b,train
{names[0]},b,test
{names[1]},,train
{names[2]},b,holdout
,a,train
""")
    with pytest.raises(DataError) as err:
        ManifestDataset(root=tmp_path, split="train", tasks={"label": {"kind": "multiclass", "classes": ["a"]}})
    message = str(err.value)
    assert "6 bad row(s) (8 problem(s))" in message and "nothing was started" in message
    for expected in ("line 3 (row 2): image 'img/missing.png'", "no such file", "line 4 (row 3): image "
                     "'img/broken.png'", "line 5 (row 4): 'img/00.png' repeats line 2 (row 1)",
                     "line 6 (row 5): empty 'label' label", "line 7 (row 6): split 'holdout' must be train, val or "
                     "test", "line 8 (row 7): empty path",
                     "line 4 (row 3): 'label' label 'b' is not one of the classes"):
        assert expected in message, (expected, message)


def test_manifest_example_trains_one_epoch_through_the_cli(tmp_path, capsys):
    root = make_manifest(tmp_path / "data", rows=[(f"slides/{i}.tif", "tumor" if i % 2 else "normal", "")
                                                  for i in range(6)])
    text = (root / "slides.csv").read_text().replace(",\n", "\n").replace("path,label,split", "path,label")
    (root / "slides.csv").write_text(text)  # no split column: seeded test split, validation held out
    args = [str(REPO / "configs/manifest_example.yaml"), f"data.root={root}", "data.num_workers=0",
            "data.batch_size=2", "train.epochs=1", "train.progress_bar=false", "eval.pictures=1",
            "data.test_fraction=0.34", "data.val_fraction=0.25", "model.patch_size=32", "model.k=4",
            "model.score_chunk=8", f"--output-dir={tmp_path / 'runs'}", "--device=cpu"]
    code = main(args)
    assert code == 0, capsys.readouterr().err[-3000:]
    run = tmp_path / "runs/manifest_example"
    record = json.loads((run / "validation.json").read_text())
    assert record["val_split"] == "holdout" and record["split_size"] == 4 and len(record["indices"]) == 1
    assert record["data_split"]["sizes"] == {"train": 4, "val": 0, "test": 2} and len(record["data_split"]["test"]) == 2
    assert (run / "test_metrics.json").is_file()


def test_ome_tiff_physical_size_gives_mpp(tmp_path):
    import tifffile

    for name, size, unit, mpp in (("um.ome.tif", 0.5, "µm", 0.5), ("nm.ome.tif", 250, "nm", 0.25)):
        tifffile.imwrite(tmp_path / name, rgb(7, 32), ome=True, photometric="rgb",
                         metadata={"axes": "YXS", "PhysicalSizeX": size, "PhysicalSizeXUnit": unit})
        with open_image(str(tmp_path / name)) as source:
            assert source.mpp == pytest.approx(mpp)


def test_a_list_of_images_without_labels_reads_for_predict(mixed):
    write_csv(mixed, "path\nimg/p1.png\nimg/slide.tif", name="predict.csv")
    table = read_manifest(mixed / "predict.csv")
    assert table.tasks == {} and table.paths == [mixed / "img/p1.png", mixed / "img/slide.tif"]
    assert table.targets(0) == {}
    with pytest.raises(DataError, match="no label column"):
        ManifestDataset(root=mixed, split="train", manifest="predict.csv")


def test_image_ids_drop_the_whole_image_suffix():
    from hrsel.io.names import image_ids, image_stem, strip_image_suffix

    assert strip_image_suffix("slides/case_018.ome.tiff") == "slides/case_018"
    assert [image_stem(n) for n in ("case_018.ome.tiff", "case_018.OME.TIF", "x.ome.zarr/", "case.2024.svs",
                                    "plain")] == ["case_018", "case_018", "x", "case.2024", "plain"]
    assert image_ids(["a/x.svs", "a/x.ome.tif", "b/y.ome.tiff"]) == ["a/x.svs", "a/x.ome.tif", "b/y"]

"""Swedish traffic signs (ATS subset): parsing rules, drop counts, split, cache, errors, items."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from hrsel.data import build_dataset, traffic
from hrsel.data.download import md5sum
from hrsel.errors import DataError

from fixtures_data import write_set

SET1 = {  # file -> (annotation after the colon, expected label or None when dropped)
    "1277381606Image000001.jpg": ("VISIBLE, 862.51, 505.63, 830.52, 468.89, PROHIBITORY, 70_SIGN;MISC_SIGNS;", 2),
    "1277381610Image000002.jpg": ("", 0),
    "1277381612Image000003.jpg": ("MISC_SIGNS;", 0),
    "1277381614Image000004.jpg": ("VISIBLE, 100.0, 100.0, 50.0, 50.0, PRIORITY, PRIORITY_ROAD;", None),
    "1277381616Image000005.jpg": ("BLURRED, 900.0, 900.0, 100.0, 100.0, PROHIBITORY, 50_SIGN;"
                                  "VISIBLE, 60.0, 60.0, 50.0, 50.0, PROHIBITORY, 80_SIGN;", 3),
    "1277381618Image000006.jpg": ("OCCLUDED, 900.0, 900.0, 100.0, 100.0, PROHIBITORY, 50_SIGN;", None),
    "1277381620Image000007.jpg": ("VISIBLE, 200.0, 200.0, 100.0, 100.0, PROHIBITORY, 80_SIGN;"
                                  "VISIBLE, 400.0, 400.0, 100.0, 100.0, PROHIBITORY, 50_SIGN;", 1),
    "1277381622Image000008ä.jpg": ("VISIBLE, 862.51q, 505.63, 830.52l, 468.89, PROHIBITORY, 70_SIGN", 2),
    "1277381624Image000009.jpg": ("SIDE_ROAD, 300.0, 300.0, 100.0, 100.0, PROHIBITORY, 70_SIGN;"
                                  "VISIBLE, 300.0, 300.0, 100.0, 100.0, OTHER, PEDESTRIAN_CROSSING;", None),
}
SET2 = {
    "1277382001Image000001.jpg": ("VISIBLE, 400.0, 300.0, 380.0, 280.0, PROHIBITORY, 50_SIGN;", 1),
    "1277382002Image000002.jpg": ("", 0),
}


@pytest.fixture
def root(tmp_path):
    write_set(tmp_path, "Set1", SET1)
    write_set(tmp_path, "Set2", SET2)
    return tmp_path


def test_parse_number_drops_trailing_junk():
    assert traffic.parse_number("862.51q") == 862.51 and traffic.parse_number(" 12 ") == 12.0
    with pytest.raises(ValueError):
        traffic.parse_number("abc")


def test_rules_labels_and_drop_counts(root):
    index = traffic.build_index(root, "Set1")
    kept = {f: lab for f, (_, lab) in SET1.items() if lab is not None}
    got = {p.split("/", 1)[1]: lab for p, lab in zip(index["images"], index["labels"])}
    assert got == kept
    assert index["counts"] == {"speed_limit": 4, "empty": 2, "dropped_no_speed_limit": 1,
                               "dropped_first_not_visible": 2, "misc_signs_skipped": 2}
    assert index["official"] is False


def test_visibility_beats_area_and_area_breaks_ties():
    s = lambda vis, side, name: traffic.Sign(vis, side, side, 0.0, 0.0, "PROHIBITORY", name)  # noqa: E731
    assert traffic.label_of([s("BLURRED", 500, "50_SIGN"), s("VISIBLE", 10, "80_SIGN")]) == (3, "speed_limit")
    assert traffic.label_of([s("VISIBLE", 10, "80_SIGN"), s("VISIBLE", 50, "70_SIGN")]) == (2, "speed_limit")
    assert traffic.label_of([]) == (0, "empty")


def test_split_by_seed_and_dataset_items(root):
    train = traffic.TrafficSigns(root=root, split="train", download=False, augment=False)
    test = build_dataset("traffic", split="test", root=str(root), download=False)
    assert train.set_name == "Set1" and test.set_name == "Set2" and len(train) == 6 and len(test) == 2
    assert traffic.TrafficSigns(root=root, split="train", seed=1, download=False).set_name == "Set2"
    item = test[0]
    assert item["image"].shape == (3, 960, 1280) and item["image"].dtype == torch.uint8
    assert item["targets"]["speed_limit"].item() == 1 and item["id"] == "Set2/1277382001Image000001.jpg"
    assert set(test.tasks) == {"speed_limit"} and test.tasks["speed_limit"].num_classes == 4
    resized = traffic.TrafficSigns(root=root, split="test", download=False, image_size=(120, 160))
    assert resized[1]["image"].shape == (3, 120, 160)


def test_train_augmentation_changes_pixels_but_not_labels(root):
    torch.manual_seed(0)
    ds = traffic.TrafficSigns(root=root, split="train", download=False)
    plain = traffic.TrafficSigns(root=root, split="train", download=False, augment=False)
    assert ds.augment and not plain.augment
    a, b = ds[0], plain[0]
    assert a["targets"]["speed_limit"] == b["targets"]["speed_limit"]
    assert not torch.equal(a["image"], b["image"])
    lazy = traffic.TrafficSigns(root=root, split="train", download=False, augment=False, as_source=True)
    src = lazy[0]["image"]
    assert src.dimensions == (1280, 960)
    np.testing.assert_array_equal(src.read_region(0, 0, 64, 32), b["image"][:, :32, :64].permute(1, 2, 0).numpy())


def test_index_is_cached_and_rebuilt_when_annotations_change(root):
    first = traffic.load_index(root, "Set2")
    cache = root / "Set2" / "hrsel_index.json"
    assert cache.is_file() and first["labels"] == [1, 0]
    with open(root / "Set2" / "annotations.txt", "a") as f:
        f.write("1277382001Image000001.jpg:VISIBLE, 400.0, 300.0, 380.0, 280.0, PROHIBITORY, 80_SIGN;\n")
    assert traffic.load_index(root, "Set2")["labels"] == [1, 0, 3]


def test_official_annotations_must_give_the_published_count(root, monkeypatch):
    monkeypatch.setitem(traffic.ANNOTATION_MD5, "Set2", md5sum(root / "Set2" / "annotations.txt"))
    monkeypatch.setitem(traffic.EXPECTED_COUNTS, "Set2", 684)
    with pytest.raises(DataError, match="684.*parsing rules"):
        traffic.build_index(root, "Set2")
    monkeypatch.setitem(traffic.EXPECTED_COUNTS, "Set2", 2)
    assert traffic.build_index(root, "Set2")["official"] is True


def test_malformed_line_names_file_and_line(root):
    path = root / "Set1" / "annotations.txt"
    lines = path.read_text(encoding="utf-8").splitlines()
    lines[2] = "no colon in this line"
    path.write_text("\n".join(lines), encoding="utf-8")
    with pytest.raises(DataError, match=r"Set1/annotations.txt:3"):
        traffic.build_index(root, "Set1")
    lines[2] = "x.jpg:VISIBLE, 1, 2, 3, PROHIBITORY, 50_SIGN"
    path.write_text("\n".join(lines), encoding="utf-8")
    with pytest.raises(DataError, match=r"annotations.txt:3: sign"):
        traffic.build_index(root, "Set1")


def test_missing_image_names_file_and_line(root):
    (root / "Set1" / "1277381620Image000007.jpg").unlink()
    with pytest.raises(DataError, match=r"1277381620Image000007.jpg \(line 7\)"):
        traffic.build_index(root, "Set1")


def test_bad_images_raise_naming_the_file(tmp_path):
    folder = write_set(tmp_path, "Set2", SET2, size=(100, 120))
    with pytest.raises(DataError, match="1277382001Image000001.jpg is 120x100.*1280x960"):
        traffic.load_rgb(folder / "1277382001Image000001.jpg", expected=traffic.IMAGE_SIZE)
    (folder / "1277382002Image000002.jpg").write_bytes(b"\xff\xd8 truncated")
    with pytest.raises(DataError, match="cannot read image .*1277382002Image000002.jpg"):
        traffic.load_rgb(folder / "1277382002Image000002.jpg")


def test_offline_error_names_urls_and_folder(tmp_path, monkeypatch):
    with pytest.raises(DataError, match=r"Set1Part0.zip.*annotations.txt.*extract") as info:
        traffic.TrafficSigns(root=tmp_path, split="train", download=False)
    assert str(tmp_path / "Set1") in str(info.value)

    def offline(url, path, **kwargs):
        raise DataError(f"cannot download {url}; this machine may be offline")

    monkeypatch.setattr(traffic, "download_url", offline)
    with pytest.raises(DataError, match=r"isy.liu.se.*Set1Part0.zip") as info:
        traffic.TrafficSigns(root=tmp_path, split="train", download=True)
    assert str(tmp_path / "Set1") in str(info.value)

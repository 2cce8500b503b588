"""Billiard: the release's label functions, the loader on release-format fixtures, the generator."""
from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import numpy as np
import pytest
import torch

from hrsel.data import billiard, build_dataset
from hrsel.data.billiard_gen import BilliardParameters, generate_billiard
from hrsel.errors import DataError

from fixtures_data import BALLS, write_release

REPO = Path(__file__).resolve().parents[1]
def test_label_functions_of_the_release():
    assert billiard.max_left_right(BALLS) == 6  # max(3, 7) - 1
    assert billiard.rightmost_number(BALLS) == 6
    assert billiard.sum_all_modulo10(BALLS) == 0  # 20 % 10
    assert billiard.left_color_min_max(BALLS) == 0  # leftmost blue -> min(...) - 1
    red_left = [dict(BALLS[0], position=[-5, 0, 0])] + BALLS[1:]
    assert billiard.left_color_min_max(red_left) == 8  # red -> max 9 - 1
    with pytest.raises(ValueError, match="colour"):
        billiard.left_color_min_max([dict(BALLS[0], color="pink")])


def test_loader_on_release_layout(tmp_path):
    write_release(tmp_path, "valid", [BALLS, BALLS[:2]] + [BALLS] * 9)
    ds = billiard.Billiard(root=tmp_path, split="valid", image_size=(64, 64))
    assert len(ds) == 11 and ds.ids[:3] == ["0", "1", "2"] and ds.ids[-1] == "10"  # numeric order
    assert ds.labels[:2] == [6, 6] and not ds.augment
    item = ds[1]
    assert item["image"].shape == (3, 64, 64) and item["image"].dtype == torch.uint8
    assert item["targets"]["max-left-right"].item() == 6 and item["id"] == "valid/1"
    other = build_dataset("billiard", split="valid", root=str(tmp_path), label="sum-all-modulo10", image_size=(64, 64))
    assert other.tasks["sum-all-modulo10"].num_classes == 10 and other.labels[0] == 0


def test_loader_errors_name_the_file(tmp_path):
    folder = write_release(tmp_path, "test", [BALLS, BALLS])
    with pytest.raises(DataError, match="0.png is 64x64.*1000x1000"):
        billiard.Billiard(root=tmp_path, split="test")[0]
    (folder / "1.json").write_text('[{"position": [0, 0, 0],\n "number": }]')
    with pytest.raises(DataError, match=r"1.json:2: invalid JSON"):
        billiard.Billiard(root=tmp_path, split="test", image_size=(64, 64))
    (folder / "1.json").unlink()
    with pytest.raises(DataError, match="1.png has no label file"):
        billiard.Billiard(root=tmp_path, split="test", image_size=(64, 64))
    (folder / "1.json").write_text(json.dumps([{"number": 3}]))
    with pytest.raises(DataError, match="1.json: ball 0 lacks"):
        billiard.Billiard(root=tmp_path, split="test", image_size=(64, 64))
    (folder / "1.json").write_text(json.dumps(BALLS))
    (folder / "1.png").write_bytes(b"\x89PNG\r\n\x1a\n broken")
    ds = billiard.Billiard(root=tmp_path, split="test", image_size=(64, 64))
    with pytest.raises(DataError, match="cannot read image .*1.png"):
        ds[1]
    with pytest.raises(DataError, match="billiard.tar.xz.*make_billiard"):
        billiard.Billiard(root=tmp_path, split="train")


def test_generator_output_is_loadable_and_labels_follow_the_numbers(tmp_path):
    params = BilliardParameters(size=240, n_train=6, n_valid=2, n_test=3, seed=1)
    out = generate_billiard(tmp_path / "b", params=params, progress=False)
    assert json.loads((out / "parameters.json").read_text())["size"] == 240
    ds = billiard.Billiard(root=out, split="train", augment=False)
    assert len(ds) == 6 and ds.image_size == (240, 240)
    for i in range(len(ds)):
        balls = json.loads((out / "train" / f"{i}.json").read_text())
        assert 4 <= len(balls) <= 8 and all(1 <= b["number"] <= 9 for b in balls)
        left = min(balls, key=lambda b: b["position"][0])["number"]
        right = max(balls, key=lambda b: b["position"][0])["number"]
        assert ds.labels[i] == max(left, right) - 1
        for a in balls:  # no two balls overlap
            for b in balls:
                if a is not b:
                    d = np.hypot(a["position"][0] - b["position"][0], a["position"][1] - b["position"][1])
                    assert d > a["radius"] + b["radius"]
    image = ds[0]["image"]
    x, y, _ = json.loads((out / "train" / "0.json").read_text())[0]["position"]
    assert image[:, int(y), int(x)].float().mean() > 200, "the number disc at the ball centre is white"
    torch.manual_seed(0)
    shifted = billiard.Billiard(root=out, split="train", padded_size=300)[0]["image"]
    assert shifted.shape == image.shape and not torch.equal(shifted, image)


def test_generator_same_output_with_workers(tmp_path):
    params = BilliardParameters(size=120, n_train=3, n_valid=0, n_test=0, seed=4)
    a = generate_billiard(tmp_path / "a", params=params, progress=False)
    spec = importlib.util.spec_from_file_location("make_billiard", REPO / "tools" / "make_billiard.py")
    cli = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(cli)
    rc = cli.main([str(tmp_path / "b"), "--size", "120", "--n-train", "3", "--n-valid", "0", "--n-test", "0",
                   "--seed", "4", "--workers", "2", "--quiet"])
    assert rc == 0
    for i in range(3):
        assert (tmp_path / "a/train" / f"{i}.png").read_bytes() == (tmp_path / "b/train" / f"{i}.png").read_bytes()
        assert (a / "train" / f"{i}.json").read_text() == (tmp_path / "b/train" / f"{i}.json").read_text()

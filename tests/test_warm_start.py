"""The patch encoder's warm start on single digits (hrsel.data.digit_patches, hrsel.engine.warm_start)."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

NARROW = {"width": 8, "strides": [2, 2, 2, 2], "blocks": [1, 1, 1, 1]}


@pytest.fixture(scope="module")
def font_pools():
    from hrsel.data.digits import rendered_pools

    return rendered_pools(train_per_class=60, test_per_class=20)


def numbered_pool(count: int = 20) -> tuple[np.ndarray, np.ndarray]:
    """Digits that are constant 28x28 blocks of value 10 + j: each placement names its pool entry."""
    images = np.repeat((10 + np.arange(count, dtype=np.uint8))[:, None, None], 28, 1).repeat(28, 2)
    return images, np.arange(count) % 10


def test_digit_patches_hold_one_whole_pool_digit_of_their_label_or_none():
    from hrsel.data.digit_patches import NO_DIGIT, digit_patches

    images, labels = numbered_pool()
    no_noise = np.zeros((3, 28, 28), np.uint8)
    x, y = digit_patches(np.random.default_rng(0), images, labels, no_noise, patch_size=40, n=300)
    assert x.shape == (300, 1, 40, 40) and x.dtype == np.uint8 and y.shape == (300,)
    assert 0.45 < (y != NO_DIGIT).mean() < 0.75
    for patch, label in zip(x[:, 0], y):
        lit = np.argwhere(patch)
        if label == NO_DIGIT:
            assert not lit.size
            continue
        (top, left), (bottom, right) = lit.min(0), lit.max(0)
        assert (bottom - top, right - left) == (27, 27)  # one whole 28x28 digit, inside the patch
        value = patch[top, left]
        assert (patch[top:top + 28, left:left + 28] == value).all() and labels[value - 10] == label


def test_digit_patches_lay_noise_over_digits_where_the_brighter_pixel_wins():
    from hrsel.data.digit_patches import NO_DIGIT, digit_patches

    images, labels = numbered_pool()
    noise = np.full((1, 28, 28), 200, np.uint8)
    x, y = digit_patches(np.random.default_rng(1), images, labels, noise, patch_size=56, n=400, p_noise=1.0)
    assert set(np.unique(x[y == NO_DIGIT])) == {0, 200}  # noise alone in patches without a digit
    with_digit = x[y != NO_DIGIT]
    assert (with_digit == 200).any(axis=(1, 2, 3)).all()  # every patch got (at least half of) a pattern
    assert ((with_digit > 0) & (with_digit < 200)).any(axis=(1, 2, 3)).mean() > 0.5  # digits partly left visible


def test_paint_clipped_matches_a_padded_canvas():
    from hrsel.data.digit_patches import paint_clipped

    rng = np.random.default_rng(2)
    for _ in range(50):
        canvas = rng.integers(0, 256, (30, 35)).astype(np.uint8)
        pattern = rng.integers(0, 256, (28, 28)).astype(np.uint8)
        top, left = rng.integers(-30, 40, size=2)
        padded = np.zeros((30 + 2 * 40, 35 + 2 * 40), np.uint8)
        padded[40:70, 40:75] = canvas
        window = padded[40 + top:40 + top + 28, 40 + left:40 + left + 28]
        np.maximum(window, pattern, out=window)
        paint_clipped(canvas, pattern, int(top), int(left))
        assert np.array_equal(canvas, padded[40:70, 40:75])


def test_digit_patches_name_a_patch_too_small_or_a_broken_pool():
    from hrsel.data.digit_patches import digit_patches
    from hrsel.errors import DataError

    images, labels = numbered_pool()
    noise = np.zeros((1, 28, 28), np.uint8)
    with pytest.raises(DataError, match="patch_size 20 is smaller than a 28x28 digit"):
        digit_patches(np.random.default_rng(0), images, labels, noise, patch_size=20, n=4)
    with pytest.raises(DataError, match="20 images and 19 labels"):
        digit_patches(np.random.default_rng(0), images, labels[:19], noise, patch_size=28, n=4)


def test_warm_start_learns_to_name_held_out_digits_across_seeds(font_pools, tmp_path):
    """80 steps of a width-8 encoder on font digits: above the 40% of always answering "no digit", every seed."""
    from hrsel.engine.warm_start import warm_start_digits

    reports = [warm_start_digits(tmp_path / f"enc{seed}.pt", backbone="narrow_resnet", backbone_options=NARROW,
                                 patch_size=28, digits=font_pools, steps=80, batch_size=64, lr=1e-2, seed=seed)
               for seed in (0, 1, 2)]
    for report in reports:
        assert report["test_patch_accuracy"] > 0.5, report
        assert report["last_loss"] < report["first_loss"] - 0.7, report
        assert report["digits"] == "rendered" and report["train_digits"] == 600


def test_warm_start_weights_load_into_the_backbone_and_are_never_overwritten(font_pools, tmp_path):
    from hrsel.engine.warm_start import sidecar, warm_start_digits
    from hrsel.errors import ConfigError
    from hrsel.models.backbones import NarrowResNet

    path = tmp_path / "warm" / "enc.pt"
    report = warm_start_digits(path, backbone="narrow_resnet", backbone_options={**NARROW, "weights_path": "x"},
                               patch_size=32, digits=font_pools, steps=2, batch_size=8)
    assert json.loads(sidecar(path).read_text()) == report and "weights_path" not in report["backbone_options"]
    saved = torch.load(path, weights_only=True)
    net = NarrowResNet(in_chans=1, **NARROW, weights_path=str(path)).eval()
    assert all(torch.equal(net.state_dict()[k], v) for k, v in saved.items()) and set(saved) == set(net.state_dict())
    before = path.read_bytes()
    with pytest.raises(ConfigError, match="exists"):
        warm_start_digits(path, backbone="narrow_resnet", backbone_options=NARROW, patch_size=32,
                          digits=font_pools, steps=2, batch_size=8)
    assert path.read_bytes() == before
    with pytest.raises(ConfigError, match="shape mismatches"):
        NarrowResNet(in_chans=1, **{**NARROW, "width": 16}, weights_path=str(path))
    with pytest.raises(ConfigError, match="in_chans=3"):
        warm_start_digits(tmp_path / "rgb.pt", backbone="narrow_resnet", backbone_options=NARROW, in_chans=3,
                          patch_size=32, digits=font_pools, steps=2)
    assert not (tmp_path / "rgb.pt").exists()


def test_ensure_warm_start_builds_what_a_megapixel_mnist_config_names_and_refuses_other_data(font_pools, tmp_path, monkeypatch):
    from hrsel.config import load_config
    from hrsel.engine import warm_start
    from hrsel.errors import ConfigError

    repo = Path(__file__).resolve().parents[1]
    plain = load_config(repo / "configs" / "mnist_s_ips.yaml")
    assert warm_start.warm_start_path(plain) is None and warm_start.ensure_warm_start(plain) is None

    path = tmp_path / "enc.pt"
    monkeypatch.setattr("hrsel.data.digits.generator_pools", lambda **kw: font_pools)
    cfg = load_config(repo / "configs" / "mnist_s_ips.yaml", [f"model.backbone_options.weights_path={path}"])
    report = warm_start.ensure_warm_start(cfg, steps=2)
    assert path.is_file() and report["steps"] == 2 and report["patch_size"] == 50 and report["digits"] == "rendered"
    assert warm_start.ensure_warm_start(cfg, steps=2) is None  # built once, then used as it is

    traffic = load_config(repo / "configs" / "traffic_dps_k5.yaml")
    traffic.model.options.setdefault("backbone_options", {})["weights_path"] = str(tmp_path / "other.pt")
    with pytest.raises(ConfigError, match=r"megapixel_mnist \(digits\) or billiard \(ball numbers\) config"):
        warm_start.ensure_warm_start(traffic)
    assert not (tmp_path / "other.pt").exists()

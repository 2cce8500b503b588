"""The billiard patch encoder's warm start on ball numbers (hrsel.data.ball_patches, hrsel.engine.warm_start)."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from hrsel.data.ball_patches import NO_BALL, ball_patches, billiard_pool, number_in_view
from hrsel.errors import ConfigError, DataError

NARROW = {"width": 8, "strides": [2, 2, 2, 2], "blocks": [1, 1, 1, 1]}


def ball(x: float, y: float, number: int, radius: float = 10.0) -> dict:
    return {"position": [x, y, 0.0], "number": number, "color": "red", "radius": radius}


@pytest.fixture(scope="module")
def billiard_root(tmp_path_factory):
    """A generated 240x240 set: balls of radius ~11 px, numbers ~6 px tall, as in 500x500 at half scale."""
    from hrsel.data.billiard_gen import BilliardParameters, generate_billiard

    params = BilliardParameters(size=240, n_train=24, n_valid=1, n_test=8)
    return generate_billiard(tmp_path_factory.mktemp("bil") / "billiard", params=params, progress=False)


def test_number_in_view_needs_the_whole_disc_and_takes_the_ball_nearest_the_centre():
    # disc radius 3.6: a disc at x = 3.6 touches the patch's left edge and is still inside
    assert number_in_view([ball(3.6, 25, 7)], 0, 0, 50) == 7
    assert number_in_view([ball(3.5, 25, 7)], 0, 0, 50) == NO_BALL
    assert number_in_view([ball(25, 46.4, 4)], 0, 0, 50) == 4
    assert number_in_view([ball(25, 46.5, 4)], 0, 0, 50) == NO_BALL
    assert number_in_view([ball(10, 10, 3), ball(30, 26, 9)], 0, 0, 50) == 9
    assert number_in_view([ball(130, 140, 5)], 100, 100, 50) == 5  # patch coordinates are the image's
    assert number_in_view([], 0, 0, 50) == NO_BALL


def coordinate_image(size: int) -> np.ndarray:
    """(3, size, size) uint8 whose pixels name their place (size <= 256): channel 0 = x, channel 1 = y."""
    yy, xx = np.mgrid[:size, :size]
    return np.stack([xx, yy, np.zeros_like(xx)]).astype(np.uint8)


def test_ball_patches_are_crops_of_the_image_labelled_by_the_balls_they_show():
    image = coordinate_image(250)
    balls = [ball(60, 70, 2, 20), ball(180, 200, 8, 22), ball(200, 60, 5, 21)]
    x, y = ball_patches(np.random.default_rng(0), [image], [balls], patch_size=50, n=400, p_ball=0.5)
    assert x.shape == (400, 3, 50, 50) and x.dtype == np.uint8 and y.dtype == np.int64
    for patch, label in zip(x, y):
        left, top = int(patch[0, 0, 0]), int(patch[1, 0, 0])
        assert np.array_equal(patch, image[:, top:top + 50, left:left + 50])
        assert label == number_in_view(balls, left, top, 50)
    assert {2, 8, 5} <= set(y.tolist()) and 0.25 < (y == NO_BALL).mean() < 0.75

    x, y = ball_patches(np.random.default_rng(1), [image], [balls], patch_size=50, n=200, p_ball=1.0)
    assert (y != NO_BALL).all()  # a patch cut near a ball always holds its whole number disc


def test_ball_patches_name_a_bad_pool():
    image = coordinate_image(40)
    with pytest.raises(DataError, match="smaller than a 50 px patch"):
        ball_patches(np.random.default_rng(0), [image], [[ball(20, 20, 1)]], patch_size=50, n=2)
    with pytest.raises(DataError, match="1 images and 0 ball lists"):
        ball_patches(np.random.default_rng(0), [image], [], patch_size=20, n=2)


def test_billiard_pool_draws_images_with_their_ball_lists(billiard_root):
    images, tables = billiard_pool(billiard_root, "train", n_images=5, seed=3)
    assert len(images) == len(tables) == 5 and images[0].shape == (3, 240, 240) and images[0].dtype == np.uint8
    again, _ = billiard_pool(billiard_root, "train", n_images=5, seed=3)
    assert all(np.array_equal(a, b) for a, b in zip(images, again))
    everything, _ = billiard_pool(billiard_root, "test", n_images=100, seed=0)
    assert len(everything) == 8  # at most the split


def test_billiard_pool_names_a_release_without_pixel_radii(tmp_path):
    from fixtures_data import make_billiard

    make_billiard(tmp_path / "release")  # the DPS release's format: 3-D positions, no radius
    with pytest.raises(DataError, match=r"0\.json: a ball has no 'radius'.*tools/make_billiard.py"):
        billiard_pool(tmp_path / "release", "train", n_images=2)


def test_ball_warm_start_learns_from_ball_patches_across_seeds(billiard_root, tmp_path):
    """A width-8 encoder, 200 steps on 24 small images: held-out accuracy above answering the commonest label
    (no ball), every seed. Reading the ~6 px numbers takes longer (data/billiard_500 at width 32: 1500 steps)."""
    from hrsel.engine.warm_start import warm_start_balls

    for seed in (0, 1, 2):
        report = warm_start_balls(tmp_path / f"enc{seed}.pt", backbone="narrow_resnet", backbone_options=NARROW,
                                  patch_size=26, root=billiard_root, steps=200, batch_size=64, lr=1e-2, seed=seed)
        assert report["test_patch_accuracy"] > report["test_commonest_label_share"] + 0.04, report
        assert report["last_loss"] < report["first_loss"] - 0.6, report
        assert report["train_images"] == 24 and report["test_images"] == 8


def test_ball_warm_start_weights_load_into_an_rgb_backbone(billiard_root, tmp_path):
    """(Keeping an existing file is the digit warm start's test: both go through the same writer.)"""
    from hrsel.engine.warm_start import sidecar, warm_start_balls
    from hrsel.models.backbones import NarrowResNet

    path = tmp_path / "warm" / "enc.pt"
    report = warm_start_balls(path, backbone="narrow_resnet", backbone_options=NARROW, patch_size=26,
                              root=billiard_root, steps=2, batch_size=8)
    assert json.loads(sidecar(path).read_text()) == report
    saved = torch.load(path, weights_only=True)
    net = NarrowResNet(in_chans=3, **NARROW, weights_path=str(path))
    assert set(saved) == set(net.state_dict()) and all(torch.equal(net.state_dict()[k], v) for k, v in saved.items())
    with pytest.raises(ConfigError, match="in_chans=1"):
        warm_start_balls(tmp_path / "grey.pt", backbone="narrow_resnet", backbone_options=NARROW, in_chans=1,
                         patch_size=26, root=billiard_root, steps=2)
    assert not (tmp_path / "grey.pt").exists()


def test_ensure_warm_start_builds_ball_numbers_for_a_billiard_config(billiard_root, tmp_path):
    from pathlib import Path

    from hrsel.config import load_config
    from hrsel.engine import warm_start

    repo = Path(__file__).resolve().parents[1]
    path = tmp_path / "enc.pt"
    cfg = load_config(repo / "configs" / "billiard_s_transformer.yaml",
                      [f"data.root={billiard_root}", f"model.backbone_options.weights_path={path}"])
    report = warm_start.ensure_warm_start(cfg, steps=2)
    assert path.is_file() and report["patch_size"] == 50 and report["billiard_root"] == str(billiard_root)
    assert report["backbone_options"]["stem_stride"] == 2 and report["seed"] == cfg.seed
    assert warm_start.ensure_warm_start(cfg, steps=2) is None  # built once, then used as it is

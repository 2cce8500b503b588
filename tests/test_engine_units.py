"""Engine pieces on their own: losses, metrics, schedules, checkpoints, pictures, samplers."""
from __future__ import annotations

import math
import os

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from hrsel.engine import checkpoint as ckpt
from hrsel.engine import metrics as M
from hrsel.engine.distributed import DistInfo, ShardSampler, TrainSampler
from hrsel.engine.optim import build_optimizer, clip_gradients, lr_factor
from hrsel.engine.visualize import infer_layout, layout_for, save_selection_picture, score_heatmap
from hrsel.tasks import TaskSpec


# ----------------------------------------------------------------------------- losses

def test_multiclass_loss_is_cross_entropy_and_stable_for_huge_logits():
    logits = torch.tensor([[1000.0, -1000.0, 0.0], [0.5, 0.2, -0.1]])
    target = torch.tensor([1, 0])
    loss = M.task_loss(logits, target, TaskSpec("multiclass", 3))
    assert torch.isfinite(loss)
    torch.testing.assert_close(loss, F.cross_entropy(logits.double(), target).float())


def test_multilabel_and_binary_losses_are_bce_with_logits():
    logits = torch.tensor([[80.0, -3.0], [0.2, 1.0]])
    target = torch.tensor([[0.0, 0.0], [1.0, 1.0]])
    loss = M.task_loss(logits, target, TaskSpec("multilabel", 2))
    expected = -(target * F.logsigmoid(logits.double()) + (1 - target) * F.logsigmoid(-logits.double())).mean()
    torch.testing.assert_close(loss, expected.float())
    b = M.task_loss(torch.tensor([[2.0], [-1.0]]), torch.tensor([1.0, 0.0]), TaskSpec("binary", 1))
    torch.testing.assert_close(b, F.binary_cross_entropy_with_logits(torch.tensor([2.0, -1.0]), torch.tensor([1.0, 0.0])))


def test_multitask_loss_weights_tasks_and_classes():
    tasks = {"a": TaskSpec("multiclass", 2), "b": TaskSpec("binary", 1)}
    logits = {"a": torch.tensor([[0.3, -0.2], [0.1, 0.4]]), "b": torch.tensor([[0.5], [-0.5]])}
    targets = {"a": torch.tensor([0, 1]), "b": torch.tensor([1.0, 1.0])}
    w = torch.tensor([1.0, 3.0])
    total, parts = M.multitask_loss(logits, targets, tasks, task_weights={"b": 0.5}, class_weights={"a": w})
    expected_a = F.cross_entropy(logits["a"], targets["a"], weight=w)
    torch.testing.assert_close(parts["a"], expected_a)
    torch.testing.assert_close(total, expected_a + 0.5 * parts["b"])


def test_class_balanced_weights():
    w = M.class_balanced_weights(torch.tensor([30.0, 10.0]), TaskSpec("multiclass", 2), 40)
    torch.testing.assert_close(w, torch.tensor([40 / 60, 40 / 20]))
    pos = M.class_balanced_weights(torch.tensor([10.0]), TaskSpec("binary", 1), 40)
    torch.testing.assert_close(pos, torch.tensor([3.0]))


# ----------------------------------------------------------------------------- metrics

def test_auc_matches_pairwise_definition_with_ties():
    g = torch.Generator().manual_seed(0)
    scores = torch.randint(0, 5, (60,), generator=g).float()  # many ties
    target = torch.randint(0, 2, (60,), generator=g).float()
    pos, neg = scores[target == 1], scores[target == 0]
    diff = pos[:, None] - neg[None, :]
    expected = ((diff > 0).float() + 0.5 * (diff == 0).float()).mean().item()
    assert M.auc(scores, target) == pytest.approx(expected)
    assert M.auc(torch.tensor([0.1, 0.9]), torch.tensor([0.0, 1.0])) == 1.0
    assert math.isnan(M.auc(torch.tensor([0.1, 0.9]), torch.tensor([1.0, 1.0])))


def test_accuracies():
    assert M.accuracy(torch.tensor([[2.0, 1.0], [0.0, 3.0], [1.0, 0.0]]), torch.tensor([0, 1, 1])) == pytest.approx(2 / 3)
    logits = torch.tensor([[1.0, -1.0, 2.0], [-1.0, -1.0, 1.0]])
    target = torch.tensor([[1.0, 0.0, 1.0], [0.0, 1.0, 1.0]])
    assert M.multilabel_accuracy(logits, target) == pytest.approx(5 / 6)
    assert M.exact_match(logits, target) == pytest.approx(1 / 2)
    out = M.all_metrics({"m": logits}, {"m": target}, {"m": TaskSpec("multilabel", 3)})
    assert set(out) == {"m/accuracy", "m/exact_match"}


# ----------------------------------------------------------------------------- optimiser and schedules

def test_cosine_with_warmup_and_piecewise():
    f = [lr_factor(s, total_steps=100, warmup_steps=10, schedule="cosine", min_lr_ratio=0.01) for s in range(100)]
    assert f[0] == pytest.approx(1 / 11) and all(a < b for a, b in zip(f[:10], f[1:11]))
    assert f[10] == pytest.approx(1.0)
    assert f[55] == pytest.approx(0.01 + 0.99 * 0.5, abs=1e-9)
    assert all(a >= b for a, b in zip(f[10:], f[11:])) and f[-1] > 0.01
    p = [lr_factor(s, total_steps=100, warmup_steps=0, schedule="piecewise", milestones=[60, 80]) for s in (0, 59, 60, 80)]
    assert p == pytest.approx([1.0, 1.0, 0.1, 0.01])


def test_optimizers_decay_matrices_only_and_clipping():
    model = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.LayerNorm(4))
    opt = build_optimizer(model, name="adamw", lr=1e-3, weight_decay=0.1)
    decays = {len(g["params"]): g["weight_decay"] for g in opt.param_groups}
    assert decays == {1: 0.1, 3: 0.0}
    sgd = build_optimizer(model, name="sgd", lr=1e-3, weight_decay=0.1, momentum=0.9)
    assert isinstance(sgd, torch.optim.SGD) and sgd.param_groups[0]["momentum"] == 0.9
    for p in model.parameters():
        p.grad = torch.full_like(p, 5.0)
    clip_gradients(model.parameters(), clip_value=1.0)
    assert all(p.grad.abs().max() <= 1.0 for p in model.parameters())
    norm = clip_gradients(model.parameters(), clip_norm=0.5)
    assert norm > 0.5
    total = torch.sqrt(sum((p.grad ** 2).sum() for p in model.parameters()))
    assert total.item() == pytest.approx(0.5, rel=1e-4)


# ----------------------------------------------------------------------------- checkpoints

def test_checkpoint_is_atomic_and_restores_rng(tmp_path, monkeypatch):
    torch.manual_seed(4)
    np.random.seed(4)
    state = {"rng": ckpt.rng_state(), "step": 3}
    expected = (torch.rand(3), np.random.rand(2))
    ckpt.save_checkpoint(tmp_path, state, is_best=True)
    assert (tmp_path / "last.pt").is_file() and (tmp_path / "best.pt").is_file()
    assert not [p for p in os.listdir(tmp_path) if ".tmp" in p]
    loaded = ckpt.load_checkpoint(tmp_path)
    ckpt.set_rng_state(loaded["rng"])
    torch.testing.assert_close(torch.rand(3), expected[0])
    np.testing.assert_array_equal(np.random.rand(2), expected[1])

    def broken_save(obj, f):  # a crash while writing leaves the previous file intact
        f.write(b"partial")
        raise OSError("disk full")

    monkeypatch.setattr(torch, "save", broken_save)
    with pytest.raises(OSError):
        ckpt.save_checkpoint(tmp_path, {"step": 4})
    monkeypatch.undo()
    assert ckpt.load_checkpoint(tmp_path / "last.pt")["step"] == 3
    assert not [p for p in os.listdir(tmp_path) if ".tmp" in p]


# ----------------------------------------------------------------------------- samplers

def test_train_sampler_shards_reshuffles_and_skips():
    data = list(range(10))
    a, b = (TrainSampler(data, DistInfo(r, 2, r), seed=1) for r in (0, 1))
    a.set_epoch(0), b.set_epoch(0)
    first = list(a) + list(b)
    assert sorted(first) == list(range(10))
    a.set_epoch(1)
    assert list(a) != first[:5]
    a.set_epoch(0)
    full = list(a)
    a.skip = 2
    assert list(a) == full[2:] and len(a) == 3
    shards = [list(ShardSampler(7, DistInfo(r, 3, r))) for r in range(3)]
    assert sorted(sum(shards, [])) == list(range(7))


# ----------------------------------------------------------------------------- pictures

def test_picture_of_scores_and_selection(tmp_path):
    image = torch.zeros(1, 60, 90, dtype=torch.uint8)
    image[:, 20:40, 30:60] = 255
    layout = infer_layout(6, (60, 90))  # 2 x 3 cells of 30 x 30
    np.testing.assert_allclose(layout.coords, [[0, 0], [30, 0], [60, 0], [0, 30], [30, 30], [60, 30]])
    heat = score_heatmap(layout, np.arange(6.0), (60, 90), side=9)
    assert heat.shape == (6, 9) and heat[0, 0] == 0 and heat[-1, -1] == 5
    path = save_selection_picture(tmp_path / "p.png", image, layout=layout, scores=np.arange(6.0),
                                  indices=np.array([1, 4]), title="pred 3 / true 3")
    from PIL import Image

    picture = np.asarray(Image.open(path).convert("RGB"))
    assert picture.shape[0] > 100 and picture.std() > 10


def test_layout_follows_the_pipeline_grid():
    class Regular:  # IPS-like: a regular, overlapping grid
        patch_size, stride = 20, 10

    class Centred:  # DPS-like: patches of 20 centred on a 2 x 3 score grid
        patch_size = 20

    image = torch.zeros(3, 40, 60, dtype=torch.uint8)
    regular = layout_for(Regular(), image, 3 * 5)
    assert regular.width == 20 and regular.coords[6].tolist() == [10, 10]
    centred = layout_for(Centred(), image, 6)  # stride 20, padding 0
    assert centred.coords.tolist() == [[0, 0], [20, 0], [40, 0], [0, 20], [20, 20], [40, 20]]
    assert layout_for(object(), image, 6).coords.shape == (6, 2)

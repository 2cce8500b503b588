"""Weight decay conventions (torch's lr-scaled decay, the DPS JAX absolute decay and the JAX CUB code's coupled
form), one step vs the formula; the schedules of the configs whose length is train.max_steps."""
import math
from pathlib import Path

import pytest
import torch

from hrsel.config import load_config
from hrsel.data.split import holdout_indices
from hrsel.engine.optim import build_optimizer, lr_factor, planned_steps, schedule_steps, set_lr

REPO = Path(__file__).resolve().parents[1]


def _model() -> torch.nn.Module:
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.LayerNorm(4))


def _one_step(mode: str, on: str, *, lr: float, wd: float, factor: float):
    model = _model()
    before = [p.detach().clone() for p in model.parameters()]
    opt = build_optimizer(model, name="adamw", lr=lr, weight_decay=wd, weight_decay_mode=mode, weight_decay_on=on)
    grads = [torch.randn_like(p) for p in model.parameters()]
    for p, g in zip(model.parameters(), grads):
        p.grad = g.clone()
    set_lr(opt, lr * factor)  # what the loop does before every update: lr(t) = lr * s(t)
    opt.step()
    return before, grads, [p.detach() for p in model.parameters()]


def _adam_first_update(g: torch.Tensor, eps: float = 1e-8) -> torch.Tensor:
    # first Adam step: m_hat = g, v_hat = g^2 -> g / (|g| + eps)
    return g / (g.abs() + eps)


@pytest.mark.parametrize("on", ["all", "matrices"])
def test_absolute_decay_matches_the_jax_formula(on):
    """theta <- theta - lr * s(t) * adam_update - wd * s(t) * theta (DPS JAX), not lr * wd."""
    lr, wd, s = 1e-4, 1e-4, 0.7
    before, grads, after = _one_step("absolute", on, lr=lr, wd=wd, factor=s)
    for p0, g, p1 in zip(before, grads, after):
        decayed = p0.ndim >= 2 or on == "all"
        expected = p0 - lr * s * _adam_first_update(g) - (wd * s * p0 if decayed else 0.0)
        torch.testing.assert_close(p1, expected, rtol=1e-6, atol=1e-9)


def test_lr_scaled_decay_is_torch_adamw():
    lr, wd, s = 1e-3, 0.1, 0.5
    before, grads, after = _one_step("lr_scaled", "matrices", lr=lr, wd=wd, factor=s)
    for p0, g, p1 in zip(before, grads, after):
        decay = lr * s * wd * p0 if p0.ndim >= 2 else 0.0
        torch.testing.assert_close(p1, p0 - lr * s * _adam_first_update(g) - decay, rtol=1e-6, atol=1e-9)


def test_absolute_decay_is_lr_times_weaker_in_lr_scaled_mode():
    """The size of the bug this option fixes: at lr 1e-4 torch's AdamW decays 1e4 x less for the same wd."""
    lr, wd = 1e-4, 1e-4
    model = torch.nn.Linear(2, 2, bias=False)
    for mode in ("absolute", "lr_scaled"):
        opt = build_optimizer(model, name="adamw", lr=lr, weight_decay=wd, weight_decay_mode=mode)
        effective = opt.param_groups[0]["lr"] * opt.param_groups[0]["weight_decay"]
        assert effective == pytest.approx(wd if mode == "absolute" else lr * wd)


def test_decay_follows_the_schedule_over_steps():
    """Under a cosine schedule the absolute decay per step is wd * s(t), s(t) the schedule factor."""
    lr, wd, total = 1e-4, 1e-4, 10
    model = torch.nn.Linear(2, 2, bias=False)
    opt = build_optimizer(model, name="adamw", lr=lr, weight_decay=wd, weight_decay_mode="absolute")
    for step in range(total):
        s = lr_factor(step, total_steps=total, warmup_steps=2, schedule="cosine")
        set_lr(opt, lr * s)
        group = opt.param_groups[0]
        assert group["lr"] * group["weight_decay"] == pytest.approx(wd * s)


def test_bad_decay_settings_are_named():
    with pytest.raises(ValueError, match="weight_decay_mode"):
        build_optimizer(_model(), name="adamw", lr=1e-3, weight_decay=0.1, weight_decay_mode="jax")
    with pytest.raises(ValueError, match="weight_decay_on"):
        build_optimizer(_model(), name="adamw", lr=1e-3, weight_decay=0.1, weight_decay_on="biases")
    with pytest.raises(ValueError, match="adamw"):
        build_optimizer(_model(), name="sgd", lr=1e-3, weight_decay=0.1, weight_decay_mode="absolute")


def test_schedule_lengths_from_epochs_or_fractions_of_all_updates():
    # DPS CUB: x0.1 at 60% and 80% of 31,300 updates, 5% warm-up
    assert schedule_steps(updates_per_epoch=375, total_steps=31300, warmup_ratio=0.05,
                          milestone_ratios=[0.6, 0.8]) == (1565, [18780, 25040])
    assert schedule_steps(updates_per_epoch=24, total_steps=1000, warmup_epochs=2.5, milestones=[10]) == (60, [240])


@pytest.mark.parametrize("on", ["all", "matrices"])
def test_jax_coupled_decay_has_the_sign_of_the_jax_cub_code(on):
    """ntsnet.py: decoupled_weight_decay (update - wd * theta) runs before optax.sgd, so SGD follows g - wd * theta."""
    lr, wd, s = 1e-3, 1e-4, 0.5
    model = _model()
    before = [p.detach().clone() for p in model.parameters()]
    opt = build_optimizer(model, name="sgd", lr=lr, weight_decay=wd, momentum=0.9, weight_decay_mode="jax_coupled",
                          weight_decay_on=on)
    grads = [torch.randn_like(p) for p in model.parameters()]
    for p, g in zip(model.parameters(), grads):
        p.grad = g.clone()
    set_lr(opt, lr * s)
    opt.step()  # the first momentum step: the buffer is the (coupled) gradient itself
    for p0, g, p1 in zip(before, grads, model.parameters()):
        coupled = p0.ndim >= 2 or on == "all"
        torch.testing.assert_close(p1.detach(), p0 - lr * s * (g - (wd * p0 if coupled else 0.0)), rtol=1e-6,
                                   atol=1e-9)
    still = [p.detach().clone() for p in model.parameters()]
    fresh = build_optimizer(model, name="sgd", lr=lr, weight_decay=wd, momentum=0.9,
                            weight_decay_mode="jax_coupled", weight_decay_on=on)
    for p in model.parameters():
        p.grad = torch.zeros_like(p)
    fresh.step()  # no loss gradient: the weights grow by lr * wd, where an L2 decay would shrink them
    for p0, p1 in zip(still, model.parameters()):
        grows = p0.ndim >= 2 or on == "all"
        torch.testing.assert_close(p1.detach(), p0 * (1 + lr * wd) if grows else p0, rtol=1e-7, atol=1e-12)


def _updates_per_epoch(cfg, train_images: int) -> int:
    """What the trainer gets: the training split less the config's validation hold-out, in batches."""
    kept, _ = holdout_indices(train_images, fraction=cfg.data.val_fraction, seed=cfg.seed)
    return math.ceil(len(kept) / cfg.data.batch_size)


def _schedule(cfg, updates_per_epoch: int) -> tuple[int, int, list[int]]:
    """(planned updates, warm-up, milestones) as the trainer builds them for the resolved config."""
    total = planned_steps(epochs=cfg.train.epochs, updates_per_epoch=updates_per_epoch,
                          max_steps=cfg.train.max_steps)
    warmup, milestones = schedule_steps(updates_per_epoch=updates_per_epoch, total_steps=total,
                                        warmup_epochs=cfg.optim.warmup_epochs, warmup_ratio=cfg.optim.warmup_ratio,
                                        milestones=cfg.optim.milestones, milestone_ratios=cfg.optim.milestone_ratios)
    return total, warmup, milestones


def test_max_steps_is_the_planned_length_else_epochs():
    assert planned_steps(epochs=84, updates_per_epoch=338, max_steps=31300) == 31300  # epochs would give 28,392
    assert planned_steps(epochs=100, updates_per_epoch=375, max_steps=31300) == 31300  # and 37,500
    assert planned_steps(epochs=12, updates_per_epoch=125, max_steps=0) == 1500


def test_cub_schedule_is_the_jax_one_whatever_an_epoch_holds():
    """JAX birds200_topk: 31,300 updates, x0.1 at 18,780 and 25,040 after a 5% warm-up; the validation hold-out
    (5994 -> 5395 images, 338 updates per epoch) used to cut the run to 84 x 338 = 28,392 and move the drops."""
    cfg = load_config(REPO / "configs" / "cub200_dps_k4.yaml")
    for val_split, per_epoch in (("auto", _updates_per_epoch(cfg, 5994)), ("none", math.ceil(5994 / 16))):
        assert per_epoch == {"auto": 338, "none": 375}[val_split]
        assert _schedule(cfg, per_epoch) == (31300, 1565, [18780, 25040])
        assert cfg.train.epochs * per_epoch >= cfg.train.max_steps  # the run is all of it, not cut by epochs
    assert cfg.optim.name == "sgd" and cfg.optim.weight_decay == pytest.approx(1e-4)
    assert cfg.optim.weight_decay_mode == "jax_coupled" and cfg.optim.weight_decay_on == "all"


@pytest.mark.parametrize("name", ["traffic_ats_k5", "traffic_ats_k10"])
def test_ats_rerun_is_100k_updates_with_the_drop_halfway(name):
    """ATS speed_limits.py drops the lr x0.1 halfway (epoch 250 of 500); the re-runs are 100k updates, so 50k.
    With the hold-out an epoch is 21 updates (747 -> 672 images): 4167 epochs made 87,507, the drop 43,764."""
    cfg = load_config(REPO / "configs" / f"{name}.yaml")
    per_epoch = _updates_per_epoch(cfg, 747)
    assert per_epoch == 21
    assert _schedule(cfg, per_epoch) == (100_000, 0, [50_000])
    assert cfg.train.epochs * per_epoch >= cfg.train.max_steps and cfg.optim.gamma == pytest.approx(0.1)


@pytest.mark.parametrize("name", ["traffic_ats_paper_k5", "traffic_ats_paper_k10"])
def test_ats_own_recipe_is_500_epochs_with_the_drop_at_250(name):
    cfg = load_config(REPO / "configs" / f"{name}.yaml")
    assert _schedule(cfg, 21) == (500 * 21, 0, [250 * 21])

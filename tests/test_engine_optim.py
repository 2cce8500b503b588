"""Weight decay conventions: torch's lr-scaled decay and the DPS JAX absolute decay, one step vs the formula."""
import pytest
import torch

from hrsel.engine.optim import build_optimizer, lr_factor, set_lr


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
    from hrsel.engine.optim import schedule_steps

    # DPS CUB: x0.1 at 60% and 80% of 31,300 updates, 5% warm-up
    assert schedule_steps(updates_per_epoch=375, total_steps=31300, warmup_ratio=0.05,
                          milestone_ratios=[0.6, 0.8]) == (1565, [18780, 25040])
    assert schedule_steps(updates_per_epoch=24, total_steps=1000, warmup_epochs=2.5, milestones=[10]) == (60, [240])

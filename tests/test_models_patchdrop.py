"""The PatchDrop pipeline on tiny images: stages, self-critical loss by hand, greedy inference, loading, and the
released-code recipe of configs/mnist_patchdrop.yaml."""
import re
from pathlib import Path

import pytest
import torch

from hrsel.config import load_config
from hrsel.errors import ConfigError
from hrsel.models import build_pipeline
from hrsel.models.patches import ImageBatch
from hrsel.select.extract import GridGeometry
from hrsel.select.policy import patchdrop_reward
from hrsel.tasks import TaskSpec
from toy_bright import one_torch_thread  # noqa: F401 (autouse fixture)

REPO = Path(__file__).resolve().parents[1]
TASKS = {"y": TaskSpec("multiclass", 3), "z": TaskSpec("binary", 1)}
LIGHT = dict(in_chans=1, backbone="narrow_resnet", backbone_options={"width": 8, "strides": (2, 2), "blocks": (1, 1)},
             patch_size=20, downscale=2)
TARGETS = {"y": torch.tensor([0, 2, 1]), "z": torch.tensor([1.0, 0.0, 1.0])}


def images(n=3, seed=0):
    return (torch.rand(n, 1, 80, 80, generator=torch.Generator().manual_seed(seed)) * 255).to(torch.uint8)


def build(**options):
    torch.manual_seed(0)
    return build_pipeline("patchdrop", tasks=TASKS, **dict(LIGHT, **options))


def grads(module):
    return [p.grad for p in module.parameters() if p.grad is not None]


def test_finetune_trains_policy_and_classifier():
    model = build(stage="finetune")
    out = model(images())
    assert out.logits["y"].shape == (3, 3) and out.scores.shape == (3, 16)
    assert {"log_prob", "kept_fraction", "greedy_kept_fraction", "greedy_logits/y"} <= set(out.extras)
    loss = torch.nn.functional.cross_entropy(out.logits["y"], TARGETS["y"]) + model.auxiliary_loss(out, TARGETS)
    loss.backward()
    for part in (model.policy, model.classifier):
        g = grads(part)
        assert g and all(torch.isfinite(x).all() for x in g) and any(x.abs().sum() > 0 for x in g)


def test_pretrain_freezes_the_classifier_and_trains_the_policy():
    model = build(stage="pretrain").train()
    assert not model.classifier.training and not any(p.requires_grad for p in model.classifier.parameters())
    out = model(images())
    assert not out.logits["y"].requires_grad
    model.auxiliary_loss(out, TARGETS).backward()
    assert not grads(model.classifier)
    assert any(g.abs().sum() > 0 for g in grads(model.policy))


def test_self_critical_loss_by_hand():
    model = build(freeze_norm=True, penalty=0.5)  # eval-mode classifier: the greedy pass can be replayed
    x = images()
    torch.manual_seed(3)
    out = model(x)
    probs = out.scores
    greedy = probs >= 0.5
    greedy[greedy.sum(1) == 0, probs[greedy.sum(1) == 0].argmax(1)] = True  # an empty set shows its best patch
    width = int(greedy.sum(1).max())
    order = torch.where(greedy, torch.arange(16).expand(3, -1), torch.full((3, 16), 99)).sort(1).values[:, :width]
    indices = order.masked_fill(order == 99, -1)
    batch = ImageBatch(x)
    with torch.no_grad():
        replay = model.classifier(batch.gather(GridGeometry.regular((80, 80), patch_size=20), indices),
                                  mask=indices >= 0, positions=indices)
    torch.testing.assert_close(out.extras["greedy_logits/y"], replay["y"])

    def all_right(logits):
        return (logits["y"].argmax(1) == TARGETS["y"]) & ((logits["z"][:, 0] > 0) == (TARGETS["z"] > 0.5))

    reward = patchdrop_reward(all_right(out.logits), out.extras["kept_fraction"], penalty=0.5)
    baseline = patchdrop_reward(all_right(replay), greedy.sum(1) / 16, penalty=0.5)
    expected = -((reward - baseline) * out.extras["log_prob"]).mean()
    torch.testing.assert_close(model.auxiliary_loss(out, TARGETS), expected)


def test_inference_keeps_p_at_least_half_up_to_the_cap():
    model = build(max_kept=3).eval()
    with torch.no_grad():
        out = model(images(4))
    assert out.indices.shape[1] <= 3
    for row, probs in zip(out.indices, out.scores):
        kept = set(row[row >= 0].tolist())
        greedy = (probs >= 0.5).nonzero().flatten()
        best = greedy[probs[greedy].argsort(descending=True)[:3]] if len(greedy) else probs.argmax()[None]
        assert kept == set(best.tolist())
    assert model.auxiliary_loss(out, TARGETS) == 0


def test_curriculum_keeps_the_patches_not_yet_free():
    model = build(curriculum_steps=160)
    model.set_progress(0, 1000)  # stage 0: the policy decides patch 0 only
    out = model(images())
    assert out.stats["free_patches"] == 1.0
    assert ((out.indices >= 0).sum(1) >= 15).all() and (out.extras["kept_fraction"] >= 15 / 16).all()
    model.set_progress(160, 1000)
    assert model(images()).stats["free_patches"] == 16.0


def test_running_mean_baseline_updates():
    model = build(baseline="running_mean", baseline_momentum=0.5)
    out = model(images())
    loss = model.auxiliary_loss(out, TARGETS)
    assert torch.isfinite(loss) and "greedy_kept_fraction" not in out.extras
    assert model.baseline.item() == pytest.approx(0.5 * out.stats["reward"], abs=1e-6)


def test_checkpoints_initialise_policy_and_classifier(tmp_path):
    source = build(backbone_options={"width": 8, "strides": (2, 2), "blocks": (1, 1)})
    with torch.no_grad():
        for p in source.parameters():
            p.add_(torch.randn_like(p))
    (tmp_path / "run").mkdir()
    torch.save({"model": source.state_dict(), "step": 7}, tmp_path / "run" / "best.pt")
    loaded = build(stage="pretrain", classifier_checkpoint=str(tmp_path / "run"),
                   policy_checkpoint=str(tmp_path / "run" / "best.pt"))
    for a, b in zip(source.state_dict().values(), loaded.state_dict().values()):
        torch.testing.assert_close(a, b)
    with pytest.raises(ConfigError, match="does not match this config"):
        build(backbone_options={"width": 4, "strides": (2, 2), "blocks": (1, 1)},
              classifier_checkpoint=str(tmp_path / "run"))
    with pytest.raises(ConfigError, match="no checkpoint at"):
        build(classifier_checkpoint=str(tmp_path / "nowhere.pt"))
    torch.save({"model": {"scorer.w": torch.zeros(1)}}, tmp_path / "other.pt")
    with pytest.raises(ConfigError, match="holds no policy"):
        build(policy_checkpoint=str(tmp_path / "other.pt"))


@pytest.mark.parametrize("option,match", [({"stage": "pre"}, "valid: pretrain, finetune"),
                                          ({"baseline": "mean"}, "valid: self_critical"),
                                          ({"penalty": -0.5}, "magnitude"),
                                          ({"alpha": 0.2}, "alpha")])
def test_bad_options(option, match):
    with pytest.raises(ConfigError, match=match):
        build(**option)


def test_finetune_trains_the_classifiers_norms_by_default():
    """Released finetune.py: rnet.train(); freeze_norm=True is the first commit's rnet.eval()."""
    for freeze, moves in ((False, True), (True, False)):
        model = build(stage="finetune", freeze_norm=freeze).train()
        stats = [b.clone() for n, b in model.classifier.named_buffers() if n.endswith("running_mean")]
        assert stats and model.classifier.training != freeze
        model(images())
        after = [b for n, b in model.classifier.named_buffers() if n.endswith("running_mean")]
        assert any(not torch.equal(a, b) for a, b in zip(stats, after)) == moves


def recipe_commands(path: Path) -> list[tuple[str, list[str]]]:
    """(config, overrides) of every `python -m hrsel.train` command in a config file's header comment."""
    header = " ".join(line.lstrip("#") for line in path.read_text().splitlines() if line.startswith("#"))
    found = re.finditer(r"python -m hrsel\.train (\S+\.yaml)((?:\s+[\w.]+=\S+)*)", header)
    return [(m.group(1), m.group(2).split()) for m in found]


def test_the_configs_three_runs_load_and_follow_the_released_code():
    """PatchDrop's released pretrain.py has no curriculum and its finetune.py trains the classifier (rnet.train());
    both were in its first commit only, and stay options (model.curriculum_steps, model.freeze_norm)."""
    commands = recipe_commands(REPO / "configs" / "mnist_patchdrop.yaml")
    stages = {}
    for config, overrides in commands:
        cfg = load_config(REPO / config, overrides)  # every documented command is a valid config
        if cfg.model.name == "patchdrop":
            opts = cfg.model.options
            stages[opts["stage"]] = opts
            assert opts.get("curriculum_steps", 0) == 0 and not opts.get("freeze_norm", False), (config, overrides)
    assert len(commands) == 3 and set(stages) == {"pretrain", "finetune"}
    assert stages["pretrain"]["penalty"] == 0.5 and stages["finetune"]["penalty"] == 10.0

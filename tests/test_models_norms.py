"""Backbone normalisation choices (hrsel.models.norms): group is batch-independent, frozen keeps its statistics."""
from __future__ import annotations

import pytest
import torch
from torch import nn

from hrsel.errors import ConfigError
from hrsel.models import build_pipeline
from hrsel.models.backbones import NarrowResNet, ResNetBackbone
from hrsel.models.norms import batch_statistics_warning, group_count
from hrsel.tasks import TaskSpec

from toy_bright import one_torch_thread  # noqa: F401 (autouse fixture)

SMALL = {"width": 8, "strides": (2, 2, 2, 2), "blocks": (1, 1, 1, 1)}


def _batch_norms(module: nn.Module) -> list[nn.Module]:
    return [m for m in module.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]


@pytest.mark.parametrize("channels, groups", [(8, 4), (16, 8), (64, 32), (96, 32), (3, 1), (2, 1)])
def test_group_count_divides_and_never_gives_one_channel_per_group(channels, groups):
    assert group_count(channels) == groups and channels % groups == 0


def test_group_norm_gives_the_same_features_in_training_and_evaluation():
    torch.manual_seed(0)
    net = NarrowResNet(norm="group", **SMALL)
    assert not _batch_norms(net) and any(isinstance(m, nn.GroupNorm) for m in net.modules())
    x = torch.rand(6, 3, 32, 32)
    with torch.no_grad():
        train_out = net.train()(x)
        eval_out = net.eval()(x)
        one_by_one = torch.cat([net(x[i:i + 1]) for i in range(6)])
    torch.testing.assert_close(train_out, eval_out)
    torch.testing.assert_close(one_by_one, eval_out, rtol=1e-5, atol=1e-6)


def test_batch_norm_differs_between_training_and_evaluation():
    """The gap `norm: group` removes: what a one-slide batch trains on is not what evaluation computes."""
    torch.manual_seed(0)
    net = NarrowResNet(norm="batch", **SMALL)
    x = torch.rand(6, 3, 32, 32)
    with torch.no_grad():
        gap = (net.train()(x) - net.eval()(x)).abs().max()
    assert gap > 1e-2


@pytest.mark.parametrize("make", [lambda: NarrowResNet(norm="frozen", **SMALL),
                                  lambda: ResNetBackbone(arch="resnet18", last_stage="layer1", norm="frozen")])
def test_frozen_batch_norm_keeps_its_running_statistics_and_trains_its_affine(make):
    torch.manual_seed(0)
    net = make()
    norms = _batch_norms(net)
    with torch.no_grad():
        for m in norms:  # as if loaded from pretrained weights
            m.running_mean.uniform_(-0.1, 0.1)
            m.running_var.uniform_(0.5, 1.5)
    before = [(m.running_mean.clone(), m.running_var.clone()) for m in norms]
    net.train()
    assert net.training and not any(m.training for m in norms)
    out = net(torch.rand(4, 3, 32, 32))
    out.sum().backward()
    for m, (mean, var) in zip(norms, before):
        torch.testing.assert_close(m.running_mean, mean)
        torch.testing.assert_close(m.running_var, var)
    assert all(m.weight.grad is not None and m.weight.grad.abs().sum() > 0 for m in norms)
    net.eval()
    net.train()  # a second train() (IPS's scoring pass switches modes) keeps them frozen
    assert not any(m.training for m in norms)


def test_unknown_norm_and_group_with_batch_norm_weights_are_named_errors(tmp_path):
    with pytest.raises(ConfigError, match="'layer' is unknown; valid: batch, group, frozen"):
        NarrowResNet(norm="layer", **SMALL)
    weights = tmp_path / "r18.pt"
    torch.save(ResNetBackbone(arch="resnet18").body.state_dict(), weights)
    with pytest.raises(ConfigError, match="norm=group cannot load weights_path=.*r18.pt.*norm=frozen"):
        ResNetBackbone(arch="resnet18", norm="group", weights_path=str(weights))


def _ips(backbone_options: dict) -> nn.Module:
    return build_pipeline("ips", tasks={"label": TaskSpec("binary", 1)}, patch_size=32, k=2, score_chunk=4,
                          backbone="narrow_resnet", backbone_options=backbone_options,
                          aggregator_options={"heads": 1, "head_dim": 4, "mlp_dim": 8})


def test_the_trainer_warns_about_batch_norm_at_one_image_per_batch():
    batch = _ips(dict(SMALL))
    message = batch_statistics_warning(batch, batch_size=1, model="ips")
    assert message and "norm=group" in message and "norm=frozen" in message and "data.batch_size" in message
    assert batch.training  # the check leaves the mode as it found it
    assert batch_statistics_warning(batch, batch_size=4, model="ips") is None
    assert batch_statistics_warning(batch, batch_size=1, model="cnn") is None
    assert batch_statistics_warning(_ips({**SMALL, "norm": "group"}), batch_size=1, model="ips") is None
    assert batch_statistics_warning(_ips({**SMALL, "norm": "frozen"}), batch_size=1, model="ips") is None

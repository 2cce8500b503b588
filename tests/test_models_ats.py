"""ATS: its traffic feature net (size, cost, the pre-activation block) and the pipeline's ATS conventions."""
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from hrsel.config import load_config
from hrsel.models import build_pipeline
from hrsel.models.backbones import ATSResNet, PreActBlock, build_backbone
from hrsel.select.ats import attention_entropy
from hrsel.tasks import TaskSpec
from toy_bright import one_torch_thread  # noqa: F401 (autouse fixture)

REPO = Path(__file__).resolve().parents[1]
TASKS = {"y": TaskSpec("multiclass", 3)}
SMALL = dict(in_chans=1, patch_size=20, k=3, downscale=2, backbone_options={"width": 8})


def conv_macs(net: torch.nn.Module, x: torch.Tensor) -> tuple[int, int]:
    """(multiply-accumulates per image, number of convs) of `net(x)`, counted by forward hooks."""
    counts: list[int] = []

    def hook(module, inputs, output):
        k = module.kernel_size[0] * module.kernel_size[1]
        counts.append(output[0].numel() * module.in_channels // module.groups * k)

    handles = [m.register_forward_hook(hook) for m in net.modules() if isinstance(m, torch.nn.Conv2d)]
    with torch.no_grad():
        net(x)
    for h in handles:
        h.remove()
    return sum(counts), len(counts)


def test_ats_net_size_cost_and_shape():
    net = build_backbone("ats_resnet").eval()
    assert sum(p.numel() for p in net.parameters()) == 59_680  # ~60k: 864 stem + 3 x 19,456 convs + 7 BN x 64
    macs, convs = conv_macs(net, torch.rand(1, 3, 100, 100))
    assert convs == 10 and macs == 72_728_064  # ~73M per 100x100 patch: 8.64M + 48.64M + 12.16M + 3.29M
    assert net(torch.rand(4, 3, 100, 100)).shape == (4, 32) and net.out_dim == 32
    assert build_backbone("ats_resnet", in_chans=5)(torch.rand(2, 5, 40, 40)).shape == (2, 32)
    narrow = build_backbone("narrow_resnet")  # the ResNet18 layout it replaces: far larger
    assert sum(p.numel() for p in narrow.parameters()) > 2.5 * 59_680
    assert conv_macs(narrow, torch.rand(1, 3, 100, 100))[0] > 6 * macs


def test_preactivation_block_against_a_functional_reference():
    torch.manual_seed(0)
    block = PreActBlock(in_chans=4, width=6, stride=2)
    for bn in (block.pre[0], block.residual[1]):  # non-trivial running statistics and affine terms
        bn.running_mean.uniform_(-0.5, 0.5)
        bn.running_var.uniform_(0.5, 2.0)
        bn.weight.data.uniform_(0.5, 1.5)
        bn.bias.data.uniform_(-0.2, 0.2)
    block.eval()
    x = torch.randn(2, 4, 9, 10)

    def bn(m, t):
        return F.batch_norm(t, m.running_mean, m.running_var, m.weight, m.bias, False, 0.0, m.eps)

    act = F.relu(bn(block.pre[0], x))  # the shortcut starts after the pre-activation (ATS)
    res = F.conv2d(act, block.residual[0].weight, stride=2, padding=1)
    res = F.conv2d(F.relu(bn(block.residual[1], res)), block.residual[3].weight, padding=1)
    short = F.conv2d(act, block.shortcut.weight, stride=2)
    torch.testing.assert_close(block(x), res + short)
    assert block(x).shape == (2, 6, 5, 5)
    same = PreActBlock(in_chans=6, width=6, stride=1).eval()
    assert isinstance(same.shortcut, torch.nn.Identity)
    assert isinstance(ATSResNet().body[1], PreActBlock)


def images(n=2, seed=0):
    return (torch.rand(n, 1, 80, 80, generator=torch.Generator().manual_seed(seed)) * 255).to(torch.uint8)


def test_sampling_at_eval_and_top_k_when_off():
    torch.manual_seed(0)
    model = build_pipeline("ats", tasks=TASKS, **SMALL).eval()
    x = images(4)
    with torch.no_grad():
        draws = [model(x).indices for _ in range(6)]
        assert any(not torch.equal(draws[0], d) for d in draws[1:])  # sampled, not the top-K
        assert all((d.diff(dim=1) > 0).all() for d in draws)  # K distinct patches each
        model.sample_at_inference = False
        out = model(x)
        top = out.scores.topk(3, dim=1).indices.sort(dim=1).values
        assert torch.equal(out.indices, top) and torch.equal(model(x).indices, top)


@pytest.mark.parametrize("strength", [0.5, -0.5])
def test_positive_entropy_strength_rewards_entropy(strength):
    torch.manual_seed(0)
    model = build_pipeline("ats", tasks=TASKS, entropy_strength=strength, **SMALL).train()
    x = images(4)
    optimizer = torch.optim.SGD(model.scorer.parameters(), lr=0.5)
    entropies = []
    for _ in range(3):
        out = model(x)
        entropies.append(attention_entropy(out.scores).item())
        optimizer.zero_grad()
        out.aux_loss.backward()  # the regulariser alone
        optimizer.step()
    torch.testing.assert_close(out.aux_loss.detach(), -strength * attention_entropy(out.scores))
    rising = entropies[-1] > entropies[0]
    assert rising == (strength > 0), entropies
    assert model.eval()(x).aux_loss is None


def test_attention_l2_is_keras_l2_on_the_hidden_kernels():
    """ATS speed_limits.py: Conv2D(8/16/32, kernel_regularizer=l2(1e-5)), the last Conv2D(1) without: the loss
    gets 1e-5 * sum(w^2) over the three hidden kernels, no biases."""
    c = 0.25  # large, so that the term is far above rounding
    torch.manual_seed(0)
    model = build_pipeline("ats", tasks=TASKS, attention_l2=c, **SMALL).train()
    hidden = [model.scorer.net[i] for i in (0, 2, 4)]
    last = model.scorer.net[6]
    assert model.scorer.hidden_kernels() == [conv.weight for conv in hidden]
    out = model(images(4))
    torch.testing.assert_close(out.aux_loss, c * sum(conv.weight.pow(2).sum() for conv in hidden))
    out.aux_loss.backward()  # the regulariser alone
    for conv in hidden:
        torch.testing.assert_close(conv.weight.grad, 2 * c * conv.weight.detach())
        assert conv.bias.grad is None
    assert last.weight.grad is None and last.bias.grad is None
    assert model.eval()(images(2)).aux_loss is None
    both = build_pipeline("ats", tasks=TASKS, attention_l2=c, entropy_strength=0.5, **SMALL).train()
    out = both(images(4))
    l2 = c * sum(w.pow(2).sum() for w in both.scorer.hidden_kernels())
    torch.testing.assert_close(out.aux_loss, l2 - 0.5 * attention_entropy(out.scores))


def test_normalize_features_makes_the_estimate_scale_free():
    class Scaled(torch.nn.Module):
        def __init__(self, net, scale):
            super().__init__()
            self.net, self.scale, self.out_dim = net, scale, net.out_dim

        def forward(self, x):
            return self.scale * self.net(x)

    pooled = {}
    for normalize in (True, False):
        for scale in (1.0, 7.0):
            torch.manual_seed(0)
            model = build_pipeline("ats", tasks=TASKS, normalize_features=normalize,
                                   **dict(SMALL, k=1)).eval()
            model.backbone = Scaled(model.backbone, scale)
            model.heads.register_forward_pre_hook(lambda m, args: pooled.__setitem__((normalize, scale), args[0]))
            torch.manual_seed(1)
            with torch.no_grad():
                model(images(3))
    # K = 1: the estimate is the drawn patch's feature itself, a unit vector when normalised
    torch.testing.assert_close(pooled[True, 1.0].norm(dim=-1), torch.ones(3, 1))
    torch.testing.assert_close(pooled[True, 1.0], pooled[True, 7.0])
    torch.testing.assert_close(7.0 * pooled[False, 1.0], pooled[False, 7.0])
    assert not torch.allclose(pooled[False, 1.0].norm(dim=-1), torch.ones(3, 1))


@pytest.mark.parametrize("name", ["traffic_ats_k5", "traffic_ats_k10", "traffic_ats_paper_k5",
                                  "traffic_ats_paper_k10", "billiard_ats", "billiard_ats_position"])
def test_ats_configs_build_with_the_ats_conventions(name):
    cfg = load_config(REPO / "configs" / f"{name}.yaml")
    opts = cfg.model.options
    assert opts["entropy_strength"] > 0 and opts["sample_at_inference"] and opts["normalize_features"]
    assert opts["attention_smoothing"] == pytest.approx(1e-4)
    if name.startswith("traffic"):
        assert opts["backbone"] == "ats_resnet" and cfg.train.class_balanced and cfg.optim.lr == pytest.approx(1e-3)
        assert cfg.optim.clip_norm == 1.0 and cfg.optim.schedule == "piecewise"
        assert opts["attention_l2"] == pytest.approx(1e-5)  # speed_limits.py: l2(1e-5) on the attention convs
    else:
        assert cfg.optim.weight_decay_mode == "absolute" and cfg.optim.weight_decay_on == "all"
    light = dict(opts, backbone="ats_resnet", backbone_options={"width": 4})  # build cheaply, same pipeline options
    model = build_pipeline(cfg.model.name, tasks={"t": TaskSpec("multiclass", 4)}, **light)
    assert model.entropy_strength == opts["entropy_strength"] and model.normalize_features
    assert model.attention_l2 == opts.get("attention_l2", 0.0)

"""Scorers, backbones, aggregators and heads: every registered one, shapes, no NaN, masking."""
import pytest
import torch
import torch.nn.functional as F

from hrsel.errors import ConfigError
from hrsel.models.aggregators import AGGREGATORS, build_aggregator
from hrsel.models.backbones import BACKBONES, build_backbone
from hrsel.models.heads import TaskHeads, is_correct, task_loss
from hrsel.models.scorers import SCORERS, build_scorer
from hrsel.tasks import TaskSpec
from toy_bright import one_torch_thread  # noqa: F401 (autouse fixture)


@pytest.mark.parametrize("name", SCORERS.names())
@pytest.mark.parametrize("in_chans", [1, 3])
def test_every_scorer(name, in_chans):
    scorer = build_scorer(name, in_chans=in_chans)
    x = torch.rand(2, in_chans, 72, 88)
    native = scorer(x)
    assert native.dim() == 3 and native.shape[0] == 2 and torch.isfinite(native).all()
    if name in ("dps", "se"):
        assert native.shape[1:] == ((72 - 8) // 8, (88 - 8) // 8)  # DPS grid formula
    assert scorer(x, grid_shape=(3, 5)).shape == (2, 3, 5)
    one = scorer(torch.rand(4, in_chans, 20, 20), grid_shape=(1, 1))
    assert one.shape == (4, 1, 1)
    one.sum().backward()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in scorer.parameters())


def test_scorer_input_errors():
    with pytest.raises(ValueError, match="at least 9x9"):
        build_scorer("dps", in_chans=1)(torch.rand(1, 1, 8, 8), grid_shape=(1, 1))
    with pytest.raises(ValueError, match=r"expects \(B, 3, h, w\)"):
        build_scorer("dps")(torch.rand(1, 1, 30, 30))
    with pytest.raises(ConfigError, match="valid: dps, resnet_stem, se"):
        build_scorer("dsp")


@pytest.mark.parametrize("name", BACKBONES.names())
@pytest.mark.parametrize("in_chans", [1, 3])
def test_every_backbone(name, in_chans):
    net = build_backbone(name, in_chans=in_chans)
    out = net(torch.rand(2, in_chans, 32, 32))
    assert out.shape == (2, net.out_dim) and torch.isfinite(out).all()


def test_truncated_resnet_and_local_weights(tmp_path):
    assert build_backbone("resnet18", in_chans=1, last_stage="layer2").out_dim == 128  # IPS MNIST
    assert build_backbone("resnet50", last_stage="layer4").out_dim == 2048
    from torchvision.models import resnet18

    ref = resnet18(weights=None)
    path = tmp_path / "weights.pt"
    torch.save(ref.state_dict(), path)
    gray = build_backbone("resnet18", in_chans=1, weights_path=str(path))
    torch.testing.assert_close(gray.body[0].weight, ref.conv1.weight.sum(1, keepdim=True))
    rgb = build_backbone("resnet18", weights_path=str(path), imagenet_norm=True)
    torch.testing.assert_close(rgb.body[4][0].conv1.weight, ref.layer1[0].conv1.weight)
    with pytest.raises(ConfigError, match="does not exist"):
        build_backbone("resnet18", weights_path=str(tmp_path / "missing.pt"))
    with pytest.raises(ConfigError, match="last_stage"):
        build_backbone("resnet18", last_stage="layer5")


@pytest.mark.parametrize("name", AGGREGATORS.names())
@pytest.mark.parametrize("pos", ["none", "learned", "sincos"])
def test_every_aggregator_masks_padding(name, pos):
    torch.manual_seed(0)
    agg = build_aggregator(name, in_dim=16, pos_encoding=pos, num_positions=20).eval()
    x = torch.randn(2, 5, 16)
    mask = torch.tensor([[True, True, True, False, False], [True] * 5])
    positions = torch.tensor([[3, 7, 1, 0, 0], [0, 1, 2, 3, 19]])
    out = agg(x, mask=mask, positions=positions)
    assert out.shape == (2, agg.num_tokens, agg.out_dim) and torch.isfinite(out).all()
    garbage = x.clone()
    garbage[0, 3:] = 1e3  # masked slots must not matter
    torch.testing.assert_close(agg(garbage, mask=mask, positions=positions), out)
    alone = agg(x[:1, :3], positions=positions[:1, :3])  # same as dropping the padding
    torch.testing.assert_close(alone, out[:1], atol=1e-5, rtol=1e-4)
    soft = F.one_hot(positions, 20).float()  # indicator positions = index positions when hard
    torch.testing.assert_close(agg(x, mask=mask, positions=soft), out, atol=1e-5, rtol=1e-4)


def test_cross_attention_scores_and_tokens():
    agg = build_aggregator("attention", in_dim=8, num_tokens=3, heads=2, head_dim=4, mlp_dim=16).eval()
    x = torch.randn(2, 6, 8)
    mask = torch.ones(2, 6, dtype=torch.bool)
    mask[1, 4:] = False
    scores = agg.attention_scores(x, mask=mask)
    torch.testing.assert_close(scores.sum(1), torch.ones(2))
    assert (scores[1, 4:] == 0).all()
    assert agg(x, mask=mask).shape == (2, 3, 8)


def test_heads_losses_and_correctness():
    tasks = {"a": TaskSpec("multiclass", 3), "b": TaskSpec("multilabel", 4), "c": TaskSpec("binary", 1)}
    heads = TaskHeads(tasks=tasks, in_dim=8, hidden_dim=16)
    per_task = heads(torch.randn(2, 3, 8))
    single = heads(torch.randn(2, 1, 8))
    for logits in (per_task, single):
        assert {k: tuple(v.shape) for k, v in logits.items()} == {"a": (2, 3), "b": (2, 4), "c": (2, 1)}
    logits = torch.tensor([[2.0, 0.0, -1.0], [0.0, 0.0, 3.0]])
    target = torch.tensor([0, 1])
    torch.testing.assert_close(task_loss(logits, target, tasks["a"]),
                               -torch.log_softmax(logits, 1)[torch.arange(2), target])
    assert is_correct(logits, target, tasks["a"]).tolist() == [True, False]
    ml = torch.tensor([[3.0, -3.0, 1.0, -1.0]])
    assert is_correct(ml, torch.tensor([[1.0, 0.0, 1.0, 0.0]]), tasks["b"]).item()
    torch.testing.assert_close(task_loss(torch.tensor([[0.0]]), torch.tensor([1.0]), tasks["c"]),
                               torch.tensor([0.6931]), atol=1e-4, rtol=0)

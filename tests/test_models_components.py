"""Scorers, backbones, aggregators and heads: every registered one, shapes, no NaN, masking."""
import pytest
import torch
import torch.nn.functional as F

from hrsel.errors import ConfigError
from hrsel.models.aggregators import AGGREGATORS, PositionalEncoding, SoftCells, build_aggregator
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
    x = torch.rand(2, net.in_dim) if name == "feature_projector" else torch.rand(2, in_chans, 32, 32)  # features
    out = net(x)
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
@pytest.mark.parametrize("pos", ["none", "learned", "sincos", "dense"])
def test_every_aggregator_masks_padding(name, pos):
    torch.manual_seed(0)
    extra = {"num_patches": 5} if name == "concat" else {}
    agg = build_aggregator(name, in_dim=16, pos_encoding=pos, num_positions=20, **extra).eval()
    x = torch.randn(2, 5, 16)
    mask = torch.tensor([[True, True, True, False, False], [True] * 5])
    positions = torch.tensor([[3, 7, 1, 0, 0], [0, 1, 2, 3, 19]])
    out = agg(x, mask=mask, positions=positions)
    assert out.shape == (2, agg.num_tokens, agg.out_dim) and torch.isfinite(out).all()
    garbage = x.clone()
    garbage[0, 3:] = 1e3  # masked slots must not matter
    torch.testing.assert_close(agg(garbage, mask=mask, positions=positions), out)
    if name != "concat":  # concat has a fixed K
        alone = agg(x[:1, :3], positions=positions[:1, :3])  # same as dropping the padding
        torch.testing.assert_close(alone, out[:1], atol=1e-5, rtol=1e-4)
    soft = F.one_hot(positions, 20).float()  # indicator positions = index positions when hard
    torch.testing.assert_close(agg(x, mask=mask, positions=soft), out, atol=1e-5, rtol=1e-4)


def test_concat_keeps_the_selection_order():
    agg = build_aggregator("concat", in_dim=3, num_patches=4)
    x = torch.arange(2 * 4 * 3, dtype=torch.float32).view(2, 4, 3)
    mask = torch.tensor([[True, True, False, True], [True] * 4])
    out = agg(x, mask=mask)
    assert out.shape == (2, 1, 12) and agg.out_dim == 12
    expected = torch.cat([x[0, 0], x[0, 1], torch.zeros(3), x[0, 3]])  # patch j at [j*D, (j+1)*D)
    torch.testing.assert_close(out[0, 0], expected)
    torch.testing.assert_close(out[1, 0], x[1].reshape(-1))
    with pytest.raises(ValueError, match="built for 4 patches, got 3"):
        agg(x[:, :3])
    with pytest.raises(ConfigError, match="num_patches"):
        build_aggregator("concat", in_dim=3)


def test_sum_pool_transformer_is_permutation_invariant_without_positions():
    torch.manual_seed(0)
    agg = build_aggregator("transformer", in_dim=12, dim=8, depth=2, heads=2).eval()
    assert agg.pool == "sum" and agg.cls is None
    assert not any("cls" in name for name, _ in agg.named_parameters())
    x = torch.randn(2, 6, 12)
    perm = torch.tensor([4, 0, 5, 2, 1, 3])
    out = agg(x)
    assert out.shape == (2, 1, 8)
    torch.testing.assert_close(agg(x[:, perm]), out, atol=1e-5, rtol=1e-5)
    tokens = agg.proj(x)  # equivariant before the sum: the summed outputs are the per-token outputs
    padding = torch.zeros(2, 6, dtype=torch.bool)
    for layer in agg.layers:
        tokens = layer(tokens, padding)
    torch.testing.assert_close(tokens.sum(1, keepdim=True), out, atol=1e-5, rtol=1e-5)
    with_pos = build_aggregator("transformer", in_dim=12, dim=8, depth=2, heads=2, pos_encoding="dense",
                                num_positions=6).eval()
    positions = torch.arange(6).expand(2, -1)
    moved = with_pos(x[:, perm], positions=positions)  # the features change cells: the output changes
    assert not torch.allclose(moved, with_pos(x, positions=positions), atol=1e-4)


def test_cls_pool_transformer_option_and_errors():
    agg = build_aggregator("transformer", in_dim=8, dim=8, depth=1, heads=2, pool="cls").eval()
    assert agg.cls is not None and agg(torch.randn(2, 3, 8)).shape == (2, 1, 8)
    with pytest.raises(ConfigError, match="pool 'mean' is unknown; valid: cls, sum"):
        build_aggregator("transformer", in_dim=8, pool="mean")
    with pytest.raises(ConfigError, match="model.num_positions"):
        build_aggregator("transformer", in_dim=8, pos_encoding="learned")
    plain = build_aggregator("transformer", in_dim=8, dim=8, depth=1, heads=2)  # default: no positions
    assert plain.pos.kind == "none"
    empty = plain.eval()(torch.randn(1, 3, 8), mask=torch.zeros(1, 3, dtype=torch.bool))
    torch.testing.assert_close(empty, torch.zeros(1, 1, 8))  # no real patch: a zero sum, no NaN


@pytest.mark.parametrize("kind", ["learned", "sincos", "dense"])
def test_soft_cells_encode_as_the_indicators_that_are_zero_elsewhere(kind):
    """DPS with candidates: K soft indicators over C candidate cells = the (B, K, N) indicators of DPS."""
    torch.manual_seed(0)
    pe = PositionalEncoding(kind=kind, num_positions=9, dim=4).double()
    if pe.bias is not None:
        with torch.no_grad():
            pe.bias.normal_()
    cells = torch.tensor([[4, 0, 7], [8, 2, -1]])  # -1: an absent candidate, never weighted
    weights = torch.softmax(torch.randn(2, 2, 3, dtype=torch.float64), dim=-1)
    indicators = torch.zeros(2, 2, 9, dtype=torch.float64)
    indicators.scatter_add_(2, cells.clamp_min(0)[:, None].expand(-1, 2, -1), weights * (cells >= 0)[:, None])
    x = torch.randn(2, 2, 4, dtype=torch.float64)
    torch.testing.assert_close(pe(x, SoftCells(cells=cells, weights=weights)), pe(x, indicators))
    leaf = weights.clone().requires_grad_()
    pe(x, SoftCells(cells=cells, weights=leaf)).sum().backward()
    assert leaf.grad[0].abs().min() > 0 and (leaf.grad[1, :, 2] == 0).all()  # the absent cell takes none
    with pytest.raises(ConfigError, match="model.num_positions=9"):
        pe(x, SoftCells(cells=torch.tensor([[9, 0, 1], [0, 1, 2]]), weights=weights))


def test_dense_positions_are_a_linear_layer_with_bias():
    torch.manual_seed(0)
    pe = PositionalEncoding(kind="dense", num_positions=7, dim=4)
    with torch.no_grad():
        pe.bias.normal_()
    x = torch.randn(2, 3, 4)
    idx = torch.tensor([[0, 3, 6], [2, 2, 5]])
    w, b = pe.table, pe.bias  # (N, D), (D,)
    torch.testing.assert_close(pe(x, idx), x + w[idx] + b)
    soft = torch.softmax(torch.randn(2, 3, 7), dim=-1)
    torch.testing.assert_close(pe(x, soft), x + soft @ w + b)
    reference = torch.nn.functional.linear(soft, w.t(), b)  # Dense(indicators): Y @ W + b
    torch.testing.assert_close(pe(x, soft) - x, reference)
    learned = PositionalEncoding(kind="learned", num_positions=7, dim=4)
    assert learned.bias is None
    torch.testing.assert_close(learned(x, idx), x + learned.table[idx])
    with pytest.raises(ValueError, match="model.num_positions=7"):
        pe(x, torch.rand(2, 3, 9))
    double = PositionalEncoding(kind="dense", num_positions=5, dim=3).double()
    y = torch.rand(1, 2, 5, dtype=torch.float64, requires_grad=True)
    feats = torch.randn(1, 2, 3, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda f, p: double(f, p), (feats, y))


def test_head_hidden_same_is_dense_d_then_swish():
    tasks = {"a": TaskSpec("multiclass", 3)}
    head = TaskHeads(tasks=tasks, in_dim=6, hidden_dim="same").heads["a"]
    assert [type(m).__name__ for m in head] == ["Linear", "SiLU", "Linear"]
    assert head[0].in_features == head[0].out_features == 6
    x = torch.randn(2, 6)
    torch.testing.assert_close(head(x), F.silu(x @ head[0].weight.t() + head[0].bias) @ head[2].weight.t()
                               + head[2].bias)
    assert len(TaskHeads(tasks=tasks, in_dim=6, hidden_dim=None).heads["a"]) == 1
    with pytest.raises(ConfigError, match="head_hidden 'wide' is invalid"):
        TaskHeads(tasks=tasks, in_dim=6, hidden_dim="wide")


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

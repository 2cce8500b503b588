"""IPS over bags of pre-extracted features (the CAMELYON16 setup): projector, selection, gradients."""
import pytest
import torch

from hrsel.models import build_pipeline
from hrsel.models.backbones import build_backbone
from hrsel.models.bags import FeatureBags, is_feature_bags
from hrsel.tasks import TaskSpec

TASKS = {"tumor": TaskSpec("binary", 1)}
OPTS = dict(k=6, score_chunk=5, backbone="feature_projector", backbone_options={"in_dim": 12, "dim": 8},
            aggregator_options={"heads": 1, "head_dim": 4, "mlp_dim": 16, "dropout": 0.0}, shuffle=False)


def ips(**extra):
    torch.manual_seed(0)
    model = build_pipeline("ips", tasks=TASKS, **dict(OPTS, **extra))
    with torch.no_grad():
        model.classifier.aggregator.query.mul_(100.0)  # spread the attention: no near-ties
    return model


def test_projector_is_the_ips_one():
    proj = build_backbone("feature_projector", in_dim=2048, dim=512)
    norm, linear, bn, relu = proj.body
    assert isinstance(norm, torch.nn.LayerNorm) and not norm.elementwise_affine
    assert (linear.in_features, linear.out_features) == (2048, 512)
    assert isinstance(bn, torch.nn.BatchNorm1d) and isinstance(relu, torch.nn.ReLU)
    assert proj(torch.randn(3, 2048)).shape == (3, 512) and proj.out_dim == 512
    with pytest.raises(ValueError, match="in_dim"):
        proj(torch.randn(3, 100))


def test_bag_detection_and_gather():
    assert is_feature_bags(torch.randn(2, 5, 3)) and is_feature_bags([torch.randn(4, 3), torch.randn(2, 3)])
    assert not is_feature_bags(torch.zeros(2, 1, 8, 8)) and not is_feature_bags(torch.zeros(2, 5, 3, dtype=torch.uint8))
    bags = FeatureBags([torch.arange(12.).view(4, 3), torch.arange(6.).view(2, 3)])
    out = bags.gather(torch.tensor([[3, 0], [1, -1]]))
    torch.testing.assert_close(out, torch.tensor([[[9., 10, 11], [0, 1, 2]], [[3, 4, 5], [0, 0, 0]]]))
    with pytest.raises(ValueError, match="feature widths"):
        FeatureBags([torch.randn(4, 3), torch.randn(4, 5)])


def test_selection_is_the_global_top_m_by_attention():
    model = ips()
    bags = torch.randn(2, 23, 12)
    model.eval()
    with torch.no_grad():
        emb = model.classifier.encode(bags)  # (B, N, D)
        attention = model.classifier.aggregator.attention_scores(emb)  # one head, one query: monotone
        out = model(bags)
    assert torch.equal(out.indices, attention.topk(6, dim=1).indices.sort(dim=1).values)
    torch.testing.assert_close(out.scores, attention, rtol=1e-5, atol=1e-7)


def test_sequential_and_batched_selection_agree_and_lengths_may_differ():
    bags = torch.randn(3, 17, 12)
    eager, sequential = ips(mode="eager").eval(), ips(mode="eager_sequential").eval()
    with torch.no_grad():
        a, b = eager(bags), sequential(bags)
        ragged = eager([bags[0], bags[1, :4], bags[2, :9]])  # different lengths: one bag at a time
        alone = eager(bags[1:2, :4])
    assert torch.equal(a.indices, b.indices)
    torch.testing.assert_close(a.logits["tumor"], b.logits["tumor"])
    assert ragged.indices.shape == (3, 6) and ragged.scores.shape == (3, 17)
    assert ragged.indices[1].tolist() == [0, 1, 2, 3, -1, -1]  # 4 items: all kept, 2 absent slots
    assert torch.isnan(ragged.scores[1, 4:]).all()
    torch.testing.assert_close(ragged.logits["tumor"][1], alone.logits["tumor"][0])


def test_gradients_reach_the_projector_and_aggregator_only_through_the_m_selected():
    model = ips().train()
    bags = [torch.randn(20, 12, requires_grad=True), torch.randn(11, 12, requires_grad=True)]
    out = model(bags)
    out.logits["tumor"].sum().backward()
    assert model.classifier.backbone.body[1].weight.grad.abs().sum() > 0
    assert model.classifier.aggregator.query.grad.abs().sum() > 0
    for bag, idx in zip(bags, out.indices):  # only the selected rows of a bag get a gradient
        touched = bag.grad.abs().sum(1) > 0
        chosen = torch.zeros_like(touched)
        chosen[idx[idx >= 0]] = True
        assert torch.equal(touched, chosen)

"""Pipelines: built by name, exactness of their selection, lazy sources, and IPS == global top-M."""
import numpy as np
import pytest
import torch

from hrsel.errors import ConfigError
from hrsel.io import ArraySource
from hrsel.models import PIPELINES, build_pipeline, pipeline_options
from hrsel.models.patches import ImageBatch
from hrsel.select import hard_topk
from hrsel.select.extract import GridGeometry
from hrsel.tasks import TaskSpec
from toy_bright import one_torch_thread  # noqa: F401 (autouse fixture)

TASKS = {"y": TaskSpec("multiclass", 3), "z": TaskSpec("binary", 1)}
LIGHT = dict(in_chans=1, backbone="narrow_resnet", backbone_options={"width": 8, "strides": (2, 2), "blocks": (1, 1)})
SMALL = {
    "ips": dict(LIGHT, patch_size=20, k=3, score_chunk=5,
                aggregator_options={"heads": 2, "head_dim": 4, "mlp_dim": 16}),
    "dps": dict(LIGHT, patch_size=20, k=3, downscale=2, num_samples=10),
    "dps_candidates": dict(LIGHT, patch_size=20, k=2, num_candidates=5, downscale=1, num_samples=10,
                           score_chunk=6),
    "ats": dict(LIGHT, patch_size=20, k=3, downscale=2),
    "patchdrop": dict(LIGHT, patch_size=20, downscale=2),
    "cnn": dict(LIGHT, downscale=2),
}


def images(n=2, seed=0):
    return (torch.rand(n, 1, 80, 80, generator=torch.Generator().manual_seed(seed)) * 255).to(torch.uint8)


def test_registry_names_and_option_errors():
    assert PIPELINES.names() == sorted(SMALL)
    assert "k" in pipeline_options("ips") and "num_selected" not in pipeline_options("ips")
    with pytest.raises(ConfigError, match="no option.*num_selectd.*valid:"):
        build_pipeline("ips", tasks=TASKS, num_selectd=3)
    with pytest.raises(ConfigError, match="unknown pipeline 'ipss'.*Did you mean 'ips'"):
        build_pipeline("ipss", tasks=TASKS)


@pytest.mark.parametrize("name", sorted(SMALL))
def test_every_pipeline_trains_and_infers(name):
    torch.manual_seed(0)
    model = build_pipeline(name, tasks=TASKS, **SMALL[name])
    x, targets = images(), {"y": torch.tensor([0, 2]), "z": torch.tensor([1.0, 0.0])}
    out = model(x)
    assert out.logits["y"].shape == (2, 3) and out.logits["z"].shape == (2, 1)
    loss = torch.nn.functional.cross_entropy(out.logits["y"], targets["y"]) + model.auxiliary_loss(out, targets)
    loss.backward()
    grads = [p.grad for p in model.parameters() if p.grad is not None]
    assert grads and all(torch.isfinite(g).all() for g in grads)
    model.eval()
    with torch.no_grad():
        again = model(x)
    assert all(torch.isfinite(v).all() for v in again.logits.values())
    if name != "cnn":
        assert again.indices.shape[0] == 2 and (again.indices < 16).all()


class Blind(torch.nn.Module):
    """A backbone that sees nothing: every patch gets the same zero feature."""

    def __init__(self, out_dim: int):
        super().__init__()
        self.out_dim = out_dim

    def forward(self, x):
        return x.new_zeros(x.shape[0], self.out_dim)


@pytest.mark.parametrize("name", ["dps", "dps_candidates"])
def test_soft_positions_pass_gradient_to_the_scorer(name):
    """Blind features: the positional encoding is the only path from the loss to the scores. DPS weights its
    table by the (B, K, N) indicators; DPS with candidates by its (B, K, C) indicators over the candidates' cells
    (it used the arg-max cell of each soft patch, and no gradient reached the scorer this way)."""
    torch.manual_seed(0)
    model = build_pipeline(name, tasks=TASKS, pos_encoding="learned", num_positions=16, **SMALL[name]).train()
    model.classifier.backbone = Blind(model.classifier.backbone.out_dim)
    out = model(images())
    out.logits["y"].pow(2).sum().backward()
    grads = [p.grad for p in model.scorer.parameters()]
    assert all(g is not None and torch.isfinite(g).all() for g in grads)
    assert sum(float(g.abs().sum()) for g in grads) > 0
    assert out.indices.dtype == torch.int64 and out.indices.shape == (2, SMALL[name]["k"])


def test_dps_at_sigma_zero_equals_hard_topk_extraction():
    torch.manual_seed(0)
    model = build_pipeline("dps", tasks=TASKS, **dict(SMALL["dps"], sigma=0.0, sigma_schedule="constant"))
    x = images(3)
    out = model(x)  # training mode: perturbed top-K at sigma 0 + streaming soft extraction
    batch = ImageBatch(x)
    scores, geometry = model.score(batch)
    idx = hard_topk(scores, 3)
    assert torch.equal(out.indices, idx)
    expected = model.classifier(batch.gather(geometry, idx), positions=idx)
    for task in TASKS:
        torch.testing.assert_close(out.logits[task], expected[task])
    out.logits["y"].sum().backward()
    assert all(p.grad is None or p.grad.abs().max() == 0 for p in model.scorer.parameters())  # sigma 0: no gradient


@pytest.mark.parametrize("chunk_size", [1, 4, 16])
@pytest.mark.parametrize("m", [1, 5])
def test_ips_pipeline_selects_global_topm_by_attention(chunk_size, m):
    torch.manual_seed(1)
    opts = dict(SMALL["ips"], k=m, score_chunk=chunk_size, shuffle=False,
                aggregator_options={"heads": 1, "head_dim": 4, "mlp_dim": 16})
    model = build_pipeline("ips", tasks={"y": TaskSpec("multiclass", 3)}, **opts)
    with torch.no_grad():
        model.classifier.aggregator.query.mul_(300.0)  # spread the attention: no near-ties
    x = images(2, seed=3)
    model.eval()  # the selection pass runs in eval mode (before the training pass moves BatchNorm stats)
    batch = ImageBatch(x)
    geometry = GridGeometry.regular((80, 80), patch_size=20)
    with torch.no_grad():
        feats = model.classifier.encode(batch.chunk(geometry, 0, 16))
        attention = model.classifier.aggregator.attention_scores(feats)  # one head, one query: monotone
    out = model.train()(x)
    assert torch.equal(out.indices, attention.topk(m, dim=1).indices.sort(dim=1).values)
    # the recorded map is the one-round attention over all 16 patches, whatever the chunk size
    torch.testing.assert_close(out.scores, attention, rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("name", ["ips", "dps", "dps_candidates", "cnn"])
def test_lazy_sources_give_the_same_output_as_tensors(name):
    torch.manual_seed(0)
    model = build_pipeline(name, tasks=TASKS, **SMALL[name]).eval()
    x = images(2, seed=5)
    sources = [ArraySource(np.ascontiguousarray(x[i, 0].numpy()), fill=0) for i in range(2)]
    with torch.no_grad():
        a, b = model(x), model(sources)
    for task in TASKS:
        torch.testing.assert_close(a.logits[task], b.logits[task])
    if a.indices is not None:
        assert torch.equal(a.indices, b.indices)


@pytest.mark.parametrize("mode", ["eager", "eager_sequential", "lazy"])
def test_ips_loading_modes_agree(mode):
    torch.manual_seed(0)
    model = build_pipeline("ips", tasks=TASKS, **dict(SMALL["ips"], mode=mode)).eval()
    torch.manual_seed(0)
    reference = build_pipeline("ips", tasks=TASKS, **SMALL["ips"]).eval()
    x = images(3, seed=7)
    with torch.no_grad():
        a, b = model(x), reference(x)
    assert torch.equal(a.indices, b.indices)
    torch.testing.assert_close(a.logits["y"], b.logits["y"])
    with pytest.raises(ConfigError, match="mode"):
        build_pipeline("ips", tasks=TASKS, mode="eagre")

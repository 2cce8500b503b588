"""Options that make the papers' rows expressible: coordinate channels, soft inference, DPS heads, CUB branch."""
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from hrsel.errors import ConfigError
from hrsel.io import ArraySource
from hrsel.models import build_pipeline
from hrsel.models.dps import SoftTopK
from hrsel.models.patches import ImageBatch, with_coordinate_channels
from hrsel.models.pipeline import PipelineOutput
from hrsel.tasks import TaskSpec
from toy_bright import one_torch_thread  # noqa: F401 (autouse fixture)

TASKS = {"label": TaskSpec("multiclass", 3)}
REPO = Path(__file__).resolve().parents[1]


def test_coordinate_channels_values():
    images = torch.full((2, 1, 4, 5), 255, dtype=torch.uint8)
    out = with_coordinate_channels(images)
    assert out.shape == (2, 3, 4, 5) and out.dtype == torch.float32
    assert torch.equal(out[:, 0], torch.ones(2, 4, 5))
    torch.testing.assert_close(out[0, 1, 0], torch.linspace(0, 1, 5))  # x along the width
    torch.testing.assert_close(out[0, 2, :, 0], torch.linspace(0, 1, 4))  # y along the height


def test_coordinate_channels_reject_lazy_sources():
    with pytest.raises(ValueError, match="in-memory"):
        with_coordinate_channels([ArraySource(torch.zeros(8, 8, 3, dtype=torch.uint8).numpy())])


@pytest.mark.parametrize("name,options", [
    ("cnn", dict(backbone="narrow_resnet", backbone_options={"width": 4})),
    ("ats", dict(backbone="narrow_resnet", backbone_options={"width": 4}, patch_size=16, k=2, downscale=2)),
])
def test_pipelines_see_the_coordinate_channels(name, options, monkeypatch):
    torch.manual_seed(0)
    model = build_pipeline(name, tasks=TASKS, in_chans=3, coord_channels=True, **options).eval()
    first_conv = next(m for m in model.modules() if isinstance(m, torch.nn.Conv2d))
    assert first_conv.in_channels == 5
    images = torch.rand(2, 3, 64, 64)
    with torch.no_grad():
        with_position = model(images).logits["label"]
        module = __import__(f"hrsel.models.{name}", fromlist=["with_coordinate_channels"])
        blank = lambda x: torch.cat([x.float(), torch.zeros_like(x[:, :2]).float()], 1)  # noqa: E731
        monkeypatch.setattr(module, "with_coordinate_channels", blank)
        without = model(images).logits["label"]
    assert with_position.shape == (2, 3)
    assert not torch.allclose(with_position, without)


def test_soft_inference_keeps_the_training_selector():
    scores = torch.randn(2, 30)
    hard = SoftTopK(k=3, sigma=0.5, sigma_schedule="constant").eval()
    soft = SoftTopK(k=3, sigma=0.5, sigma_schedule="constant", inference_selector="soft").eval()
    assert hard(scores)[0] is None
    indicators, indices = soft(scores)
    assert indicators.shape == (2, 3, 30) and (indicators < 1).any()
    assert indices.shape == (2, 3)
    with pytest.raises(ValueError, match="inference_selector"):
        SoftTopK(k=3, inference_selector="sometimes")


TINY = dict(in_chans=1, patch_size=16, k=3, downscale=2, num_samples=8,
            backbone="narrow_resnet", backbone_options={"width": 8})


def test_dps_head_hidden_is_dense_then_silu():
    model = build_pipeline("dps", tasks=TASKS, head_hidden="same", **TINY)
    head = model.classifier.heads.heads["label"]
    assert [type(m).__name__ for m in head] == ["Linear", "SiLU", "Linear"]
    assert head[0].in_features == head[0].out_features == model.classifier.aggregator.out_dim == 8
    assert len(build_pipeline("dps", tasks=TASKS, **TINY).classifier.heads.heads["label"]) == 1


def test_dps_concat_aggregator_gets_k_and_merges_the_whole_image():
    model = build_pipeline("dps", tasks=TASKS, aggregator="concat", global_branch=True, global_merge="concat",
                           **TINY)
    assert model.classifier.aggregator.num_patches == 3
    assert model.classifier.heads.heads["label"][0].in_features == (3 + 1) * 8
    with pytest.raises(ConfigError, match="global_merge=concat"):
        build_pipeline("dps", tasks=TASKS, aggregator="concat", global_branch=True, **TINY)
    with pytest.raises(ConfigError, match="global_branch=true"):
        build_pipeline("dps", tasks=TASKS, global_aux_loss=True, **TINY)


def test_dps_global_branch_forward_backward():
    torch.manual_seed(0)
    model = build_pipeline("dps", tasks=TASKS, global_branch=True, global_aux_loss=True, sigma=0.5, **TINY)
    images = (torch.rand(2, 1, 48, 48) * 255).to(torch.uint8)
    out = model(images)
    assert out.logits["label"].shape == (2, 3)
    assert out.extras["whole_logits/label"].shape == (2, 3) and out.extras["part_logits/label"].shape == (2, 3, 3)
    targets = {"label": torch.tensor([0, 2])}
    loss = F.cross_entropy(out.logits["label"], targets["label"]) + model.auxiliary_loss(out, targets)
    loss.backward()
    for name in ("scorer", "classifier.backbone", "classifier.heads", "aux_heads.whole", "aux_heads.part"):
        grads = [p.grad for n, p in model.named_parameters() if n.startswith(name)]
        assert grads and all(g is not None and torch.isfinite(g).all() for g in grads), name
    model.eval()  # hard top-K: logits = head(mean(parts) + whole), the whole image through the same backbone
    with torch.no_grad():
        out = model(images)
        geometry = model.score(ImageBatch(images))[1]
        patches = ImageBatch(images).gather(geometry, out.indices)
        net = model.classifier
        parts = net.backbone(patches.flatten(0, 1)).view(2, 3, -1)
        whole = net.backbone(images.float() / 255)
        expected = net.heads.heads["label"](parts.mean(1) + whole)
    torch.testing.assert_close(out.logits["label"], expected, atol=1e-5, rtol=1e-4)
    assert not out.extras  # no auxiliary logits outside training


def test_dps_auxiliary_loss_adds_the_nts_cross_entropies():
    model = build_pipeline("dps", tasks=TASKS, global_branch=True, global_aux_loss=True, **TINY)
    whole, parts = torch.randn(2, 3), torch.randn(2, 3, 3)
    out = PipelineOutput(logits={"label": torch.randn(2, 3)}, aux_loss=torch.tensor(0.25),
                         extras={"whole_logits/label": whole, "part_logits/label": parts})
    target = torch.tensor([1, 0])
    expected = 0.25 + F.cross_entropy(whole, target) + F.cross_entropy(parts.reshape(6, 3), target.repeat_interleave(3))
    torch.testing.assert_close(model.auxiliary_loss(out, {"label": target}), expected)


def test_mnist_dps_config_builds_and_runs():
    from hrsel.config import load_config
    from hrsel.data.megapixel_mnist import TASKS as MNIST_TASKS
    from hrsel.train import build_pipeline as build_from_config

    cfg = load_config(REPO / "configs" / "mnist_dps.yaml")
    full = build_from_config(cfg, MNIST_TASKS)  # the config as written: 61 x 61 = 3721 dense positions
    agg = full.classifier.aggregator
    assert agg.pool == "sum" and agg.pos.kind == "dense" and agg.pos.table.shape == (3721, 128)
    # a 150x150 image: 50x50 scorer input -> 5 x 5 cells
    tiny = load_config(REPO / "configs" / "mnist_dps.yaml", ["model.num_positions=25", "model.k=4",
                                                             "model.num_samples=8"])
    model = build_from_config(tiny, MNIST_TASKS)
    out = model((torch.rand(1, 1, 150, 150) * 255).to(torch.uint8))
    assert {k: tuple(v.shape) for k, v in out.logits.items()} == {t: (1, 10) for t in MNIST_TASKS}
    assert all(torch.isfinite(v).all() for v in out.logits.values())

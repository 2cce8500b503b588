"""Options that make the papers' ablation rows expressible: coordinate channels, soft inference."""
import pytest
import torch

from hrsel.io import ArraySource
from hrsel.models import build_pipeline
from hrsel.models.dps import SoftTopK
from hrsel.models.patches import with_coordinate_channels
from hrsel.tasks import TaskSpec

TASKS = {"label": TaskSpec("multiclass", 3)}


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

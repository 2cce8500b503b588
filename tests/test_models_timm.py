"""timm backbones by name, local weights (.pt/.safetensors), stems adapted to any channel count; no network."""
import os

os.environ["HF_HUB_OFFLINE"] = "1"  # before timm / huggingface_hub are imported

import socket  # noqa: E402

import pytest  # noqa: E402
import timm  # noqa: E402
import torch  # noqa: E402
from safetensors.torch import save_file  # noqa: E402

from hrsel.errors import ConfigError  # noqa: E402
from hrsel.models import build_pipeline  # noqa: E402
from hrsel.models.backbones import BACKBONES, build_backbone  # noqa: E402
from hrsel.models.build import check_pipeline_options  # noqa: E402
from hrsel.models.weights import adapt_stem_weight, channel_stats  # noqa: E402
from hrsel.tasks import TaskSpec  # noqa: E402
from toy_bright import one_torch_thread  # noqa: F401,E402 (autouse fixture)

MODELS = {"timm/resnet18": ({}, 512), "timm/efficientnet_b0": ({}, 1280),
          "timm/vit_tiny_patch16_224": ({"img_size": 32}, 192)}


@pytest.fixture(autouse=True)
def no_network(monkeypatch):
    def refuse(*args, **kwargs):
        raise AssertionError("a test tried to use the network")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket, "create_connection", refuse)


def plain_stem(weight, in_chans):
    """The adaptation written out: 1 -> sum of RGB; N -> R, G, B, R, ... scaled by 3 / N."""
    if in_chans == 1:
        return weight.sum(1, keepdim=True)
    return torch.cat([weight[:, i % 3: i % 3 + 1] for i in range(in_chans)], 1) * (3 / in_chans)


def save_weights(model, tmp_path, fmt):
    state = {k: v.contiguous() for k, v in model.state_dict().items()}
    path = tmp_path / f"weights.{fmt}"
    if fmt == "safetensors":
        save_file(state, str(path))
    else:
        torch.save(state, path)
    return str(path)


@pytest.mark.parametrize("name", sorted(MODELS))
@pytest.mark.parametrize("in_chans", [1, 3, 4])
def test_timm_backbones_shapes(name, in_chans):
    options, dim = MODELS[name]
    net = build_backbone(name, in_chans=in_chans, **options)
    out = net(torch.rand(2, in_chans, 32, 32))
    assert net.out_dim == dim and out.shape == (2, dim) and torch.isfinite(out).all()
    assert not net.normalize  # random init: no normalisation unless asked


@pytest.mark.parametrize("fmt", ["pt", "safetensors"])
@pytest.mark.parametrize("in_chans", [1, 3, 4])
def test_timm_resnet_local_weights(tmp_path, fmt, in_chans):
    torch.manual_seed(0)
    ref = timm.create_model("resnet18", pretrained=False, num_classes=7)  # with a head: its keys are dropped
    path = save_weights(ref, tmp_path, fmt)
    net = build_backbone("timm/resnet18", in_chans=in_chans, weights_path=path)
    torch.testing.assert_close(net.model.conv1.weight, plain_stem(ref.conv1.weight, in_chans)
                               if in_chans != 3 else ref.conv1.weight)
    torch.testing.assert_close(net.model.layer4[1].conv2.weight, ref.layer4[1].conv2.weight)
    torch.testing.assert_close(net.model.bn1.running_mean, ref.bn1.running_mean)
    assert net.normalize  # weights loaded: the pretrained config's mean/std are applied
    if in_chans == 3:
        x = torch.rand(2, 3, 32, 32)
        ref.reset_classifier(0)
        ref.eval(), net.eval()
        mean, std = torch.tensor((0.485, 0.456, 0.406)), torch.tensor((0.229, 0.224, 0.225))
        torch.testing.assert_close(net(x), ref((x - mean.view(1, 3, 1, 1)) / std.view(1, 3, 1, 1)))
        off = build_backbone("timm/resnet18", weights_path=path, normalize=False).eval()
        torch.testing.assert_close(off(x), ref(x))


def test_timm_efficientnet_and_vit_weights(tmp_path):
    torch.manual_seed(0)
    eff = timm.create_model("efficientnet_b0", pretrained=False)
    net = build_backbone("timm/efficientnet_b0", in_chans=4, weights_path=save_weights(eff, tmp_path, "safetensors"))
    torch.testing.assert_close(net.model.conv_stem.weight, plain_stem(eff.conv_stem.weight, 4))
    torch.testing.assert_close(net.model.conv_head.weight, eff.conv_head.weight)
    vit = timm.create_model("vit_tiny_patch16_224", pretrained=False)  # 224 px: pos_embed resampled to 32 px
    net = build_backbone("timm/vit_tiny_patch16_224", in_chans=1, img_size=32, weights_path=save_weights(vit, tmp_path, "pt"))
    torch.testing.assert_close(net.model.patch_embed.proj.weight, plain_stem(vit.patch_embed.proj.weight, 1))
    torch.testing.assert_close(net.model.blocks[2].attn.qkv.weight, vit.blocks[2].attn.qkv.weight)
    assert net.model.pos_embed.shape == (1, 1 + 4, 192)
    torch.testing.assert_close(net.mean, torch.full((1, 1, 1, 1), 0.5))  # ViT's own (inception) stats
    assert net(torch.rand(2, 1, 32, 32)).shape == (2, 192)


@pytest.mark.parametrize("in_chans", [1, 4])
def test_torchvision_resnet_keeps_pretrained_stem(tmp_path, in_chans):
    from torchvision.models import resnet18

    ref = resnet18(weights=None)
    path = str(tmp_path / "tv.pt")
    torch.save(ref.state_dict(), path)
    net = build_backbone("resnet18", in_chans=in_chans, weights_path=path, imagenet_norm=True)
    torch.testing.assert_close(net.body[0].weight, plain_stem(ref.conv1.weight, in_chans))
    if in_chans == 4:  # the RGB filters are there (scaled by 3/4), not a random stem
        torch.testing.assert_close(net.body[0].weight[:, :3], ref.conv1.weight * 0.75)
    assert net.mean.shape == (1, in_chans, 1, 1)
    assert net(torch.rand(2, in_chans, 32, 32)).shape == (2, 512)
    tv_safe = str(tmp_path / "tv.safetensors")  # also from .safetensors, without the fc head
    save_file({k: v for k, v in ref.state_dict().items() if not k.startswith("fc.")}, tv_safe)
    again = build_backbone("resnet18", in_chans=in_chans, weights_path=tv_safe)
    torch.testing.assert_close(again.body[0].weight, net.body[0].weight)


def test_adapt_stem_and_channel_stats():
    w = torch.randn(8, 3, 3, 3)
    torch.testing.assert_close(adapt_stem_weight(w, 5, key="k", path="p"), plain_stem(w, 5))
    with pytest.raises(ConfigError, match="p.*stem k.*2 input channels.*in_chans=4"):
        adapt_stem_weight(torch.randn(8, 2, 3, 3), 4, key="k", path="p")
    assert channel_stats((0.3, 0.6, 0.9), 1) == pytest.approx((0.6,))
    assert channel_stats((0.3, 0.6, 0.9), 4) == (0.3, 0.6, 0.9, 0.3)


def test_named_errors(tmp_path):
    with pytest.raises(ConfigError, match=r"timm has no model 'resnet51'.*Close names: .*timm/resnet50"):
        build_backbone("timm/resnet51")
    with pytest.raises(ConfigError, match="does not exist"):
        build_backbone("timm/resnet18", weights_path=str(tmp_path / "none.pt"))
    for suffix in ("pt", "safetensors"):
        bad = tmp_path / f"bad.{suffix}"
        bad.write_bytes(b"not weights at all")
        with pytest.raises(ConfigError, match=f"bad.{suffix}.*cannot be read"):
            build_backbone("timm/resnet18", weights_path=str(bad))
    other = save_weights(timm.create_model("resnet34", pretrained=False), tmp_path, "pt")
    with pytest.raises(ConfigError, match=r"does not fit.*unexpected keys \(\d+\): layer1\.2\."):
        build_backbone("timm/resnet18", weights_path=other)
    with pytest.raises(ConfigError, match="missing keys"):
        build_backbone("resnet34", weights_path=save_weights(timm.create_model("resnet18"), tmp_path, "pt"))
    with pytest.raises(ConfigError, match="does not take option.*img_size"):
        build_backbone("timm/resnet18", img_size=32)
    vit = build_backbone("timm/vit_tiny_patch16_224")
    with pytest.raises(ConfigError, match="takes 224x224 patches.*img_size: 32"):
        vit(torch.rand(1, 3, 32, 32))


def test_config_checks_know_timm_names():
    assert "timm/resnet18" in BACKBONES and "timm/anything" in BACKBONES  # the family; get() checks the name
    out = check_pipeline_options("ips", {"backbone": "timm/vit_tiny_patch16_224",
                                         "backbone_options": {"img_size": "32", "normalize": False}})
    assert out["backbone_options"] == {"img_size": 32, "normalize": False}
    with pytest.raises(ConfigError, match="model.backbone_options.img_sise.*Did you mean.*img_size"):
        check_pipeline_options("ips", {"backbone": "timm/resnet18", "backbone_options": {"img_sise": 32}})
    with pytest.raises(ConfigError, match="model.backbone.*timm/efficientnet_b9.*Close names"):
        check_pipeline_options("ips", {"backbone": "timm/efficientnet_b9"})
    with pytest.raises(ConfigError, match="filled in by hrsel"):
        check_pipeline_options("ips", {"backbone": "timm/resnet18", "backbone_options": {"model_name": "x"}})


def test_ips_with_timm_backbone_trains():
    torch.manual_seed(0)
    tasks = {"y": TaskSpec("multiclass", 3)}
    model = build_pipeline("ips", tasks=tasks, in_chans=1, backbone="timm/resnet18", patch_size=16,
                           k=2, score_chunk=4, aggregator_options={"heads": 2, "head_dim": 4, "mlp_dim": 8})
    x = (torch.rand(2, 1, 48, 48) * 255).to(torch.uint8)
    out = model(x)
    assert out.logits["y"].shape == (2, 3) and out.indices.shape == (2, 2)
    torch.nn.functional.cross_entropy(out.logits["y"], torch.tensor([0, 2])).backward()
    grads = [p.grad for p in model.parameters() if p.grad is not None]
    assert grads and all(torch.isfinite(g).all() for g in grads)

"""The fast path changes the speed, not the result: selections, losses and gradients are equal."""
import pytest
import torch
import torch.nn.functional as F

from hrsel.models import build_pipeline
from hrsel.models.backbones import NarrowResNet
from hrsel.models.fastpath import (CPU_SCORE_BATCH, check_score_batch, encode_eval, encode_in_parts,
                                   prepare_for_device, resolve_score_batch)
from hrsel.tasks import TaskSpec

TASKS = {"majority": TaskSpec(kind="multiclass", num_classes=10), "multi": TaskSpec(kind="multilabel", num_classes=10)}


def _patches(n_const: int = 7, n_random: int = 9, channels: int = 2, size: int = 12) -> torch.Tensor:
    g = torch.Generator().manual_seed(0)
    fills = torch.tensor([[0.0, 0.0], [0.5, 0.0], [0.0, 0.0], [1.0, 0.25], [0.5, 0.0], [0.0, 0.0], [0.3, 0.3]])
    const = fills[:n_const, :channels, None, None].expand(-1, -1, size, size)
    rand = torch.rand(n_random, channels, size, size, generator=g)
    order = torch.randperm(n_const + n_random, generator=g)
    return torch.cat([const, rand])[order]


@pytest.mark.parametrize("part", [None, 1, 4, 100])
def test_encode_eval_equals_encoding_every_patch(part):
    net = NarrowResNet(in_chans=2, width=8, strides=(2, 2), blocks=(1, 1)).eval()
    torch.nn.init.normal_(net.body[1].running_mean)  # a non-trivial eval-mode BatchNorm
    patches = _patches()
    with torch.no_grad():
        want = net(patches)
        got = encode_eval(net, patches, part)
        parts = encode_in_parts(net, patches, part)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(parts, want, rtol=1e-5, atol=1e-6)


def test_encode_eval_encodes_each_distinct_constant_patch_once():
    seen = []
    patches = _patches(n_const=7, n_random=3)

    def encode(x):
        seen.append(x.shape[0])
        return x.flatten(1).sum(1, keepdim=True)

    out = encode_eval(encode, patches)
    assert sum(seen) == 4 + 3  # fills (0, 0), (0.5, 0), (1, .25), (.3, .3) once each, then the 3 random ones
    torch.testing.assert_close(out, patches.flatten(1).sum(1, keepdim=True))


def test_encode_eval_passes_feature_bags_through():
    features = torch.zeros(5, 3)  # (n, D): constant rows are features, not patches
    out = encode_eval(lambda x: x * 2, features, 2)
    assert torch.equal(out, features * 2)


def test_prepare_for_device_sets_the_memory_format_of_convolutions_only():
    model = build_pipeline("ips", tasks=TASKS, in_chans=1, patch_size=16, k=2, score_chunk=4,
                           backbone="narrow_resnet", backbone_options={"width": 8, "strides": [2], "blocks": [1]})
    prepare_for_device(model, "cpu")
    conv = model.classifier.backbone.body[3].conv1.weight  # (8, 8, 3, 3): the two layouts differ
    assert conv.is_contiguous(memory_format=torch.channels_last) and not conv.is_contiguous()
    plain = prepare_for_device(torch.nn.Linear(3, 2), "cpu")
    assert plain.weight.is_contiguous()


def test_score_batch_values():
    assert resolve_score_batch("auto", torch.device("cpu")) == CPU_SCORE_BATCH
    assert resolve_score_batch("auto", torch.device("meta")) is None
    assert resolve_score_batch(7, torch.device("cpu")) == 7
    for bad in (0, -3, 2.5, True, "fast"):
        with pytest.raises(ValueError, match="score_batch"):
            check_score_batch(bad)
    with pytest.raises(ValueError, match="score_batch"):
        build_pipeline("ips", tasks=TASKS, score_batch=0)


def _sparse_images(batch: int = 3, side: int = 64) -> torch.Tensor:
    """uint8 canvases, mostly blank with a few bright squares: constant and non-constant patches."""
    g = torch.Generator().manual_seed(1)
    images = torch.zeros(batch, 1, side, side, dtype=torch.uint8)
    for b in range(batch):
        for _ in range(4):
            y, x = torch.randint(0, side - 10, (2,), generator=g).tolist()
            images[b, :, y:y + 10, x:x + 10] = torch.randint(1, 256, (10, 10), generator=g, dtype=torch.uint8)
    return images


def _ips_step(fast: bool, images: torch.Tensor):
    torch.manual_seed(0)
    model = build_pipeline("ips", tasks=TASKS, in_chans=1, patch_size=16, stride=8, k=4, score_chunk=5,
                           backbone="narrow_resnet", backbone_options={"width": 8, "strides": [2, 2], "blocks": [1, 1]},
                           shuffle=False, score_batch=3 if fast else None)
    model = prepare_for_device(model, "cpu", channels_last=fast).train()
    out = model(images)
    loss = F.cross_entropy(out.logits["majority"], torch.arange(len(images)))
    loss = loss + F.binary_cross_entropy_with_logits(out.logits["multi"], torch.ones_like(out.logits["multi"]))
    loss.backward()
    grads = [p.grad.clone() for p in model.parameters() if p.grad is not None]
    return out, loss.detach(), grads


def test_ips_step_is_the_same_with_and_without_the_fast_path():
    images = _sparse_images()
    slow, slow_loss, slow_grads = _ips_step(False, images)
    fast, fast_loss, fast_grads = _ips_step(True, images)
    assert torch.equal(slow.indices, fast.indices)
    torch.testing.assert_close(fast.scores, slow.scores, rtol=1e-4, atol=1e-6, equal_nan=True)
    torch.testing.assert_close(fast_loss, slow_loss, rtol=1e-5, atol=1e-6)
    assert len(fast_grads) == len(slow_grads)
    for a, b in zip(fast_grads, slow_grads):
        torch.testing.assert_close(a, b, rtol=1e-3, atol=1e-5)


def test_dps_step_is_the_same_with_and_without_channels_last():
    images = torch.rand(2, 3, 128, 128)
    losses, outs = [], []
    for fast in (False, True):
        torch.manual_seed(0)
        model = build_pipeline("dps", tasks=TASKS, in_chans=3, patch_size=16, k=2, num_samples=20, downscale=2,
                               backbone="narrow_resnet", backbone_options={"width": 8, "strides": [2], "blocks": [1]})
        model = prepare_for_device(model, "cpu", channels_last=fast).train()
        torch.manual_seed(1)  # the same perturbation noise
        out = model(images)
        loss = F.cross_entropy(out.logits["majority"], torch.tensor([3, 4]))
        loss.backward()
        losses.append(loss.detach())
        outs.append(out)
    assert torch.equal(outs[0].indices, outs[1].indices)
    torch.testing.assert_close(losses[1], losses[0], rtol=1e-5, atol=1e-6)


def test_ips_under_bf16_autocast_selects_and_learns_on_the_cpu():
    """The GPU's bf16 path at small size: both passes under autocast, scores recorded as float."""
    images = _sparse_images()
    torch.manual_seed(0)
    model = build_pipeline("ips", tasks=TASKS, in_chans=1, patch_size=16, stride=8, k=4, score_chunk=5,
                           backbone="narrow_resnet", backbone_options={"width": 8, "strides": [2, 2], "blocks": [1, 1]})
    model = prepare_for_device(model, "cpu").train()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = model(images)
        loss = F.cross_entropy(out.logits["majority"].float(), torch.arange(len(images)))
    loss.backward()
    assert out.indices.shape == (3, 4) and out.scores.dtype == torch.float32
    assert torch.isfinite(loss) and all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None)


def test_compiled_scorer_selects_the_same_patches():
    images = _sparse_images(batch=2, side=48)
    picked = []
    for compiled in (False, True):
        torch.manual_seed(0)
        model = build_pipeline("ips", tasks=TASKS, in_chans=1, patch_size=16, k=3, score_chunk=9,
                               backbone="narrow_resnet", backbone_options={"width": 4, "strides": [2], "blocks": [1]},
                               shuffle=False, score_batch=None, compile_scorer=compiled)
        picked.append(model.eval()(images).indices)
        assert not any("compiled" in key for key in model.state_dict())
    assert torch.equal(picked[0], picked[1])


def test_host_to_device_keeps_pixels_and_dtype():
    from hrsel.models.patches import host_to_device

    pixels = torch.randint(0, 256, (2, 3, 4, 4), dtype=torch.uint8)
    moved = host_to_device(pixels, torch.device("cpu"))
    assert moved.dtype == torch.uint8 and torch.equal(moved, pixels)


def _ips(**options):
    torch.manual_seed(0)
    return build_pipeline("ips", tasks=TASKS, in_chans=1, patch_size=16, k=4, score_chunk=5,
                          backbone="narrow_resnet", backbone_options={"width": 8, "strides": [2], "blocks": [1]},
                          shuffle=False, **options).eval()


def test_skip_blank_selects_only_patches_with_content():
    images = _sparse_images(batch=3, side=64)  # 16 cells, 4 squares of 10 px each: 4 to 10 cells with content
    geometry_content = images.unfold(2, 16, 16).unfold(3, 16, 16)  # (B, 1, 4, 4, 16, 16)
    has_content = (geometry_content.amax((-1, -2)) != geometry_content.amin((-1, -2)))[:, 0].flatten(1)  # (B, 16)
    out = _ips(skip_blank=True)(images)
    for row in range(3):
        picked = out.indices[row][out.indices[row] >= 0]
        assert has_content[row, picked].all() or has_content[row].sum() < 4
        assert len(set(picked.tolist())) == len(picked)
    assert all(torch.isfinite(v).all() for v in out.logits.values())


def test_skip_blank_classifies_an_empty_image_from_its_blank_patches():
    blank = torch.zeros(2, 1, 64, 64, dtype=torch.uint8)
    out = _ips(skip_blank=True)(blank)
    want = _ips(skip_blank=False)(blank)
    for task in TASKS:
        torch.testing.assert_close(out.logits[task], want.logits[task])


def test_iterative_topm_never_keeps_an_absent_item_ahead_of_a_present_one():
    from hrsel.select.ips import iterative_topm

    scores = torch.tensor([[5.0, 4.0, 3.0, 2.0, 1.0, 0.0]])
    present = torch.tensor([[False, True, False, True, True, False]])
    chunks = [(torch.arange(0, 3)[None], scores[:, :3, None], present[:, :3]),
              (torch.arange(3, 6)[None], scores[:, 3:, None], present[:, 3:])]
    result = iterative_topm(iter(chunks), m=4, score_fn=lambda items, mask, idx: items[..., 0])
    assert result.indices[result.mask].tolist() == [1, 3, 4]
    assert result.mask.sum() == 3


@pytest.mark.parametrize("name,options,shape", [
    ("narrow_resnet", {"width": 8, "strides": [2, 2], "blocks": [1, 1]}, (6, 1, 20, 20)),
    ("ats_resnet", {"width": 8}, (6, 1, 20, 20)),  # pre-activation: BatchNorms that follow no convolution
    ("resnet18", {"last_stage": "layer1"}, (6, 1, 32, 32)),
])
def test_folded_backbone_follows_the_live_weights(name, options, shape):
    from hrsel.models.backbones import build_backbone
    from hrsel.models.fastpath import FoldedBackbone

    torch.manual_seed(0)
    net = build_backbone(name, in_chans=1, **options)
    x = torch.rand(shape)
    net.train()
    net(x)  # moves the running statistics away from their initial values
    folded = FoldedBackbone(net)
    assert not any(isinstance(m, torch.nn.BatchNorm2d) for m in folded.module.modules()) or name == "ats_resnet"
    with torch.no_grad():
        for p in net.parameters():  # a training step changes the live weights ...
            p.add_(0.05 * torch.randn_like(p))
        net.train()
        net(x)  # ... and the statistics
        net.eval()
        torch.testing.assert_close(folded.refresh()(x), net(x), rtol=1e-4, atol=1e-5)
    assert folded.matches(net) and not folded.matches(torch.nn.Linear(1, 1))


def test_ips_scoring_backbone_is_refreshed_every_pass_and_not_in_the_state_dict():
    images = _sparse_images()
    model = _ips()
    before = model(images).indices
    keys = set(model.state_dict())
    first = model._scoring_backbone()
    with torch.no_grad():
        for p in model.classifier.backbone.parameters():
            p.mul_(-1.5)
    after = model(images).indices
    fresh = _ips()
    fresh.load_state_dict(model.state_dict())
    assert torch.equal(after, fresh(images).indices)  # the folded copy follows the changed weights
    assert model._scoring_backbone() is first and set(model.state_dict()) == keys
    assert before.shape == after.shape


def test_a_backbone_fx_cannot_trace_scores_with_the_live_module():
    model = build_pipeline("ips", tasks=TASKS, backbone="feature_projector", backbone_options={"in_dim": 12, "dim": 8},
                           k=2, score_chunk=3).eval()  # its forward checks the input shape: untraceable
    assert model._scoring_backbone() is model.classifier.backbone
    out = model([torch.rand(7, 12), torch.rand(5, 12)])
    assert out.indices.shape == (2, 2)


@pytest.mark.parametrize("stride,padding_ok", [(24, True), (25, False)])
def test_dps_candidates_scores_from_the_image_downscaled_once_are_exact(stride, padding_ok):
    from hrsel.models.dps_candidates import pooled_grid
    from hrsel.models.patches import ImageBatch
    from hrsel.select.extract import GridGeometry

    torch.manual_seed(0)
    model = build_pipeline("dps_candidates", tasks=TASKS, in_chans=3, patch_size=40, stride=stride, k=2,
                           num_candidates=5, downscale=4, score_chunk=7, num_samples=10,
                           backbone="narrow_resnet", backbone_options={"width": 4, "strides": [2], "blocks": [1]})
    images = torch.randint(0, 256, (2, 3, 150, 170), dtype=torch.uint8)
    batch = ImageBatch(images)
    geometry = GridGeometry.regular((150, 170), patch_size=40, stride=stride)
    assert (pooled_grid(batch, geometry, 4) is not None) == padding_ok
    fast = model._stream(batch, geometry)
    chunks = [(idx, model.score_patches(p)) for idx, p in batch.chunks(geometry, 7)]
    want = torch.cat([s for _, s in chunks], dim=1)
    torch.testing.assert_close(fast.all_scores, want, rtol=1e-5, atol=1e-6)

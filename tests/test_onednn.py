"""The route around oneDNN#6035 (hrsel.models.onednn): same results, only where the bug bites, no crash.

The subprocess test reproduces the bug's shape with 4 input channels, which oneDNN corrupts under AVX2
(block 8) as well as AVX-512 (block 16): without the route around it crashes, hangs or returns wrong
weight gradients on any x86 CPU, so it fails on an AVX2 machine too.
"""
from __future__ import annotations

import subprocess
import sys
import textwrap

import pytest
import torch
from torch import nn

from hrsel.models.backbones import ATSResNet, NarrowResNet
from hrsel.models.fastpath import prepare_for_device
from hrsel.models.onednn import SubsampledPointwiseConv2d, is_affected, route_around_strided_pointwise

from isa_caps import ISA_CAPS, REPO, capped_env



@pytest.mark.parametrize("in_chans, out_chans, side, stride, groups", [
    (4, 6, 9, 2, 1), (8, 8, 16, 2, 1), (3, 5, 7, (3, 2), 1), (6, 4, 11, 2, 2)])
def test_subsampled_convolution_equals_the_strided_one(in_chans, out_chans, side, stride, groups):
    torch.manual_seed(0)
    plain = nn.Conv2d(in_chans, out_chans, 1, stride, groups=groups, bias=True).double()
    routed = nn.Conv2d(in_chans, out_chans, 1, stride, groups=groups, bias=True).double()
    routed.load_state_dict(plain.state_dict())
    assert route_around_strided_pointwise(routed) == [""] and type(routed) is SubsampledPointwiseConv2d
    x = torch.randn(2, in_chans, side, side + 1, dtype=torch.float64)
    xa, xb = x.clone().requires_grad_(True), x.clone().requires_grad_(True)
    ya, yb = plain(xa), routed(xb)
    assert ya.shape == yb.shape
    torch.testing.assert_close(yb, ya)
    g = torch.randn_like(ya)
    ya.backward(g)
    yb.backward(g)
    torch.testing.assert_close(xb.grad, xa.grad)
    torch.testing.assert_close(routed.weight.grad, plain.weight.grad)
    torch.testing.assert_close(routed.bias.grad, plain.bias.grad)


def test_subsampled_convolution_gradients_match_finite_differences():
    torch.manual_seed(0)
    conv = nn.Conv2d(3, 2, 1, 2).double()
    route_around_strided_pointwise(conv)
    x = torch.randn(1, 3, 5, 4, dtype=torch.float64, requires_grad=True)
    weight, bias = conv.weight.detach().clone().requires_grad_(True), conv.bias.detach().clone().requires_grad_(True)

    def routed(inp, w, b):
        return torch.func.functional_call(conv, {"weight": w, "bias": b}, (inp,))

    assert torch.autograd.gradcheck(routed, (x, weight, bias))


def test_only_the_affected_convolutions_change_and_the_state_stays():
    net = NarrowResNet(in_chans=1, width=8, strides=(1, 2, 2), blocks=(1, 1, 1))
    params = {name: p for name, p in net.named_parameters()}
    keys = list(net.state_dict())
    changed = route_around_strided_pointwise(net)
    assert changed == ["body.4.downsample.0", "body.5.downsample.0"]  # the strided 1x1 shortcuts, 8 channels
    assert list(net.state_dict()) == keys and all(p is params[n] for n, p in net.named_parameters())
    assert all(type(m) is nn.Conv2d for n, m in net.named_modules() if n not in changed and isinstance(m, nn.Conv2d))
    assert route_around_strided_pointwise(NarrowResNet(width=16, strides=(2, 2))) == []  # 16 channels: a full block
    assert route_around_strided_pointwise(ATSResNet(width=32)) == []
    assert not is_affected(nn.Conv2d(8, 8, 3, 2, 1)) and not is_affected(nn.Conv2d(8, 8, 1, 1))
    assert not is_affected(nn.Conv2d(8, 8, 1, 2, padding=1)) and is_affected(nn.Conv2d(15, 8, 1, 2))


def test_prepare_for_device_routes_around_on_the_cpu_only():
    cpu = prepare_for_device(NarrowResNet(width=8, strides=(2,), blocks=(1,)), "cpu", channels_last=False)
    assert type(cpu.body[3].downsample[0]) is SubsampledPointwiseConv2d  # streamed patches are channels_last anyway
    meta = prepare_for_device(NarrowResNet(width=8, strides=(2,), blocks=(1,)), "meta")
    assert type(meta.body[3].downsample[0]) is nn.Conv2d


def test_folded_backbone_of_a_routed_network_computes_what_it_does():
    from hrsel.models.fastpath import FoldedBackbone

    torch.manual_seed(0)
    net = prepare_for_device(NarrowResNet(in_chans=1, width=8, strides=(2, 2), blocks=(1, 1)), "cpu").eval()
    for m in net.modules():
        if isinstance(m, nn.BatchNorm2d):
            nn.init.normal_(m.running_mean)
            nn.init.uniform_(m.running_var, 0.5, 2.0)
    x = torch.rand(5, 1, 24, 24)
    with torch.no_grad():
        torch.testing.assert_close(FoldedBackbone(net).module(x), net(x), rtol=1e-4, atol=1e-5)


TRAIN_AFFECTED_SHAPE = textwrap.dedent("""
    import torch
    from torch import nn
    from hrsel.models.fastpath import prepare_for_device

    torch.manual_seed(0)
    conv = nn.Conv2d(4, 8, 1, 2, bias=False)  # 4 channels: fewer than oneDNN's block under AVX2 and AVX-512
    reference = nn.Conv2d(4, 8, 1, 2, bias=False).double()
    reference.load_state_dict(conv.state_dict())
    conv = prepare_for_device(conv, "cpu")
    worst = 0.0
    for step in range(5):
        x = torch.randn(4, 4, 64, 64)
        g = torch.randn(4, 8, 32, 32)
        conv.weight.grad = reference.weight.grad = None
        conv(x.contiguous(memory_format=torch.channels_last)).backward(g.contiguous(memory_format=torch.channels_last))
        reference(x.double()).backward(g.double())
        error = (conv.weight.grad.double() - reference.weight.grad).abs().max() / reference.weight.grad.abs().max()
        worst = max(worst, error.item())
    print("worst relative error", worst)
    assert worst < 1e-5, worst
""")


@pytest.mark.parametrize("cap", ISA_CAPS)
def test_the_affected_shape_trains_right_under_every_isa_cap(cap):
    try:
        done = subprocess.run([sys.executable, "-c", TRAIN_AFFECTED_SHAPE], capture_output=True, text=True,
                              env=capped_env(cap), timeout=120, cwd=REPO)
    except subprocess.TimeoutExpired:
        pytest.fail(f"ONEDNN_MAX_CPU_ISA={cap}: hung for 120 s (oneDNN#6035 spins under AVX2)")
    assert done.returncode == 0, f"ONEDNN_MAX_CPU_ISA={cap}: exit {done.returncode}\n{done.stdout}{done.stderr[-2000:]}"

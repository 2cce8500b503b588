"""benchmarks/train_step.py: the quick run writes its rows, and the plain implementations compute what hrsel does."""
from __future__ import annotations

import importlib.util
import json
import math
import subprocess
import sys
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]


def bench():
    spec = importlib.util.spec_from_file_location("train_step_bench", REPO / "benchmarks" / "train_step.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_quick_run_writes_rows(tmp_path):
    out = tmp_path / "train_step.json"
    done = subprocess.run([sys.executable, str(REPO / "benchmarks" / "train_step.py"), "--quick", "--rounds", "1",
                           "--repeats", "1", "--threads", "1", "--cases", "ips_b4_n900,dps_traffic",
                           "--json", str(out)],
                          capture_output=True, text=True, timeout=300, cwd=REPO)
    assert done.returncode == 0, done.stderr[-2000:]
    result = json.loads(out.read_text())
    assert result["machine"]["cpu_count"] and result["machine"]["torch"] == torch.__version__
    rows = {(r["case"], r["impl"]): r for r in result["rows"]}
    assert set(rows) == {(c, i) for c in ("ips_b4_n900", "dps_traffic") for i in ("hrsel", "plain")}
    for row in rows.values():
        assert row["status"] == "ok", row
        assert math.isfinite(row["step_ms_median"]) and row["step_ms_median"] > 0 and row["ratio_vs_plain"] > 0
        assert len(row["step_ms_all"]) == 1 and math.isfinite(row["peak_mb"])
    assert rows[("ips_b4_n900", "plain")]["ratio_vs_plain"] == 1.0
    assert rows[("ips_b4_n900", "hrsel")]["select_ms_median"] > 0


def test_plain_ips_selects_what_hrsel_selects():
    """Same weights copied into the plain net: the same M indices from the no-grad pass, on the same image."""
    from hrsel.models import build_pipeline
    from hrsel.models.patches import ImageBatch
    from hrsel.select.extract import GridGeometry

    b = bench()
    setup = b.case_setup("ips_b4_n900", quick=True)  # 4 x 4 patches of 32, M = I = 4
    torch.manual_seed(0)
    pipeline = build_pipeline("ips", tasks=setup["tasks"], **dict(setup["options"], shuffle=False)).eval()
    plain = b.PlainIPS(setup)
    assert sum(p.numel() for p in plain.parameters()) == sum(p.numel() for p in pipeline.parameters())
    b.copy_weights(pipeline, plain)
    images = torch.randint(0, 256, (2, 1, 128, 128), dtype=torch.uint8, generator=torch.Generator().manual_seed(3))
    batch = ImageBatch(images, device="cpu", in_chans=1)
    geometry = GridGeometry.regular(batch.image_hw, patch_size=32)
    expected = pipeline.select(batch, geometry).indices
    got = plain.select(images.float() / 255, 16, "cpu")
    assert got.tolist() == expected.tolist()
    assert len(set(got[0].tolist())) == 4  # a real selection, not the first M by default
    plain.eval()  # the gradient pass in eval mode (no dropout, running BN statistics): the same logits
    with torch.no_grad():
        tokens = plain.mil(plain.encode(plain.patches_of(images.float() / 255, got)), got)
        reference = pipeline.classifier(batch.gather(geometry, expected), positions=expected)
    for i, (name, head) in enumerate(plain.heads.items()):
        torch.testing.assert_close(head(tokens[:, i]), reference[name], rtol=1e-4, atol=1e-5)


def test_plain_perturbed_topk_matches_hrsel_operator():
    """The plain (one-hot, dense Jacobian) operator on hrsel's noise draw: same indicators, same gradient."""
    from hrsel.select.perturbed import perturbed_topk, sample_noise

    b = bench()
    scores = torch.rand(2, 12, dtype=torch.float64).float().requires_grad_(True)
    weights = torch.randn(2, 3, 12)
    ours = perturbed_topk(scores, 3, 0.1, 40, generator=torch.Generator().manual_seed(5))
    (ours * weights).sum().backward()
    grad_ours, scores.grad = scores.grad.clone(), None
    noise = sample_noise(2, 40, 12, generator=torch.Generator().manual_seed(5))  # (S, B, n)
    original = torch.randn
    try:  # the plain op draws (B, S, n) noise itself: hand it hrsel's draw
        b.torch.randn = lambda *shape, **kw: noise.permute(1, 0, 2).contiguous()
        plain = b.PlainPerturbedTopK.apply(scores, 3, 0.1, 40)
    finally:
        b.torch.randn = original
    (plain * weights).sum().backward()
    torch.testing.assert_close(plain, ours)
    torch.testing.assert_close(scores.grad, grad_ours, rtol=1e-4, atol=1e-5)


def test_plain_dps_patches_are_hrsel_grid_patches():
    """The plain extraction (every patch materialised) reads the patches of hrsel's centred / regular grids."""
    from hrsel.models.patches import ImageBatch
    from hrsel.select.extract import GridGeometry

    b = bench()
    images = torch.randint(0, 256, (2, 3, 120, 120), dtype=torch.uint8, generator=torch.Generator().manual_seed(4))
    batch = ImageBatch(images, device="cpu", in_chans=3)
    dps = b.PlainDPS(b.case_setup("dps_traffic", quick=True))  # 32-pixel patches centred on 4 x 4 cells
    geometry = GridGeometry.centred((120, 120), (4, 4), patch_size=32)
    stride = 120 // 4
    got = dps.grid_patches(images.float() / 255, 4, 4, stride, (32 - stride) // 2)
    torch.testing.assert_close(got, batch.chunk(geometry, 0, 16))
    candidates = b.PlainDPS(b.case_setup("dps_candidates", quick=True))  # 32-pixel patches at stride 24
    geometry = GridGeometry.regular((120, 120), patch_size=32, stride=24)
    got = candidates.grid_patches(images.float() / 255, *geometry.shape, 24, 0)
    torch.testing.assert_close(got, batch.chunk(geometry, 0, geometry.num_patches))


def test_lazy_synthetic_images_read_the_same_pixels_both_ways():
    """The 250k case's lazy images: hrsel streams the ImageSource, plain reads patch by patch; same pixels, and a
    training step of the hrsel pipeline runs on the sources."""
    from hrsel.models import build_pipeline
    from hrsel.models.patches import ImageBatch
    from hrsel.select.extract import GridGeometry

    b = bench()
    setup = b.case_setup("ips_b4_n900", quick=True)
    grays = [b.SyntheticGray(128, 128, seed) for seed in (0, 1)]
    sources = [g.source() for g in grays]
    idx = torch.tensor([[0, 5, 15], [3, 7, 12]])
    batch = ImageBatch(sources, device="cpu", in_chans=1)
    expected = batch.gather(GridGeometry.regular((128, 128), patch_size=32), idx)
    torch.testing.assert_close(b.PlainIPS(setup).patches_of(grays, idx), expected)
    pipeline = build_pipeline("ips", tasks=setup["tasks"], **setup["options"]).train()
    out = pipeline(sources)
    b.task_losses(out.logits, b.make_targets(setup["tasks"], 2, "cpu"), setup["tasks"]).backward()
    assert out.indices.shape == (2, 4)

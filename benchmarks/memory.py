"""Peak memory and time of one training step per pipeline, against the image size.

One training step = forward + backward + optimizer step on synthetic lazy images
(pixels generated on read, with a pyramid, so nothing full-size sits in memory unless
a pipeline puts it there), measured after a warm-up forward + backward on a 512^2 image
(lazy imports, Numba's cache and reader threads are loaded by then and counted in the
base). Every configuration runs in a fresh subprocess:
on CPU the peak is the process's peak RSS (includes torch itself: see "base_mb", the
RSS before the step); on CUDA it is torch.cuda.max_memory_allocated after a reset.

    python benchmarks/memory.py --json benchmarks/results/memory_cpu.json
    python benchmarks/memory.py --quick                        # small sizes, a smoke run
    python benchmarks/memory.py --methods ips,dps --sides 1024,4096 --device cuda --batch 4
    python benchmarks/memory.py --methods ips_tissue          # IPS with the tissue mask, 4000^2 and 40000^2

"ips_tissue" is one IPS step with the tissue mask on (`hrsel.tiling.tissue`), on synthetic slides
of `--tissue-sides` (4000, 40000): tiled pyramidal TIFFs (hrsel.io.writer, written once into
`--cache`) with tissue islands and blue pen strokes on glass, the same share of tissue at every
size. The mask is computed from the thumbnail inside the measured step. The figure to watch: the
peak at 40000^2 within 1.25x of the peak at 4000^2.

Rows: {"method", "pixels", "side", "batch", "device", "peak_mb", "base_mb", "step_ms", "status"}.
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time

import numpy as np

METHODS = ("ips", "dps", "dps_candidates", "cnn", "ips_tissue")
SIDES = (1024, 4096, 16384)
TISSUE_SIDES = (4000, 40000)
TILE = 256


def _tile_kind(tx: np.ndarray, ty: np.ndarray) -> np.ndarray:
    """0 glass, 1 tissue, 2 pen ink per level-0 tile: islands of 3 x 2 tiles on a 9 x 7 pattern, pen strokes."""
    ink = ((ty % 7) == 5) & ((tx % 13) < 6)
    return np.where(ink, 2, (((tx % 9) < 3) & ((ty % 7) < 2)).astype(int))


def tissue_slide(side: int, folder: str) -> str:
    """A side x side pyramidal TIFF of tissue islands and pen strokes on glass (written once, O(tile) memory)."""
    from hrsel.io.writer import write_sparse_pyramid

    path = os.path.join(folder, f"tissue_{side}.tif")
    if os.path.exists(path):
        return path
    os.makedirs(folder, exist_ok=True)
    levels = 1
    while (side >> levels) >= 512:
        levels += 1
    colours = np.array([(236, 236, 234), (150, 60, 140), (40, 60, 170)])
    noise = np.random.default_rng(0).integers(-25, 26, (TILE, TILE, 3))
    offsets = np.arange(TILE)

    def tile_fn(level: int, tx: int, ty: int):
        ys = ((ty * TILE + offsets) << level) // TILE  # the level-0 tile under each pixel row / column
        xs = ((tx * TILE + offsets) << level) // TILE
        kinds = _tile_kind(xs[None, :], ys[:, None])  # (TILE, TILE)
        if not kinds.any():
            return None
        pixels = colours[kinds]
        return np.clip(pixels + noise * (kinds > 0)[..., None], 0, 255).astype(np.uint8)

    tmp = path + f".{os.getpid()}.tmp"
    write_sparse_pyramid(tmp, size=(side, side), tile_fn=tile_fn, levels=levels, tile=TILE,
                         background=236)
    os.replace(tmp, path)
    return path


def synthetic_source(side: int):
    """A lazy side x side RGB image with a 4x pyramid; pixels are computed for each read."""
    from hrsel.io.base import ImageSource, Pyramid

    class SyntheticSource(ImageSource):
        backend = "synthetic"

        def _open(self):
            return "synthetic"

        def _describe(self, handle):
            dims, s = [], side
            while s >= 256 or not dims:
                dims.append((s, s))
                s //= 4
            return Pyramid(level_dimensions=tuple(dims), channels=3)

        def _read(self, handle, level, x, y, width, height):
            ds = 4 ** level
            yy = (np.arange(y, y + height, dtype=np.int64) * ds)[:, None]
            xx = (np.arange(x, x + width, dtype=np.int64) * ds)[None, :]
            base = ((xx * 7 + yy * 13) // 64 % 200).astype(np.uint8)  # smooth-ish texture
            spot = ((xx // 512 + yy // 512) % 17 == 0).astype(np.uint8) * 55  # sparse bright blocks
            return np.repeat((base + spot)[..., None], 3, axis=2)

    return SyntheticSource(f"synthetic://{side}x{side}", fill=255)


BACKBONES = {  # CPU default: a light feature net, so 16384^2 (16k patches of 128^2) runs in minutes
    "light": dict(backbone="narrow_resnet", backbone_options={"width": 8, "strides": (2, 2, 2, 2), "stem_stride": 4}),
    "resnet18": dict(backbone="resnet18"),
}


def pipeline_options(method: str, quick: bool, backbone: str) -> dict:
    """Fixed budgets: K = M = 8 patches of 128 (64 with --quick), I = 64 (IPS), 256 (scoring, extraction)."""
    patch = 64 if quick else 128
    common = dict(in_chans=3, **BACKBONES[backbone])
    if method == "ips":
        return dict(common, patch_size=patch, k=8, score_chunk=64,
                    aggregator_options={"heads": 8, "head_dim": 64, "mlp_dim": 2048})
    if method == "dps":
        return dict(common, patch_size=patch, k=8, downscale=16, num_samples=100, extract_chunk=256)
    if method == "dps_candidates":
        # the scorer sees 16 x 16 pixels of each patch (it needs at least 9 x 9), with --quick too
        return dict(common, patch_size=patch, k=8, num_candidates=32, score_chunk=256, downscale=patch // 16,
                    num_samples=100)
    if method == "cnn":
        return dict(common, downscale=1)
    if method == "ips_tissue":
        return pipeline_options("ips", quick, backbone)
    raise SystemExit(f"unknown method {method!r}; valid: {', '.join(METHODS)}")


def rss_mb() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def worker(method: str, side: int, batch: int, device: str, quick: bool, backbone: str, threads: int,
           cache: str = "") -> dict:
    """One configuration in this process: build, one training step, measure."""
    import torch

    if threads > 0:
        torch.set_num_threads(threads)
    from hrsel.models import build_pipeline
    from hrsel.tasks import TaskSpec

    torch.manual_seed(0)
    tasks = {"label": TaskSpec("multiclass", 4)}
    model = build_pipeline("ips" if method == "ips_tissue" else method, tasks=tasks, **pipeline_options(method, quick, backbone)).to(device).train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
    tissue = method == "ips_tissue"
    if tissue:
        from hrsel.io import open_image
        from hrsel.tiling.tissue import compute_tissue_mask

        def images_of(s):  # the slide, and the mask computed inside the measured step
            return [open_image(tissue_slide(s, cache)) for _ in range(batch)]

        def run(imgs):
            return model(imgs, tissue=[compute_tissue_mask(img, min_fraction=0.5) for img in imgs])
    else:
        def images_of(s):
            return [synthetic_source(s) for _ in range(batch)]

        def run(imgs):
            return model(imgs)
    images = images_of(side)
    target = torch.zeros(batch, dtype=torch.long, device=device)
    warm = run(images_of(1024 if tissue else 512))  # lazy imports, Numba cache, reader threads
    torch.nn.functional.cross_entropy(warm.logits["label"], target).backward()
    optimizer.zero_grad(set_to_none=True)
    del warm
    if device == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    base = rss_mb() if device == "cpu" else torch.cuda.memory_allocated() / 2**20
    start = time.perf_counter()
    out = run(images)
    loss = torch.nn.functional.cross_entropy(out.logits["label"], target) + model.auxiliary_loss(
        out, {"label": target})
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    optimizer.step()
    if device == "cuda":
        torch.cuda.synchronize()
    step_ms = (time.perf_counter() - start) * 1e3
    if device == "cuda":
        peak = torch.cuda.max_memory_allocated() / 2**20
    else:
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux
    return {"method": method, "pixels": side * side, "side": side, "batch": batch, "device": device,
            "backbone": backbone, "threads": torch.get_num_threads(),
            "peak_mb": round(peak, 1), "base_mb": round(base, 1), "step_ms": round(step_ms, 1), "status": "ok",
            "patches_scored": float(out.stats.get("patches_scored", 0.0))}


def run_one(method: str, side: int, args) -> dict:
    cmd = [sys.executable, __file__, "--worker", "--methods", method, "--sides", str(side),
           "--batch", str(args.batch), "--device", args.device, "--backbone", args.backbone,
           "--threads", str(args.threads), "--cache", args.cache] + (["--quick"] if args.quick else [])
    row = {"method": method, "pixels": side * side, "side": side, "batch": args.batch, "device": args.device}
    if method == "cnn" and side > args.max_cnn_side:
        return dict(row, status="skipped", note=f"side > --max-cnn-side={args.max_cnn_side}")
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=args.timeout)
    except subprocess.TimeoutExpired:
        return dict(row, status="timeout")
    if proc.returncode != 0:
        tail = (proc.stderr or proc.stdout).strip().splitlines()[-1:] or [""]
        status = "oom" if proc.returncode in (-9, 137) or "out of memory" in proc.stderr.lower() else "error"
        return dict(row, status=status, error=tail[0][:300])
    return json.loads(proc.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--methods", default=",".join(METHODS))
    parser.add_argument("--sides", default=None, help="image sides, comma-separated (default 1024,4096,16384)")
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--device", default="cpu", choices=("cpu", "cuda"))
    parser.add_argument("--backbone", default=None, choices=tuple(BACKBONES),
                        help="feature net: light (CPU default) or resnet18 (CUDA default)")
    parser.add_argument("--threads", type=int, default=1,
                        help="torch CPU threads (1: steady timings on a shared machine; 0: torch's default)")
    parser.add_argument("--quick", action="store_true", help="sides 512,1024,2048, 64-pixel patches")
    parser.add_argument("--max-cnn-side", type=int, default=4096, help="skip the full-image CNN above this side")
    parser.add_argument("--timeout", type=float, default=1800.0, help="seconds per configuration")
    parser.add_argument("--json", default=None, help="write the rows here")
    parser.add_argument("--tissue-sides", default=None,
                        help="slide sides of the ips_tissue case (default 4000,40000; --quick 1024,2048)")
    parser.add_argument("--cache", default=os.path.join("benchmarks", "results", "local", "tissue_slides"),
                        help="folder of the ips_tissue case's synthetic slides (written once)")
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    args.backbone = args.backbone or ("light" if args.device == "cpu" else "resnet18")
    methods = args.methods.split(",")
    sides = [int(s) for s in args.sides.split(",")] if args.sides else ([512, 1024, 2048] if args.quick else SIDES)
    if args.worker:
        print(json.dumps(worker(methods[0], sides[0], args.batch, args.device, args.quick, args.backbone,
                                args.threads, args.cache)))
        return
    tissue_sides = ([int(s) for s in args.tissue_sides.split(",")] if args.tissue_sides
                    else [1024, 2048] if args.quick else list(TISSUE_SIDES))
    rows = []
    plan = [(side, m) for side in sides for m in methods if m != "ips_tissue"]
    plan += [(side, "ips_tissue") for side in tissue_sides if "ips_tissue" in methods]
    for side, method in plan:  # small sizes first: partial results stay useful
        row = run_one(method, side, args)
        rows.append(row)
        print(f"{method:15s} {side:6d}^2  {row.get('status'):8s} peak {row.get('peak_mb', '-'):>9} MB  "
              f"base {row.get('base_mb', '-'):>8} MB  step {row.get('step_ms', '-'):>9} ms", flush=True)
    for method in methods:
        ok = sorted((r for r in rows if r["method"] == method and r.get("status") == "ok"), key=lambda r: r["side"])
        if len(ok) >= 2:
            print(f"{method}: peak grows x{ok[-1]['peak_mb'] / ok[0]['peak_mb']:.2f} from {ok[0]['side']}^2 "
                  f"to {ok[-1]['side']}^2")
    if args.json:
        os.makedirs(os.path.dirname(os.path.abspath(args.json)), exist_ok=True)
        with open(args.json, "w") as f:
            json.dump({"device": args.device, "batch": args.batch, "backbone": args.backbone, "rows": rows}, f,
                      indent=1)


if __name__ == "__main__":
    main()

"""Which limits the streaming scoring pass: reading/decoding patches, or scoring them?

Over a synthetic pyramidal TIFF (the cached one of `io_stream.py`), three rates in patches/s:
  read     `hrsel.tiling.stream_patches` alone (CPU threads read and inflate deflate tiles),
           for each `--workers` count: the bound set by I/O;
  score    the no-grad IPS scoring pass on patches already in memory (uint8 on the device):
           encode each chunk of I patches with the backbone, score buffer + chunk with the
           cross-attention aggregator, keep the top M (`hrsel.select.ips.iterative_topm`):
           the bound set by compute;
  stream   both together: chunks from `stream_patches` (read ahead by the threads while the
           device works) fed to the same pass, for each `--workers` count.
The limiter is the smaller of read and score; stream shows how close the overlap gets.

    python benchmarks/stream_throughput.py --json benchmarks/results/stream_throughput_cuda.json
    python benchmarks/stream_throughput.py --quick        # CPU: 2k^2 pyramid, few patches
"""
from __future__ import annotations

import argparse
import datetime
import json
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from io_stream import DEFAULT_CACHE, label, make_image  # noqa: E402  (the shared synthetic pyramids)


def open_grid(path: Path, patch: int, max_patches: int, passes: int | None):
    """The pyramid and its patch grid (cut to max_patches), walked `passes` times over.

    passes=None: once on the CPU; on a GPU as often as needed for at least 8192 patches, so
    that a run lasts long enough to time.
    """
    import numpy as np

    from hrsel.io import open_image
    from hrsel.tiling import PatchGrid

    source = open_image(str(path), backend="tiff")
    grid = PatchGrid.for_source(source, patch_size=patch)
    if max_patches and len(grid) > max_patches:
        grid = grid.subset(np.arange(max_patches))
    passes = passes or 1
    return source, grid.subset(np.tile(np.arange(len(grid)), passes)) if passes > 1 else grid


def build_scoring_pass(args, device):
    """(encode (n, C, p, p) uint8 -> (1, n, D), score_fn) from an IPS pipeline built by the library."""
    import torch

    from hrsel.models import build_pipeline
    from hrsel.tasks import TaskSpec

    model = build_pipeline("ips", tasks={"label": TaskSpec("binary", 1)}, patch_size=args.patch,
                           k=args.m, score_chunk=args.chunk, backbone=args.backbone,
                           backbone_options=dict(last_stage=args.last_stage)).to(device).eval()

    def encode(patches: torch.Tensor) -> torch.Tensor:
        x = patches.to(device, non_blocking=True).float().div_(255.0)  # (n, C, p, p)
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=args.amp):
            return model.classifier.encode(x[None]).float()  # (1, n, D)

    def score_fn(items, mask, indices):
        return model.classifier.aggregator.attention_scores(items, mask=mask, positions=indices)

    return encode, score_fn


def timed(fn, device) -> float:
    import torch

    if device.type == "cuda":
        torch.cuda.synchronize(device)
    start = time.perf_counter()
    fn()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter() - start


def rate_read(source, grid, args, workers: int) -> float:
    from hrsel.tiling import stream_patches

    def run():
        for _ in stream_patches(source, grid, chunk_size=args.chunk, workers=workers, prefetch=args.prefetch):
            pass

    return len(grid) / timed(run, args.torch_device)


def rate_score(grid, encode, score_fn, args) -> float:
    """The scoring pass over len(grid) patches, with one random chunk reused (no I/O)."""
    import torch

    from hrsel.select.ips import iterative_topm

    device = args.torch_device
    n, chunk = len(grid), args.chunk
    patches = torch.randint(0, 256, (chunk, 3, args.patch, args.patch), dtype=torch.uint8, device=device)
    patches = patches.contiguous(memory_format=torch.channels_last)  # the layout stream_patches yields

    def chunks():
        for start in range(0, n, chunk):
            stop = min(start + chunk, n)
            yield torch.arange(start, stop, device=device)[None], encode(patches[: stop - start])

    def run():
        iterative_topm(chunks(), m=args.m, score_fn=score_fn)

    with torch.no_grad():
        return n / timed(run, device)


def rate_stream(source, grid, encode, score_fn, args, workers: int) -> float:
    import torch

    from hrsel.select.ips import iterative_topm
    from hrsel.tiling import stream_patches

    device = args.torch_device

    def chunks():
        for chunk in stream_patches(source, grid, chunk_size=args.chunk, workers=workers, prefetch=args.prefetch):
            yield torch.from_numpy(chunk.indices).to(device)[None], encode(chunk.patches)

    def run():
        iterative_topm(chunks(), m=args.m, score_fn=score_fn)

    with torch.no_grad():
        return len(grid) / timed(run, device)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default=None, help="cpu | cuda | cuda:N (default: cuda when present)")
    parser.add_argument("--size", type=int, default=8192, help="side of the synthetic pyramid")
    parser.add_argument("--patch", type=int, default=256)
    parser.add_argument("--chunk", type=int, default=None, help="I, patches per chunk (default: cuda 256, cpu 32)")
    parser.add_argument("--m", type=int, default=100, help="M, patches kept by the pass")
    parser.add_argument("--backbone", default="resnet18")
    parser.add_argument("--last-stage", default="layer4", help="truncate the backbone (layer1..layer4)")
    parser.add_argument("--workers", type=int, nargs="+", default=None, help="reader threads (default: 1 2 4 8 / 1 2)")
    parser.add_argument("--prefetch", type=int, default=2)
    parser.add_argument("--max-patches", type=int, default=None, help="patches per run (default: cuda all, cpu 128)")
    parser.add_argument("--passes", type=int, default=None,
                        help="walk the grid this many times (default: cpu 1, cuda >= 8192 patches in all)")
    parser.add_argument("--amp", action="store_true", help="bfloat16 autocast for the backbone")
    parser.add_argument("--repeats", type=int, default=2, help="runs per measurement; the best is kept")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    parser.add_argument("--quick", action="store_true", help="2k^2 pyramid, 64 patches, workers 1 2")
    parser.add_argument("--cache", type=Path, default=DEFAULT_CACHE)
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args()

    import torch

    if args.threads:
        torch.set_num_threads(args.threads)
    device = args.torch_device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    cuda = device.type == "cuda"
    if cuda:
        torch.backends.cudnn.benchmark = True
    if args.quick:
        args.size, args.max_patches = 2048, args.max_patches or 64
        args.workers = args.workers or [1, 2]
    args.chunk = args.chunk or (256 if cuda else 32)
    args.max_patches = (0 if cuda else 128) if args.max_patches is None else args.max_patches
    args.workers = args.workers or ([1, 2, 4, 8] if cuda else [1, 2])
    name = torch.cuda.get_device_name(device) if cuda else f"cpu ({torch.get_num_threads()} threads)"

    path = make_image(args.size, args.cache)
    if args.passes is None and cuda:
        _, once = open_grid(path, args.patch, args.max_patches, 1)
        args.passes = -(-8192 // len(once))
    source, grid = open_grid(path, args.patch, args.max_patches, args.passes)
    encode, score_fn = build_scoring_pass(args, device)
    rate_score(grid.subset(range(min(len(grid), 2 * args.chunk))), encode, score_fn, args)  # warm-up
    print(f"device {name}; pyramid {label(args.size)}, {len(grid)} patches of {args.patch}^2 "
          f"({args.passes or 1} pass(es)), "
          f"I={args.chunk}, M={args.m}, {args.backbone} up to {args.last_stage}, amp={args.amp}")

    def best(measure) -> float:  # the best of a few runs: a neighbour's burst only ever slows a run down
        return max(measure() for _ in range(args.repeats))

    rows = [dict(phase="score", workers=None, patches_per_s=best(lambda: rate_score(grid, encode, score_fn, args)))]
    for workers in args.workers:
        rows.append(dict(phase="read", workers=workers,
                         patches_per_s=best(lambda: rate_read(source, grid, args, workers))))
        rows.append(dict(phase="stream", workers=workers,
                         patches_per_s=best(lambda: rate_stream(source, grid, encode, score_fn, args, workers))))
    source.close()
    score = rows[0]["patches_per_s"]
    print(f"{'phase':<8} {'workers':>7} {'patches/s':>10}  limiter")
    for row in rows:
        row["patches_per_s"] = round(row["patches_per_s"], 2)
        if row["phase"] == "stream":
            read = next(r["patches_per_s"] for r in rows if r["phase"] == "read" and r["workers"] == row["workers"])
            row["limiter"] = "reading" if read < score else "scoring"
            row["of_bound"] = round(row["patches_per_s"] / min(read, score), 3)
        print(f"{row['phase']:<8} {row['workers'] or '-':>7} {row['patches_per_s']:>10.1f}  "
              + (f"{row['limiter']} ({100 * row['of_bound']:.0f}% of the bound)" if row["phase"] == "stream" else ""))
    if args.json:
        result = dict(benchmark="stream_throughput", device=name, torch=torch.__version__,
                      date=datetime.date.today().isoformat(), pyramid=label(args.size), patches=len(grid),
                      passes=args.passes or 1,
                      patch=args.patch, chunk=args.chunk, m=args.m, backbone=args.backbone,
                      last_stage=args.last_stage, amp=args.amp, repeats=args.repeats, rows=rows)
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(result, indent=2) + "\n")
        print(f"wrote {args.json}")


if __name__ == "__main__":
    main()

"""Patch streaming throughput and peak memory: hrsel stream vs naive read_region loop vs unfold.

Synthetic pyramidal TIFFs (8k^2, 32k^2, 96k^2 by default; the large ones mostly
background) are generated once into a cache folder. Every (case, method) runs
in a fresh subprocess so its peak RSS is its own. Also compares Numba
extraction, `torch.Tensor.unfold` + `contiguous` and a numpy loop on an
in-memory array.

    python benchmarks/io_stream.py --quick                 # 2k^2 and 8k^2 pyramids, a minute
    python benchmarks/io_stream.py --json results/io.json  # 8k^2, 32k^2, 96k^2
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

PATCH = 256
DEFAULT_CACHE = REPO / "benchmarks" / "results" / "tmp" / "io_cache"


# ---- synthetic images ------------------------------------------------------------------------


def tissue_fraction(size: int) -> float:
    return 0.4 if size <= 8192 else 0.05  # the big ones are mostly background


def blobs(size: int, seed: int = 0) -> np.ndarray:
    """(k, 3) ellipse centres and radii (normalised) covering about `tissue_fraction` of the image."""
    rng = np.random.default_rng(seed)
    count = 6
    radius = np.sqrt(tissue_fraction(size) / (count * np.pi))
    centres = rng.uniform(radius + 0.02, 1 - radius - 0.02, (count, 2))
    return np.concatenate([centres, np.full((count, 1), radius)], axis=1)


def make_tiles(tile: int, count: int = 8) -> list[bytes]:
    from hrsel.io.writer import encode_tile

    rng = np.random.default_rng(1)
    yy, xx = np.mgrid[0:tile, 0:tile]
    tiles = []
    for k in range(count):
        base = 150 + 40 * np.sin((xx + 7 * k) / 9.0) * np.cos((yy - 3 * k) / 13.0)  # (t, t) "cells"
        noise = rng.integers(0, 12, (tile, tile))
        rgb = np.stack([base + noise, 0.5 * base + noise, base + 20], axis=2)
        tiles.append(encode_tile(np.clip(rgb, 0, 255).astype(np.uint8)))
    return tiles


def make_image(size: int, cache: Path) -> Path:
    from hrsel.io.writer import write_sparse_pyramid

    path = cache / f"synthetic_{size}.tif"
    if path.exists():
        return path
    cache.mkdir(parents=True, exist_ok=True)
    tile = 256
    shapes, tiles = blobs(size), make_tiles(tile)
    levels = max(1, int(np.ceil(np.log2(size / 1024))) + 1)  # down to ~1k pixels

    def tile_fn(level: int, tx: int, ty: int):
        step = tile * 2**level / size  # tile size in normalised units
        cx, cy = (tx + 0.5) * step, (ty + 0.5) * step
        inside = ((shapes[:, 0] - cx) ** 2 + (shapes[:, 1] - cy) ** 2) <= shapes[:, 2] ** 2
        return tiles[(tx * 7 + ty * 3) % len(tiles)] if inside.any() else None

    start = time.perf_counter()
    partial = path.with_suffix(".partial")
    write_sparse_pyramid(partial, size=(size, size), tile_fn=tile_fn, levels=levels, tile=tile, mpp=0.5)
    partial.rename(path)
    print(f"wrote {path} ({path.stat().st_size / 2**20:.0f} MiB, {levels} levels) in "
          f"{time.perf_counter() - start:.1f} s", file=sys.stderr)
    return path


# ---- methods (each runs inside its own subprocess) ---------------------------------------------


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0  # Linux: KiB


def grid_for(source, foreground: bool):
    from hrsel.tiling import PatchGrid

    return PatchGrid.for_source(source, patch_size=PATCH, min_tissue_fraction=0.25 if foreground else None)


def read_all(method: str, source, grid, args: argparse.Namespace) -> int:
    """Read every patch of `grid` with one method; the number of patches read."""
    import torch

    from hrsel.tiling import stream_patches

    count = 0
    if method.startswith("stream"):
        for chunk in stream_patches(source, grid, chunk_size=args.chunk, workers=args.workers, prefetch=2):
            count += chunk.patches.shape[0]
    elif method.startswith("naive"):  # one read_region per patch, batched like the stream's chunks
        coords = grid.coords
        for first in range(0, len(coords), args.chunk):
            block = coords[first : first + args.chunk]
            batch = np.stack([source.read_region(int(x), int(y), PATCH, PATCH) for x, y in block])
            count += torch.from_numpy(batch).permute(0, 3, 1, 2).shape[0]  # same channels_last layout
    elif method == "unfold":
        whole = torch.from_numpy(source.read_level(0)).permute(2, 0, 1)  # (C, H, W)
        patches = whole.unfold(1, PATCH, PATCH).unfold(2, PATCH, PATCH)  # (C, rows, cols, p, p)
        patches = patches.permute(1, 2, 0, 3, 4).reshape(-1, 3, PATCH, PATCH).contiguous()
        count = patches.shape[0]
    else:
        raise ValueError(method)
    return count


def run_file_method(method: str, path: str, args: argparse.Namespace) -> tuple[int, float]:
    """(patches read, best seconds over --repeats) for one method on one pyramid."""
    import torch  # noqa: F401 - imported before the clock starts

    from hrsel.io import open_image
    from hrsel.tiling import kernels

    backend = "openslide" if "openslide" in method else "tiff"
    source = open_image(path, backend=backend)
    grid = grid_for(source, args.foreground)
    if args.max_patches and len(grid) > args.max_patches:
        grid = grid.subset(np.arange(args.max_patches))
    kernels.extract_patches(np.zeros((8, 8, 3), np.uint8), np.zeros((1, 2), np.int64), 4)  # load the JIT cache
    best = float("inf")
    for _ in range(1 if method == "unfold" else args.repeats):  # unfold's peak RSS is the point, and it is slow
        start = time.perf_counter()
        count = read_all(method, source, grid, args)
        best = min(best, time.perf_counter() - start)
    return count, best


def run_memory_method(method: str, size: int, args: argparse.Namespace) -> tuple[int, float]:
    """Every method writes into the same preallocated (n, C, p, p) buffer: page-faulting a fresh
    multi-hundred-MB output costs anywhere from 15 to 200 ms on a VM, which would swamp the copy."""
    import torch

    from hrsel.tiling import PatchGrid, kernels

    image = np.random.default_rng(0).integers(0, 256, (size, size, 3), dtype=np.uint8)
    grid = PatchGrid(image_size=(size, size), patch_size=PATCH)
    coords = grid.coords
    out = np.zeros((len(coords), 3, PATCH, PATCH), np.uint8)
    if method == "numba":
        kernels.extract_patches(image[:PATCH, :PATCH], coords[:1] * 0, PATCH)  # compile / load cache
    best = float("inf")
    for _ in range(args.repeats):
        start = time.perf_counter()
        if method == "numba":
            kernels.extract_patches(image, coords, PATCH, out=out)
        elif method == "unfold":  # unfold + contiguous, the copy landing in `out`
            whole = torch.from_numpy(image).permute(2, 0, 1)
            view = whole.unfold(1, PATCH, PATCH).unfold(2, PATCH, PATCH).permute(1, 2, 0, 3, 4)
            torch.from_numpy(out).copy_(view.reshape(-1, 3, PATCH, PATCH))
        elif method == "numpy_loop":
            for i, (x, y) in enumerate(coords):
                out[i] = image[y : y + PATCH, x : x + PATCH].transpose(2, 0, 1)
        else:
            raise ValueError(method)
        best = min(best, time.perf_counter() - start)
    expected = image[:PATCH, PATCH : 2 * PATCH].transpose(2, 0, 1)
    assert np.array_equal(out[1], expected), f"{method} extracted the wrong pixels"
    return len(coords), best


def worker(spec: dict, args: argparse.Namespace) -> None:
    if spec["kind"] == "file":
        count, seconds = run_file_method(spec["method"], spec["path"], args)
    else:
        count, seconds = run_memory_method(spec["method"], spec["size"], args)
    print(json.dumps({"patches": count, "seconds": seconds, "peak_rss_mb": peak_rss_mb()}))


# ---- driver --------------------------------------------------------------------------------------


def run_in_subprocess(spec: dict, argv: list[str]) -> dict:
    command = [sys.executable, __file__, "--worker", json.dumps(spec), *argv]
    done = subprocess.run(command, capture_output=True, text=True, check=False)
    if done.returncode != 0:
        raise RuntimeError(f"{spec} failed:\n{done.stderr[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def label(size: int) -> str:
    return f"{size // 1024}k^2" if size % 1024 == 0 else f"{size}^2"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[8192, 32768, 98304])
    parser.add_argument("--memory-size", type=int, default=8192, help="in-memory extraction case")
    parser.add_argument("--quick", action="store_true", help="2k^2 and 8k^2 pyramids, 4k^2 in-memory")
    parser.add_argument("--cache", type=Path, default=DEFAULT_CACHE)
    parser.add_argument("--json", type=Path, default=None)
    parser.add_argument("--chunk", type=int, default=64)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=5, help="timed passes per process (best kept)")
    parser.add_argument("--rounds", type=int, default=3, help="fresh processes per method (median reported)")
    parser.add_argument("--foreground", action="store_true", help="only Otsu foreground patches")
    parser.add_argument("--max-patches", type=int, default=0, help="cap patches per run (0: all)")
    parser.add_argument("--naive-max-patches", type=int, default=0, help="cap the naive loop (0: every patch)")
    parser.add_argument("--unfold-max-size", type=int, default=16384, help="largest side unfold loads whole")
    parser.add_argument("--openslide", action="store_true", help="also stream / loop through OpenSlide")
    parser.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker is not None:
        worker(json.loads(args.worker), args)
        return
    if args.quick:
        args.sizes, args.memory_size = [2048, 8192], 4096
    shared = ["--chunk", str(args.chunk), "--workers", str(args.workers), "--repeats", str(args.repeats)]
    if args.foreground:
        shared.append("--foreground")
    jobs = []  # (case, method, pixels, spec, argv)
    for size in args.sizes:
        path = str(make_image(size, args.cache))
        methods = ["stream", "naive"] + (["stream_openslide", "naive_openslide"] if args.openslide else [])
        naive_capped = 0 < args.naive_max_patches < (size // PATCH) ** 2
        methods += ["stream_capped"] if naive_capped else []  # same patches as the capped naive loop
        methods += ["unfold"] if size <= args.unfold_max_size else []
        for method in methods:
            capped = method.startswith("naive") or method == "stream_capped"
            cap = args.naive_max_patches if capped else args.max_patches
            spec = {"kind": "file", "method": method, "path": path}
            jobs.append((f"pyramid {label(size)}", method, size * size, spec, shared + ["--max-patches", str(cap)]))
    for method in ("numba", "unfold", "numpy_loop"):
        spec = {"kind": "memory", "method": method, "size": args.memory_size}
        jobs.append((f"in-memory {label(args.memory_size)}", method, args.memory_size**2, spec, shared))
    results: dict[tuple[str, str], list[dict]] = {}
    for round_ in range(args.rounds):  # rounds interleave the methods, so drift on the machine hits all alike
        for case, method, pixels, spec, argv in jobs:
            result = run_in_subprocess(spec, argv)
            results.setdefault((case, method), []).append(result)
            print(f"round {round_ + 1}/{args.rounds}", end="", file=sys.stderr)
            print_row(dict(case=case, method=method, **result))
    rows = [summarise(case, method, pixels, results[case, method]) for case, method, pixels, _, _ in jobs]
    print_table(rows)
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        keep = ("case", "method", "pixels", "patches_per_s", "peak_rss_mb", "patches", "seconds",
                "patches_per_s_rounds")
        args.json.write_text(json.dumps([{k: row[k] for k in keep} for row in rows], indent=2))
        print(f"wrote {args.json}")


def summarise(case: str, method: str, pixels: int, runs: list[dict]) -> dict:
    """One row per (case, method): the median round's speed, the highest peak RSS, every round kept."""
    seconds = sorted(run["seconds"] for run in runs)
    median = seconds[len(seconds) // 2]
    patches = runs[0]["patches"]
    return dict(case=case, method=method, pixels=pixels, patches=patches, seconds=median,
                patches_per_s=patches / median, peak_rss_mb=max(run["peak_rss_mb"] for run in runs),
                patches_per_s_rounds=[run["patches"] / run["seconds"] for run in runs])


def print_row(row: dict) -> None:
    print(f"  {row['case']:<18} {row['method']:<17} {row['patches'] / row['seconds']:>10.0f} patches/s "
          f"{row['peak_rss_mb']:>8.0f} MB", file=sys.stderr)


def print_table(rows: list[dict]) -> None:
    print(f"{'case':<18} {'method':<17} {'patches':>8} {'seconds':>8} {'patches/s':>10} {'peak RSS MB':>12}")
    for row in rows:
        print(f"{row['case']:<18} {row['method']:<17} {row['patches']:>8} {row['seconds']:>8.2f} "
              f"{row['patches_per_s']:>10.0f} {row['peak_rss_mb']:>12.0f}")
    by = {(r["case"], r["method"]): r for r in rows}
    for case in dict.fromkeys(r["case"] for r in rows):
        stream = by.get((case, "stream_capped"), by.get((case, "stream")))  # on the naive loop's patches
        if stream and (case, "naive") in by:
            naive = by[case, "naive"]
            ratio = stream["patches_per_s"] / naive["patches_per_s"]
            rounds = [a / b for a, b in zip(stream["patches_per_s_rounds"], naive["patches_per_s_rounds"])]
            print(f"{case}: {stream['method']} / naive = {ratio:.2f}x of the medians, "
                  f"{min(rounds):.2f}-{max(rounds):.2f}x round by round (target >= 1.5x)")
        if (case, "numba") in by and (case, "unfold") in by:
            ratio = by[case, "numba"]["patches_per_s"] / by[case, "unfold"]["patches_per_s"]
            print(f"{case}: numba / unfold+contiguous = {ratio:.2f}x (target >= 1x)")
    streams = [r for r in rows if r["method"] == "stream"]
    if len(streams) >= 2:
        print(f"stream peak RSS {streams[-1]['case']} / {streams[0]['case']} = "
              f"{streams[-1]['peak_rss_mb'] / streams[0]['peak_rss_mb']:.2f}x (target <= 1.2x)")


if __name__ == "__main__":
    os.environ.setdefault("PYTHONWARNINGS", "ignore")
    main()

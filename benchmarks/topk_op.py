"""Perturbed top-K: `hrsel.select.perturbed_topk` against the dense reference formula.

Times forward + backward and measures the peak memory of each, in the same run,
at the DPS traffic size (b=32, S=500, k=5, n=2028) and billiard size (b=64,
S=500, k=10, n=900). The reference materialises the (b, S, k, n) one-hots and the
(b, k, n, n) Jacobian as the DPS supplement's code and its PyTorch port do, but
with the correct contraction.

CPU peak memory is the growth of peak RSS in a fresh subprocess per measurement;
CUDA peak memory is max_memory_allocated above the inputs after a reset.

    python benchmarks/topk_op.py --json benchmarks/results/topk_op_cpu.json
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time

CASES = {
    "traffic": dict(b=32, samples=500, k=5, n=2028),
    "billiard": dict(b=64, samples=500, k=10, n=900),
    "tiny": dict(b=4, samples=100, k=5, n=200),
}


def run_once(case: str, method: str, device: str, repeats: int) -> dict:
    """Measure one (case, method) in this process: median ms and peak MB above the inputs."""
    import resource

    import torch

    from hrsel.select import perturbed_topk, sample_noise
    from hrsel.select.reference import dense_perturbed_topk

    dev = torch.device(device)

    def make_step(c):
        scores = torch.rand(c["b"], c["n"], device=dev)
        upstream = torch.randn(c["b"], c["k"], c["n"], device=dev)
        noise = None
        if method == "ref":  # the reference takes its noise as input: not counted in its peak
            noise = sample_noise(c["b"], c["samples"], c["n"], generator=torch.Generator(dev).manual_seed(0), device=dev)

        def step():
            s = scores.clone().requires_grad_()
            if method == "ours":
                y = perturbed_topk(s, c["k"], 0.05, c["samples"], generator=torch.Generator(dev).manual_seed(0))
            else:
                y = dense_perturbed_topk(s, c["k"], 0.05, noise)
            (y * upstream).sum().backward()
            return s.grad

        return step

    make_step(CASES["tiny"])()  # load kernels and thread pools before the baseline is read
    step = make_step(CASES[case])

    def sync():
        if dev.type == "cuda":
            torch.cuda.synchronize()

    if dev.type == "cuda":
        step()  # warm-up at full size; the peak counter is reset below
        sync()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
    else:
        base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    times = []
    for _ in range(repeats):
        sync()
        t0 = time.perf_counter()
        step()
        sync()
        times.append((time.perf_counter() - t0) * 1e3)
    if dev.type == "cuda":
        peak = torch.cuda.max_memory_allocated() - base
    else:
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 - base
    return {"ms": sorted(times)[len(times) // 2], "peak_mb": peak / 2**20}


def measure(case: str, method: str, device: str, repeats: int) -> dict:
    """CPU: a fresh subprocess per measurement, so one method's peak RSS never hides another's."""
    if device != "cpu":
        return run_once(case, method, device, repeats)
    cmd = [sys.executable, __file__, "--child", case, method, device, str(repeats)]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        raise SystemExit(f"measuring {case}/{method} on {device} failed:\n{proc.stderr}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--cases", nargs="+", default=["traffic", "billiard"], choices=sorted(CASES))
    parser.add_argument("--devices", nargs="+", default=None, help="default: cpu, and cuda when present")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--json", metavar="PATH", help="write the rows as JSON")
    parser.add_argument("--child", nargs=4, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        case, method, device, repeats = args.child
        print(json.dumps(run_once(case, method, device, int(repeats))))
        return

    import torch

    devices = args.devices or (["cpu", "cuda"] if torch.cuda.is_available() else ["cpu"])
    rows = []
    print(f"{'case':10} {'device':6} {'ours ms':>9} {'ref ms':>9} {'speed-up':>8} {'ours MB':>9} {'ref MB':>9} {'leaner':>8}")
    for device in devices:
        for case in args.cases:
            ours = measure(case, "ours", device, args.repeats)
            ref = measure(case, "ref", device, args.repeats)
            row = {
                "case": case,
                "device": torch.cuda.get_device_name() if device == "cuda" else "cpu",
                **CASES[case],
                "ours_ms": round(ours["ms"], 2),
                "ref_ms": round(ref["ms"], 2),
                "ours_peak_mb": round(ours["peak_mb"], 1),
                "ref_peak_mb": round(ref["peak_mb"], 1),
            }
            row["speedup"] = round(row["ref_ms"] / row["ours_ms"], 2)
            row["memory_ratio"] = round(row["ref_peak_mb"] / max(row["ours_peak_mb"], 0.1), 1)
            rows.append(row)
            print(
                f"{case:10} {device:6} {row['ours_ms']:9.1f} {row['ref_ms']:9.1f} {row['speedup']:7.1f}x"
                f" {row['ours_peak_mb']:9.1f} {row['ref_peak_mb']:9.1f} {row['memory_ratio']:7.1f}x"
            )
    if args.json:
        from pathlib import Path

        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(rows, indent=2) + "\n")
        print(f"wrote {args.json}")


if __name__ == "__main__":
    main()

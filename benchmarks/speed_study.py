"""Inference speed of patch selection vs full-image CNNs (DPS supplement, App. A).

Images/s at inference on 1000 x 1000 images of
  - ResNet50 on the full image and ResNet18 on the full image (the `cnn` pipeline),
  - patch selection: the DPS scorer on the 4x downscaled image, hard or perturbed top-K,
    ResNet50 on K in {3, 5, 10} patches of P in {50, 100}, mean pooling (the `dps`
    pipeline; "perturbed" runs its selector in training mode, i.e. perturbed top-K and
    streaming soft extraction, while everything else stays in eval mode),
  - the scoring pass alone (DPS scorer + hard top-K), to split the time of selection.
For every point the batch size is searched (powers of two up to `--max-batch`, stopping
at the first out-of-memory) and the best images/s is kept, as in the paper. x-axis of the
plot: percentage of pixels extracted, K * P^2 / (H * W).

    python benchmarks/speed_study.py --json benchmarks/results/speed_study_cuda.json   # GPU
    python benchmarks/speed_study.py --quick                                          # CPU, minutes
    python benchmarks/speed_study.py --replot benchmarks/results/speed_study_cpu.json # PNG only
"""
from __future__ import annotations

import argparse
import datetime
import json
import statistics
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

NUM_CLASSES = 9  # billiard max-left-right


def make_specs(ks: list[int], patch_sizes: list[int], *, downscale: int, num_samples: int,
               selectors: list[str]) -> list[dict]:
    """One dict per point: name, pipeline name, its options and the labels of the plot."""
    specs = [dict(method=f"{arch}_full", pipeline="cnn", options=dict(backbone=arch), k=None, patch=None)
             for arch in ("resnet50", "resnet18")]
    dps = dict(downscale=downscale, scorer="dps", backbone="resnet50", aggregator="mean", sigma=0.05,
               num_samples=num_samples, sigma_schedule="constant")
    for patch in patch_sizes:
        for k in ks:
            for selector in selectors:
                options = dict(dps, patch_size=patch, k=k, selector=selector)
                specs.append(dict(method=f"select_{selector}", pipeline="dps", options=options, k=k, patch=patch))
    specs.append(dict(method="score_only", pipeline="dps", k=max(ks), patch=max(patch_sizes),
                      options=dict(dps, patch_size=max(patch_sizes), k=max(ks), selector="hard")))
    return specs


def build_model(spec: dict, device):
    from hrsel.models import build_pipeline
    from hrsel.tasks import TaskSpec

    model = build_pipeline(spec["pipeline"], tasks={"label": TaskSpec("multiclass", NUM_CLASSES)},
                           **spec["options"]).to(device).eval()
    if spec["method"] == "select_perturbed":
        model.select.train()  # perturbed top-K + soft extraction at inference; BN etc. stay in eval
    if spec["method"] == "score_only":
        from hrsel.models.patches import ImageBatch

        def forward(images):  # the scoring pass of the DPS pipeline and its (hard) selection
            scores, _ = model.score(ImageBatch(images, device=device))
            return model.select(scores)[1]

        return forward
    return model


def is_oom(error: BaseException) -> bool:
    import torch

    return isinstance(error, torch.cuda.OutOfMemoryError) or "out of memory" in str(error).lower()


def images_per_s(forward, batch: int, image_size: int, device, *, warmup: int, iters: int,
                 min_seconds: float) -> float:
    """images/s of `forward` on random uint8 images (B, 3, S, S), from the median time of a call.

    The median, not the mean, so that a neighbour's burst on a shared machine does not count.
    """
    import torch

    images = torch.randint(0, 256, (batch, 3, image_size, image_size), dtype=torch.uint8, device=device)

    def sync():
        if device.type == "cuda":
            torch.cuda.synchronize(device)

    with torch.no_grad():
        for _ in range(warmup):
            forward(images)
        sync()
        times: list[float] = []
        begin = time.perf_counter()
        while len(times) < iters or (time.perf_counter() - begin < min_seconds and len(times) < 50 * iters):
            start = time.perf_counter()
            forward(images)
            sync()
            times.append(time.perf_counter() - start)
    return batch / statistics.median(times)


def search_batch(spec: dict, device, args) -> dict:
    """Try batch sizes 1, 2, 4, ... <= max_batch; keep the fastest, stop at the first OOM."""
    import torch

    forward = build_model(spec, device)
    sizes, b = [], 1
    while b < args.max_batch:
        sizes.append(b)
        b *= 2
    sizes.append(args.max_batch)
    tried: dict[int, float] = {}
    oom_at = None
    for size in sizes:
        try:
            tried[size] = images_per_s(forward, size, args.image_size, device, warmup=args.warmup,
                                       iters=args.iters, min_seconds=args.min_seconds)
        except (RuntimeError, torch.cuda.OutOfMemoryError) as error:
            if not is_oom(error):
                raise
            oom_at = size
            break
        finally:
            if device.type == "cuda":
                torch.cuda.empty_cache()
    if not tried:
        raise SystemExit(f"{spec['method']} does not fit even batch 1 on {device}")
    best = max(tried, key=tried.get)
    pixels_pct = 100.0 if spec["pipeline"] == "cnn" else 100.0 * spec["k"] * spec["patch"] ** 2 / args.image_size ** 2
    return dict(method=spec["method"], k=spec["k"], patch=spec["patch"], pixels_pct=round(pixels_pct, 3),
                images_per_s=round(tried[best], 3), best_batch=best, oom_at=oom_at,
                per_batch={str(s): round(v, 3) for s, v in tried.items()})


def summarise(rows: list[dict]) -> dict:
    """The three claims of App. A, in numbers."""
    by = {(r["method"], r["k"], r["patch"]): r["images_per_s"] for r in rows}
    out: dict = {}
    r50 = by.get(("resnet50_full", None, None))
    r18 = by.get(("resnet18_full", None, None))
    top = max((key for key in by if key[0] == "select_hard"), key=lambda key: (key[2], key[1]), default=None)
    if top and r50:
        out[f"speedup_hard_k{top[1]}_p{top[2]}_vs_resnet50"] = round(by[top] / r50, 2)
    if top and r18:
        out[f"resnet18_full_vs_hard_k{top[1]}_p{top[2]}"] = round(r18 / by[top], 2)
    ratios = [by[("select_hard", k, p)] / by[("select_perturbed", k, p)]
              for (m, k, p) in by if m == "select_hard" and ("select_perturbed", k, p) in by]
    if ratios:
        out["hard_over_perturbed_min"] = round(min(ratios), 3)
        out["hard_over_perturbed_max"] = round(max(ratios), 3)
    score = [r for r in rows if r["method"] == "score_only"]
    if score and top and top[1:] == (score[0]["k"], score[0]["patch"]):
        # seconds per image of scoring / of the whole selection pipeline
        share = by[top] / score[0]["images_per_s"]
        out[f"scoring_share_of_time_k{top[1]}_p{top[2]}"] = round(share, 3)
        out[f"feature_net_share_of_time_k{top[1]}_p{top[2]}"] = round(1 - share, 3)
    return out


def plot(rows: list[dict], path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from bench_plots import finish_log_log

    fig, ax = plt.subplots(figsize=(6.4, 4.2), dpi=90)
    colours = {50: "tab:blue", 100: "tab:orange"}
    for method, style in (("select_hard", "-o"), ("select_perturbed", "--s")):
        for patch in sorted({r["patch"] for r in rows if r["method"] == method}):
            pts = sorted((r["pixels_pct"], r["images_per_s"], r["k"]) for r in rows
                         if r["method"] == method and r["patch"] == patch)
            ax.plot([p[0] for p in pts], [p[1] for p in pts], style, color=colours.get(patch),
                    label=f"{method.split('_')[1]} top-K, P={patch}, ResNet50")
            for x, y, k in pts:
                ax.annotate(f"K={k}", (x, y), textcoords="offset points", xytext=(3, 3), fontsize=7)
    for method, colour in (("resnet50_full", "black"), ("resnet18_full", "grey")):
        for r in rows:
            if r["method"] == method:
                ax.axhline(r["images_per_s"], color=colour, ls=":",
                           label=f"{method.replace('_full', '')} full image ({r['images_per_s']:.3g}/s)")
    finish_log_log(fig, ax, path, xlabel="pixels extracted (% of the image)", ylabel="images / s (best batch size)",
                   title=title)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default=None, help="cpu | cuda | cuda:N (default: cuda when present)")
    parser.add_argument("--image-size", type=int, default=1000)
    parser.add_argument("--ks", type=int, nargs="+", default=[3, 5, 10])
    parser.add_argument("--patch-sizes", type=int, nargs="+", default=[50, 100])
    parser.add_argument("--selectors", nargs="+", default=["hard", "perturbed"], choices=["hard", "perturbed"])
    parser.add_argument("--downscale", type=int, default=4, help="scorer input = image / downscale (billiard: 4)")
    parser.add_argument("--num-samples", type=int, default=500, help="perturbations of perturbed top-K")
    parser.add_argument("--max-batch", type=int, default=None, help="batch-size cap (default: cuda 256, cpu 2)")
    parser.add_argument("--warmup", type=int, default=None, help="untimed calls (default: cuda 3, cpu 1)")
    parser.add_argument("--iters", type=int, default=None, help="timed calls at least (default: cuda 10, cpu 3)")
    parser.add_argument("--min-seconds", type=float, default=None, help="time at least (default: cuda 1, cpu 0)")
    parser.add_argument("--quick", action="store_true", help="K in {3, 10}, P = 50, batch 1, one timed call")
    parser.add_argument("--json", type=Path, default=None)
    parser.add_argument("--plot", type=Path, default=None, help="PNG (default: beside --json)")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    parser.add_argument("--replot", type=Path, default=None, help="redraw the PNG of a saved JSON; runs nothing")
    args = parser.parse_args()
    if args.replot:
        saved = json.loads(args.replot.read_text())
        png = args.plot or args.replot.with_suffix(".png")
        plot(saved["rows"], png, f"Inference speed, {saved['image_size']}^2 images, {saved['device']}")
        print(f"wrote {png}")
        return

    import torch

    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    cuda = device.type == "cuda"
    if cuda:
        torch.backends.cudnn.benchmark = True
    if args.quick:
        args.ks, args.patch_sizes = [3, 10], [50]
        args.max_batch = args.max_batch or 1
        args.iters, args.warmup, args.min_seconds = args.iters or 1, 1 if args.warmup is None else args.warmup, 0.0
    args.max_batch = args.max_batch or (256 if cuda else 2)
    args.warmup = (3 if cuda else 1) if args.warmup is None else args.warmup
    args.iters = args.iters or (10 if cuda else 3)
    args.min_seconds = (1.0 if cuda else 0.0) if args.min_seconds is None else args.min_seconds

    name = torch.cuda.get_device_name(device) if cuda else f"cpu ({torch.get_num_threads()} threads)"
    specs = make_specs(args.ks, args.patch_sizes, downscale=args.downscale, num_samples=args.num_samples,
                       selectors=args.selectors)
    print(f"device {name}, images {args.image_size}^2, batch <= {args.max_batch}, torch {torch.__version__}")
    print(f"{'method':<18} {'K':>3} {'P':>4} {'% pixels':>9} {'images/s':>10} {'batch':>6}  per batch")
    rows = []
    for spec in specs:
        row = search_batch(spec, device, args)
        rows.append(row)
        print(f"{row['method']:<18} {row['k'] or '-':>3} {row['patch'] or '-':>4} {row['pixels_pct']:>9.2f} "
              f"{row['images_per_s']:>10.3f} {row['best_batch']:>6}  {row['per_batch']}"
              + (f" (OOM at {row['oom_at']})" if row["oom_at"] else ""), flush=True)
    summary = summarise(rows)
    for key, value in summary.items():
        print(f"{key}: {value}")
    if args.json:
        result = dict(benchmark="speed_study", device=name, torch=torch.__version__,
                      date=datetime.date.today().isoformat(), image_size=args.image_size,
                      settings=dict(max_batch=args.max_batch, warmup=args.warmup, iters=args.iters,
                                    min_seconds=args.min_seconds, downscale=args.downscale,
                                    num_samples=args.num_samples, precision="float32"),
                      rows=rows, summary=summary)
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(result, indent=2) + "\n")
        print(f"wrote {args.json}")
    png = args.plot or (args.json.with_suffix(".png") if args.json else None)
    if png:
        plot(rows, png, f"Inference speed, {args.image_size}^2 images, {name}")
        print(f"wrote {png}")


if __name__ == "__main__":
    main()

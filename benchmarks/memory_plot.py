"""Peak memory of one training step vs image size, one curve per method, on one log-log plot.

Reads the JSON written by `benchmarks/memory.py --json` and marks the sizes where a method
ran out of memory with a red cross on the memory-limit line (or above its last point when
the limit is not recorded).

    python benchmarks/memory_plot.py benchmarks/results/memory_cpu.json            # -> memory_cpu.png
    python benchmarks/memory_plot.py results.json --out plot.png --title "H100, batch 16"

Accepted rows (a JSON list, or an object with "rows"/"results" and optional "device" and
"memory_limit_mb"): the method in "pipeline" | "method" | "name"; the image size in
"megapixels" | "mpix" | "pixels" | "image_size" (side or (height, width)); the peak in
"peak_mb" | "peak_memory_mb" | "peak_mib" | "peak_gb" | "peak_bytes"; out of memory when
"oom" is true, "status" is "oom" or "error" says "out of memory"; other statuses (skipped,
timeout, error) are listed but not drawn.
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

METHOD_KEYS = ("pipeline", "method", "name")
PEAK_KEYS = {"peak_mb": 1.0, "peak_memory_mb": 1.0, "peak_mib": 1.0, "peak_gb": 1024.0, "peak_gib": 1024.0,
             "peak_bytes": 1 / 2**20}
LIMIT_KEYS = ("memory_limit_mb", "device_memory_mb", "total_memory_mb")


def _first(row: dict, keys, what: str, path: Path):
    for key in keys:
        if key in row:
            return row[key]
    raise SystemExit(f"{path}: row {row} has no {what} (looked for {', '.join(keys)})")


def megapixels(row: dict, path: Path) -> float:
    for key in ("megapixels", "mpix", "mp"):
        if row.get(key) is not None:
            return float(row[key])
    if row.get("pixels") is not None:
        return float(row["pixels"]) / 1e6
    side = _first(row, ("image_size", "size"), "image size", path)
    h, w = (side, side) if isinstance(side, (int, float)) else side
    return float(h) * float(w) / 1e6


def peak_mb(row: dict) -> float | None:
    for key, scale in PEAK_KEYS.items():
        if row.get(key) is not None:
            return float(row[key]) * scale
    return None


def status(row: dict) -> str:
    """"ok", "oom", or another reason the row has no figure (skipped, timeout, error)."""
    state = str(row.get("status", "")).lower()
    error = str(row.get("error", "")).lower()
    if row.get("oom") or state in ("oom", "out_of_memory", "out-of-memory") or "out of memory" in error:
        return "oom"
    if state in ("", "ok") and peak_mb(row) is not None:
        return "ok"
    return state or "missing"


def load(path: Path, *, above_base: bool = False) -> tuple[dict[str, list[tuple[float, float | str]]], dict]:
    """{method: [(megapixels, peak MB, or the status when there is no figure)]} and the file's metadata."""
    data = json.loads(path.read_text())
    meta = data if isinstance(data, dict) else {}
    rows = data if isinstance(data, list) else data.get("rows", data.get("results"))
    if not isinstance(rows, list) or not rows:
        raise SystemExit(f"{path}: expected a list of rows or an object with 'rows'; got {type(data).__name__}")
    curves: dict[str, list[tuple[float, float | str]]] = {}
    for row in rows:
        method = str(_first(row, METHOD_KEYS, "method name", path))
        state = status(row)
        value: float | str = state
        if state == "ok":
            value = peak_mb(row) - (float(row.get("base_mb") or 0.0) if above_base else 0.0)
        curves.setdefault(method, []).append((megapixels(row, path), value))
    if "device" not in meta:
        devices = {str(r["device"]) for r in rows if "device" in r}
        if len(devices) == 1:
            meta = dict(meta, device=devices.pop())
    return {m: sorted(points, key=lambda p: p[0]) for m, points in curves.items()}, meta


def plot(curves: dict, meta: dict, out: Path, title: str | None, *, above_base: bool = False) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from bench_plots import finish_log_log

    limit = next((float(meta[k]) for k in LIMIT_KEYS if meta.get(k)), None)
    measured = [p for points in curves.values() for _, p in points if not isinstance(p, str)]
    oom_y = limit or (max(measured) * 1.5 if measured else 1.0)
    fig, ax = plt.subplots(figsize=(6.4, 4.2), dpi=90)
    for method, points in curves.items():
        ok = [(x, y) for x, y in points if not isinstance(y, str)]
        if not ok and not any(y == "oom" for _, y in points):
            ax.plot([], [], " ", label=f"{method}: no figure ({', '.join(sorted({str(y) for _, y in points}))})")
            continue
        line, = ax.plot([x for x, _ in ok], [y for _, y in ok], "-o", ms=4, label=method)
        oom = [x for x, y in points if y == "oom"]
        if oom:
            ax.plot(oom, [oom_y] * len(oom), "x", color="red", ms=9, mew=2)
            if ok:  # a dotted link from the last point that fit to the first that did not
                ax.plot([ok[-1][0], oom[0]], [ok[-1][1], oom_y], ":", color=line.get_color())
    if limit:
        ax.axhline(limit, color="red", lw=0.8, ls="--", label=f"memory limit {limit / 1024:.0f} GiB")
    if any(y == "oom" for points in curves.values() for _, y in points):
        ax.plot([], [], "x", color="red", mew=2, label="out of memory")
    finish_log_log(fig, ax, out, xlabel="image size (megapixels)",
                   ylabel="peak memory, one training step (MB" + (" above base)" if above_base else ")"),
                   title=title or f"Peak memory vs image size ({meta.get('device', 'device not recorded')})")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("json", type=Path, help="output of benchmarks/memory.py --json")
    parser.add_argument("--out", type=Path, default=None, help="PNG (default: the JSON path with .png)")
    parser.add_argument("--title", default=None)
    parser.add_argument("--above-base", action="store_true",
                        help="subtract each row's base_mb (CPU RSS before the step, torch itself)")
    args = parser.parse_args()
    curves, meta = load(args.json, above_base=args.above_base)
    out = args.out or args.json.with_suffix(".png")
    plot(curves, meta, out, args.title, above_base=args.above_base)
    for method, points in curves.items():
        cells = ", ".join(f"{x:g} MP: " + (y.upper() if isinstance(y, str) else f"{y:.0f} MB") for x, y in points)
        print(f"{method:<16} {cells}")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()

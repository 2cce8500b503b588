"""Own slides at a larger size: the README's commands on synthetic slides with a lesion and pen marks.

    python benchmarks/own_slides.py                                  # 48 slides of 4096^2, seed 0, 96-px patches
    python benchmarks/own_slides.py --patch-size 32                  # the acceptance test's patch (1/3 lesion)
    python benchmarks/own_slides.py --size 2048 --seeds 0 1 2 --json benchmarks/results/local/own.json
    python benchmarks/own_slides.py --k 75                           # M from README rule 3 for a 2-patch lesion
    python benchmarks/own_slides.py --dry-run                        # 12 slides of 512^2, 2 epochs (seconds)

The check of tests/test_own_slides_acceptance.py at a size nearer a slide's: `hrsel.data.synthetic_slides`
writes the set (0.25 um/px, read at 0.5; a lesion of 24 um radius on half the slides, pen marks on
half of each class), then per seed, in subprocesses and one at a time:
`python -m hrsel.train configs/manifest_example.yaml data.root=... <overrides>` and
`python -m hrsel.predict RUN slides.csv --split test` with the default checkpoint (best.pt).
Recorded per seed: the test slides' labels and p(tumour), whether each tumour slide's rank-1 patch
lies on its lesion, pen-marked normal slides called tumour, training and predict seconds, the
tissue patches per slide and K. The overrides scale the model, not the method: a narrow ResNet
(GroupNorm, as manifest_example's norm) and K = 10% of the mean tissue patches unless `--k` says. The patch follows the
README's "Sizing resolution, patch and M": one lesion diameter at the target resolution (48 um = 96 px
at 0.5 um/px) by default; `--patch-size 32` is the acceptance test's patch, a third of the lesion,
which at 4096^2 makes N 9x larger and the lesion 0.7% of the tissue patches.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "benchmarks"))
from machine import describe  # noqa: E402

DEFAULT_JSON = REPO / "benchmarks" / "results" / "local" / "own_slides_cpu.json"
LESION_UM, MPP, TARGET_MPP = 24.0, 0.25, 0.5  # lesion radius; the slides' resolution; the run's
MODEL = ["model.backbone=narrow_resnet",
         "model.backbone_options={width: 16, strides: [2, 2, 2, 2], blocks: [1, 1, 1, 1], norm: group}",
         "model.aggregator_options={heads: 2, head_dim: 16, mlp_dim: 64, dropout: 0.0}",
         "eval.pictures=0", "train.progress_bar=false", "data.num_workers=0"]


def tissue_patches(root: Path, patch_level0: int) -> float:
    """Mean count of tissue patches per slide (data.tissue's rule) at the run's patch size."""
    from hrsel.io import open_image
    from hrsel.tiling.tissue import compute_tissue_mask

    counts = []
    for path in sorted((root / "slides").glob("*.tif"))[:8]:
        with open_image(str(path)) as source:
            mask = compute_tissue_mask(source)
            w, h = source.dimensions
        counts.append(mask.tissue_share * (w // patch_level0) * (h // patch_level0))
    return sum(counts) / len(counts)


def run(args: list[str], cwd: Path, log: Path) -> float:
    start = time.perf_counter()
    with log.open("w") as f:
        code = subprocess.run([sys.executable, "-m", *args], cwd=cwd, stdout=f, stderr=subprocess.STDOUT).returncode
    if code != 0:
        raise SystemExit(f"{' '.join(args[:2])} failed (exit {code}); see {log}")
    return time.perf_counter() - start


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--size", type=int, default=4096, help="level-0 pixels per side (0.25 um/px)")
    p.add_argument("--slides", type=int, nargs=3, default=(32, 8, 8), metavar=("TRAIN", "VAL", "TEST"))
    p.add_argument("--epochs", type=int, default=30)
    p.add_argument("--patch-size", type=int, default=round(2 * LESION_UM / TARGET_MPP),
                   help="pixels at 0.5 um/px (default: one lesion diameter, 96)")
    p.add_argument("--k", type=int, default=None,
                   help="M, patches kept per slide (default: 10%% of the mean tissue patches, at least 4)")
    p.add_argument("--seeds", type=int, nargs="+", default=[0])
    p.add_argument("--workdir", type=Path, default=None, help="where slides and runs go (default: a temp folder)")
    p.add_argument("--json", type=Path, default=DEFAULT_JSON)
    p.add_argument("--dry-run", action="store_true", help="12 slides of 512^2, 2 epochs")
    a = p.parse_args(argv)
    if a.k is not None and a.k < 1:
        p.error(f"--k {a.k}: M must be at least 1 patch per slide")
    if a.dry_run:
        a.size, a.slides, a.epochs, a.patch_size = 512, (4, 4, 4), 2, 32
    from hrsel.data.synthetic_slides import check_predictions, make_slide_set

    with tempfile.TemporaryDirectory() as tmp:
        work = a.workdir or Path(tmp)
        root = work / "my_slides"
        start = time.perf_counter()
        if not (root / "slides.csv").is_file():
            make_slide_set(root, n_train=a.slides[0], n_val=a.slides[1], n_test=a.slides[2], size=a.size, mpp=MPP,
                           lesion_um=LESION_UM, seed=0)
        made_s = time.perf_counter() - start
        tissue = tissue_patches(root, patch_level0=round(a.patch_size * TARGET_MPP / MPP))
        k = a.k if a.k is not None else max(4, round(0.1 * tissue))
        print(f"{sum(a.slides)} slides of {a.size}^2 in {made_s:.0f} s; "
              f"{tissue:.0f} tissue patches of {a.patch_size} px per slide, K={k}")
        runs = []
        for seed in a.seeds:
            out = work / f"seed{seed}"
            overrides = [f"data.root={root}", *MODEL, f"model.patch_size={a.patch_size}", f"model.k={k}",
                         f"train.epochs={a.epochs}", f"seed={seed}",
                         "experiment=my_slides", f"--output-dir={out / 'runs'}", "--device=cpu", "--overwrite"]
            out.mkdir(parents=True, exist_ok=True)
            train_s = run(["hrsel.train", str(REPO / "configs/manifest_example.yaml"), *overrides], out,
                          out / "train.log")
            preds = out / "preds"
            predict_s = run(["hrsel.predict", str(out / "runs/my_slides"), str(root / "slides.csv"), "--split", "test",
                             "--out", str(preds), "--no-pictures", "--no-progress"], out, out / "predict.log")
            rows = check_predictions(root, preds)
            summary = json.loads((out / "runs/my_slides/test_metrics.json").read_text())
            tumours = [r for r in rows if r["label"] == "tumor"]
            result = {"seed": seed, "train_s": round(train_s, 1), "predict_s": round(predict_s, 1),
                      "label_accuracy": sum(r["predicted"] == r["label"] for r in rows) / len(rows),
                      "top_patch_on_lesion": f"{sum(bool(r['top_on_lesion']) for r in tumours)}/{len(tumours)}",
                      "pen_normals_called_tumour": sum(r["pen"] and r["label"] == "normal" and r["predicted"] == "tumor"
                                                       for r in rows),
                      "weights": summary.get("weights"), "best": summary.get("best"),
                      "warnings": summary.get("warnings", []),
                      "slides": rows}
            runs.append(result)
            print(f"seed {seed}: labels {result['label_accuracy']:.3f}, top patch on the lesion "
                  f"{result['top_patch_on_lesion']}, pen-marked normals called tumour "
                  f"{result['pen_normals_called_tumour']}, train {train_s:.0f} s, predict {predict_s:.0f} s")
    record = {"benchmark": "own_slides", "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
              "machine": describe(), "size": a.size, "mpp": MPP, "target_mpp": TARGET_MPP, "lesion_um": LESION_UM,
              "patch_size": a.patch_size, "slides": list(a.slides),
              "epochs": a.epochs, "tissue_patches_per_slide": round(tissue, 1), "k": k, "dry_run": a.dry_run,
              "command": "python benchmarks/own_slides.py " + " ".join(argv if argv is not None else sys.argv[1:]),
              "runs": runs}
    a.json.parent.mkdir(parents=True, exist_ok=True)
    a.json.write_text(json.dumps(record, indent=1))
    print(f"wrote {a.json}")
    return 0


if __name__ == "__main__":
    os.environ.setdefault("OMP_NUM_THREADS", str(os.cpu_count() or 1))
    sys.exit(main())

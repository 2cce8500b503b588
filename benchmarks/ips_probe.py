"""IPS selection probe: what the top-M picks look like while an IPS config trains (issue 25's relapse test).

    python benchmarks/ips_probe.py --label shipped                                       # configs/mnist_s_ips.yaml
    python benchmarks/ips_probe.py --label dropout --set model.aggregator_options.dropout=0.1
    python benchmarks/ips_probe.py --dry-run --json /tmp/p.json                          # tiny data, seconds

Trains the config through the real `Trainer` (its data, pipeline, optimiser, schedule, clipping;
one `train_batch` per update, as `hrsel.train` does) for `--updates` updates, and every `--every`
updates runs the pipeline in evaluation mode on the first `--images` test canvases of Megapixel
MNIST (held out: never trained on) and records, over all their picks (B x M):

- `inked`: share of picks with any non-zero pixel (a digit or a noise line);
- `digit`: share of picks that overlap a digit's 28x28 box (labels.json `positions`);
- `top_rows`: share of picks in the top two rows of the patch grid (position bias);
- `position_r2`: share of the variance of the per-image-centred log attention over all N patches
  that the patch index explains (variance of the per-position mean over the total);
- `spread`: the encoder embeddings' spread across an image's patches, ||E - mean_n E|| / ||E|| over
  all N patches (1: no shared component; 0: every patch embedded alike);
- `bn_var_min`: the encoder's smallest BatchNorm running variance (see `smallest_running_var`);
- the random baseline of `inked` and `digit` (their share among all patches) once.

A run relapses when, after update `RELAPSE_AFTER`, `inked` falls below two thirds of its peak so far
or `top_rows` exceeds 30% (the thresholds of issue 25). The record (`--json`, keyed by `--label`,
so probes accumulate) holds the overrides, the curve, the verdict and the machine.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "benchmarks"))
from machine import describe  # noqa: E402

DEFAULT_JSON = REPO / "benchmarks" / "results" / "local" / "ips_probe_cpu.json"
RELAPSE_AFTER = 150  # updates: the shipped config's learning rate peaks at 169
DRY = ["data.generate.n_train=64", "data.generate.n_test=16", "data.generate.width=200", "data.generate.height=200",
       "data.eval_batch_size=8", "model.num_positions=16", "model.k=8"]  # a 4 x 4 grid


def build_trainer(config: str, overrides: list[str], run_dir: Path):
    """The Trainer `python -m hrsel.train CONFIG overrides` would build (single process, CPU)."""
    import torch

    from hrsel.config import load_config
    from hrsel.engine import distributed
    from hrsel.engine.loop import Trainer
    from hrsel.models.fastpath import prepare_for_device
    from hrsel.train import build_datasets, build_pipeline, load_collate, prepare_data

    cfg = load_config(config, [*overrides, f"output_dir={run_dir}", "device=cpu"])
    info = distributed.init_distributed(torch.device("cpu"))
    prepare_data(cfg, info)
    torch.manual_seed(cfg.seed)
    splits = build_datasets(cfg)
    pipeline = prepare_for_device(build_pipeline(cfg, splits.train.tasks), torch.device("cpu"),
                                  channels_last=cfg.train.channels_last)
    torch.manual_seed(cfg.seed)
    trainer = Trainer(cfg=cfg, pipeline=pipeline, tasks=splits.train.tasks, train_set=splits.train,
                      val_set=splits.val, test_set=splits.test, device=torch.device("cpu"), info=info,
                      run_dir=cfg.run_dir, collate_fn=load_collate())
    return cfg, trainer


class ProbeSet:
    """The first `n` test canvases, their patch grid and which patches hold ink or a digit."""

    def __init__(self, dataset, n: int, patch: int):
        import numpy as np
        import torch

        items = [dataset[i] for i in range(min(n, len(dataset)))]
        self.images = torch.stack([item["image"] for item in items]).float()  # (B, 1, H, W)
        b, _, h, w = self.images.shape
        self.cols, rows = w // patch, h // patch
        grid = self.images[:, 0, :rows * patch, :self.cols * patch].reshape(b, rows, patch, self.cols, patch)
        self.inked = (grid.amax(dim=(2, 4)) > 0).reshape(b, -1)  # (B, N)
        digit = np.zeros((b, rows, self.cols), dtype=bool)
        positions = np.asarray(dataset.labels["positions"][:b])  # (B, 5, 2) top-left (y, x)
        for i, boxes in enumerate(positions):
            for y, x in boxes:
                last_row, last_col = min(rows - 1, (y + 27) // patch), min(self.cols - 1, (x + 27) // patch)
                digit[i, y // patch:last_row + 1, x // patch:last_col + 1] = True
        self.digit = torch.from_numpy(digit.reshape(b, -1))

    def measure(self, pipeline) -> dict[str, float]:
        import torch

        was_training = pipeline.training
        pipeline.eval()
        try:
            with torch.no_grad():
                out = pipeline(self.images)
                spread = embedding_spread(pipeline, self.images)
        finally:
            pipeline.train(was_training)
        picks = out.indices.clamp(min=0)  # (B, M)
        logs = out.scores.clamp(min=1e-30).log()  # (B, N)
        centred = logs - logs.mean(dim=1, keepdim=True)
        total = centred.var(unbiased=False).item()
        return {"inked": self.inked.gather(1, picks).float().mean().item(),
                "digit": self.digit.gather(1, picks).float().mean().item(),
                "top_rows": (picks // self.cols < 2).float().mean().item(),
                "position_r2": centred.mean(dim=0).var(unbiased=False).item() / total if total > 0 else 0.0,
                "spread": spread, "bn_var_min": smallest_running_var(pipeline.classifier.backbone)}


def smallest_running_var(encoder) -> float | None:
    """The smallest BatchNorm running variance in the encoder (None: it has no BatchNorm).

    The no-grad scoring pass runs the encoder in evaluation mode, on running statistics gathered
    from the M selected patches only: when the picks are all blank canvas a layer's variance decays
    towards 0 and the scoring pass multiplies ink by up to 1/sqrt(eps)."""
    from torch import nn

    values = [m.running_var.min().item() for m in encoder.modules()
              if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.running_var is not None]
    return min(values) if values else None


def embedding_spread(pipeline, images) -> float:
    """Mean over images of ||E - mean_n E||_F / ||E||_F, E (N, D) the encoder's embeddings of all patches."""
    from hrsel.models.patches import ImageBatch
    from hrsel.select.extract import GridGeometry

    batch = ImageBatch(images, device=images.device, in_chans=pipeline.in_chans)
    geometry = GridGeometry.regular(batch.image_hw, patch_size=pipeline.patch_size, stride=pipeline.stride)
    ratios = []
    for _, items in batch.chunks(geometry, geometry.num_patches):
        e = pipeline.classifier.encode_for_scoring(items)  # (B, N, D)
        ratios += ((e - e.mean(dim=1, keepdim=True)).norm(dim=(1, 2)) / e.norm(dim=(1, 2)).clamp(min=1e-12)).tolist()
    return sum(ratios) / len(ratios)


def relapsed(curve: list[dict]) -> str | None:
    """Why the run relapsed (issue 25's rule), or None."""
    peak = 0.0
    for point in curve:
        peak = max(peak, point["inked"])
        if point["step"] <= RELAPSE_AFTER:
            continue
        if point["inked"] < 2 / 3 * peak:
            return f"inked share {point['inked']:.2f} < 2/3 of its peak {peak:.2f} at update {point['step']}"
        if point["top_rows"] > 0.30:
            return f"{point['top_rows']:.0%} of picks in the top two rows at update {point['step']}"
    return None


def train_and_probe(trainer, probe: ProbeSet, *, updates: int, every: int) -> list[dict]:
    curve, losses, started = [], [], time.perf_counter()

    def record() -> None:
        point = {"step": trainer.state.step, "lr": trainer.optimizer.param_groups[0]["lr"],
                 "train_loss": sum(losses) / len(losses) if losses else None,
                 "minutes": (time.perf_counter() - started) / 60, **probe.measure(trainer.module)}
        curve.append(point)
        losses.clear()
        print(" ".join(f"{k} {v:.3g}" if isinstance(v, float) else f"{k} {v}" for k, v in point.items()), flush=True)

    record()
    trainer.model.train()
    while trainer.state.step < updates:
        for batch in trainer._train_loader():
            losses.append(trainer.train_batch(batch)["train_loss"])
            if trainer.state.step % every == 0:
                record()
            if trainer.state.step >= updates:
                break
        else:
            trainer.state.epoch, trainer.state.batch_in_epoch = trainer.state.epoch + 1, 0
    return curve


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", default=str(REPO / "configs" / "mnist_s_ips.yaml"))
    p.add_argument("--set", nargs="*", default=[], metavar="KEY=VALUE", help="config overrides of this probe")
    p.add_argument("--label", default="shipped", help="the probe's key in the JSON")
    p.add_argument("--updates", type=int, default=500)
    p.add_argument("--every", type=int, default=25)
    p.add_argument("--images", type=int, default=64, help="held-out test canvases probed")
    p.add_argument("--data-root", default=None, help="data.root (default: the config's)")
    p.add_argument("--json", type=Path, default=DEFAULT_JSON)
    p.add_argument("--dry-run", action="store_true", help="tiny canvases, 6 updates")
    a = p.parse_args(argv)
    with tempfile.TemporaryDirectory() as tmp:
        overrides = list(a.set) + ["train.progress_bar=false", "eval.pictures=0"]
        if a.dry_run:
            a.updates, a.every, a.images = 6, 3, 8
            overrides += DRY
            a.data_root = str(Path(tmp) / "data")
        if a.data_root:
            overrides.append(f"data.root={a.data_root}")
        cfg, trainer = build_trainer(a.config, overrides, Path(tmp) / "run")
        probe = ProbeSet(trainer.test_set, a.images, trainer.module.patch_size)
        base = {"inked": probe.inked.float().mean().item(), "digit": probe.digit.float().mean().item()}
        print(f"{a.label}: random picks {base['inked']:.0%} inked, {base['digit']:.0%} digit; "
              f"{trainer.total_steps} updates planned, {trainer.updates_per_epoch} per epoch", flush=True)
        curve = train_and_probe(trainer, probe, updates=a.updates, every=a.every)
    verdict = relapsed(curve)
    print(f"{a.label}: " + (f"relapsed: {verdict}" if verdict else "no relapse"))
    record = json.loads(a.json.read_text()) if a.json.is_file() else {}
    record[a.label] = {"config": os.path.relpath(a.config, REPO), "overrides": a.set, "updates": a.updates,
                       "planned_updates": trainer.total_steps, "probe_images": a.images, "random": base,
                       "relapse": verdict, "curve": curve, "dry_run": a.dry_run, "machine": describe(),
                       "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
                       "command": "python benchmarks/ips_probe.py "
                                  + " ".join(argv if argv is not None else sys.argv[1:])}
    a.json.parent.mkdir(parents=True, exist_ok=True)
    a.json.write_text(json.dumps(record, indent=1))
    print(f"wrote {a.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

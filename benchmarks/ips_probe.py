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
- `digits_found`: share of the canvases' digits (5 each) that at least one pick overlaps;
- `majority_seen`: share of canvases where picks overlap at least 2 of the 3 majority-class digits
  (enough to tell the majority from the 2 other digits);
- `bn_var_min`: the encoder's smallest BatchNorm running variance (see `smallest_running_var`);
- the random baseline of `inked` and `digit` (their share among all patches) once.

With `--checkpoint RUN` it trains nothing: it measures a trained run's best.pt once, on `--images`
canvases of `--split`, and splits its majority accuracy by `majority_seen` (a miss with the majority
in view is the classifier's; one without it, the selection's):

    python benchmarks/ips_probe.py --checkpoint runs/learning_ips_m18/mnist_s_ips_s0 --images 500 --label s0

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
LABEL_KEYS = ("positions", "digits", "majority")  # labels.json keys the probe reads
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

        from hrsel.errors import DataError

        labels = getattr(dataset, "labels", None)
        missing = [k for k in LABEL_KEYS if not isinstance(labels, dict) or k not in labels]
        if missing:
            raise DataError(f"ips_probe measures Megapixel MNIST canvases: the data set {type(dataset).__name__} "
                            f"({getattr(dataset, 'root', '?')}) has no labels {missing} (labels.json keys "
                            f"{LABEL_KEYS}); probe a run or config of hrsel's megapixel_mnist data")
        items = [dataset[i] for i in range(min(n, len(dataset)))]
        # (B, 1, H, W) in the data set's own dtype: the pipeline scales uint8 by 1/255 and takes float as is
        self.images = torch.stack([item["image"] for item in items])
        b, _, h, w = self.images.shape
        self.cols, rows = w // patch, h // patch
        grid = self.images[:, 0, :rows * patch, :self.cols * patch].reshape(b, rows, patch, self.cols, patch)
        self.inked = (grid.amax(dim=(2, 4)) > 0).reshape(b, -1)  # (B, N)
        positions = np.asarray(dataset.labels["positions"][:b])  # (B, D, 2) top-left (y, x), D = 5 digits
        boxes = np.zeros((*positions.shape[:2], rows, self.cols), dtype=bool)  # (B, D, rows, cols)
        for i, digits in enumerate(positions):
            for d, (y, x) in enumerate(digits):
                last_row, last_col = min(rows - 1, (y + 27) // patch), min(self.cols - 1, (x + 27) // patch)
                boxes[i, d, y // patch:last_row + 1, x // patch:last_col + 1] = True
        self.boxes = torch.from_numpy(boxes.reshape(*boxes.shape[:2], -1))  # (B, D, N)
        self.digit = self.boxes.any(dim=1)  # (B, N)
        majority = np.asarray(dataset.labels["majority"][:b])  # (B,)
        self.is_majority = torch.from_numpy(np.asarray(dataset.labels["digits"][:b]) == majority[:, None])  # (B, D)
        self.majority = torch.from_numpy(majority)

    def hits(self, picks):
        """(B, D) whether any of an image's picks (B, M) overlaps each of its digits."""
        b, d, n = self.boxes.shape
        return self.boxes.gather(2, picks[:, None, :].expand(b, d, picks.shape[1])).any(dim=2)

    def majority_seen(self, picks):
        """(B,) whether the picks overlap at least 2 of the image's 3 majority-class digits."""
        return (self.hits(picks) & self.is_majority).sum(dim=1) >= 2

    def run(self, pipeline):
        import torch

        was_training = pipeline.training
        pipeline.eval()
        try:
            with torch.no_grad():
                return pipeline(self.images), embedding_spread(pipeline, self.images)
        finally:
            pipeline.train(was_training)

    def measure(self, pipeline, out=None, spread=None) -> dict[str, float]:
        if out is None:
            out, spread = self.run(pipeline)
        picks = out.indices.clamp(min=0)  # (B, M)
        logs = out.scores.clamp(min=1e-30).log()  # (B, N)
        centred = logs - logs.mean(dim=1, keepdim=True)
        total = centred.var(unbiased=False).item()
        return {"inked": self.inked.gather(1, picks).float().mean().item(),
                "digit": self.digit.gather(1, picks).float().mean().item(),
                "top_rows": (picks // self.cols < 2).float().mean().item(),
                "digits_found": self.hits(picks).float().mean().item(),
                "majority_seen": self.majority_seen(picks).float().mean().item(),
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


def probe_checkpoint(path: str, *, images: int, split: str | None, data_root: str | None) -> tuple[dict, dict]:
    """A trained run's selection and its majority accuracy split by whether the majority was in view."""
    import dataclasses

    from hrsel.inference.load import load_model
    from hrsel.train import open_split

    loaded = load_model(path)
    cfg = loaded.config
    if data_root:
        cfg = dataclasses.replace(cfg, data=dataclasses.replace(cfg.data, root=data_root))
    dataset = open_split(cfg, split or cfg.data.eval_split, for_eval=True)
    probe = ProbeSet(dataset, images, loaded.pipeline.patch_size)
    out, spread = probe.run(loaded.pipeline)
    point = {"step": int(loaded.train_state.get("step", -1)), **probe.measure(loaded.pipeline, out, spread)}
    right = out.logits["majority"].argmax(dim=1) == probe.majority  # (B,)
    seen = probe.majority_seen(out.indices.clamp(min=0))  # (B,)
    point["majority_accuracy"] = right.float().mean().item()
    for name, where in (("seen", seen), ("unseen", ~seen)):
        point[f"majority_accuracy_{name}"] = right[where].float().mean().item() if where.any() else None
        point[f"images_{name}"] = int(where.sum())
    base = {"inked": probe.inked.float().mean().item(), "digit": probe.digit.float().mean().item()}
    print(" ".join(f"{k} {v:.3g}" if isinstance(v, float) else f"{k} {v}" for k, v in point.items()), flush=True)
    return point, base


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
    p.add_argument("--checkpoint", default=None, metavar="RUN",
                   help="measure this run folder's best.pt (or a .pt file) once instead of training")
    p.add_argument("--split", default=None, help="with --checkpoint: the split probed (default: the run's test split)")
    a = p.parse_args(argv)
    if a.split and not a.checkpoint:
        p.error("--split chooses the split a --checkpoint is measured on; training probes use the config's test split")
    if a.checkpoint:
        point, base = probe_checkpoint(a.checkpoint, images=a.images, split=a.split, data_root=a.data_root)
        return save(a, argv, {"checkpoint": a.checkpoint, "split": a.split, "probe_images": a.images,
                              "random": base, "trained": point})
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
    return save(a, argv, {"config": os.path.relpath(a.config, REPO), "overrides": a.set, "updates": a.updates,
                          "planned_updates": trainer.total_steps, "probe_images": a.images, "random": base,
                          "relapse": verdict, "curve": curve, "dry_run": a.dry_run})


def save(a: argparse.Namespace, argv: list[str] | None, entry: dict) -> int:
    """Add `entry` under `--label` to the `--json` record (probes accumulate), with machine, date and command."""
    record = json.loads(a.json.read_text()) if a.json.is_file() else {}
    record[a.label] = {**entry, "machine": describe(), "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
                       "command": "python benchmarks/ips_probe.py " + " ".join(argv if argv is not None else sys.argv[1:])}
    a.json.parent.mkdir(parents=True, exist_ok=True)
    a.json.write_text(json.dumps(record, indent=1))
    print(f"wrote {a.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

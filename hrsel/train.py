"""Train a pipeline from a YAML config.

    python -m hrsel.train configs/demo.yaml
    python -m hrsel.train configs/mnist.yaml optim.lr=3e-4 train.epochs=10 --device cuda
    python -m hrsel.train --resume runs/mnist                  # continue runs/mnist from its last.pt
    python -m hrsel.train --resume runs/mnist train.epochs=20   # ... for more epochs (a safe change)
    python -m hrsel.train configs/mnist.yaml --overwrite       # start runs/mnist over; the old one moves aside
    torchrun --nproc_per_node 4 -m hrsel.train configs/camelyon16.yaml

A bad config (unknown key, wrong type, impossible value, missing data folder), a busy or
finished run folder and an unreadable checkpoint stop with exit status 2 and a message naming
the key, folder or file, before the run folder is written.
"""
from __future__ import annotations

import argparse
import inspect
import json
import logging
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from hrsel.config import Config, check_builder_options, check_data_root, dump_config, load_config
from hrsel.config.checks import check_components, check_eval_metric
from hrsel.errors import CheckpointError, ConfigError, DataError, HrselError, RunFolderError, SelectionError

log = logging.getLogger("hrsel.train")



def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m hrsel.train", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter,
                                epilog="overrides: dotted keys, typed like the YAML value, e.g. optim.lr=3e-4 "
                                       "data.batch_size=8 model.k=50")
    p.add_argument("args", nargs="*", metavar="CONFIG [key.sub=value ...]")
    p.add_argument("--print-config", action="store_true",
                   help="check the config like a run does, print it resolved and exit (touches no data or disk)")
    p.add_argument("--resume", nargs="?", const="", default=None, metavar="RUN_DIR",
                   help="continue the run in RUN_DIR (or RUN_DIR/x.pt) with the run's own config.yaml; "
                        "without RUN_DIR: the run folder of CONFIG")
    p.add_argument("--overwrite", action="store_true",
                   help="start over in a run folder that holds a run; its files move to <run folder>.replaced-<time>")
    p.add_argument("--output-dir", help="parent of the run directory (config key output_dir)")
    p.add_argument("--seed", type=int, help="config key seed")
    p.add_argument("--device", help="auto, cpu, cuda, cuda:1 ... (config key device)")
    args = p.parse_intermixed_args(argv)
    if args.resume and ("=" in args.resume or args.resume.endswith((".yaml", ".yml"))):
        args.args.append(args.resume)  # `--resume key=value`: the flag took an override, not a folder
        args.resume = ""
    return args


@dataclass
class RunRequest:
    """What the command line asks for: the config, and how to treat the run folder."""

    cfg: Config
    checkpoint: Path | None = None  # resume from this file
    overwrite: bool = False  # start over in a folder holding a run (moving its files aside)
    changes: list[str] = field(default_factory=list)  # keys a resumed run changed (safe ones only)

    @property
    def mode(self) -> str:
        return "resume" if self.checkpoint is not None else "overwrite" if self.overwrite else "new"


def resolve_config(args: argparse.Namespace) -> RunRequest:
    """CONFIG + overrides + flags -> validated config, and the checkpoint to resume from (or None)."""
    config_path = next((a for a in args.args if "=" not in a), None)
    overrides = [a for a in args.args if "=" in a]
    extra = [a for a in args.args if "=" not in a and a != config_path]
    if extra:
        raise ConfigError(f"unexpected arguments {extra}; give one CONFIG file, then key.sub=value overrides")
    flags = flag_overrides(args, overrides)
    if args.resume is None:
        if config_path is None:
            raise ConfigError("no CONFIG given; usage: python -m hrsel.train configs/demo.yaml [key=value ...], "
                              "or python -m hrsel.train --resume runs/NAME")
        return RunRequest(load_config(config_path, overrides + flags), overwrite=args.overwrite)
    if args.overwrite:
        raise ConfigError("--resume and --overwrite exclude each other: --resume continues the run in its folder, "
                          "--overwrite starts it over (moving its files aside); give one")
    return resume_request(args.resume, config_path, overrides + flags)


FLAG_KEYS = {"output_dir": "--output-dir", "seed": "--seed", "device": "--device"}  # flags that set a config key


def flag_overrides(args: argparse.Namespace, overrides: list[str]) -> list[str]:
    """The overrides of --output-dir, --seed and --device; a key set by both a flag and an override is refused."""
    flags = []
    for key, flag in FLAG_KEYS.items():
        value = getattr(args, key)
        if value is None or value == "":
            continue
        given = [o for o in overrides if o.partition("=")[0].strip().lstrip("-") == key]
        if given:
            raise ConfigError(f"{key} is given twice, as {given[0]!r} and as {flag} {value}; give it once")
        flags.append(f"{key}={value}")
    return flags


def resume_request(resume: str, config_path: str | None, overrides: list[str]) -> RunRequest:
    """--resume: the run's own config.yaml, with only the overrides a resumed run may change."""
    from hrsel.engine import rundir

    if resume:
        run_dir, checkpoint = rundir.resume_target(resume)
    elif config_path is None:
        raise ConfigError("--resume needs the run folder (--resume runs/NAME) or a CONFIG whose run folder "
                          "(output_dir/experiment) to continue")
    else:
        run_dir, checkpoint = rundir.resume_target(load_config(config_path, overrides).run_dir)
    saved_file = run_dir / "config.yaml"
    saved = load_config(saved_file)
    requested = load_config(config_path or saved_file, overrides)
    preflight(requested)  # typed builder options, so that `1e-3` and 0.001 compare equal
    cfg, changes = rundir.resume_config(saved, requested, run_dir=run_dir, config_file=saved_file)
    return RunRequest(cfg, checkpoint=checkpoint, changes=changes)


# ----------------------------------------------------------------------------- building

def preflight(cfg: Config) -> None:
    """The checks that need neither data nor a model: the data folder and every builder's option keys.

    Options are replaced by their typed values (e.g. `model.sigma=1` becomes 1.0).
    """
    from hrsel.engine.datagen import GENERATORS

    check_components(cfg)  # every name and nested option (model.aggregator_options.heads, ...), typed
    check_data_root(cfg)
    cfg.data.options = _builder_options("data", cfg.data.name, cfg.data.options, _dataset_builder(cfg.data.name),
                                        supplied=("split", "root"))
    cfg.model.options = _builder_options("model", cfg.model.name, cfg.model.options,
                                         _pipeline_builder(cfg.model.name), supplied=("tasks",))
    if cfg.data.generate_if_missing and cfg.data.name in GENERATORS:
        cfg.data.generate = check_builder_options("data.generate", cfg.data.name, cfg.data.generate,
                                                  GENERATORS[cfg.data.name], supplied=("root",))


@dataclass
class Splits:
    """The data of a run: train, validation (None with data.val_split=none) and test sets."""

    train: Any
    val: Any | None
    test: Any
    record: dict[str, Any]  # how the validation set was made; the run folder keeps it as validation.json
    band_norm: Any = None  # the BandNormalizer of data.band_norm (None: dtype default); saved as band_norm.json


def build_datasets(cfg: Config) -> Splits:
    """Train, validation and test sets; best.pt is selected on validation, test is evaluated once at the end."""
    splits = _build_splits(cfg)
    train = splits.train
    while not hasattr(train, "split_record") and hasattr(train, "dataset"):
        train = train.dataset  # a held-out Subset: the data set underneath
    own_rule = getattr(train, "split_record", None)  # how the data set split its files (manifest)
    if own_rule is not None:
        splits.record["data_split"] = own_rule
    return splits


def _build_splits(cfg: Config) -> Splits:
    train = open_split(cfg, cfg.data.train_split, for_eval=False)
    test = open_split(cfg, cfg.data.eval_split, for_eval=True)
    mode = validation_mode(cfg, train)
    if mode == "none":
        log.warning("data.val_split=none: best.pt is selected on the test split %r, so its test metrics are "
                    "optimistic", cfg.data.eval_split)
        return Splits(train, None, test, {"val_split": "none", "rule": f"no validation set: best.pt is selected "
                                                                        f"on the test split {cfg.data.eval_split!r}"})
    if mode == "holdout":
        return _hold_out(cfg, train, test)
    try:
        val = open_split(cfg, mode, for_eval=True)
    except DataError as e:
        raise ConfigError(f"config key 'data.val_split' = {cfg.data.val_split!r} validates on the {cfg.data.name} "
                          f"split {mode!r}, which cannot be opened: {e} Or set data.val_split=holdout to hold out "
                          f"data.val_fraction of {cfg.data.train_split!r}") from None
    return Splits(train, val, test, {"val_split": mode, "rule": f"the data set's own {mode!r} split",
                                     "size": len(val)})


BAND_NORM_FILE = "band_norm.json"  # the run's computed data.band_norm statistics (hrsel.io.bands)


def apply_band_norm(cfg: Config, splits: Splits, *, resuming: bool) -> None:
    """Resolve data.band_norm (computed ones once over training images; a resumed run reloads the run folder's
    band_norm.json) and give every split's image sources the normaliser."""
    from hrsel.data.band_norm import resolve_band_norm, with_band_norm

    saved = cfg.run_dir / BAND_NORM_FILE if resuming else None
    splits.band_norm = resolve_band_norm(cfg.data.band_norm, splits.train, saved=saved)
    splits.train, splits.val, splits.test = (with_band_norm(part, splits.band_norm)
                                             for part in (splits.train, splits.val, splits.test))


def validation_mode(cfg: Config, train: Any = None) -> str:
    """'none', 'holdout' or the split to validate on (data.val_split=auto: the data set's own -- by name, or
    the training set's `validation_split` attribute (a manifest with val rows) --, else holdout)."""
    from hrsel.data.registry import validation_split

    if cfg.data.val_split != "auto":
        return cfg.data.val_split
    return validation_split(cfg.data.name) or getattr(train, "validation_split", None) or "holdout"


def open_split(cfg: Config, split: str, *, for_eval: bool) -> Any:
    """One split of the configured data set; `for_eval` turns augmentation off where the data set has it."""
    from hrsel import data

    builder = _dataset_builder(cfg.data.name)
    options = _builder_options("data", cfg.data.name, cfg.data.options, builder, supplied=("split", "root"))
    if for_eval and builder is not None and "augment" in inspect.signature(builder).parameters:
        options = {**options, "augment": False}
    try:
        return data.build_dataset(cfg.data.name, split=split, root=cfg.data.root, **options)
    except FileNotFoundError as e:
        raise ConfigError(f"config key 'data.root' = {cfg.data.root!r}: {e}") from None


def _hold_out(cfg: Config, train: Any, test: Any) -> Splits:
    """Hold out a seeded, class-stratified data.val_fraction of the training split (un-augmented) for validation."""
    from hrsel.data.split import class_labels, holdout_indices, subset

    task, labels = class_labels(train) or (None, None)
    kept, held = holdout_indices(len(train), fraction=cfg.data.val_fraction, seed=cfg.seed, labels=labels)
    val = subset(open_split(cfg, cfg.data.train_split, for_eval=True), held)
    rule = (f"{len(held)} of the {len(train)} items of split {cfg.data.train_split!r}, stratified on "
            f"{task or 'nothing'}: per class, the items i with the smallest blake2b('{cfg.seed}:i') "
            f"(hrsel.data.split.holdout_indices, seed {cfg.seed}, fraction {cfg.data.val_fraction})")
    record = {"val_split": "holdout", "rule": rule, "of_split": cfg.data.train_split, "seed": cfg.seed,
              "fraction": cfg.data.val_fraction, "split_size": len(train), "stratified_on": task, "indices": held}
    return Splits(subset(train, kept), val, test, record)


def record_validation(splits: Splits, path: Path, *, resuming: bool, write: bool) -> None:
    """Keep how the validation set was made in `path`; a resumed run must validate on the same items."""
    if resuming and path.is_file():
        before = json.loads(path.read_text())
        if (before.get("val_split"), before.get("indices")) != (splits.record["val_split"],
                                                                splits.record.get("indices")):
            raise DataError(f"{path}: this run started with validation set <{before.get('rule')}>, the resumed "
                            f"one would use <{splits.record['rule']}>; the training data, data.val_split, "
                            f"data.val_fraction or seed changed. Restore them, or start a new run")
    if write:
        path.write_text(json.dumps(splits.record, indent=1) + "\n")


def prepare_data(cfg: Config, info: Any) -> None:
    """Rank 0 builds a missing generated data set (data.generate_if_missing); the others wait."""
    from hrsel.engine import distributed
    from hrsel.engine.datagen import needs_generation

    if cfg.data.generate_if_missing and info.is_main and needs_generation(cfg.data.name, cfg.data.root):
        generate_dataset(cfg)
    distributed.barrier(info)


def generate_dataset(cfg: Config) -> None:
    """Build the data set into data.root with its generator (Megapixel MNIST), saying where digits came from."""
    from hrsel.engine.datagen import generate_dataset as generate

    log.info("data folder %s is missing: generating %s %s", cfg.data.root, cfg.data.name, cfg.data.generate)
    note = generate(cfg.data.name, root=cfg.data.root, **cfg.data.generate)
    print(f"generated {cfg.data.name} in {cfg.data.root}: {note}", flush=True)


def build_pipeline(cfg: Config, tasks: dict) -> Any:
    from hrsel import models

    options = _builder_options("model", cfg.model.name, cfg.model.options, _pipeline_builder(cfg.model.name),
                               supplied=("tasks",))
    try:
        return models.build_pipeline(cfg.model.name, tasks=tasks, **options)
    except (ValueError, TypeError) as e:
        if isinstance(e, HrselError):
            raise
        raise ConfigError(f"model {cfg.model.name!r} rejected its options {options}: {e}") from None


def load_collate() -> Any:
    from hrsel.data.collate import collate

    return collate


def _builder_options(section: str, name: str, options: dict, builder: Any, *, supplied: tuple[str, ...]) -> dict:
    return options if builder is None else check_builder_options(section, name, options, builder, supplied=supplied)


def _pipeline_builder(name: str) -> Any:
    from hrsel import models

    registry = getattr(models, "PIPELINES", None)
    return registry.get(name) if registry is not None else None


def _dataset_builder(name: str) -> Any:
    """The class behind a data set name, for checking its options (the registry builds lazily)."""
    import importlib

    from hrsel import data

    builder = data.DATASETS.get(name)
    found = inspect.getclosurevars(builder).nonlocals
    if {"module", "attribute"} <= set(found):  # hrsel.data.registry's lazy builder
        return getattr(importlib.import_module(f"hrsel.data.{found['module']}"), found["attribute"])
    return builder


def dry_run(cfg: Config, pipeline: Any, dataset: Any, collate: Any) -> None:
    """One no-grad forward on one evaluation item: impossible sizes (K > patches, ...) fail here, not mid-epoch."""
    import torch

    batch = collate([dataset[0]])
    pipeline.eval()
    try:
        with torch.no_grad(), torch.random.fork_rng(devices=[]):
            images = batch["images"]
            if isinstance(images, torch.Tensor) and cfg.data.images_to_device:
                images = images.to(next(pipeline.parameters()).device)
            out = pipeline(images)
    except (ValueError, IndexError, RuntimeError) as e:
        if isinstance(e, SelectionError):  # K larger than the patch grid, a patch larger than the image, ...
            raise ConfigError(f"the pipeline cannot select patches of the first evaluation image with this config "
                              f"({cfg.model.name}: {_size_options(cfg)}): {e}") from None
        if isinstance(e, HrselError):
            raise
        raise ConfigError(f"the pipeline cannot process the first evaluation image with this config: {e}") from None
    finally:
        pipeline.train()
    from hrsel.models.bags import is_feature_bags

    num_patches = None if out.scores is None else out.scores.shape[-1]
    if is_feature_bags(images):  # bag lengths vary by slide; IPS keeps all of a bag shorter than M
        num_patches = None
    value = cfg.model.options.get("k")
    if num_patches is not None and isinstance(value, int) and value > num_patches:
        raise ConfigError(f"config key 'model.k' = {value} is more than the {num_patches} patches of an image of "
                          f"this data set; choose model.k <= {num_patches} or smaller patches")


def _size_options(cfg: Config) -> str:
    """The model keys that size the patch grid and the selection, as `key=value`, for a message."""
    keys = ("patch_size", "stride", "k", "num_selected", "downscale")
    return ", ".join(f"model.{k}={cfg.model.options[k]}" for k in keys if k in cfg.model.options) or "defaults"


# ----------------------------------------------------------------------------- running

def run(request: RunRequest) -> dict[str, Any]:
    """Lock the run folder, then train (the folder is written only once every check has passed)."""
    from hrsel.engine import distributed
    from hrsel.engine.logbook import setup_logging

    cfg = request.cfg
    info = distributed.init_distributed(distributed.resolve_device(cfg.device))
    device = distributed.resolve_device(cfg.device, info.local_rank)
    setup_logging(None, is_main=info.is_main)
    lock = claim_run_folder(cfg, info, mode=request.mode)
    try:
        return train(request, info, device)
    finally:
        if lock is not None:
            lock.release()


def claim_run_folder(cfg: Config, info: Any, *, mode: str) -> Any:
    """Rank 0 locks the run folder and checks that `mode` may use it; every rank gets its verdict."""
    from hrsel.engine import distributed, rundir

    lock, error = None, None
    if info.is_main:
        try:
            lock = rundir.claim_run_folder(cfg.run_dir, mode=mode)
        except RunFolderError as e:
            error = str(e)
    error = distributed.broadcast_object(error, info)
    if error is not None:
        raise RunFolderError(error)
    return lock


def train(request: RunRequest, info: Any, device: Any) -> dict[str, Any]:
    import torch

    from hrsel.engine import checkpoint, distributed
    from hrsel.engine.loop import Trainer
    from hrsel.engine.probe import decide_find_unused

    cfg, run_dir = request.cfg, request.cfg.run_dir
    state = None  # the checkpoint is read before any data work: a bad one fails in a second, not after hours
    if request.checkpoint is not None:
        state = checkpoint.load_checkpoint(request.checkpoint, require=checkpoint.TRAINING_KEYS)
    prepare_data(cfg, info)
    torch.manual_seed(cfg.seed + info.rank)
    collate = load_collate()
    splits = build_datasets(cfg)
    apply_band_norm(cfg, splits, resuming=state is not None)
    check_eval_metric(cfg, splits.train.tasks)  # the tasks are known now; nothing is trained or written yet
    record_validation(splits, run_dir / "validation.json", resuming=state is not None, write=False)
    from hrsel.models.fastpath import prepare_for_device

    pipeline = prepare_for_device(build_pipeline(cfg, splits.train.tasks), device,
                                  channels_last=cfg.train.channels_last)
    warn_batch_statistics(cfg, pipeline)
    probe_set = splits.test if splits.val is None else splits.val
    dry_run(cfg, pipeline, probe_set, collate)
    write_run_folder(request, splits, info)
    loop_cfg = decide_find_unused(cfg, pipeline, probe_set, collate, info, tasks=splits.train.tasks)
    torch.manual_seed(cfg.seed + info.rank)
    trainer = Trainer(cfg=loop_cfg, pipeline=pipeline, tasks=splits.train.tasks, train_set=splits.train,
                      val_set=splits.val, test_set=splits.test, device=device, info=info, run_dir=run_dir,
                      collate_fn=collate)
    if state is not None:
        resume_trainer(trainer, state, request.checkpoint)
    log.info("run %s: %d train / %s / %d test items, %s on %s, %d updates", run_dir, len(trainer.train_set),
             "no validation" if trainer.val_set is None else f"{len(trainer.val_set)} validation",
             len(trainer.test_set), cfg.model.name, device, trainer.total_steps)
    try:
        result = trainer.fit()
        distributed.barrier(info)  # no rank tears the group down while another still talks to it
    finally:
        trainer = pipeline = None  # DDP's reducer holds the group: free it before destroying the group
        distributed.cleanup()
    result["is_main"] = info.is_main
    return result


def warn_batch_statistics(cfg: Config, pipeline: Any) -> None:
    """A selection model with BatchNorm trained one image per batch: say that evaluation will differ."""
    from hrsel.models.norms import batch_statistics_warning

    warning = batch_statistics_warning(pipeline, batch_size=cfg.data.batch_size, model=cfg.model.name)
    if warning:
        log.warning(warning)


def write_run_folder(request: RunRequest, splits: Splits, info: Any) -> None:
    """Rank 0 writes the run folder now that every check passed: config.yaml, validation.json, train.log.

    With --overwrite the earlier run's files first move to `<run folder>.replaced-<time>/`.
    A resumed run keeps its config.yaml (and validation.json) unless a safe override changed it.
    """
    from hrsel.engine import distributed, rundir
    from hrsel.engine.checkpoint import atomic_write
    from hrsel.engine.logbook import setup_logging

    cfg, run_dir = request.cfg, request.cfg.run_dir
    moved = None
    if info.is_main:
        if request.overwrite:
            moved = rundir.move_previous_run(run_dir)
        if request.checkpoint is None or request.changes:
            text = dump_config(cfg)
            atomic_write(run_dir / "config.yaml", lambda f: f.write(text), text=True)
        validation = run_dir / "validation.json"
        record_validation(splits, validation, resuming=False, write=request.checkpoint is None
                          or not validation.is_file())
        if splits.band_norm is not None and (request.checkpoint is None or not (run_dir / BAND_NORM_FILE).is_file()):
            splits.band_norm.save(run_dir / BAND_NORM_FILE)
    distributed.barrier(info)
    setup_logging(run_dir, is_main=info.is_main)
    if moved is not None:
        log.warning("--overwrite: the previous run of %s was moved to %s", run_dir, moved)
    for change in request.changes:
        log.info("resumed with %s (a key a resumed run may change; the rest is the run's config.yaml)", change)


def resume_trainer(trainer: Any, state: dict[str, Any], path: Path) -> None:
    """Load a checkpoint into the trainer; one that does not fit the pipeline names the file."""
    try:
        trainer.resume(state)
    except (RuntimeError, KeyError, ValueError, TypeError) as e:
        first = " ".join(str(e).split())[:400] or type(e).__name__
        raise CheckpointError(f"checkpoint {str(path)!r} does not fit the pipeline built from "
                              f"{path.parent / 'config.yaml'}: {first}. It was written by another model or "
                              f"version of hrsel; resume from a checkpoint of this run, or start a new run") from None


def report(result: dict[str, Any]) -> None:
    """The summary a person reads at the end of a run (rank 0)."""
    best, last = result["best"], result.get("last")
    if best is not None:
        print(f"best.pt: epoch {best['epoch']}, step {best['step']}, {best['selected_on']} {best['metric']} "
              f"{best['value']:.4f}{_loss_text(best)}")
    if best is not None and last is not None and last["epoch"] != best["epoch"]:
        value = "n/a" if last["value"] is None else f"{last['value']:.4f}"
        print(f"last.pt: epoch {last['epoch']}, step {last['step']}, {best['selected_on']} {last['metric']} "
              f"{value}{_loss_text(last)}")
    for warning in result.get("warnings", ()):
        print(f"warning: {warning}")
    print(f"test split, evaluated once with {result['test_weights']}:")
    for key, value in result["metrics"].items():
        print(f"test {key}: {value:.4f}")
    kind = "GPU memory allocated" if result["device"].startswith("cuda") else "resident memory of the process"
    print(f"peak memory: {result['peak_memory_mb']:.0f} MB ({kind})")
    print(f"pictures: {result['pictures']}")
    print(f"run directory (config, checkpoints, metrics.csv, test_metrics.json, tensorboard): {result['run_dir']}")


def _loss_text(summary: dict[str, Any]) -> str:
    return "" if summary.get("loss") is None else f" (loss {summary['loss']:.4f})"


def main(argv: list[str] | None = None) -> int:
    from hrsel.cli import run_command

    args = parse_args(argv)
    return run_command(lambda: train_command(args))


def train_command(args: argparse.Namespace) -> int:
    request = resolve_config(args)
    from hrsel.engine.distributed import check_device

    preflight(request.cfg)  # builder options and the data folder: no data read, nothing written
    check_device(request.cfg.device)
    if args.print_config:
        print(dump_config(request.cfg), end="")
        return 0
    result = run(request)
    if result["is_main"]:
        report(result)
    return 0

if __name__ == "__main__":
    sys.exit(main())

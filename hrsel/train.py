"""Train a pipeline from a YAML config.

    python -m hrsel.train configs/demo.yaml
    python -m hrsel.train configs/mnist.yaml optim.lr=3e-4 train.epochs=10 --device cuda
    python -m hrsel.train configs/mnist.yaml --resume            # continue runs/mnist from last.pt
    torchrun --nproc_per_node 4 -m hrsel.train configs/camelyon16.yaml

A bad config (unknown key, wrong type, impossible value, missing data folder)
stops before any work with exit status 2 and a message naming the key.
"""
from __future__ import annotations

import argparse
import inspect
import logging
import sys
from pathlib import Path
from typing import Any

from hrsel.config import Config, check_builder_options, check_data_root, dump_config, load_config, save_config
from hrsel.errors import ConfigError, DataError, HrselError

log = logging.getLogger("hrsel.train")

EXIT_CONFIG = 2


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m hrsel.train", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter,
                                epilog="overrides: dotted keys, typed like the YAML value, e.g. optim.lr=3e-4 "
                                       "data.batch_size=8 model.num_selected=50")
    p.add_argument("args", nargs="*", metavar="CONFIG [key.sub=value ...]")
    p.add_argument("--print-config", action="store_true", help="print the resolved config and exit")
    p.add_argument("--resume", nargs="?", const="", default=None, metavar="RUN_DIR",
                   help="continue from RUN_DIR/last.pt (default: the config's run directory)")
    p.add_argument("--output-dir", help="parent of the run directory (config key output_dir)")
    p.add_argument("--seed", type=int, help="config key seed")
    p.add_argument("--device", help="auto, cpu, cuda, cuda:1 ... (config key device)")
    args = p.parse_intermixed_args(argv)
    if args.resume and ("=" in args.resume or args.resume.endswith((".yaml", ".yml"))):
        args.args.append(args.resume)  # `--resume key=value`: the flag took an override, not a folder
        args.resume = ""
    return args


def resolve_config(args: argparse.Namespace) -> tuple[Config, Path | None]:
    """CONFIG + overrides + flags -> validated Config, and the run folder to resume (or None)."""
    config_path = next((a for a in args.args if "=" not in a), None)
    overrides = [a for a in args.args if "=" in a]
    extra = [a for a in args.args if "=" not in a and a != config_path]
    if extra:
        raise ConfigError(f"unexpected arguments {extra}; give one CONFIG file, then key.sub=value overrides")
    resume = None if args.resume is None else Path(args.resume) if args.resume else None
    if config_path is None:
        if resume is None:
            raise ConfigError("no CONFIG given; usage: python -m hrsel.train configs/demo.yaml [key=value ...]")
        config_path = str(resume / "config.yaml")
    flags = [f"output_dir={args.output_dir}"] if args.output_dir else []
    flags += [f"seed={args.seed}"] if args.seed is not None else []
    flags += [f"device={args.device}"] if args.device else []
    cfg = load_config(config_path, overrides + flags)
    if resume is not None:  # the run folder given to --resume is the run directory
        cfg.output_dir, cfg.experiment = str(resume.parent), resume.name
    return cfg, (cfg.run_dir if args.resume is not None else None)


# ----------------------------------------------------------------------------- building

def preflight(cfg: Config) -> None:
    """The checks that need neither data nor a model: the data folder and every builder's option keys.

    Options are replaced by their typed values (e.g. `model.sigma=1` becomes 1.0).
    """
    from hrsel.engine.datagen import GENERATORS

    check_data_root(cfg)
    cfg.data.options = _builder_options("data", cfg.data.name, cfg.data.options, _dataset_builder(cfg.data.name),
                                        supplied=("split", "root"))
    cfg.model.options = _builder_options("model", cfg.model.name, cfg.model.options,
                                         _pipeline_builder(cfg.model.name), supplied=("tasks",))
    if cfg.data.generate_if_missing and cfg.data.name in GENERATORS:
        cfg.data.generate = check_builder_options("data.generate", cfg.data.name, cfg.data.generate,
                                                  GENERATORS[cfg.data.name], supplied=("root",))


def build_datasets(cfg: Config) -> tuple[Any, Any]:
    from hrsel import data

    options = _builder_options("data", cfg.data.name, cfg.data.options, _dataset_builder(cfg.data.name),
                               supplied=("split", "root"))
    try:
        train = data.build_dataset(cfg.data.name, split=cfg.data.train_split, root=cfg.data.root, **options)
        test = data.build_dataset(cfg.data.name, split=cfg.data.eval_split, root=cfg.data.root, **options)
    except FileNotFoundError as e:
        raise ConfigError(f"config key 'data.root' = {cfg.data.root!r}: {e}") from None
    return train, test


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
    """One no-grad forward on one test item: impossible sizes (K > patches, ...) fail here, not mid-epoch."""
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
        if isinstance(e, HrselError):
            raise
        raise ConfigError(f"the pipeline cannot process the first test image with this config: {e}") from None
    finally:
        pipeline.train()
    num_patches = None if out.scores is None else out.scores.shape[-1]
    for key in ("k", "num_selected"):
        value = cfg.model.options.get(key)
        if num_patches is not None and isinstance(value, int) and value > num_patches:
            raise ConfigError(f"config key 'model.{key}' = {value} is more than the {num_patches} patches of "
                              f"an image of this data set; choose model.{key} <= {num_patches} or smaller patches")


# ----------------------------------------------------------------------------- running

def run(cfg: Config, resume_dir: Path | None) -> dict[str, Any]:
    import torch

    from hrsel.engine import checkpoint, distributed
    from hrsel.engine.logbook import setup_logging
    from hrsel.engine.loop import Trainer

    preflight(cfg)
    device = distributed.resolve_device(cfg.device)
    info = distributed.init_distributed(device)
    device = distributed.resolve_device(cfg.device, info.local_rank)
    run_dir = cfg.run_dir
    if info.is_main:
        run_dir.mkdir(parents=True, exist_ok=True)
        save_config(cfg, run_dir / "config.yaml")
    distributed.barrier(info)
    setup_logging(run_dir, is_main=info.is_main)
    prepare_data(cfg, info)
    torch.manual_seed(cfg.seed + info.rank)
    collate = load_collate()
    train_set, eval_set = build_datasets(cfg)
    pipeline = build_pipeline(cfg, train_set.tasks).to(device)
    dry_run(cfg, pipeline, eval_set, collate)
    torch.manual_seed(cfg.seed + info.rank)
    trainer = Trainer(cfg=cfg, pipeline=pipeline, tasks=train_set.tasks, train_set=train_set, eval_set=eval_set,
                      device=device, info=info, run_dir=run_dir, collate_fn=collate)
    if resume_dir is not None:
        trainer.resume(checkpoint.load_checkpoint(resume_dir))
    log.info("run %s: %d train / %d test items, %s on %s, %d updates", run_dir, len(trainer.train_set),
             len(trainer.eval_set), cfg.model.name, device, trainer.total_steps)
    try:
        result = trainer.fit()
        distributed.barrier(info)  # no rank tears the group down while another still talks to it
    finally:
        trainer = pipeline = None  # DDP's reducer holds the group: free it before destroying the group
        distributed.cleanup()
    result["is_main"] = info.is_main
    return result


def report(result: dict[str, Any]) -> None:
    """The summary a person reads at the end of a run (rank 0)."""
    for key, value in result["metrics"].items():
        print(f"test {key}: {value:.4f}")
    kind = "GPU memory allocated" if result["device"].startswith("cuda") else "resident memory of the process"
    print(f"peak memory: {result['peak_memory_mb']:.0f} MB ({kind})")
    print(f"pictures: {result['pictures']}")
    print(f"run directory (config, checkpoints, metrics.csv, tensorboard): {result['run_dir']}")


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        cfg, resume_dir = resolve_config(args)
        if args.print_config:
            print(dump_config(cfg), end="")
            return 0
        result = run(cfg, resume_dir)
    except (ConfigError, DataError) as e:
        print(f"error: {e}", file=sys.stderr)
        return EXIT_CONFIG
    except HrselError as e:
        print(f"error: {e}", file=sys.stderr)
        signum = getattr(e, "signum", 0)
        return 128 + signum if signum else 1
    if result["is_main"]:
        report(result)
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Load a trained pipeline from a run folder or a checkpoint file, ready for inference.

    model = load_model("runs/mnist")                         # best.pt of the run, on the CPU, in eval mode
    model = load_model("runs/mnist", checkpoint="last", device="cuda")
    model = load_model("runs/mnist/best.pt")
    result = model.predict("slide.svs")                      # the run's preprocessing, then the pipeline
    result.probabilities["label"], result.predicted["label"]  # = hrsel.predict's row for that image

`model.predict` takes a path (an image, or an .h5 feature cache), an `ImageSource` or an array
and applies what the run's data set did before the pipeline (`hrsel.inference.preprocess`): the
level at `data.target_mpp`, `data.band_norm`, the `data.tissue` mask. `model.pipeline` is the bare
network: it takes images already prepared that way (`image, tissue = model.prepare(path)`, then
`model.pipeline([image], tissue=[tissue])` for a run with data.tissue, else `model.pipeline([image])`);
given a slide's level 0 it silently scores other pixels than the run was trained on.

A checkpoint written by the trainer carries what it needs to be rebuilt on its own: the resolved
config (a plain dict), the task specs, the class names and the hrsel version. It is read with
torch.load(weights_only=True): nothing but tensors, numbers, strings and plain containers is
unpickled, so a checkpoint from elsewhere cannot run code. A corrupt file, a run folder without
the checkpoint asked for, or a checkpoint of another library raises `CheckpointError` naming the
file (or what the folder holds) and the fix.
"""
from __future__ import annotations

import logging
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from hrsel.config import Config, from_dict, validate
from hrsel.errors import CheckpointError, ConfigError
from hrsel.models.fastpath import prepare_for_device
from hrsel.tasks import TaskSpec

log = logging.getLogger(__name__)

__all__ = ["LoadedModel", "load_model", "resolve_checkpoint"]

NAMED = {"best": "best.pt", "last": "last.pt"}
CARRIED = ("model", "config", "tasks")  # what a checkpoint needs to be loaded without its run folder


@dataclass
class LoadedModel:
    """A trained pipeline (eval mode, on `device`) and what it predicts."""

    pipeline: torch.nn.Module
    tasks: dict[str, TaskSpec]
    class_names: dict[str, list[str]]  # task -> one name per class (binary: the negative and the positive)
    config: Config
    checkpoint_path: Path
    hrsel_version: str
    train_state: dict[str, Any] = field(default_factory=dict)  # step, epoch, best... of the checkpoint

    @property
    def device(self) -> torch.device:
        first = next(iter(self.pipeline.parameters()), None)
        return first.device if first is not None else torch.device("cpu")

    def predict(self, image: Any, *, tissue_cache: str | os.PathLike | None = None) -> Any:
        """Predict one image as `hrsel.predict` does (the run's preprocessing, eval mode, no grad, the
        trainer's seed): an `hrsel.inference.predict.ImagePrediction` with the probabilities and the predicted
        class of every task, the pipeline's output and the image as it read it. `image`: a path (an image file
        or an .h5 feature cache), an `ImageSource` or an array. `tissue_cache`: a folder to keep the tissue
        masks of a run with data.tissue in (None: computed each call)."""
        from hrsel.inference.predict import predict_image

        return predict_image(self, image, tissue_folder=tissue_cache)

    def prepare(self, image: Any) -> tuple[Any, Any]:
        """(the image as the run's pipeline expects it, its tissue mask or None): `image` (a path, an
        `ImageSource` or an array) at the run's data.target_mpp, with its data.band_norm, and the data.tissue
        mask; `self.pipeline([image], tissue=[mask])` then scores what training scored."""
        from hrsel.inference.preprocess import RunPreprocessing

        return RunPreprocessing.of(self).image(image)


def resolve_checkpoint(path: str | os.PathLike, checkpoint: str = "best") -> Path:
    """The checkpoint file meant by `path` (a run folder or a file) and `checkpoint` ("best", "last" or a path).

    A run folder without it raises `CheckpointError` listing what the folder holds.
    """
    path = Path(path)
    if path.is_file():
        return path
    if not path.exists():
        raise CheckpointError(f"{str(path)!r} does not exist; give a run folder (output_dir/experiment, e.g. "
                              f"runs/mnist) or a checkpoint file in one (runs/mnist/best.pt)")
    if not path.is_dir():
        raise CheckpointError(f"{str(path)!r} is neither a run folder nor a checkpoint file")
    name = NAMED.get(checkpoint, checkpoint)
    candidate = Path(name) if Path(name).is_absolute() else path / name
    if candidate.is_file():
        return candidate
    if Path(name).is_file():  # a path relative to the working folder
        return Path(name)
    held = sorted(p.name + ("/" if p.is_dir() else "") for p in path.iterdir())
    listing = ", ".join(held[:20]) + (f" and {len(held) - 20} more" if len(held) > 20 else "") if held else "nothing"
    checkpoints = sorted(p.name for p in path.glob("*.pt"))
    if checkpoints:
        fix = (f"choose one it holds: checkpoint={Path(checkpoints[0]).stem!r} "
               f"(--checkpoint {Path(checkpoints[0]).stem})")
        if name == NAMED["best"] and "last.pt" in checkpoints:
            fix += ("; a run writes best.pt at its first evaluation with a finite validation metric, so this run "
                    "ended (or was stopped) before one")
    else:
        fix = ("it holds no checkpoint: the run stopped before its first checkpoint, or this is not a run folder "
               "(run folders are output_dir/experiment, e.g. runs/mnist, and hold config.yaml, last.pt, best.pt)")
    raise CheckpointError(f"run folder {str(path)!r} has no {name} (it holds: {listing}); {fix}")


def load_model(path: str | os.PathLike, *, checkpoint: str = "best", device: str = "cpu") -> LoadedModel:
    """Rebuild the pipeline of a run folder's checkpoint (or of a checkpoint file) in eval mode on `device`.

    `checkpoint`: "best" (best.pt: selected on validation), "last" (last.pt) or a file name / path;
    ignored when `path` is a file.
    """
    from hrsel.engine.checkpoint import load_checkpoint

    file = resolve_checkpoint(path, checkpoint)
    state = load_checkpoint(file, resuming=False)
    if not isinstance(state, dict) or "model" not in state:
        held = sorted(map(str, state))[:8] if isinstance(state, dict) else type(state).__name__
        raise CheckpointError(f"checkpoint {str(file)!r} is not a hrsel checkpoint: it holds {held}, not the "
                              f"'model', 'config' and 'tasks' the trainer writes (a checkpoint of another library "
                              f"or a bare state_dict?). Give a checkpoint of a hrsel run (runs/NAME/best.pt)")
    missing = [k for k in CARRIED if k not in state]
    if missing:
        raise CheckpointError(f"checkpoint {str(file)!r} lacks {', '.join(missing)}: it was written by a hrsel "
                              f"before checkpoints carried their config and tasks (it holds "
                              f"{sorted(map(str, state))[:10]}). Train the run again with this hrsel")
    cfg = _config(state["config"], file)
    tasks = _tasks(state["tasks"], file)
    class_names = {t: list(v) for t, v in (state.get("class_names") or {}).items()}
    for name, spec in tasks.items():
        class_names.setdefault(name, [str(i) for i in range(max(spec.num_classes, 2 if spec.kind == "binary"
                                                                else 1))])
    target = _device(device)
    pipeline = _build(cfg, tasks, file)
    try:
        pipeline.load_state_dict(state["model"])
    except (RuntimeError, KeyError, ValueError, TypeError) as e:
        first = " ".join(str(e).split())[:400] or type(e).__name__
        raise CheckpointError(f"checkpoint {str(file)!r}: its weights do not fit the {cfg.model.name!r} pipeline "
                              f"built from its own config: {first}. It was written by another version of hrsel "
                              f"({state.get('hrsel_version', 'unknown')}); load it with that version") from None
    prepare_for_device(pipeline, target, channels_last=cfg.train.channels_last).eval()
    train_state = dict(state.get("train_state") or {})
    set_progress = getattr(pipeline, "set_progress", None)
    if callable(set_progress) and "step" in train_state:  # e.g. DPS's sigma schedule at the checkpoint's step
        set_progress(int(train_state["step"]), max(int(state.get("total_steps") or 1), 1))
    version = str(state.get("hrsel_version", "unknown"))
    log.info("loaded %s (%s, step %s, hrsel %s) on %s", file, cfg.model.name, train_state.get("step", "?"),
             version, target)
    return LoadedModel(pipeline=pipeline, tasks=tasks, class_names=class_names, config=cfg,
                       checkpoint_path=file, hrsel_version=version, train_state=train_state)


def _config(raw: Any, file: Path) -> Config:
    if not isinstance(raw, dict):
        raise CheckpointError(f"checkpoint {str(file)!r}: its 'config' is a {type(raw).__name__}, not the mapping "
                              f"the trainer writes; the file is not a hrsel checkpoint")
    try:
        cfg = from_dict(raw)
        validate(cfg)
    except ConfigError as e:
        raise CheckpointError(f"checkpoint {str(file)!r} carries a config this hrsel does not accept: {e} "
                              f"(it was written by another version of hrsel; load it with that version)") from None
    return cfg


def _tasks(raw: Any, file: Path) -> dict[str, TaskSpec]:
    try:
        return {str(name): TaskSpec(str(spec["kind"]), int(spec["num_classes"])) for name, spec in raw.items()}
    except (AttributeError, KeyError, TypeError, ValueError) as e:
        raise CheckpointError(f"checkpoint {str(file)!r}: its 'tasks' ({raw!r:.200}) are not "
                              f"{{name: {{kind, num_classes}}}} as the trainer writes: {e}") from None


def _device(device: str | torch.device) -> torch.device:
    from hrsel.engine.distributed import check_device, resolve_device

    check_device(str(device))  # ConfigError naming the device and what this machine has
    return resolve_device(str(device))


_INITIAL_WEIGHTS = ("classifier_checkpoint", "policy_checkpoint")  # PatchDrop's chained runs


def _without_initial_weights(cfg: Config) -> Config:
    """The config without the files its run started from (local weights, earlier runs): the checkpoint's
    weights replace them, and they may not exist where the model is loaded."""
    import copy

    cfg = copy.deepcopy(cfg)
    options = cfg.model.options
    for key in _INITIAL_WEIGHTS:
        options.pop(key, None)
    for key, value in options.items():
        if key.endswith("_options") and isinstance(value, dict):
            value.pop("weights_path", None)
    return cfg


def _build(cfg: Config, tasks: dict[str, TaskSpec], file: Path) -> torch.nn.Module:
    """The pipeline of the config; its initial weights are overwritten, so building draws from a private RNG."""
    from hrsel.train import build_pipeline

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(cfg.seed)
        try:
            return build_pipeline(_without_initial_weights(cfg), tasks)
        except ConfigError as e:
            raise CheckpointError(f"checkpoint {str(file)!r}: the pipeline of its config cannot be built by this "
                                  f"hrsel: {e}") from None

"""Every configs/*.yaml builds, trains one step and evaluates, through `hrsel.train.main`.

Each config runs on tiny data written in its data set's exact on-disk format
(fixtures_data.py). The overrides only shrink what a CPU test must: the data folder,
item counts, batch sizes, one update, one picture, and the sizes that tie the model to
the image (patch size, K (IPS's M), I, positional table); every other model option is the config's,
so the real architecture is what gets built. A new config is covered automatically.
"""
from __future__ import annotations

import csv
import inspect
import math
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import pytest
import torch

from hrsel.config import Config, load_config
from hrsel.train import main

from fixtures_data import (make_billiard, make_camelyon, make_camelyon_features, make_cub, make_manifest,
                           make_megapixel_mnist, make_traffic)
from toy_bright import one_torch_thread  # noqa: F401 (autouse fixture)

REPO = Path(__file__).resolve().parents[1]
CONFIGS = sorted((REPO / "configs").glob("*.yaml"))  # the experiments; their bases live in configs/base/
ITEMS = 2  # training and test items, and the batch size: one update, one evaluation batch


@dataclass(frozen=True)
class Tiny:
    """How a data set is made tiny: its writer, the data overrides, the image it yields, model size caps."""

    write: Callable[[Path], Path]  # writes the data set under a folder, returns data.root
    data: tuple[str, ...] = ()  # data overrides that shrink the images
    image_hw: tuple[int, int] | None = None  # (height, width) the pipeline sees; None: feature bags
    caps: dict[str, int] = field(default_factory=dict)  # model option -> largest value that fits


TINY = {
    "megapixel_mnist": Tiny(make_megapixel_mnist, (), (140, 140),  # the generator's canvas
                            {"patch_size": 28, "stride": 28, "k": 8, "score_chunk": 8}),
    # 960x1280 JPEGs on disk (the format checks it), resized by the data set's own image_size option
    "traffic": Tiny(make_traffic, ("data.image_size=[192, 256]",), (192, 256), {"patch_size": 20}),
    "billiard": Tiny(make_billiard, ("data.image_size=[160, 160]", "data.padded_size=176"), (160, 160),
                     {"patch_size": 20}),
    "cub200": Tiny(make_cub, ("data.resize=80", "data.crop=64"), (64, 64), {"patch_size": 32}),
    "camelyon16": Tiny(make_camelyon, ("data.patch_size=64",), None, {"patch_size": 64}),
    "features": Tiny(make_camelyon_features, (), None, {"k": 4, "score_chunk": 4}),
    "camelyon16_features": Tiny(make_camelyon_features, (), None, {"k": 4, "score_chunk": 4}),
    # 256x256 JPEG TIFF pyramids at 0.25 um/px: target_mpp 0.5 reads their 128x128 level 1
    "manifest": Tiny(make_manifest, (), (128, 128), {"patch_size": 32, "k": 4, "score_chunk": 8}),
}
SHRUNK_MODEL_KEYS = {"patch_size", "stride", "k", "score_chunk", "num_positions"}


@pytest.fixture(scope="module")
def data_root(tmp_path_factory):
    """data set name -> its tiny data folder, written once per module."""
    roots: dict[str, Path] = {}

    def root_of(name: str) -> Path:
        if name not in roots:
            roots[name] = TINY[name].write(tmp_path_factory.mktemp(name))
        return roots[name]

    return root_of


def score_cells(pipeline: str, model: dict, image_hw: tuple[int, int]) -> int:
    """Cells of the pipeline's grid on the tiny image: the scorer's map (DPS, ATS) or the regular grid."""
    from hrsel.models import build
    from hrsel.models.scorers import build_scorer
    from hrsel.select.extract import GridGeometry

    params = inspect.signature(build.PIPELINES.get(pipeline)).parameters.values()
    opts = {**{p.name: p.default for p in params}, **model}  # the pipeline's defaults, then the config's
    if pipeline in ("dps", "ats"):
        chans = opts["in_chans"] + 2 * bool(opts.get("coord_channels"))
        scorer = build_scorer(opts["scorer"], in_chans=chans, **(opts["scorer_options"] or {}))
        h, w = (side // opts["downscale"] for side in image_hw)
        return scorer(torch.zeros(1, chans, h, w)).shape[1:].numel()
    return GridGeometry.regular(image_hw, patch_size=opts["patch_size"], stride=opts.get("stride")).num_patches


def tiny_overrides(cfg: Config, root: Path) -> list[str]:
    tiny = TINY[cfg.data.name]
    out = [f"data.root={root}", f"data.limit_train={ITEMS}", f"data.limit_eval={ITEMS}",
           f"data.batch_size={ITEMS}", f"data.eval_batch_size={ITEMS}", "data.num_workers=0",
           "train.epochs=1", "train.max_steps=1", "train.progress_bar=false", *tiny.data]
    if cfg.eval.pictures > 1:
        out.append("eval.pictures=1")
    model = dict(cfg.model.options)
    for key, cap in tiny.caps.items():
        if isinstance(model.get(key), int) and model[key] > cap:
            model[key] = cap
            out.append(f"model.{key}={cap}")
    if model.get("num_positions") and tiny.image_hw is not None:
        out.append(f"model.num_positions={score_cells(cfg.model.name, model, tiny.image_hw)}")
    return out


def warm_start_override(cfg: Config, folder: Path) -> list[str]:
    """A config whose backbone starts from a warm start (configs/demo.yaml, built by hrsel.demo): a
    2-step one of the same network written here, and the override that points the config at it."""
    from hrsel.data.digits import rendered_pools
    from hrsel.engine.warm_start import warm_start_digits

    model = cfg.model.options
    if not (model.get("backbone_options") or {}).get("weights_path"):
        return []
    path = folder / "warm_start.pt"
    warm_start_digits(path, backbone=model["backbone"], backbone_options=model["backbone_options"],
                      in_chans=model.get("in_chans", 1), patch_size=28, steps=2, batch_size=4,
                      digits=rendered_pools(train_per_class=2, test_per_class=1))
    return [f"model.backbone_options.weights_path={path}"]


def test_configs_are_found():
    assert CONFIGS, f"no configs in {REPO / 'configs'}"


@pytest.mark.parametrize("config", CONFIGS, ids=lambda p: p.stem)
def test_config_trains_one_step_and_evaluates(config, data_root, tmp_path, capsys):
    cfg = load_config(config)
    assert cfg.data.name in TINY, f"{config.name}: no tiny writer for data set {cfg.data.name!r} in TINY"
    assert cfg.eval.metric, f"{config.name}: name the paper's metric in eval.metric"
    overrides = tiny_overrides(cfg, data_root(cfg.data.name))
    warm = warm_start_override(cfg, tmp_path)
    code = main([str(config), *overrides, *warm, f"--output-dir={tmp_path}", "--device=cpu"])
    err = capsys.readouterr().err
    assert code == 0, f"{config.name} with {overrides} exited {code}:\n{err[-3000:]}"

    run = tmp_path / cfg.experiment
    state = torch.load(run / "last.pt", weights_only=False)
    assert state["train_state"]["step"] == 1
    with open(run / "metrics.csv", newline="") as f:
        row = list(csv.DictReader(f))[-1]
    assert math.isfinite(float(row[f"test/{cfg.eval.metric}"])), row
    ran = load_config(run / "config.yaml")
    changed = {k for k in cfg.model.options if ran.model.options.get(k) != cfg.model.options[k]}
    if warm:  # the warm start's file, nothing else of the backbone
        changed.discard("backbone_options")
        ran.model.options["backbone_options"]["weights_path"] = cfg.model.options["backbone_options"]["weights_path"]
        assert ran.model.options["backbone_options"] == cfg.model.options["backbone_options"]
    assert changed <= SHRUNK_MODEL_KEYS and ran.model.name == cfg.model.name, changed
    shutil.rmtree(run)  # checkpoints of the full-size models: ~300 MB a config, 7 GB a session otherwise

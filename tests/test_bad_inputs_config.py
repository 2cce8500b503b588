"""Bad configs: every typo, unknown name and impossible value is named, with the closest valid key, before any work.

Three routes: `load_config` (the schema's own keys), `preflight` (names, builder options and
the nested `*_options`, against the keywords of what they build) and the command line, which
must exit with status 2, print the key and leave the disk as it was.
"""
from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from hrsel.config import load_config
from hrsel.config.checks import all_metric_names, check_eval_metric, metric_names
from hrsel.errors import ConfigError
from hrsel.tasks import TaskSpec
from hrsel.train import main, preflight

MNIST_TASKS = {"majority": TaskSpec("multiclass", 10), "multi": TaskSpec("multilabel", 10)}


@pytest.fixture
def config_file(tmp_path: Path) -> Path:
    """A valid config: IPS on Megapixel MNIST in an (empty) data folder; runs go to tmp_path/runs."""
    (tmp_path / "data").mkdir()
    path = tmp_path / "exp.yaml"
    path.write_text(yaml.safe_dump({
        "experiment": "exp", "output_dir": str(tmp_path / "runs"),
        "data": {"name": "megapixel_mnist", "root": str(tmp_path / "data"), "batch_size": 4},
        "model": {"name": "ips"}, "train": {"epochs": 1},
    }))
    return path


def _error(config_file: Path, overrides: list[str]) -> str:
    """The ConfigError that load_config + preflight raise for these overrides (fails when none is raised)."""
    with pytest.raises(ConfigError) as err:
        preflight(load_config(config_file, overrides))
    return str(err.value)


def test_the_base_config_passes_preflight(config_file):
    cfg = load_config(config_file, ["model.aggregator_options={heads: 4, dropout: 0}", "eval.metric=multi/auc"])
    preflight(cfg)
    assert cfg.model.options["aggregator_options"] == {"heads": 4, "dropout": 0.0}  # typed: int -> float


# ----------------------------------------------------------------------------- misspelt keys, every section

@pytest.mark.parametrize("override, closest", [
    ("optim.learnig_rate=0.1", "optim.lr"),
    ("optim.learning_rate=0.1", "optim.lr"),
    ("optim.weight_decy=0.1", "optim.weight_decay"),
    ("optim.momentun=0.8", "optim.momentum"),
    ("optim.sheduler=cosine", "optim.schedule"),
    ("optim.clip_grad_norm=1.0", "optim.clip_norm"),
    ("optim.lr_min=0.1", "optim.min_lr_ratio"),
    ("train.epocs=3", "train.epochs"),
    ("train.gradient_accumulation=2", "train.grad_accum"),
    ("train.presicion=bf16", "train.precision"),
    ("train.checkpoint_every_n=5", "train.checkpoint_every"),
    ("train.lr=0.1", "optim.lr"),  # the right leaf in another section
    ("eval.metrc=majority/accuracy", "eval.metric"),
    ("eval.batch_size=4", "data.batch_size"),
    ("seeed=1", "seed"),
    ("experment=x", "experiment"),
    ("devcie=cpu", "device"),
    ("output_directory=x", "output_dir"),
    ("optimizer=sgd", "optim.name"),
    # data and model take free keys: they are checked against the data set / pipeline, with the
    # section's own keys in the running for "did you mean"
    ("data.bach_size=3", "data.batch_size"),
    ("data.num_worker=2", "data.num_workers"),
    ("data.val_spilt=holdout", "data.val_split"),
    ("data.taks=[majority]", "data.tasks"),
    ("model.num_selectd=5", "model.k"),  # the old name of model.k, misspelt
    ("model.aggregator_options.headz=3", "model.aggregator_options.heads"),
    ("model.backbone_options.last_stge=layer2", "model.backbone_options.last_stage"),
    ("data.generate.n_trian=10", "data.generate.n_train"),
])
def test_misspelt_key_names_the_closest_valid_key(config_file, override, closest):
    extra = ["data.generate_if_missing=true"] if override.startswith("data.generate.") else []
    message = _error(config_file, [override, *extra])
    key = override.partition("=")[0]
    assert f"unknown config key {key!r}" in message
    assert f"Did you mean {closest!r}?" in message


@pytest.mark.parametrize("text, key, closest", [
    ("optim:\n  learnig_rate: 0.1\n", "optim.learnig_rate", "optim.lr"),
    ("data:\n  bach_size: 3\n", "data.bach_size", "data.batch_size"),
])
def test_misspelt_yaml_key_names_the_closest_valid_key(config_file, text, key, closest):
    raw = yaml.safe_load(config_file.read_text())
    for section, values in yaml.safe_load(text).items():
        raw.setdefault(section, {}).update(values)
    config_file.write_text(yaml.safe_dump(raw))
    message = _error(config_file, [])
    assert key in message and f"Did you mean {closest!r}?" in message


# ----------------------------------------------------------------------------- nested options

@pytest.mark.parametrize("overrides, words", [
    (["model.name=dps", "model.aggregator=transformer", "model.aggregator_options={deph: 2}"],
     ["'model.aggregator_options.deph'", "'transformer'", "Did you mean 'model.aggregator_options.depth'"]),
    (["model.name=dps", "model.scorer_options={widht: [4, 8, 16]}"],
     ["'model.scorer_options.widht'", "Did you mean 'model.scorer_options.widths'"]),
    (["model.name=patchdrop", "model.policy=se", "model.policy_options={reduce: 2}"],
     ["'model.policy_options.reduce'", "Did you mean 'model.policy_options.reduction'"]),
    (["model.name=cnn", "model.backbone=narrow_resnet", "model.backbone_options={widht: 8}"],
     ["'model.backbone_options.widht'", "Did you mean 'model.backbone_options.width'"]),
    (["model.backbone_options={in_chans: 1}"], ["'model.backbone_options.in_chans'", "filled in by hrsel"]),
    (["model.aggregator_options={in_dim: 8}"], ["'model.aggregator_options.in_dim'", "filled in by hrsel"]),
    (["model.backbone_options={arch: resnet50}"], ["'model.backbone_options.arch'", "filled in by hrsel"]),
    (["model.name=ats", "model.aggregator_options={heads: 2}"],  # ATS has no aggregator at all
     ["'model.aggregator_options'", "'ats'"]),
], ids=["transformer-depth", "scorer-widths", "policy-reduction", "narrow-width", "backbone-in_chans",
        "aggregator-in_dim", "resnet-arch", "ats-no-aggregator"])
def test_nested_option_is_checked_against_the_part_it_builds(config_file, overrides, words):
    message = _error(config_file, overrides)
    for word in words:
        assert word in message, message


# ----------------------------------------------------------------------------- unknown names

@pytest.mark.parametrize("overrides, key, names", [
    (["data.name=mnst"], "data.name", "megapixel_mnist"),
    (["model.name=ipss"], "model.name", "dps_candidates"),
    (["model.backbone=resnt18"], "model.backbone", "narrow_resnet"),
    (["model.name=dps", "model.aggregator=tranformer"], "model.aggregator", "transformer"),
    (["model.name=dps", "model.scorer=dpss"], "model.scorer", "resnet_stem"),
    (["model.name=patchdrop", "model.policy=policy_net"], "model.policy", "resnet_stem"),
    (["data.name=traffic", "data.generate_if_missing=true"], "data.generate_if_missing", "megapixel_mnist"),
    (["data.generate_if_missing=true", "data.generate={digits: emnist}"], "data.generate.digits", "rendered"),
])
def test_unknown_name_lists_the_valid_ones(config_file, overrides, key, names):
    message = _error(config_file, overrides)
    assert repr(key) in message and names in message, message


# ----------------------------------------------------------------------------- impossible values

@pytest.mark.parametrize("overrides, key, words", [
    (["data.batch_size=0"], "data.batch_size", "> 0"),
    (["model.k=0"], "model.k", "> 0"),
    (["model.name=dps", "model.k=-2"], "model.k", "> 0"),
    (["model.aggregator_options={heads: 0}"], "model.aggregator_options.heads", "> 0"),
    (["model.name=cnn", "model.backbone=narrow_resnet", "model.backbone_options={strides: [1, 0]}"],
     "model.backbone_options.strides[1]", "> 0"),
    (["data.generate_if_missing=true", "data.generate={width: 0}"], "data.generate.width", "> 0"),
    (["model.aggregator_options={dropout: 1.5}"], "model.aggregator_options.dropout", "[0, 1]"),
    (["model.name=dps", "model.feature_dropout=-0.1"], "model.feature_dropout", "[0, 1]"),
    (["model.name=patchdrop", "model.alpha=2"], "model.alpha", "[0, 1]"),
    (["data.val_fraction=1.5"], "data.val_fraction", "(0, 1)"),
    (["optim.betas=[0.9, 1.2]"], "optim.betas", "[0, 1)"),
    (["optim.momentum=2"], "optim.momentum", "[0, 1]"),
    (["train.task_weights={majority: -1}"], "train.task_weights.majority", ">= 0"),
    (["optim.betas=[0.9]"], "optim.betas", "two numbers"),
    (["model.name=dps", "model.scorer_options={widths: [8, 16]}"], "model.scorer_options.widths", "3 items"),
    (["data.name=traffic", "data.image_size=[1200]"], "data.image_size", "2 items"),
    (["model.aggregator_options={heads: eight}"], "model.aggregator_options.heads", "expects int"),
    (["model.backbone_options=5"], "model.backbone_options", "mapping"),
    (["model.patch_size=big"], "model.patch_size", "expects int"),
    (["model.head_hidden=2.5"], "model.head_hidden", "expects int"),
    (["model.backbone_options={imagenet_norm: maybe}"], "model.backbone_options.imagenet_norm", "expects bool"),
    (["model.stride=null"], "model.stride", None),  # optional: null is fine
    (["device=cdua"], "device", "cuda:N"),
    (["eval.metric=majority"], "eval.metric", "task/metric"),
    (["eval.metric=majority/acc"], "eval.metric", "did you mean 'accuracy'"),
    (["data.band_norm={scale: .inf}"], "data.band_norm.scale", "finite number"),
    (["data.band_norm={mean: [0.5, .nan], std: [1, 1]}"], "data.band_norm.mean", "finite number"),
    (["data.band_norm={offset: -.inf, scale: 1}"], "data.band_norm.offset", "finite number"),
])
def test_impossible_value_names_the_key(config_file, overrides, key, words):
    if words is None:
        preflight(load_config(config_file, overrides))  # the control: a valid value passes
        return
    message = _error(config_file, overrides)
    assert repr(key) in message and words in message, message


# ----------------------------------------------------------------------------- eval.metric against the tasks

@pytest.mark.parametrize("metric, words", [
    ("majorty/accuracy", ["'majorty'", "did you mean 'majority'", "majority, multi"]),
    ("multi/auc", ["multilabel", "'auc'", "multi/exact_match"]),
    ("majority/exact_match", ["'exact_match'", "majority/accuracy"]),
])
def test_eval_metric_is_checked_against_the_data_sets_tasks(config_file, metric, words):
    cfg = load_config(config_file, [f"eval.metric={metric}"])
    with pytest.raises(ConfigError, match="eval.metric") as err:
        check_eval_metric(cfg, MNIST_TASKS)
    for word in words:
        assert word in str(err.value), str(err.value)


@pytest.mark.parametrize("metric", ["", "loss", "majority/accuracy", "multi/exact_match", "multi/accuracy"])
def test_valid_eval_metric_passes(config_file, metric):
    check_eval_metric(load_config(config_file, [f"eval.metric={metric}"]), MNIST_TASKS)


def test_metric_names_follow_task_metrics():
    assert all_metric_names() == {"accuracy", "auc", "exact_match"}
    assert metric_names({"t": TaskSpec("binary", 1)}) == ["loss", "t/accuracy", "t/auc"]
    assert metric_names({"t": TaskSpec("multiclass", 3)}) == ["loss", "t/accuracy"]


# ----------------------------------------------------------------------------- the command line

@pytest.mark.parametrize("overrides, key", [
    (["optim.learnig_rate=0.1"], "optim.lr"),
    (["data.bach_size=3"], "data.batch_size"),
    (["model.aggregator_options.headz=3"], "model.aggregator_options.heads"),
    (["model.backbone=resnt18"], "model.backbone"),
    (["eval.metric=majority/acc"], "eval.metric"),
    (["model.aggregator_options={dropout: 1.5}"], "model.aggregator_options.dropout"),
    (["data.generate_if_missing=true", "data.generate={digits: emnist}"], "data.generate.digits"),
    (["data.generate_if_missing=true", "data.generate={n_train: -5}"], "data.generate.n_train"),
    (["data.name=traffic", "data.generate_if_missing=true"], "data.generate_if_missing"),
    (["model.name=dps", "model.scorer_options={widths: [8, 16]}"], "model.scorer_options.widths"),
])
def test_cli_bad_config_exits_2_and_writes_nothing(config_file, tmp_path, capsys, overrides, key):
    data = tmp_path / "data"
    data.rmdir()  # generate_if_missing would build it here: it must stay absent
    if not any(o.startswith("data.generate_if_missing") for o in overrides):
        data.mkdir()
    before = sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*"))
    assert main([str(config_file), *overrides, "--device", "cpu"]) == 2
    assert key in capsys.readouterr().err
    assert not (tmp_path / "runs").exists()
    assert sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*")) == before

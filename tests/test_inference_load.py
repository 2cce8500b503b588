"""hrsel.load_model: checkpoints load on their own with torch.load(weights_only=True), and bad ones are named."""
from __future__ import annotations

import random

import numpy as np
import pytest
import torch

import hrsel
from hrsel.engine import checkpoint as ckpt
from hrsel.errors import CheckpointError
from hrsel.inference import LoadedModel, load_model
from hrsel.tasks import TaskSpec

from inference_fixtures import train_tiny_run


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    return train_tiny_run(tmp_path_factory.mktemp("load"))


@pytest.mark.parametrize("name", ["last.pt", "best.pt"])
def test_trainer_checkpoints_load_weights_only_and_carry_what_loading_needs(run, name):
    state = torch.load(run / name, weights_only=True)  # raises on numpy arrays, dataclasses, custom classes
    assert state["tasks"] == {"majority": {"kind": "multiclass", "num_classes": 10},
                              "multi": {"kind": "multilabel", "num_classes": 10}}
    assert state["class_names"]["majority"] == [str(i) for i in range(10)]
    assert state["hrsel_version"] == hrsel.__version__
    assert state["config"]["model"]["name"] == "ips" and state["config"]["model"]["k"] == 3
    assert state["config"]["data"]["tasks"] == ["majority", "multi"]


def test_rng_state_is_plain_and_restores_every_generator():
    state = ckpt.rng_state()
    assert isinstance(state["numpy"]["key"], torch.Tensor) and isinstance(state["python"], list)
    expected = (random.random(), np.random.rand(3).tolist(), np.random.randn(), torch.rand(2).tolist())
    ckpt.set_rng_state(state)
    assert (random.random(), np.random.rand(3).tolist(), np.random.randn(), torch.rand(2).tolist()) == expected
    legacy = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    expected = np.random.rand(2).tolist()
    ckpt.set_rng_state(legacy)  # the tuple form of older checkpoints still restores
    assert np.random.rand(2).tolist() == expected


def test_load_model_from_run_folder_matches_the_trained_weights(run):
    model = hrsel.load_model(run)
    assert isinstance(model, LoadedModel) and model.checkpoint_path == run / "best.pt"
    assert not model.pipeline.training and model.device == torch.device("cpu")
    assert model.tasks == {"majority": TaskSpec("multiclass", 10), "multi": TaskSpec("multilabel", 10)}
    assert model.class_names["multi"][3] == "3" and model.hrsel_version == hrsel.__version__
    assert model.config.model.name == "ips" and model.config.experiment == "tiny_ips"
    saved = torch.load(run / "best.pt", weights_only=True)["model"]
    loaded = model.pipeline.state_dict()
    assert saved.keys() == loaded.keys() and all(torch.equal(saved[k], loaded[k]) for k in saved)
    last = load_model(run, checkpoint="last")
    assert last.checkpoint_path == run / "last.pt" and last.train_state["step"] == 4
    assert load_model(run / "last.pt").train_state["step"] == 4  # a checkpoint file, `checkpoint` ignored
    images = torch.zeros(1, 1, 128, 128, dtype=torch.uint8)
    with torch.no_grad():
        out = model.pipeline(images)
    assert out.logits["majority"].shape == (1, 10) and out.logits["multi"].shape == (1, 10)


def test_run_folder_without_the_checkpoint_lists_what_it_holds(run, tmp_path):
    folder = tmp_path / "half_run"
    folder.mkdir()
    (folder / "config.yaml").write_text("experiment: x\n")
    (folder / "train.log").write_text("")
    with pytest.raises(CheckpointError) as info:
        load_model(folder)
    message = str(info.value)
    assert "has no best.pt" in message and "config.yaml, train.log" in message and "no checkpoint" in message
    (folder / "last.pt").write_bytes((run / "last.pt").read_bytes())
    with pytest.raises(CheckpointError, match=r"has no best.pt .*last.pt.*checkpoint='last'"):
        load_model(folder)
    assert load_model(folder, checkpoint="last").train_state["step"] == 4
    with pytest.raises(CheckpointError, match="does not exist"):
        load_model(tmp_path / "nowhere")


@pytest.mark.parametrize("damage", ["truncated", "empty", "garbage"])
def test_corrupt_checkpoint_is_named_with_the_other_one(run, tmp_path, damage):
    folder = tmp_path / "run"
    folder.mkdir()
    good = (run / "best.pt").read_bytes()
    (folder / "last.pt").write_bytes(good)
    data = {"truncated": good[: len(good) // 2], "empty": b"", "garbage": bytes(range(256)) * 4}[damage]
    (folder / "best.pt").write_bytes(data)
    with pytest.raises(CheckpointError) as info:
        load_model(folder)
    message = str(info.value)
    assert str(folder / "best.pt") in message and "cannot be read" in message
    assert "checkpoint='last'" in message and "--resume" not in message


def test_checkpoints_of_other_libraries_are_refused(tmp_path):
    bare = tmp_path / "resnet.pt"
    torch.save({"conv1.weight": torch.zeros(2, 3, 3, 3)}, bare)  # a bare state_dict
    with pytest.raises(CheckpointError, match=r"not a hrsel checkpoint.*conv1.weight"):
        load_model(bare)
    pickled = tmp_path / "numpy.pt"
    torch.save({"model": {}, "extra": np.zeros(3)}, pickled)  # would need weights_only=False
    with pytest.raises(CheckpointError, match=r"Python objects other than tensors.*numpy"):
        load_model(pickled)
    tensor = tmp_path / "tensor.pt"
    torch.save(torch.zeros(3), tensor)
    with pytest.raises(CheckpointError, match="not a hrsel checkpoint"):
        load_model(tensor)


def test_checkpoint_that_does_not_fit_its_config_is_named(run, tmp_path):
    state = torch.load(run / "best.pt", weights_only=True)
    state["tasks"]["majority"]["num_classes"] = 7  # heads of another shape
    bad = tmp_path / "other.pt"
    torch.save(state, bad)
    with pytest.raises(CheckpointError, match=r"do not fit the 'ips' pipeline"):
        load_model(bad)
    del state["config"]
    torch.save(state, bad)
    with pytest.raises(CheckpointError, match="lacks config"):
        load_model(bad)


def test_resume_refuses_a_non_weights_only_checkpoint_by_name(tmp_path):
    path = tmp_path / "last.pt"
    torch.save({"model": {}, "rng": {"numpy": np.random.get_state()}}, path)
    with pytest.raises(CheckpointError, match=r"last.pt.*Python objects other than tensors"):
        ckpt.load_checkpoint(tmp_path, require=ckpt.TRAINING_KEYS)


def test_class_names_come_from_the_data_set_through_subsets():
    from torch.utils.data import Subset

    class Named(torch.utils.data.Dataset):
        class_names = {"kind": ["cat", "dog", "owl"], "tumour": ["normal", "tumour"]}

    tasks = {"kind": TaskSpec("multiclass", 3), "tumour": TaskSpec("binary", 1), "other": TaskSpec("multiclass", 2)}
    names = ckpt.class_names_of(Subset(Named(), [0]), tasks)
    assert names == {"kind": ["cat", "dog", "owl"], "tumour": ["normal", "tumour"], "other": ["0", "1"]}


def test_initial_weight_files_are_not_needed_to_load_a_trained_model():
    """A run started from local weights loads where those files no longer exist: the checkpoint replaces them."""
    from hrsel.config import from_dict
    from hrsel.inference.load import _without_initial_weights

    cfg = from_dict({"data": {"root": "x"}, "model": {"name": "patchdrop", "classifier_checkpoint": "runs/gone",
                                                       "backbone_options": {"weights_path": "/gone.pt", "width": 8}}})
    stripped = _without_initial_weights(cfg)
    assert stripped.model.options == {"backbone_options": {"width": 8}}
    assert cfg.model.options["backbone_options"]["weights_path"] == "/gone.pt"  # the run's config is untouched

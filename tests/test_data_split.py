"""The validation hold-out: disjoint, deterministic, stratified; a data set's own validation split."""
from __future__ import annotations

from collections import Counter

import pytest

from hrsel.config import Config
from hrsel.data.registry import validation_split
from hrsel.data.split import class_labels, holdout_indices
from hrsel.errors import ConfigError, DataError
from hrsel.tasks import TaskSpec
from hrsel.train import Splits, build_datasets, record_validation

from fixtures_data import make_billiard, make_cub


def test_holdout_is_disjoint_complete_and_a_pure_function_of_seed_and_size():
    kept, held = holdout_indices(50, fraction=0.2, seed=7)
    assert len(held) == 10 and sorted(kept + held) == list(range(50)) and not set(kept) & set(held)
    assert holdout_indices(50, fraction=0.2, seed=7) == (kept, held)  # no RNG state involved
    assert holdout_indices(50, fraction=0.2, seed=8)[1] != held
    assert holdout_indices(3, fraction=0.01, seed=0)[1].__len__() == 1  # at least one ...
    assert len(holdout_indices(3, fraction=0.99, seed=0)[0]) == 1  # ... and at least one left to train on


def test_holdout_is_stratified_by_largest_remainder():
    labels = [0] * 30 + [1] * 15 + [2] * 5  # 50 items, 10 held out: shares 6, 3, 1
    kept, held = holdout_indices(50, fraction=0.2, seed=1, labels=labels)
    assert Counter(labels[i] for i in held) == {0: 6, 1: 3, 2: 1}
    odd = [0] * 7 + [1] * 7 + [2] * 6  # 20 items, 5 held: shares 1.75, 1.75, 1.5 -> 2, 2, 1
    assert Counter(odd[i] for i in holdout_indices(20, fraction=0.25, seed=3, labels=odd)[1]) == {0: 2, 1: 2, 2: 1}


def test_holdout_rejects_impossible_requests():
    with pytest.raises(DataError, match="val_fraction"):
        holdout_indices(10, fraction=1.0, seed=0)
    with pytest.raises(DataError, match="val_split"):
        holdout_indices(1, fraction=0.5, seed=0)
    with pytest.raises(DataError, match="one label per item"):
        holdout_indices(4, fraction=0.5, seed=0, labels=[0, 1])


def test_class_labels_reads_the_first_single_label_task():
    class Mnist:  # megapixel_mnist: labels per task, the multilabel one is skipped
        tasks = {"multi": TaskSpec("multilabel", 10), "max": TaskSpec("multiclass", 10)}
        labels = {"multi": [[1], [2]], "max": [3, 4], "majority": [5, 6]}

        def __len__(self):
            return 2

    class Plain(Mnist):
        tasks = {"c": TaskSpec("binary", 1)}
        labels = [0, 1]

    class Unlabelled(Mnist):
        labels = None

    assert class_labels(Mnist()) == ("max", [3, 4])
    assert class_labels(Plain()) == ("c", [0, 1])
    assert class_labels(Unlabelled()) is None


def _config(name: str, root, **data) -> Config:
    cfg = Config(seed=2)
    cfg.data.name, cfg.data.root = name, str(root)
    for key, value in data.items():
        setattr(cfg.data, key, value)
    return cfg


def test_billiard_validates_on_its_own_valid_split(tmp_path):
    assert validation_split("billiard") == "valid" and validation_split("cub200") is None
    splits = build_datasets(_config("billiard", make_billiard(tmp_path, size=64, n=3),
                                   options={"image_size": [64, 64]}))
    assert splits.record["val_split"] == "valid" and len(splits.train) == 3
    assert [splits.val[i]["id"] for i in range(3)] == ["valid/0", "valid/1", "valid/2"]
    for folder in (tmp_path / "valid").iterdir():
        folder.unlink()
    (tmp_path / "valid").rmdir()
    with pytest.raises(ConfigError, match="data.val_split=holdout"):  # a missing own split is not skipped silently
        build_datasets(_config("billiard", tmp_path, options={"image_size": [64, 64]}))
    held = build_datasets(_config("billiard", tmp_path, val_split="holdout", val_fraction=0.4,
                                  options={"image_size": [64, 64]})).record["indices"]
    assert held in ([0], [2])  # labels 6, 2, 6: the one held-out item comes from the larger class


def test_holdout_of_cub_is_stratified_and_not_augmented(tmp_path):
    make_cub(tmp_path, n_per_class=4, classes=3)  # 2 train images per class
    splits = build_datasets(_config("cub200", tmp_path, val_fraction=0.5, options={"resize": 40, "crop": 32}))
    held = splits.record["indices"]
    assert splits.record["stratified_on"] == "species" and len(held) == 3
    assert sorted(splits.train.indices + splits.val.indices) == list(range(6))
    assert Counter(splits.val.dataset.labels[i] for i in held) == {0: 1, 1: 1, 2: 1}
    assert splits.train.dataset.augment and not splits.val.dataset.augment and not splits.test.augment
    assert splits.train.tasks == splits.val.tasks == {"species": TaskSpec("multiclass", 200)}


def test_a_resumed_run_must_validate_on_the_items_it_started_with(tmp_path):
    path = tmp_path / "validation.json"
    first = Splits(None, None, None, {"val_split": "holdout", "rule": "a", "indices": [1, 4]})
    record_validation(first, path, resuming=False, write=True)
    record_validation(first, path, resuming=True, write=True)
    other = Splits(None, None, None, {"val_split": "holdout", "rule": "b", "indices": [1, 5]})
    with pytest.raises(DataError, match="validation.json.*data.val_fraction"):
        record_validation(other, path, resuming=True, write=True)
    record_validation(other, path, resuming=False, write=True)  # a new run in the same folder starts afresh
    assert '"b"' in path.read_text()


@pytest.mark.parametrize("override, words", [
    ("data.val_split=test", "selected on test data"), ("data.val_split=train", "holdout"),
    ("data.val_fraction=1.5", "(0, 1)"), ("data.val_split=", "auto, holdout, none")])
def test_config_rejects_selecting_on_test_or_train(override, words):
    from pathlib import Path

    from hrsel.config import load_config

    with pytest.raises(ConfigError, match="data.val_") as error:
        load_config(Path(__file__).parents[1] / "configs" / "demo.yaml", [override])
    assert words in str(error.value)

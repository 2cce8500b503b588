"""python -m hrsel.evaluate: the trainer's numbers for the same checkpoint and split, plus the extra metrics."""
from __future__ import annotations

import csv
import json
import math

import pytest
import torch

from hrsel.engine import metrics as M
from hrsel.evaluate import main
from hrsel.inference.evaluate import balanced_accuracy, evaluate_run, task_metrics
from hrsel.tasks import TaskSpec

from inference_fixtures import train_tiny_run


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    return train_tiny_run(tmp_path_factory.mktemp("evaluate"))


def test_cli_reproduces_test_metrics_json(run, capsys):
    assert main([str(run)]) == 0
    out = capsys.readouterr().out
    trainer = json.loads((run / "test_metrics.json").read_text())
    record = json.loads((run / "eval_test_best.json").read_text())
    assert record["checkpoint"] == str(run / "best.pt") and record["split"] == "test" and record["items"] == 6
    assert record["checkpoint_step"] == trainer["best"]["step"]
    for key, value in trainer["metrics"].items():  # majority/accuracy, multi/exact_match, multi/accuracy, loss
        assert record["metrics"][key] == pytest.approx(value, abs=1e-6), key
    assert {"majority/balanced_accuracy", "majority/macro_f1", "multi/macro_f1"} <= set(record["metrics"])
    counts = torch.tensor(record["confusion_matrices"]["majority"]["counts"])
    assert counts.shape == (10, 10) and counts.sum() == 6
    assert counts.diag().sum().item() / 6 == pytest.approx(trainer["metrics"]["majority/accuracy"])
    picture = run / "eval_test_best_confusion_majority.png"
    assert picture.stat().st_size > 1000 and picture.read_bytes()[:4] == b"\x89PNG"
    assert "multi" not in record["confusion_matrices"]  # multilabel: no confusion matrix
    assert "majority  accuracy" in out and str(run / "eval_test_best.json") in out


def test_val_split_of_last_checkpoint_matches_the_last_validation_row(run, tmp_path):
    report = evaluate_run(run, split="val", checkpoint="last", batch_size=1, out_dir=tmp_path / "out")
    with open(run / "metrics.csv", newline="") as f:
        last = list(csv.DictReader(f))[-1]
    assert int(last["step"]) == report.record["checkpoint_step"] == 4
    assert report.record["items"] == 2  # the held-out 20% of 10 training items, as validation.json says
    for key in ("majority/accuracy", "multi/exact_match", "multi/accuracy", "loss"):
        assert report.metrics[key] == pytest.approx(float(last[f"val/{key}"]), abs=1e-5), key
    assert report.json_path == tmp_path / "out" / "eval_val_last.json" and report.json_path.is_file()
    assert report.pictures["majority"].parent == tmp_path / "out"


def test_bad_inputs_exit_2_with_a_named_error(run, tmp_path, capsys):
    assert main([str(tmp_path)]) == 2
    assert "has no best.pt" in capsys.readouterr().err
    assert main([str(run), "--checkpoint", str(tmp_path / "missing.pt")]) == 2
    assert "missing.pt" in capsys.readouterr().err
    assert main([str(run), "--batch-size", "0"]) == 2
    assert "batch size" in capsys.readouterr().err
    with pytest.raises(SystemExit) as info:
        main([str(run), "--split", "train"])
    assert info.value.code == 2


def test_metrics_agree_with_the_trainer_on_random_logits():
    torch.manual_seed(0)
    multi = TaskSpec("multiclass", 4)
    logits, target = torch.randn(50, 4), torch.randint(0, 4, (50,))
    values, matrix = task_metrics(logits, target, multi)
    assert values["accuracy"] == pytest.approx(M.accuracy(logits, target))
    assert matrix.sum() == 50 and matrix.diag().sum() == (logits.argmax(-1) == target).sum()
    labels = TaskSpec("multilabel", 5)
    logits, target = torch.randn(40, 5) * 0.2 + 0.3, (torch.rand(40, 5) > 0.5).float()  # logits mostly in [0, 1]
    values, matrix = task_metrics(logits, target, labels)
    assert matrix is None
    assert values["exact_match"] == pytest.approx(M.exact_match(logits, target))
    assert values["accuracy"] == pytest.approx(M.multilabel_accuracy(logits, target))
    binary = TaskSpec("binary", 1)
    scores, truth = torch.randn(60, 1) * 30, (torch.rand(60) > 0.3).float()
    values, matrix = task_metrics(scores, truth, binary)
    assert values["auc"] == pytest.approx(M.auc(scores, truth), abs=1e-6)
    assert values["accuracy"] == pytest.approx(((scores.reshape(-1) > 0) == (truth > 0.5)).float().mean().item())
    assert matrix.shape == (2, 2)
    assert math.isnan(task_metrics(scores[:5], torch.ones(5), binary)[0]["auc"])  # one class: no AUC


def test_balanced_accuracy_and_macro_f1_on_a_known_case():
    # truth 0,0,0,0,1,1 ; predicted 0,0,0,0,0,1: recall 1 and 0.5 -> balanced 0.75 while accuracy is 5/6
    logits = torch.tensor([[1.0, 0]] * 5 + [[0, 1.0]])
    target = torch.tensor([0, 0, 0, 0, 1, 1])
    values, matrix = task_metrics(logits, target, TaskSpec("multiclass", 2))
    assert matrix.tolist() == [[4, 0], [1, 1]]
    assert values["accuracy"] == pytest.approx(5 / 6) and values["balanced_accuracy"] == pytest.approx(0.75)
    assert values["macro_f1"] == pytest.approx((8 / 9 + 2 / 3) / 2, abs=1e-6)  # F1 0.889 and 0.667
    assert values["auc"] == pytest.approx(0.75)  # the missed positive ties the 4 negatives: (4 + 4 / 2) / 8
    assert balanced_accuracy(torch.tensor([[2, 0, 0], [0, 0, 0], [1, 0, 1]])) == pytest.approx(0.75)


def test_validation_rows_of_a_manifest_are_named_as_such(tmp_path):
    from inference_fixtures import train_tiny_slides_run

    run = train_tiny_slides_run(tmp_path)
    report = evaluate_run(run, split="val", out_dir=tmp_path / "out", pictures=False)
    assert report.record["split_name"] == "val" and report.record["items"] == 2  # the CSV's val rows
    with open(run / "metrics.csv", newline="") as f:
        last = list(csv.DictReader(f))[-1]
    assert report.metrics["label/accuracy"] == pytest.approx(float(last["val/label/accuracy"]))


def test_chance_levels_are_what_a_model_blind_to_its_input_scores():
    tasks = {"c": TaskSpec("multiclass", 3), "pair": TaskSpec("multiclass", 2), "b": TaskSpec("binary", 1),
             "m": TaskSpec("multilabel", 4)}
    targets = {"c": torch.tensor([0, 2, 2, 2, 1]), "pair": torch.tensor([1, 1, 0, 1, 1]),
               "b": torch.tensor([[0.0], [1.0], [0.0], [0.0], [0.0]]), "m": torch.zeros(5, 4)}
    chance = M.chance_levels(targets, tasks)
    assert chance == {"c/accuracy": 0.6, "pair/accuracy": 0.8, "pair/auc": 0.5, "b/accuracy": 0.8, "b/auc": 0.5}
    blind = {t: torch.zeros(5, max(spec.num_classes, 1)) for t, spec in tasks.items()}  # constant logits
    blind["c"][:, 2] = blind["pair"][:, 1] = 1.0  # ... on the commonest class
    blind["b"] -= 1.0
    scored = M.all_metrics(blind, targets, tasks)
    for key, value in chance.items():  # a constant predictor scores exactly the chance level
        assert scored[key] == pytest.approx(value), key

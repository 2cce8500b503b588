"""Every experiment config resolves to exactly what it resolved to before configs gained `base:`.

tests/fixtures/resolved_configs.json holds `resolved(path)` (below) of each of the 36 configs/*.yaml
as they were before the rewrite (one file per experiment, no inheritance), written once and
committed. Rewriting the configs as bases plus differences must leave every resolved value, and
its type, unchanged.

Keys renamed since (`hrsel.config.renames.RENAMED`: model.num_selected -> model.k, ...) are
compared under their new names: the snapshot passes through the same `rename_keys` that
`load_config` applies to every file, so a renamed key must carry the value it had.

Values changed on purpose since, in the snapshot too: manifest_example's data.tissue (true),
data.val_fraction (0.2), model.backbone_options.norm (group) and optim.clip_norm (1.0), the
README's sizing advice for one slide per batch (issue 24); mnist_s_ips's optim.weight_decay (0.1),
optim.weight_decay_on (all), optim.lr (0.001), optim.warmup_epochs (10) and the aggregator's dropout
(0.1): IPS's own settings; its model.k (18: IPS's ratio of M to inked patches) and train.epochs (100:
what M = 18 fits in the task's CPU budget; issue 25).
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from hrsel.config import load_config, rename_keys, to_dict

REPO = Path(__file__).resolve().parents[1]
SNAPSHOT = REPO / "tests" / "fixtures" / "resolved_configs.json"
CONFIGS = sorted((REPO / "configs").glob("*.yaml"))


def snapshot(name: str) -> dict[str, Any]:
    """The snapshot of configs/<name>.yaml, old key names translated as load_config translates them."""
    return rename_keys(json.loads(SNAPSHOT.read_text())[name], source="the snapshot", warn=lambda message: None)


def resolved(path: Path) -> dict[str, Any]:
    """The config as the run folder's config.yaml would hold it, through JSON (tuples become lists)."""
    return json.loads(json.dumps(to_dict(load_config(path))))


def differences(want: Any, got: Any, key: str = "") -> list[str]:
    """Dotted keys whose value or type differs, e.g. "model.k: 10 (int) != 5 (int)"."""
    if isinstance(want, dict) and isinstance(got, dict):
        out = [f"{key}{k}: missing" for k in want if k not in got]
        out += [f"{key}{k}: not in the snapshot (value {got[k]!r})" for k in got if k not in want]
        for k in want.keys() & got.keys():
            out += differences(want[k], got[k], f"{key}{k}.")
        return out
    if isinstance(want, list) and isinstance(got, list) and len(want) == len(got):
        return [d for i, (w, g) in enumerate(zip(want, got)) for d in differences(w, g, f"{key[:-1]}[{i}].")]
    if type(want) is not type(got) or want != got:
        return [f"{key[:-1]}: {want!r} ({type(want).__name__}) in the snapshot, now {got!r} ({type(got).__name__})"]
    return []


def test_the_snapshot_holds_every_experiment():
    snapshot = json.loads(SNAPSHOT.read_text())
    assert len(snapshot) == 36
    assert {p.stem for p in CONFIGS} == set(snapshot), "a config was added or removed: update the snapshot knowingly"


@pytest.mark.parametrize("path", CONFIGS, ids=[p.stem for p in CONFIGS])
def test_config_resolves_as_in_the_snapshot(path):
    diff = differences(snapshot(path.stem), resolved(path))
    assert not diff, f"configs/{path.name} resolves differently from the snapshot:\n  " + "\n  ".join(diff)


def test_the_snapshot_is_compared_under_the_new_key_names():
    ips = snapshot("mnist")["model"]
    assert ips["k"] == 100 and ips["score_chunk"] == 100 and "num_selected" not in ips
    assert snapshot("mnist_s_dps_candidates")["model"]["downscale"] == 2


def test_the_comparison_names_a_changed_value_and_its_type():
    want = {"model": {"k": 10, "sigma": 0.05, "opts": {"dims": [1, 2]}}, "seed": 0}
    got = {"model": {"k": 10.0, "sigma": 0.05, "opts": {"dims": [1, 3]}, "new": 1}, "seed": 0}
    assert sorted(differences(want, got)) == [
        "model.k: 10 (int) in the snapshot, now 10.0 (float)",
        "model.new: not in the snapshot (value 1)",
        "model.opts.dims[1]: 2 (int) in the snapshot, now 3 (int)",
    ]

"""Renamed keys (hrsel.config.renames): the old names still work, with a warning naming old key, new key, file."""
from __future__ import annotations

import logging
from pathlib import Path

import pytest
import yaml

from hrsel.config import RENAMED, from_dict, load_config, to_dict
from hrsel.errors import ConfigError

REPO = Path(__file__).resolve().parents[1]
LOGGER = "hrsel.config.renames"


def ips_file(folder: Path, name: str, model: dict, base: str | None = None) -> Path:
    raw = {"data": {"name": "megapixel_mnist", "root": "data/x"}, "model": {"name": "ips", **model}}
    if base:
        raw = {"base": base, "model": model}
    path = folder / name
    path.write_text(yaml.safe_dump(raw, sort_keys=False))
    return path


def warnings_of(caplog) -> str:
    return "\n".join(r.getMessage() for r in caplog.records if r.name == LOGGER and r.levelno == logging.WARNING)


def test_old_names_in_a_file_load_as_the_new_ones_with_a_warning(tmp_path, caplog):
    old = ips_file(tmp_path, "old.yaml", {"num_selected": 7, "chunk_size": 9, "patch_size": 50})
    new = ips_file(tmp_path, "new.yaml", {"k": 7, "score_chunk": 9, "patch_size": 50})
    with caplog.at_level(logging.WARNING, logger=LOGGER):
        cfg = load_config(old)
    assert cfg.model.options == {"k": 7, "score_chunk": 9, "patch_size": 50}  # in the file's order
    assert {**to_dict(cfg), "experiment": "x"} == {**to_dict(load_config(new)), "experiment": "x"}
    text = warnings_of(caplog)
    for words in (["'model.num_selected'", "'model.k'"], ["'model.chunk_size'", "'model.score_chunk'"]):
        line = next(line for line in text.splitlines() if words[0] in line)
        assert words[1] in line and str(old) in line and "README" in line


def test_score_downscale_is_now_downscale(tmp_path, caplog):
    path = tmp_path / "cand.yaml"
    path.write_text("data: {name: megapixel_mnist, root: x}\nmodel: {name: dps_candidates, score_downscale: 2}\n")
    with caplog.at_level(logging.WARNING, logger=LOGGER):
        assert load_config(path).model.options == {"downscale": 2}
    assert "'model.score_downscale'" in warnings_of(caplog) and "'model.downscale'" in warnings_of(caplog)


def test_new_names_give_no_warning_and_every_config_uses_them(tmp_path, caplog):
    with caplog.at_level(logging.WARNING, logger=LOGGER):
        load_config(ips_file(tmp_path, "new.yaml", {"k": 7, "score_chunk": 9}))
        for path in sorted((REPO / "configs").glob("*.yaml")):
            load_config(path)
    assert warnings_of(caplog) == ""


def test_both_names_in_one_file_is_a_config_error(tmp_path):
    path = ips_file(tmp_path, "both.yaml", {"num_selected": 7, "k": 5})
    with pytest.raises(ConfigError, match=r"both\.yaml.*'model\.num_selected' and 'model\.k'.*keep only model\.k"):
        load_config(path)


def test_an_old_name_in_a_base_is_overridden_by_the_new_name_in_the_file(tmp_path, caplog):
    ips_file(tmp_path, "base.yaml", {"num_selected": 7, "chunk_size": 9})
    child = ips_file(tmp_path, "child.yaml", {"k": 3}, base="base.yaml")
    with caplog.at_level(logging.WARNING, logger=LOGGER):
        cfg = load_config(child)
    assert cfg.model.options == {"k": 3, "score_chunk": 9}
    assert str(tmp_path / "base.yaml") in warnings_of(caplog)  # the file that holds the old key


def test_an_override_with_an_old_name_sets_the_new_key(tmp_path, caplog):
    path = ips_file(tmp_path, "new.yaml", {"k": 7})
    with caplog.at_level(logging.WARNING, logger=LOGGER):
        cfg = load_config(path, ["model.num_selected=2"])
    assert cfg.model.options == {"k": 2}
    assert "override 'model.num_selected=2'" in warnings_of(caplog) and "'model.k'" in warnings_of(caplog)


def test_a_mapping_with_old_names_converts_as_a_checkpoint_or_run_folder_needs(caplog):
    raw = {"data": {"root": "x"}, "model": {"name": "ips", "num_selected": 4, "chunk_size": 8}}
    with caplog.at_level(logging.WARNING, logger=LOGGER):
        cfg = from_dict(raw, source="checkpoint 'runs/old/last.pt'")
    assert cfg.model.options == {"k": 4, "score_chunk": 8}
    assert raw["model"] == {"name": "ips", "num_selected": 4, "chunk_size": 8}, "the input is not changed"
    assert "checkpoint 'runs/old/last.pt'" in warnings_of(caplog)


def test_build_pipeline_takes_the_old_keywords_with_a_deprecation_warning():
    from hrsel.models import build_pipeline
    from hrsel.tasks import TaskSpec

    small = {"backbone": "narrow_resnet", "backbone_options": {"width": 4, "strides": [2, 2], "blocks": [1, 1]},
             "aggregator_options": {"heads": 1, "head_dim": 4, "mlp_dim": 8}}
    tasks = {"t": TaskSpec("multiclass", 2)}
    with pytest.warns(DeprecationWarning) as record:
        ips = build_pipeline("ips", tasks=tasks, patch_size=8, num_selected=3, chunk_size=5, **small)
    assert (ips.k, ips.score_chunk) == (3, 5)
    messages = [str(w.message) for w in record]
    assert any("'model.num_selected'" in m and "'model.k'" in m for m in messages), messages
    assert any("'model.chunk_size'" in m and "'model.score_chunk'" in m for m in messages), messages
    assert all(w.filename == __file__ for w in record), "the warning points at the caller"
    with pytest.warns(DeprecationWarning, match=r"'model.score_downscale'.*'model.downscale'"):
        cand = build_pipeline("dps_candidates", tasks=tasks, patch_size=8, k=2, score_downscale=2, num_samples=4,
                              backbone="narrow_resnet", backbone_options=small["backbone_options"])
    assert cand.downscale == 2


def test_the_readme_table_lists_every_renamed_key():
    readme = (REPO / "README.md").read_text()
    table = readme[readme.index("| idea | key | old key"):]
    table = table[:table.index("\n\n")]
    for section, names in RENAMED.items():
        for old, new in names.items():
            assert f"`{section}.{new}`" in table and f"`{section}.{old}`" in table, (old, new)

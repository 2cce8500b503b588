"""`base:` in config files: merged key by key under the file, chains and lists, named errors, resolved runs.

The unit tests write small YAML trees under tmp_path. One tiny run (IPS on a 128 x 128
Megapixel MNIST, one epoch) checks that the run folder holds the resolved config, that a
resume never reads the base again, and that a run folder written with old key names resumes.
"""
from __future__ import annotations

import logging
import shutil
from pathlib import Path

import pytest
import yaml

from hrsel.config import deep_merge, load_config, load_raw, save_config, to_dict
from hrsel.errors import ConfigError

from fixtures_data import make_megapixel_mnist
from toy_bright import one_torch_thread  # noqa: F401 (autouse fixture)

REPO = Path(__file__).resolve().parents[1]
BASE = """\
experiment: shared_name
data: {name: megapixel_mnist, root: data/x, batch_size: 4, tasks: [majority, max]}
model:
  name: ips
  k: 10
  score_chunk: 20
  backbone: narrow_resnet
  backbone_options: {width: 16, blocks: [1, 1, 1, 1]}
optim: {lr: 0.001, betas: [0.9, 0.99]}
"""


def write(path: Path, text: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    return path


@pytest.fixture
def tree(tmp_path):
    """configs/base/common.yaml and configs/child.yaml (base: base/common.yaml) under tmp_path."""
    write(tmp_path / "configs" / "base" / "common.yaml", BASE)
    return tmp_path / "configs"


def test_mappings_merge_key_by_key_and_lists_and_scalars_replace(tree):
    child = write(tree / "child.yaml", "base: base/common.yaml\nmodel: {k: 5, backbone_options: {width: 8}}\n"
                                       "optim: {betas: [0.8, 0.9]}\ndata: {tasks: [top]}\n")
    cfg = load_config(child)
    assert cfg.model.options == {"k": 5, "score_chunk": 20, "backbone": "narrow_resnet",
                                 "backbone_options": {"width": 8, "blocks": [1, 1, 1, 1]}}
    assert cfg.optim.betas == [0.8, 0.9] and cfg.optim.lr == 0.001
    assert cfg.data.options == {"tasks": ["top"]} and cfg.data.batch_size == 4


def test_the_experiment_is_the_loaded_files_own_name_never_the_bases(tree):
    child = write(tree / "child.yaml", "base: base/common.yaml\n")
    assert load_config(child).experiment == "child"
    assert load_config(tree / "base" / "common.yaml").experiment == "shared_name"  # its own, when loaded itself


def test_a_chain_of_bases_resolves_paths_relative_to_each_file(tree):
    write(tree / "base" / "deeper" / "middle.yaml", "base: ../common.yaml\nmodel: {k: 7}\noptim: {lr: 0.01}\n")
    child = write(tree / "exp" / "child.yaml", "base: ../base/deeper/middle.yaml\noptim: {lr: 0.5}\n")
    cfg = load_config(child)
    assert cfg.model.options["k"] == 7 and cfg.model.options["score_chunk"] == 20 and cfg.optim.lr == 0.5


def test_a_list_of_bases_merges_left_to_right_then_the_file(tree):
    write(tree / "base" / "small.yaml", "model: {k: 3, score_chunk: 4}\ndevice: cpu\n")
    child = write(tree / "child.yaml", "base: [base/common.yaml, base/small.yaml]\nmodel: {score_chunk: 6}\n")
    cfg = load_config(child)
    assert (cfg.model.options["k"], cfg.model.options["score_chunk"], cfg.device) == (3, 6, "cpu")
    assert cfg.model.options["backbone_options"]["width"] == 16


def test_overrides_come_after_every_base(tree):
    child = write(tree / "child.yaml", "base: base/common.yaml\nmodel: {k: 5}\n")
    cfg = load_config(child, ["model.k=2", "model.backbone_options.width=4", "optim.lr=0.1"])
    assert cfg.model.options["k"] == 2 and cfg.optim.lr == 0.1
    assert cfg.model.options["backbone_options"] == {"width": 4, "blocks": [1, 1, 1, 1]}


def test_a_cycle_is_a_config_error_naming_the_chain(tree):
    a = write(tree / "a.yaml", "base: b.yaml\n")
    write(tree / "b.yaml", "base: a.yaml\n")
    with pytest.raises(ConfigError, match=r"cycle of bases \(\S*a\.yaml -> \S*b\.yaml -> \S*a\.yaml\)"):
        load_config(a)
    itself = write(tree / "self.yaml", "base: self.yaml\n")
    with pytest.raises(ConfigError, match=r"self\.yaml -> \S*self\.yaml"):
        load_config(itself)


def test_a_missing_base_is_a_config_error_naming_the_chain(tree):
    write(tree / "middle.yaml", "base: base/gone.yaml\n")
    child = write(tree / "child.yaml", "base: middle.yaml\n")
    with pytest.raises(ConfigError) as err:
        load_config(child)
    message = str(err.value)
    assert "gone.yaml" in message and "does not exist" in message and "relative to the file" in message
    assert "child.yaml -> " in message and "middle.yaml -> " in message


@pytest.mark.parametrize("value", ["3", "[]", "{a: b}", "['']"])
def test_a_base_that_is_not_a_path_is_a_config_error(tree, value):
    child = write(tree / "child.yaml", f"base: {value}\n")
    with pytest.raises(ConfigError, match=r"child\.yaml.*'base'.*relative to this file"):
        load_config(child)


def test_a_broken_base_names_the_base_file_and_the_chain(tree):
    write(tree / "base" / "broken.yaml", "model: [unclosed\n")
    child = write(tree / "child.yaml", "base: base/broken.yaml\n")
    with pytest.raises(ConfigError, match=r"broken\.yaml.*base chain: \S*child\.yaml -> \S*broken\.yaml.*YAML"):
        load_config(child)


def test_deep_merge_leaves_its_inputs_alone():
    under, over = {"a": {"b": 1, "c": [1]}, "d": 1}, {"a": {"c": [2]}, "e": None}
    assert deep_merge(under, over) == {"a": {"b": 1, "c": [2]}, "d": 1, "e": None}
    assert under == {"a": {"b": 1, "c": [1]}, "d": 1} and over == {"a": {"c": [2]}, "e": None}


def test_the_saved_config_is_resolved_and_loads_alone(tree, tmp_path):
    child = write(tree / "child.yaml", "base: base/common.yaml\nmodel: {k: 5}\n")
    cfg = load_config(child)
    save_config(cfg, tmp_path / "config.yaml")
    saved = yaml.safe_load((tmp_path / "config.yaml").read_text())
    assert "base" not in saved and saved["model"]["score_chunk"] == 20 and saved["experiment"] == "child"
    shutil.rmtree(tree / "base")  # the run folder's copy needs no base
    assert to_dict(load_config(tmp_path / "config.yaml")) == to_dict(cfg)


def test_print_config_shows_the_resolved_config(tree, tmp_path, capsys):
    from hrsel.train import main

    (tmp_path / "data").mkdir()
    child = write(tree / "child.yaml", f"base: base/common.yaml\ndata: {{root: {tmp_path / 'data'}}}\n")
    assert main([str(child), "--print-config", "model.k=4"]) == 0
    printed = yaml.safe_load(capsys.readouterr().out)
    assert "base" not in printed and printed["experiment"] == "child"
    assert printed["model"]["k"] == 4 and printed["model"]["score_chunk"] == 20 and printed["optim"]["lr"] == 0.001


# ----------------------------------------------------------------------------- configs/ itself

def test_every_base_in_configs_is_used_and_none_is_an_experiment():
    experiments = sorted((REPO / "configs").glob("*.yaml"))
    bases = {p.resolve() for p in (REPO / "configs" / "base").glob("*.yaml")}
    used: set[Path] = set()
    for path in [*experiments, *bases]:
        named = yaml.safe_load(path.read_text()).get("base") or []
        used |= {(path.parent / n).resolve() for n in ([named] if isinstance(named, str) else named)}
    assert bases and bases <= used, f"bases no config uses: {sorted(map(str, bases - used))}"
    for path in bases:
        assert "experiment" not in yaml.safe_load(path.read_text()), f"{path.name}: a base names no run folder"


def test_every_config_file_says_what_it_is_on_its_first_line():
    for path in [*(REPO / "configs").glob("*.yaml"), *(REPO / "configs" / "base").glob("*.yaml")]:
        first = path.read_text().splitlines()[0]
        assert first.startswith("# ") and len(first) > 30, f"{path.name}: start with a one-line comment"


def test_load_raw_gives_the_merged_mapping_without_base():
    raw = load_raw(REPO / "configs" / "billiard_s_max.yaml")
    assert "base" not in raw and raw["model"]["aggregator"] == "max" and raw["data"]["root"] == "data/billiard_500"


# ----------------------------------------------------------------------------- a run made from a base

RUN_BASE = """\
device: cpu
data: {{name: megapixel_mnist, root: {root}, batch_size: 4, eval_batch_size: 4, tasks: [majority]}}
model: {{name: ips, in_chans: 1, backbone: narrow_resnet, patch_size: 32, k: 3, score_chunk: 4,
        backbone_options: {{width: 8, strides: [2, 2, 2, 2], blocks: [1, 1, 1, 1]}}}}
optim: {{lr: 0.001}}
train: {{epochs: 1, progress_bar: false}}
eval: {{pictures: 0}}
"""


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """A finished one-epoch run of configs/run.yaml (base: base/tiny.yaml); returns its folder."""
    import torch

    from hrsel.train import main

    folder = tmp_path_factory.mktemp("based_run")
    root = make_megapixel_mnist(folder, size=128, n_train=8, n_test=4)
    write(folder / "configs" / "base" / "tiny.yaml", RUN_BASE.format(root=root))
    child = write(folder / "configs" / "run.yaml", f"base: base/tiny.yaml\noutput_dir: {folder / 'runs'}\n")
    torch.set_num_threads(1)
    assert main([str(child)]) == 0
    return folder / "runs" / "run"


def test_the_run_folder_holds_the_resolved_config(run):
    saved = yaml.safe_load((run / "config.yaml").read_text())
    assert "base" not in saved and saved["model"]["k"] == 3 and saved["data"]["batch_size"] == 4
    assert saved["experiment"] == "run"


def test_a_resume_reads_the_run_folder_not_the_base(run, tmp_path, capsys):
    from hrsel.train import main

    copy = shutil.copytree(run, tmp_path / "runs" / "run")
    (run.parents[1] / "configs" / "base" / "tiny.yaml").write_text("model: [not, a, mapping]\n")  # base ruined
    assert main(["--resume", str(copy), "train.epochs=2"]) == 0, capsys.readouterr().err[-2000:]
    assert yaml.safe_load((copy / "config.yaml").read_text())["train"]["epochs"] == 2


def test_a_run_folder_written_with_old_key_names_resumes(run, tmp_path, capsys, caplog):
    from hrsel.train import main

    copy = shutil.copytree(run, tmp_path / "runs" / "run")
    text = (copy / "config.yaml").read_text()
    old = text.replace("  k: 3\n", "  num_selected: 3\n").replace("  score_chunk: 4\n", "  chunk_size: 4\n")
    assert old != text and "num_selected: 3" in old and "chunk_size: 4" in old
    (copy / "config.yaml").write_text(old)
    with caplog.at_level(logging.WARNING, logger="hrsel.config.renames"):
        assert main(["--resume", str(copy), "train.epochs=2"]) == 0, capsys.readouterr().err[-2000:]
    warned = " ".join(r.getMessage() for r in caplog.records if r.name == "hrsel.config.renames")
    assert "'model.num_selected'" in warned and "'model.k'" in warned and str(copy / "config.yaml") in warned
    resumed = yaml.safe_load((copy / "config.yaml").read_text())  # rewritten by the safe change, new names
    assert resumed["model"]["k"] == 3 and "num_selected" not in resumed["model"]
    assert resumed["train"]["epochs"] == 2

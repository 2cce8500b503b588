"""The repository stands alone and its documentation agrees with its files.

No file names a path outside the repository; the README's commands, data folders and config
names match configs/; `make bench` leaves the committed benchmark results alone.
"""
from __future__ import annotations

import re
import shlex
import subprocess
from pathlib import Path

import pytest

from hrsel.config import load_raw

REPO = Path(__file__).resolve().parents[1]
README = (REPO / "README.md").read_text(encoding="utf-8")
OUTSIDE = re.compile(r"/work/|(?<![\w-])shared/|REFERENCE\.md")
# .ci/run and the Makefile describe the development and CI machines, which keep real MNIST files
# beside the clone; they may name that folder, but only behind a test that it exists (checked below).
CI_RUN = ".ci/run"
MAKEFILE = "Makefile"
COMMITTED_BENCH = "benchmarks/results/topk_op_cpu.json"


def git(*args: str) -> str:
    return subprocess.run(["git", *args], cwd=REPO, capture_output=True, text=True, check=True).stdout


def repo_files() -> list[str]:
    """Tracked files and untracked ones git does not ignore (what the next commit may hold)."""
    return [f for f in git("ls-files", "--cached", "--others", "--exclude-standard").splitlines()
            if (REPO / f).is_file()]


def outside_mentions(path: str) -> list[str]:
    text = (REPO / path).read_bytes()[:2_000_000].decode("utf-8", errors="ignore")
    return [f"{path}:{n}: {line.strip()}" for n, line in enumerate(text.splitlines(), 1) if OUTSIDE.search(line)]


def test_no_file_outside_tests_names_a_path_outside_the_repository():
    files = [f for f in repo_files() if not f.startswith("tests/") and f not in (CI_RUN, MAKEFILE)]
    assert "README.md" in files and "constraints.txt" in files
    hits = [hit for f in files for hit in outside_mentions(f)]
    assert not hits, "paths outside the repository (say it in the repo's own words):\n" + "\n".join(hits)


def test_ci_run_uses_the_mnist_folder_beside_the_clone_only_when_it_exists():
    lines = (REPO / CI_RUN).read_text().splitlines()
    exports = [n for n, line in enumerate(lines) if "export HRSEL_MNIST_DIR" in line]
    assert exports, f"{CI_RUN} no longer sets HRSEL_MNIST_DIR"
    for n in exports:
        assert any('[ -d "$beside" ]' in line for line in lines[max(0, n - 2):n]), \
            f"{CI_RUN}:{n + 1} exports HRSEL_MNIST_DIR without checking that the folder exists"
    assert lines[-1].strip() == "make test"


def test_makefile_uses_the_mnist_folder_beside_the_clone_only_when_it_exists():
    lines = (REPO / MAKEFILE).read_text().splitlines()
    mentions = [n for n, line in enumerate(lines) if OUTSIDE.search(line) and not line.lstrip().startswith("#")]
    assert mentions, f"{MAKEFILE} no longer offers the MNIST folder beside the clone"
    for n in mentions:
        guard = lines[n - 1].strip()
        assert guard == "ifneq ($(wildcard ../shared/data/mnist),)" or "wildcard" in lines[n], \
            f"{MAKEFILE}:{n + 1} names a folder outside the repository without checking that it exists"


def test_readme_opens_with_the_title_then_the_quick_start():
    assert README.startswith("# hrsel\n")
    first_block = README[README.index("```"):].split("```")[1]
    assert first_block.startswith("bash\nmake demo") and "make test" in first_block


def test_readme_data_command_writes_where_the_mnist_config_reads():
    command = re.search(r"^python tools/make_megapixel_mnist\.py .*$", README, re.MULTILINE)
    assert command, "README has no `python tools/make_megapixel_mnist.py` command"
    args = shlex.split(command.group(0))[2:]
    root = next(a for a in args if not a.startswith("-") and not a.isdigit())
    config = load_raw(REPO / "configs" / "mnist.yaml")  # the file merged over its base
    assert root == config["data"]["root"], f"README writes {root}, configs/mnist.yaml reads {config['data']['root']}"
    generate = config["data"]["generate"]
    for flag, key in (("--width", "width"), ("--height", "height"), ("--n-train", "n_train"), ("--n-test", "n_test")):
        assert int(args[args.index(flag) + 1]) == generate[key], f"README {flag} differs from data.generate.{key}"


def readme_config_names() -> set[str]:
    named = set(re.findall(r"configs/([\w-]+)\.yaml", README))
    table = README[README.index("| config | experiment |"):]
    table = table[:table.index("\n\n")]
    for row in table.splitlines()[2:]:
        named |= set(re.findall(r"`([\w-]+)`", row.split("|")[1]))
    return named


def test_every_config_the_readme_names_exists_and_every_config_is_named():
    named = readme_config_names()
    on_disk = {p.stem for p in (REPO / "configs").glob("*.yaml")}
    assert len(named) > 20
    assert not named - on_disk, f"README names configs that do not exist: {sorted(named - on_disk)}"
    assert not on_disk - named, f"configs/ holds configs the README does not list: {sorted(on_disk - named)}"


def bench_json(*make_args: str) -> str:
    out = subprocess.run(["make", "-n", "bench", *make_args], cwd=REPO, capture_output=True, text=True,
                         check=True).stdout
    line = next(line for line in out.splitlines() if "benchmarks/topk_op.py" in line)
    args = shlex.split(line)
    return args[args.index("--json") + 1]


def test_make_bench_leaves_the_committed_results_alone():
    target = bench_json()
    assert target != COMMITTED_BENCH and COMMITTED_BENCH in git("ls-files", "benchmarks/results")
    assert not git("ls-files", target), f"make bench writes into the committed file {target}"
    assert git("check-ignore", target).strip() == target, f"make bench writes {target}, which git does not ignore"


@pytest.mark.parametrize("explicit", [COMMITTED_BENCH, "/tmp/topk.json"])
def test_make_bench_writes_where_asked(explicit):
    assert bench_json(f"BENCH_JSON={explicit}") == explicit

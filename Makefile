# The two commands of the README. Each creates or reuses the project's virtual
# environment (.venv) and installs what is missing; a second run starts in seconds.
PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.hrsel-installed
# Real MNIST t10k files shipped beside the repository (tests and the demo look here).
export HRSEL_MNIST_DIR ?= $(abspath ../shared/data/mnist)

.PHONY: demo test install bench clean

demo: $(STAMP)
	$(PY) -m hrsel.train configs/demo.yaml

test: $(STAMP)
	$(PY) -m pytest -q

install: $(STAMP)

$(STAMP): setup.cfg pyproject.toml constraints.txt
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -c constraints.txt -e '.[dev]'
	touch $@

bench: $(STAMP)
	$(PY) benchmarks/topk_op.py --json benchmarks/results/topk_op_cpu.json

clean:
	rm -rf $(VENV) *.egg-info .pytest_cache

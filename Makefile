# The two commands of the README. Each creates or reuses the project's virtual
# environment (.venv) and installs what is missing; a second run starts in seconds.
PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.hrsel-installed
# MNIST: the demo and the tests read $HRSEL_MNIST_DIR when it is set (`make demo HRSEL_MNIST_DIR=DIR`
# or in the environment), then data/mnist and ~/.cache/hrsel/mnist. Without it the demo draws digits
# from a font and says so, and the tests write tiny IDX files of their own (a folder that is missing
# or lacks the files only skips the extra checks on the real ones). The development and CI machines
# keep the real t10k files beside the clone: they are used when that folder exists.
ifneq ($(wildcard ../shared/data/mnist),)
export HRSEL_MNIST_DIR ?= $(abspath ../shared/data/mnist)
endif
# `make bench` writes into the git-ignored benchmarks/results/local/; to replace a committed
# figure, ask for it: `make bench BENCH_JSON=benchmarks/results/topk_op_cpu.json`.
BENCH_JSON ?= benchmarks/results/local/topk_op_cpu.json
# Test processes (pytest-xdist): one per core of the 2-core CI machine; each test file stays in one
# process, so a module's trained toy models and data fixtures are made once. `make test TEST_WORKERS=0`
# runs the suite in one process.
TEST_WORKERS ?= 2

.PHONY: demo test test-zarr2 install bench clean

demo: $(STAMP)
	$(PY) -m hrsel.demo configs/demo.yaml

test: $(STAMP)
	$(PY) -m pytest -q -n $(TEST_WORKERS) --dist loadfile

# The readers' zarr 2 / pre-2025.5.21 tifffile code paths, with those releases laid over the
# venv's (needs the package registry once). CI runs `test` only: it has no network.
COMPAT := .compat/zarr2
test-zarr2: $(STAMP)
	test -d $(COMPAT) || $(PY) -m pip install --quiet --no-deps --target $(COMPAT) zarr==2.18.3 \
		numcodecs==0.15.1 asciitree fasteners deprecated wrapt tifffile==2024.8.30
	PYTHONPATH=$(COMPAT) $(PY) -m pytest -q -p no:cacheprovider -p no:zarr tests/test_io.py \
		tests/test_io_errors.py tests/test_tiling.py tests/test_tiling_stream.py \
		tests/test_data_megapixel_mnist.py tests/test_data_camelyon_cub.py

install: $(STAMP)

$(STAMP): setup.cfg pyproject.toml constraints.txt
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -c constraints.txt -e '.[dev]'
	touch $@

bench: $(STAMP)
	$(PY) benchmarks/topk_op.py --json $(BENCH_JSON)

clean:
	rm -rf $(VENV) .compat *.egg-info .pytest_cache

# The two commands of the README. Each creates or reuses the project's virtual
# environment (.venv) and installs what is missing; a second run starts in seconds.
PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.hrsel-installed
# Real MNIST t10k files shipped beside the repository (tests and the demo look here).
export HRSEL_MNIST_DIR ?= $(abspath ../shared/data/mnist)

.PHONY: demo test test-zarr2 install bench clean

demo: $(STAMP)
	$(PY) -m hrsel.train configs/demo.yaml

test: $(STAMP)
	$(PY) -m pytest -q

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
	$(PY) benchmarks/topk_op.py --json benchmarks/results/topk_op_cpu.json

clean:
	rm -rf $(VENV) .compat *.egg-info .pytest_cache

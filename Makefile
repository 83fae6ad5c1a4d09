# The README's two commands: `make train` and `make test`.
# Both create the project virtual environment (.venv) on first use.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: train test test-slow lint setup bench bench-smoke bench-host gpu-bundle compile-check tune clean

# test workers (pytest-xdist): one per core of the 2-core machine
WORKERS ?= 2

setup: $(STAMP)

$(STAMP): pyproject.toml requirements-tested.txt
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -r requirements-tested.txt
	$(PY) -m pip install --quiet -e ".[test]"
	touch $(STAMP)

train: $(STAMP)
	$(PY) examples/train_mnist.py $(ARGS)

test: $(STAMP)
	$(PY) -m pytest -q -n $(WORKERS) $(ARGS)

# the long tests the default run skips (GPU-sized grids under the interpreter, end-to-end runs)
test-slow: $(STAMP)
	$(PY) -m pytest -q -n $(WORKERS) -m slow $(ARGS)

lint: $(STAMP)
	$(VENV)/bin/ruff check .

bench: $(STAMP)
	$(PY) benchmarks/bench_digitcaps.py $(ARGS)

bench-smoke: $(STAMP)
	$(PY) benchmarks/bench_digitcaps.py --smoke $(ARGS)

bench-host: $(STAMP)
	env -u TRITON_INTERPRET $(PY) benchmarks/bench_digitcaps.py --host-overhead $(ARGS)

# data/gpu-bundle: MNIST gzipped + wheels for benchmarks/gpu_verify.sh on a GPU machine (docs/gpu/README.md)
gpu-bundle: $(STAMP)
	$(PY) benchmarks/gpu_bundle.py

# every autotune config of every kernel for sm_80 and sm_90 (the test suite compiles the defaults)
compile-check: $(STAMP)
	$(PY) -m capstriton.kernels.compile_check $(ARGS)

tune: $(STAMP)
	$(PY) -m capstriton.tune $(ARGS)

clean:
	rm -rf $(VENV) build *.egg-info

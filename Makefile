# Two entry points for a fresh machine; each does all its own set-up.
#   make run   - train the MNIST MLP showcase (experiments/mnist_mlp.py)
#   make test  - lint, format check, type check, package check, the library tests at the JAX
#                floor and under Python 3.13 (make compat-ci), and the whole test suite
#   make compat - the library tests in every supported Python x JAX environment
#   make bench - the CPU benchmark suite (benchmarks/run.py)
#   make device-check - the accelerator check (benchmarks/device_check.py, <= 8 min on one H100)
#   make docs  - the documentation site (Sphinx + MyST, warnings are errors) into docs/_build/html
#   make docs-check - screenshots of the built site in headless Chromium (docs/_build/screenshots)
#   make aot   - compile every case for CPU, H100 and TPU v5e without a device (benchmarks/aot.py)
#   make vocab-blocks - the fused loss's vocabulary block per platform, compiled (vocab_blocks.py)
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: run test test-aot lint package-check compat compat-ci docs docs-check bench device-check aot vocab-blocks mesh-layouts clean

# The deviceless accelerator compiles get their own venv (.venv-aot, requirements-aot.lock):
# the CUDA and TPU compiler plugins stay out of .venv and out of jxent's dependencies.
AOT_VENV := .venv-aot
AOT_BIN := $(AOT_VENV)/bin
AOT_STAMP := $(AOT_VENV)/.installed
# Compile for accelerators on this machine: no GPU probe, no TPU metadata-server queries, no
# libtpu one-process lock (nothing runs on a TPU; a test run may compile beside `make aot`).
AOT_ENV := JAX_PLATFORMS=cpu TPU_SKIP_MDS_QUERY=1 TPU_WORKER_HOSTNAMES=localhost \
	ALLOW_MULTIPLE_LIBTPU_LOAD=1

$(STAMP): requirements.lock pyproject.toml
	$(PYTHON) -m venv --clear $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -r requirements.lock
	$(BIN)/pip install --quiet --no-deps -e .
	touch $(STAMP)

$(AOT_STAMP): requirements-aot.lock pyproject.toml
	$(PYTHON) -m venv --clear $(AOT_VENV)
	$(AOT_BIN)/pip install --quiet --upgrade pip
	$(AOT_BIN)/pip install --quiet -r requirements-aot.lock
	$(AOT_BIN)/pip install --quiet --no-deps -e .
	touch $(AOT_STAMP)

run: $(STAMP)
	$(BIN)/python experiments/mnist_mlp.py $(ARGS)

lint: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/mypy

# Builds the wheel and sdist, installs the wheel into a fresh venv and checks py.typed,
# the licence and the sdist's tests (~30 s; see tools/check_package.py).
package-check: $(STAMP)
	$(BIN)/python tools/check_package.py

docs: $(STAMP)
	$(BIN)/sphinx-build -W --keep-going -q -b html docs docs/_build/html

# Needs Chromium (Debian: apt-get install chromium); see tools/check_docs.py.
docs-check: docs
	$(BIN)/python tools/check_docs.py

test: lint package-check docs test-aot compat-ci
	$(BIN)/python -m pytest -n 2 -m "not aot" $(ARGS)

# tests/benchmarks/test_aot.py: compiled-for-H100 / TPU v5e properties, in .venv-aot (a
# minute or two).
test-aot: $(AOT_STAMP)
	$(AOT_ENV) $(AOT_BIN)/python -m pytest -m aot tests/benchmarks/test_aot.py $(AOT_ARGS)

# The library test suite in separate virtual environments under .compat/ (created once and
# reused; see tools/compat.py and docs/compatibility.md): every supported Python x JAX pair,
# or for CI the JAX floor on Debian's Python 3.11 and the lock on Python 3.13.
compat: $(STAMP)
	$(BIN)/python tools/compat.py $(ARGS)

# CI's time: the slow-marked library tests run at the lock only (the main suite); here the
# rest, at the JAX floor and under Python 3.13. The compiled_memory tests assert what the
# lock's XLA:CPU allocates, which older XLA does not (docs/compatibility.md).
compat-ci: $(STAMP)
	$(BIN)/python tools/compat.py --ci --workers 2 -m "not slow and not compiled_memory"

bench: $(STAMP)
	$(BIN)/python benchmarks/run.py $(ARGS)

device-check: $(STAMP)
	$(BIN)/python benchmarks/device_check.py $(ARGS)

# docs/bench/aot.{json,md,png}; ARGS="--quick" or filters (see benchmarks/aot.py --help).
aot: $(AOT_STAMP)
	$(AOT_ENV) $(AOT_BIN)/python benchmarks/aot.py $(ARGS)

# docs/bench/vocab_blocks.{json,md}: the fused loss's block size per platform, compiled.
vocab-blocks: $(AOT_STAMP)
	$(AOT_ENV) $(AOT_BIN)/python benchmarks/vocab_blocks.py $(ARGS)

# docs/bench/mesh_layouts.{json,md}: the fused loss per device for data / 2-D / vocabulary
# sharding, w as [D, V] and [V, D], Auto and Explicit axes, compiled.
mesh-layouts: $(AOT_STAMP)
	$(AOT_ENV) $(AOT_BIN)/python benchmarks/mesh_layouts.py $(ARGS)

clean:
	rm -rf $(VENV) $(AOT_VENV) .compat .pytest_cache .mypy_cache .ruff_cache .hypothesis docs/_build

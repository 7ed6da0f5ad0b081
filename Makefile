# Two entry points for a fresh machine; each does all its own set-up.
#   make run   - train the MNIST MLP showcase (experiments/mnist_mlp.py)
#   make test  - lint, format check, type check, package check, the library tests at the JAX
#                floor and under Python 3.13 (make compat-ci), and the whole test suite
#   make compat - the library tests in every supported Python x JAX environment
#   make bench - the CPU benchmark suite (benchmarks/run.py)
#   make device-check - the accelerator check (benchmarks/device_check.py, <= 8 min on one H100)
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: run test lint package-check compat compat-ci bench device-check clean

$(STAMP): requirements.lock pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -r requirements.lock
	$(BIN)/pip install --quiet --no-deps -e .
	touch $(STAMP)

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

# The library test suite in separate virtual environments under .compat/ (created once and
# reused; see tools/compat.py and docs/compatibility.md): every supported Python x JAX pair,
# or for CI the JAX floor on Debian's Python 3.11 and the lock on Python 3.13.
compat: $(STAMP)
	$(BIN)/python tools/compat.py $(ARGS)

compat-ci: $(STAMP)
	$(BIN)/python tools/compat.py --ci --workers 2

test: lint package-check compat-ci
	$(BIN)/python -m pytest -n 2 $(ARGS)

bench: $(STAMP)
	$(BIN)/python benchmarks/run.py $(ARGS)

device-check: $(STAMP)
	$(BIN)/python benchmarks/device_check.py $(ARGS)

clean:
	rm -rf $(VENV) .compat .pytest_cache .mypy_cache .ruff_cache .hypothesis

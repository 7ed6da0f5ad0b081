# Two entry points for a fresh machine; each does all its own set-up.
#   make run   - train the MNIST MLP showcase (experiments/mnist_mlp.py)
#   make test  - lint, format check, type check, package check, the docs build and the whole test suite
#   make bench - the CPU benchmark suite (benchmarks/run.py)
#   make device-check - the accelerator check (benchmarks/device_check.py, <= 8 min on one H100)
#   make docs  - the documentation site (Sphinx + MyST, warnings are errors) into docs/_build/html
#   make docs-check - screenshots of the built site in headless Chromium (docs/_build/screenshots)
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: run test lint package-check docs docs-check bench device-check clean

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

docs: $(STAMP)
	$(BIN)/sphinx-build -W --keep-going -q -b html docs docs/_build/html

# Needs Chromium (Debian: apt-get install chromium); see tools/check_docs.py.
docs-check: docs
	$(BIN)/python tools/check_docs.py

test: lint package-check docs
	$(BIN)/python -m pytest -n 2 $(ARGS)

bench: $(STAMP)
	$(BIN)/python benchmarks/run.py $(ARGS)

device-check: $(STAMP)
	$(BIN)/python benchmarks/device_check.py $(ARGS)

clean:
	rm -rf $(VENV) .pytest_cache .mypy_cache .ruff_cache .hypothesis docs/_build

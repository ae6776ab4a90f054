# Two entry points (see README): `make quickstart` runs the main job, `make test` runs the tests.
# Both create .venv and install the pinned dependencies first.
PY ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
WORKDIR ?= workdirs/quickstart

.PHONY: setup data quickstart test bench clean

setup: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	$(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q -e '.[test]'
	touch $@

data: setup
	$(BIN)/python -m locality.data.fetch fashion_mnist

quickstart: data
	$(BIN)/python experiments/sample.py --config configs/sample.py:quickstart --workdir $(WORKDIR)

test: setup
	$(BIN)/python -m pytest -q -n 2 tests

bench: setup
	$(BIN)/python benchmarks/stats_and_optimal.py
	$(BIN)/python benchmarks/pca_locality.py

clean:
	rm -rf $(VENV) workdirs

# Two entry points (see README): `make quickstart` runs the main job, `make test` runs the tests.
# Both create .venv and install the pinned dependencies first.
PY ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
WORKDIR ?= workdirs/quickstart

.PHONY: setup data quickstart lint format test bench clean

setup: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	$(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q -e '.[test]'
	touch $@

data: setup
	$(BIN)/python -m locality.data.fetch fashion_mnist

# The compact end-to-end job (~15 min on 2 CPU cores): GD-trained linear denoisers at the DDIM
# levels, every registered method against the committed UNet (8 samples), sensitivity fields of
# Wiener / linear / UNet / DiT, and the report.
quickstart: data
	$(BIN)/python -m experiments.linear_gd --config configs/linear_gd.py:fashion_mnist,ddim \
		--config.steps=400 --workdir $(WORKDIR)/linear_gd_ddim
	$(BIN)/python -m experiments.compare --config configs/compare.py:fashion_mnist,quick \
		--config.method_kwargs.linear.weights=$(WORKDIR)/linear_gd_ddim/linear_weights.npz \
		--workdir $(WORKDIR)/compare_fashion_mnist
	$(BIN)/python -m experiments.sensitivity --config configs/sensitivity.py:fashion_mnist,quick \
		--config.linear_weights=$(WORKDIR)/linear_gd_ddim/linear_weights.npz \
		--workdir $(WORKDIR)/sensitivity_fashion_mnist
	$(BIN)/python -m experiments.report --results $(WORKDIR) --out $(WORKDIR)/REPORT.md --readme=
	@echo "report: $(WORKDIR)/REPORT.md"

# ruff (lint + format check, line length 100; configured in pyproject.toml). `make format` fixes.
lint: setup
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

format: setup
	$(BIN)/ruff check --fix .
	$(BIN)/ruff format .

test: lint
	$(BIN)/python -m pytest -q -n 2 tests

bench: setup
	$(BIN)/python -m benchmarks.stats_and_optimal
	$(BIN)/python -m benchmarks.pca_locality

clean:
	rm -rf $(VENV) workdirs

# `make train` and `make test` create .venv and install everything on first use.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: help install train test test-full lint format tables clean

help: ## list targets
	@grep -E '^[a-z-]+:.*## ' $(MAKEFILE_LIST) | awk -F':.*## ' '{printf "  %-10s %s\n", $$1, $$2}'

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --upgrade pip
	$(PY) -m pip install -e ".[dev]"
	touch $(STAMP)

install: $(STAMP) ## create .venv with the package and all dependencies

train: $(STAMP) ## run the default job (DEQ fusion on ROSMAP)
	$(PY) train.py $(ARGS)

test: $(STAMP) ## fast test suite (what CI runs), on 2 processes
	$(PY) -m pytest -m "not slow and not gpu" -n 2 -q $(ARGS)

test-full: $(STAMP) ## every test that runs without a GPU, slow ones included
	$(PY) -m pytest -m "not gpu" -q $(ARGS)

lint: $(STAMP) ## ruff check and ruff format --check (CI runs it before the tests)
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .

format: $(STAMP) ## apply ruff's fixes and formatting
	$(VENV)/bin/ruff check --fix .
	$(VENV)/bin/ruff format .

tables: $(STAMP) ## regenerate results/ (tables, figures, results/README.md) from the run records
	$(PY) scripts/make_tables.py

clean: ## remove logs (not results/)
	rm -rf logs outputs multirun

# `make train` and `make test` create .venv and install everything on first use:
# fusionbench with all its extras and the dev tools, at the versions pinned in constraints.txt.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: help install constraints train test test-full lint format tables clean

help: ## list targets
	@grep -E '^[a-z-]+:.*## ' $(MAKEFILE_LIST) | awk -F':.*## ' '{printf "  %-12s %s\n", $$1, $$2}'

$(STAMP): pyproject.toml constraints.txt
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --upgrade pip
	$(PY) -m pip install -e ".[all,dev]" -c constraints.txt
	touch $(STAMP)

install: $(STAMP) ## create .venv with the package, every extra and the dev tools (pinned by constraints.txt)

# torch and what comes with it stay unpinned: see the top of constraints.txt.
UNPINNED := ^(pip|torch|torchvision|triton|nvidia-[a-z0-9-]*|cuda-[a-z0-9-]*)==
constraints: ## re-pin constraints.txt: newest versions of .[all,dev] that resolve, from a scratch venv
	set -e; v=$$(mktemp -d); trap 'rm -rf "$$v"' EXIT; \
	$(PYTHON) -m venv "$$v"; \
	"$$v/bin/pip" install --upgrade pip; \
	"$$v/bin/pip" install -e ".[all,dev]"; \
	{ grep '^#' constraints.txt; "$$v/bin/pip" freeze --all --exclude-editable \
		| grep -v '^#' | grep -viE '$(UNPINNED)'; } > constraints.txt.new; \
	mv constraints.txt.new constraints.txt

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

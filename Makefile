# vugen developer commands. `make help` lists them.
VENV ?= .venv
PYTHON ?= python3
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed-stamp

.PHONY: help install test test-fast demo bench lint format clean

help:  ## list the targets
	@grep -E '^[a-z-]+:.*## ' $(MAKEFILE_LIST) | awk 'BEGIN {FS = ":.*## "}; {printf "  %-10s %s\n", $$1, $$2}'

install: $(STAMP)  ## create .venv and install vugen with its dev extras (idempotent)

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e ".[dev]"
	touch $(STAMP)

test: install  ## run the whole test suite (slow tests included)
	$(PY) -m pytest

test-fast: install  ## run the tests not marked slow
	$(PY) -m pytest -m "not slow"

demo: install  ## the three stages on Shapes with a tiny offline VLM, held-out generation and ShapeEval (CPU)
	$(PY) -m vugen.demo

bench: install  ## speed table vs plain PyTorch in the same run (ARGS="--threads 1 --json bench.json", "--device cuda")
	$(PY) -m benchmarks.run $(ARGS)

lint: install  ## ruff lint and format check
	$(VENV)/bin/ruff check vugen adapters tests examples benchmarks
	$(VENV)/bin/ruff format --check vugen adapters tests examples benchmarks

format: install  ## apply ruff fixes and formatting
	$(VENV)/bin/ruff check --fix vugen adapters tests examples benchmarks
	$(VENV)/bin/ruff format vugen adapters tests examples benchmarks

clean:  ## remove caches and outputs (keeps .venv)
	rm -rf .pytest_cache .ruff_cache build dist *.egg-info outputs lightning_logs

# vugen developer commands. `make help` lists them.
VENV ?= .venv
PYTHON ?= python3
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed-stamp
# Exact versions the test suite passes with (a pip constraints file): `make install` and CI use them, `make lock`
# refreshes them, `make test-latest` tries the newest versions pyproject.toml's ranges allow.
LOCK := requirements/lock.txt
LATEST_VENV ?= .venv-latest

.PHONY: help install install-browser lock test test-heavy test-fast test-latest demo demo-real bench bench-gpu coverage lint format clean

help:  ## list the targets
	@grep -E '^[a-z-]+:.*## ' $(MAKEFILE_LIST) | awk 'BEGIN {FS = ":.*## "}; {printf "  %-12s %s\n", $$1, $$2}'

install: $(STAMP)  ## create .venv and install vugen with its dev extras at the locked versions (idempotent)

# Constraints (-c), not requirements: lock lines for other platforms (nvidia-*, triton) are ignored where unneeded.
$(STAMP): pyproject.toml $(LOCK)
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -c $(LOCK) -e ".[dev]"
	touch $(STAMP)

# Playwright drives the system's Chromium (its own browser download needs the internet); apt needs root.
install-browser:  ## Debian's chromium for the browser tests of `vugen serve` (apt-get; they skip without it)
	command -v chromium >/dev/null || apt-get install -y -qq chromium || (apt-get update -qq && apt-get install -y -qq chromium)

# A fresh throwaway venv, so the lock holds exactly what a new install resolves to today (no leftovers of .venv).
lock:  ## rewrite requirements/lock.txt with the newest versions pyproject.toml allows (fresh temporary venv)
	@set -eu; tmp=$$(mktemp -d); trap 'rm -rf "$$tmp"' EXIT; \
	$(PYTHON) -m venv "$$tmp/venv"; \
	"$$tmp/venv/bin/python" -m pip install --quiet --upgrade pip; \
	"$$tmp/venv/bin/python" -m pip install --quiet -e ".[dev]"; \
	{ echo "# Known-good versions of vugen's dependencies: a pip constraints file (make install: pip install -c)."; \
	  echo "# Made $$(date -u +%Y-%m-%d) by \`make lock\` (the newest versions pyproject.toml allows, in a fresh venv) with"; \
	  "$$tmp/venv/bin/python" -c 'import platform; print(f"# Python {platform.python_version()} on {platform.system()} {platform.machine()}.")'; \
	  echo "# Refresh: make lock, then make test; edit pyproject.toml's ranges, not this file."; \
	  "$$tmp/venv/bin/python" -m pip freeze --exclude-editable; } > "$$tmp/lock.txt"; \
	mkdir -p $(dir $(LOCK)); mv "$$tmp/lock.txt" $(LOCK); \
	echo "wrote $(LOCK)"

# One worker per core (pytest-xdist): the tests are single-threaded (tests/conftest.py), so this is ~1.7x on 2 cores.
test: install  ## run the test suite (slow tests included, heavy ones not), one worker per core
	$(PY) -m pytest -n auto -m "not heavy"

# The shipped family configs at the released models' geometry and the demo's decoder recipe to 30 dB: ~14 CPU-minutes,
# so apart from `make test`; CI runs it.
test-heavy: install  ## run the heavy tests (every family config at released geometry, the demo decoder to 30 dB)
	$(PY) -m pytest -n auto -m heavy

test-fast: install  ## run the tests not marked slow (nor heavy)
	$(PY) -m pytest -n auto -m "not slow and not heavy"

# Not used by CI: warns early when a new release inside pyproject.toml's ranges breaks vugen, before `make lock`.
test-latest:  ## run the tests on the newest versions pyproject.toml allows, in .venv-latest (PYTEST_ARGS="-k ...")
	test -x $(LATEST_VENV)/bin/python || $(PYTHON) -m venv $(LATEST_VENV)
	$(LATEST_VENV)/bin/python -m pip install --quiet --upgrade pip
	$(LATEST_VENV)/bin/python -m pip install --quiet --upgrade --upgrade-strategy eager -e ".[dev]"
	$(LATEST_VENV)/bin/python -m pytest -n auto $(PYTEST_ARGS)

demo: install  ## the three stages on Shapes with a tiny offline VLM, held-out generation and ShapeEval (CPU)
	$(PY) -m vugen.demo

# Needs Debian's fonts-noto-color-emoji (apt-get install fonts-noto-color-emoji) for its image set.
demo-real: install  ## stages 1 and 3 on real images (emoji icons), held-out reconstruction vs linear baselines (CPU)
	$(PY) -m vugen.demo_real

bench: install  ## speed table vs plain PyTorch in the same run (ARGS="--threads 1 --json bench.json", "--device cuda")
	$(PY) -m benchmarks.run $(ARGS)

# One H100 / H200, offline (random weights at the family configs' geometry), <= 8 minutes; --dry-run: tiny, on the CPU.
bench-gpu: install  ## GPU table: matmul peak, decoder/sampler MFU, generation, memory (ARGS="--dry-run", "--json gpu.json")
	$(PY) -m benchmarks.gpu $(ARGS)

coverage: install  ## vugen check on a tiny checkpoint of every image-text-to-text architecture -> docs/coverage.md
	$(PY) -m tools.coverage_matrix $(ARGS)

lint: install  ## ruff lint and format check
	$(VENV)/bin/ruff check vugen adapters tests examples benchmarks tools
	$(VENV)/bin/ruff format --check vugen adapters tests examples benchmarks tools

format: install  ## apply ruff fixes and formatting
	$(VENV)/bin/ruff check --fix vugen adapters tests examples benchmarks tools
	$(VENV)/bin/ruff format vugen adapters tests examples benchmarks tools

clean:  ## remove caches and outputs (keeps .venv)
	rm -rf .pytest_cache .ruff_cache build dist *.egg-info outputs lightning_logs

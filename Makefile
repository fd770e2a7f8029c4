# Every target bootstraps .venv from pyproject.toml by itself, so a fresh clone needs
# nothing but python3 (>= 3.11) and make. Re-running is cheap: pip runs again only
# when pyproject.toml changes.

PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed-stamp
SMOKE  := .venv-smoke
PIP    := PIP_DISABLE_PIP_VERSION_CHECK=1 $(BIN)/python -m pip --quiet

.PHONY: venv lint test coverage smoke demo bench blocking-types clean

$(STAMP): pyproject.toml
	@test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(PIP) install -e '.[dev,cli,images]'
	@touch $@

venv: $(STAMP)

lint: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/mypy

test: lint coverage smoke

coverage: $(STAMP)
	$(BIN)/coverage erase
	$(BIN)/coverage run -m pytest
	$(BIN)/coverage combine --quiet
	$(BIN)/coverage report

# Build the wheel, install it into a fresh venv and use it from outside the source tree.
smoke: $(STAMP)
	rm -rf dist $(SMOKE)
	$(PIP) wheel --no-deps --wheel-dir dist .
	$(PYTHON) -m venv $(SMOKE)
	PIP_DISABLE_PIP_VERSION_CHECK=1 $(SMOKE)/bin/python -m pip --quiet install dist/*.whl
	cd /tmp && $(CURDIR)/$(SMOKE)/bin/python $(CURDIR)/tests/smoke_wheel.py

demo: $(STAMP)
	$(BIN)/deepmode demo

# Every benchmark (each starts the mock in its own process), then the targets table
# into benchmarks/RESULTS.md and README.md. About 5 minutes on 2 cores.
bench: $(STAMP)
	$(BIN)/python benchmarks/batch.py
	$(BIN)/python benchmarks/scaling.py
	$(BIN)/python benchmarks/upload_memory.py
	$(BIN)/python benchmarks/download.py
	$(BIN)/python benchmarks/sync_overhead.py
	$(BIN)/python benchmarks/import_time.py
	$(BIN)/python benchmarks/mock_throughput.py
	$(BIN)/python benchmarks/hub.py
	$(BIN)/python benchmarks/shared_backoff.py
	$(BIN)/python benchmarks/journal.py
	$(BIN)/python benchmarks/report.py

# Client's static types, generated from the async resources (a test says when to rerun).
blocking-types: $(STAMP)
	$(BIN)/python tools/generate_blocking_types.py

clean:
	rm -rf $(VENV) $(SMOKE) dist .coverage .coverage.* .mypy_cache .ruff_cache .hypothesis deepmode-demo

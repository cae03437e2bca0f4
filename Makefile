# The two quick-start commands are `make demo` and `make test`; both set up .venv first.
PYTHON ?= python3.11
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: setup demo compress-demo test test-core lint bench clean

setup: $(STAMP)

$(STAMP): pyproject.toml
	@command -v $(PYTHON) >/dev/null 2>&1 || { echo "error: $(PYTHON) not found; install Python 3.11 or run make PYTHON=/path/to/python3.11"; exit 1; }
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -e '.[dev]'
	touch $(STAMP)

# The main job through the service: embedded `lorita serve` (SQLite, local broker, a worker
# child), `lorita submit` of a LoRITa job on digits, download, verify, print the table.
demo: setup
	$(BIN)/python -m cli.demo

# The same job without the service.
compress-demo: setup
	$(BIN)/lorita compress examples/digits_fcn.json --out var/demo

test: setup
	$(BIN)/python -m pytest -q

test-core: setup
	$(BIN)/python -m pytest -q tests/core

lint: setup
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/mypy

bench: setup
	$(BIN)/python benchmarks/train_overhead.py

clean:
	rm -rf var .pytest_cache .mypy_cache .ruff_cache

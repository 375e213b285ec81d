# Two commands: `make run` starts a working node, `make test` passes the suite.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
AIHUB_HOME ?= $(HOME)/.aihub
export AIHUB_HOME

.PHONY: setup run test lint format bench network network-down clean

setup: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -e '.[dev]'
	touch $@

run: setup
	$(BIN)/aihub init --if-missing
	$(BIN)/aihub serve

lint: setup
	$(BIN)/ruff check --no-cache .
	$(BIN)/ruff format --no-cache --check .
	$(BIN)/lint-imports --no-cache

format: setup
	$(BIN)/ruff check --fix .
	$(BIN)/ruff format .

test: lint
	$(BIN)/pytest

# Benchmarks: not part of `make test` (nor CI). BENCH_ARGS=--quick for a run under a minute.
bench: setup
	@command -v wrk >/dev/null || echo "wrk not found (apt-get install wrk): using the Python load generator"
	$(BIN)/python -m bench $(BENCH_ARGS)

# Three nodes on loopback, joined together; a request routed to a peer, its receipt, balances.
network: setup
	$(BIN)/aihub network up

network-down: setup
	$(BIN)/aihub network down

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache .hypothesis

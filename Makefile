# Two commands: `make run` starts a working node, `make test` passes the suite.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
AIHUB_HOME ?= $(HOME)/.aihub
export AIHUB_HOME

.PHONY: setup run test lint format bench network network-down clean agents browser

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

test: lint browser
	$(BIN)/pytest

# Debian's Chromium, which the dashboard's browser tests drive (tests/test_dashboard_browser.py):
# installed when missing (root only: apt-get), quietly.
CHROMIUM ?= /usr/bin/chromium

browser:
	@test -x $(CHROMIUM) || { [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null \
		&& apt-get update -qq >/dev/null \
		&& DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends chromium >/dev/null; } \
		|| { test -x $(CHROMIUM) || echo "chromium not found: apt-get install chromium (the browser tests need it)"; }

# Coding agents for tests/test_coding_agents.py (Codex CLI, Claude Code), pinned, from npm,
# into .cache/agents (not global). Needs npm; the tests skip with that reason without it.
AGENTS_DIR ?= .cache/agents
CODEX_VERSION ?= 0.171.0
CLAUDE_CODE_VERSION ?= 2.1.332

agents: $(AGENTS_DIR)/.installed

$(AGENTS_DIR)/.installed: Makefile
	npm install --prefix $(AGENTS_DIR) --no-audit --no-fund --no-save --loglevel=error \
		@openai/codex@$(CODEX_VERSION) @anthropic-ai/claude-code@$(CLAUDE_CODE_VERSION)
	touch $@

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

# Two commands: `make run` starts a working node, `make test` passes the suite.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
AIHUB_HOME ?= $(HOME)/.aihub
export AIHUB_HOME

.PHONY: setup check-lock run test lint format bench scale network network-down clean agents lock \
	lock-upgrade postgres browser proxies bench-tools container-tools systemd-root

# Every dependency, runtime and dev, is installed from requirements/: exact versions with their
# hashes (pip --require-hashes), resolved by `make lock` from pyproject.toml. A lock older than
# pyproject.toml's dependencies stops `make setup` with what to run.
LOCK := requirements/dev.txt

setup: check-lock $(VENV)/.installed

check-lock:
	@$(PYTHON) requirements/lockfile.py check

# A new lock rebuilds the virtualenv from scratch (--clear), so nothing outside the lock stays.
$(VENV)/.installed: pyproject.toml requirements/dev.txt | check-lock
	@echo "Installing aihub and its locked dependencies into $(VENV) (a few minutes the first time)"
	$(PYTHON) -m venv $(if $(filter requirements/dev.txt,$?),--clear) $(VENV)
	$(BIN)/pip install --require-hashes --no-deps --progress-bar on -r $(LOCK)
	$(BIN)/pip install --no-deps --no-build-isolation --quiet -e .
	$(BIN)/pip check
	@echo "Installed: $(BIN)/aihub (or put it on your PATH: . $(BIN)/activate)"
	touch $@

# dev.txt: every extra (dev tools, optional backends) for make setup and CI; runtime.txt: the
# runtime dependencies alone, at the same versions, for the Docker image; guardrails.txt: those
# and the guardrails extra (Presidio, detect-secrets), for the image built with GUARDRAILS=1.
# Re-resolve the locks after a change to pyproject.toml's dependencies (or requirements/*.in):
# what is locked stays as it is unless the change needs it moved; `make lock-upgrade` moves
# everything to the newest versions allowed. uv (itself pinned in requirements/uv.txt) writes
# hashes for every platform and Python 3.11+, so one lock serves Linux, macOS and Docker.
LOCK_VENV := .cache/lock
UV := $(LOCK_VENV)/bin/uv
COMPILE = $(UV) pip compile --quiet --universal --python-version 3.11 --generate-hashes \
	--no-header --index-url https://pypi.org/simple $(UPGRADE)

lock:
	$(PYTHON) -m venv $(LOCK_VENV)
	$(LOCK_VENV)/bin/pip install --quiet --require-hashes --no-deps -r requirements/uv.txt
	$(COMPILE) requirements/uv.in -o requirements/uv.txt
	$(COMPILE) pyproject.toml requirements/build.in --all-extras -o requirements/dev.txt
	$(COMPILE) pyproject.toml requirements/build.in -c requirements/dev.txt \
		-o requirements/runtime.txt
	$(COMPILE) pyproject.toml requirements/build.in --extra guardrails -c requirements/dev.txt \
		-o requirements/guardrails.txt
	$(PYTHON) requirements/lockfile.py stamp
	@echo "Locked: requirements/dev.txt, runtime.txt, guardrails.txt, uv.txt; commit them with pyproject.toml"

lock-upgrade:
	$(MAKE) lock UPGRADE=--upgrade

# `make run PORT=9000 NAME=alice`: the port to serve on (written to a new node's config, so
# that what `init` prints to try it says that port), and the name a new node is given.
# Taken from make's command line only: a PORT or NAME the environment holds for something
# else (many hosts set PORT) must not move the node off the port the README says.
given = $(if $(filter command line,$(origin $(1))),$(2) $($(1)))
run: setup
	$(BIN)/aihub init --if-missing $(call given,NAME,--name) $(call given,PORT,--port)
	$(BIN)/aihub serve $(call given,PORT,--port)

lint: setup
	$(BIN)/ruff check --no-cache .
	$(BIN)/ruff format --no-cache --check .
	$(BIN)/lint-imports --no-cache

format: setup
	$(BIN)/ruff check --fix .
	$(BIN)/ruff format .

# The suite in parallel, a test file per worker process and as many workers as cores: files
# share module-scoped nodes and mocks, so a file stays whole. TEST_WORKERS=0 runs it serially.
TEST_WORKERS ?= auto
test: lint postgres browser proxies
	$(BIN)/pytest -n $(TEST_WORKERS) --dist loadfile

# PostgreSQL's server binaries, which the storage and multi-process tests start on loopback
# (tests/postgres.py): Debian's `postgresql` package, installed only when they are missing.
postgres:
	@command -v initdb >/dev/null || ls /usr/lib/postgresql/*/bin/initdb >/dev/null 2>&1 || { \
		echo "installing PostgreSQL (apt-get install postgresql)"; \
		apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq \
			--no-install-recommends postgresql >/dev/null; }

# Debian's Chromium, which the dashboard's browser tests drive (tests/test_dashboard_browser.py):
# installed when missing (root only: apt-get), quietly.
CHROMIUM ?= /usr/bin/chromium

browser:
	@test -x $(CHROMIUM) || { [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null \
		&& apt-get update -qq >/dev/null \
		&& DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null; } \
		|| { test -x $(CHROMIUM) || echo "chromium not found: apt-get install chromium (the browser tests need it)"; }

# Debian's nginx and Caddy for tests/test_reverse_proxy.py (deploy/nginx.conf and
# deploy/Caddyfile in front of a node, a peer routing through them): installed when missing
# (root only), quietly; never run as services.
proxies:
	@{ command -v nginx >/dev/null || test -x /usr/sbin/nginx; } && command -v caddy >/dev/null \
		|| { [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null && apt-get update -qq >/dev/null \
		&& DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends \
			nginx-light caddy >/dev/null; } \
		|| echo "nginx or caddy not found: apt-get install nginx-light caddy (the reverse proxy test needs them)"

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

# A Debian system for tests/test_systemd_unit.py to boot deploy/aihub.service in (systemd-nspawn),
# and the base on which tests/test_docker_image.py builds and runs deploy/Dockerfile and runs
# compose.peers.yml (podman, runc and podman-compose: no Docker engine): debootstrap's minimal
# bookworm with systemd, Python and sudo, into .cache/ (root only: those tests skip when not
# root). The tools are installed when missing; the mirror is the machine's own apt source.
SYSTEMD_ROOT ?= .cache/systemd/bookworm
DEBIAN_MIRROR ?= $(or $(shell sed -n 's/^URIs: *//p' /etc/apt/sources.list.d/debian.sources 2>/dev/null | head -1),http://deb.debian.org/debian)

container-tools:
	@{ command -v debootstrap && command -v systemd-nspawn && command -v podman \
		&& command -v runc && command -v podman-compose && test -x /usr/lib/podman/aardvark-dns \
		&& test -x /usr/libexec/podman/catatonit; } >/dev/null || { \
		echo "installing debootstrap, systemd-nspawn, podman, runc and podman-compose (apt-get)"; \
		apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq \
			--no-install-recommends debootstrap systemd-container podman runc netavark \
			aardvark-dns catatonit podman-compose >/dev/null; }

systemd-root: $(SYSTEMD_ROOT)/.complete

$(SYSTEMD_ROOT)/.complete: | container-tools
	rm -rf $(SYSTEMD_ROOT) && mkdir -p $(SYSTEMD_ROOT)
	debootstrap --variant=minbase \
		--include=systemd,systemd-sysv,dbus,python3,python3-venv,python-is-python3,ca-certificates,sudo \
		bookworm $(abspath $(SYSTEMD_ROOT)) $(DEBIAN_MIRROR) >/dev/null
	touch $@

# Benchmarks: not part of `make test` (nor CI). BENCH_ARGS=--quick for a run under a minute.
# Both modes in one run: pinned (the node alone on a core), then unpinned (everything sharing
# every core, nginx as the floor), each with its own table and results file.
bench: setup postgres bench-tools
	$(BIN)/python -m bench $(BENCH_ARGS)
	$(BIN)/python -m bench --unpinned $(BENCH_ARGS)
	$(BIN)/python -m bench.postgres  # the PostgreSQL arm (bench/README.md)
	$(BIN)/python -m bench.governance  # guardrails and the response cache (bench/README.md)

# The unpinned mode's load generator and floor: Debian's `wrk` and `nginx-light`, installed
# only when they are missing (nginx is run by the bench from a generated config, never as a
# service).
bench-tools:
	@{ command -v wrk >/dev/null && { command -v nginx >/dev/null || test -x /usr/sbin/nginx; }; } || { \
		echo "installing wrk and nginx (apt-get install wrk nginx-light)"; \
		apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq \
			--no-install-recommends wrk nginx-light >/dev/null; }

# N real nodes on loopback joined by invites, measured (bench/README.md): not part of `make test`.
# `make scale SCALE_ARGS="--nodes 10 --topology random --health-interval 5"`.
SCALE_ARGS ?=
scale: setup
	$(BIN)/python -m bench.scale $(SCALE_ARGS)

# Three nodes on loopback, joined together; a request routed to a peer, its receipt, balances.
# `make network PORT=9801`: alice on 9801, bob and carol on the next two.
PORT ?= 8801
network: setup
	$(BIN)/aihub network up --base-port $(PORT)

network-down: setup
	$(BIN)/aihub network down

clean:
	rm -rf $(VENV) $(LOCK_VENV) .pytest_cache .ruff_cache .hypothesis

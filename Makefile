# Two commands set everything up on a fresh machine: `make demo` and `make test`.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed-$(shell cat pyproject.toml | cksum | cut -d' ' -f1)
PYTEST_ARGS ?=

.PHONY: all venv system-deps lint test test-stress check e2e demo demo-check bench clean

all: test

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q -e '.[test]'
	rm -f $(VENV)/.installed-*
	touch $(STAMP)

venv: $(STAMP)

# System packages the tests use (OpenSSH client and server, socat, Chromium); installed only
# when missing. The development identity provider's npm packages come from its lockfile.
system-deps: deploy/dev-idp/node_modules/.installed
	@bash scripts/install-system-deps.sh

deploy/dev-idp/node_modules/.installed: deploy/dev-idp/package-lock.json
	cd deploy/dev-idp && npm ci --no-audit --no-fund --loglevel=error
	touch $@

lint: venv
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/mypy
	$(BIN)/lint-imports

# Everything: lint, unit, integration and the slow end-to-end tests with real OpenSSH and gcloud.
test: venv system-deps lint
	$(BIN)/pytest -q -p no:cacheprovider $(PYTEST_ARGS)

# The quick inner loop: no slow end-to-end tests.
check: venv lint
	$(BIN)/pytest -q -p no:cacheprovider -m "not e2e" $(PYTEST_ARGS)

e2e: venv system-deps
	$(BIN)/pytest -q -p no:cacheprovider -m e2e $(PYTEST_ARGS)

# The timing-sensitive suites under load on purpose: one busy loop pinned to each core, then the
# known-sensitive tests STRESS_REPEAT (default 3) more times (scripts/stress.sh).
test-stress: venv system-deps
	@bash scripts/stress.sh

BENCH_STAMP := $(VENV)/.bench-$(shell cat pyproject.toml | cksum | cut -d' ' -f1)

$(BENCH_STAMP): $(STAMP)
	$(BIN)/python -m pip install -q -e '.[test,bench]'
	rm -f $(VENV)/.bench-*
	touch $@

# Benchmarks (loopback only, ~6 min on 2 cores): tunnel-client + relay against direct TCP, socat,
# websockify, a bare websockets chain and the gcloud CLI; prints the tables and writes
# docs/benchmarks.md; HTTP mode against nginx and a bare aiohttp proxy with wrk, the PROXY v2
# identity header per tunnel and SSH certificates (their sections of docs/benchmarks.md, ~5 min);
# then the scale-out figures (3 relays + Redis) into docs/benchmarks-cluster.md; then audit search
# on 1,000,000 records (SQLite and PostgreSQL) into docs/benchmarks-audit.md.
# bench.gate runs those steps in order and judges the targets only when the 1-minute load average
# at its start is at most 0.5: on a busier machine everything still runs and is written, the
# output and the docs say the targets were not judged, and bench.gate exits 3 (1: a step failed);
# make reports it as "Error 3" (make's own status is 2 for any failed recipe: scripts that
# must tell a busy run from a failure run `.venv/bin/python -m bench.gate` themselves).
# Tunnel-open latency alone: $(BIN)/python -m bench.handshake
bench: $(BENCH_STAMP)
	@bash scripts/install-bench-deps.sh
	$(BIN)/python -m bench.gate --out docs/benchmarks.md

demo: venv system-deps
	$(BIN)/python -m scripts.demo

# Start the demo stack in its own state directory (.demo-check: a running `make demo` is left
# alone), check login, ssh, HTTP mode, the console and the admin CLI end to end, stop.
demo-check: venv system-deps
	$(BIN)/python -m scripts.demo --check

clean:
	rm -rf $(VENV) .mypy_cache .ruff_cache .pytest_cache build *.egg-info

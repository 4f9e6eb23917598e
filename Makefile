# Two commands set up everything on a fresh machine:
#   make demo   creates .venv, installs tracklog and trains the demo agent
#   make test   installs the dev tools, then runs ruff, mypy --strict, pyright and pytest
SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
PY := $(BIN)/python
# The CPU build of torch that lies on this machine's disk; it must be installed
# before stable-baselines3, or pip resolves a multi-GB CUDA build instead.
TORCH := torch==2.13.0
# MLflow's client and server would otherwise try to send usage telemetry off the machine.
export MLFLOW_DISABLE_TELEMETRY ?= true

.PHONY: install install-dev demo test lint typecheck pytest bench clean postgres bench-scale

$(BIN)/activate:
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip

$(VENV)/.installed: $(BIN)/activate pyproject.toml
	$(PY) -m pip install --quiet $(TORCH)
	$(PY) -m pip install --quiet -e '.[all,demo]'
	touch $@

# The dev tools in the same pip run as the package and its extras (one resolve and one
# editable build instead of two: ~10 s less on a fresh clone); torch still goes first.
$(VENV)/.installed-dev: $(BIN)/activate pyproject.toml
	$(PY) -m pip install --quiet $(TORCH)
	$(PY) -m pip install --quiet -e '.[all,demo,dev]'
	touch $(VENV)/.installed $@

install: $(VENV)/.installed

install-dev: $(VENV)/.installed-dev

demo: install
	$(BIN)/tracklog demo --settings examples/demo.yaml

lint: install-dev
	$(BIN)/ruff check src tests examples bench docs/hooks
	$(BIN)/ruff format --check src tests examples bench docs/hooks

typecheck: install-dev
	$(BIN)/mypy --strict
	$(BIN)/pyright -p .

# PostgreSQL for the scale tests and bench-scale, from Debian's packages if missing
# (CI runs as root on a clean machine); tests/postgres.py starts a throwaway cluster
# of it on 127.0.0.1. Debian keeps pg_ctl and initdb in /usr/lib/postgresql/*/bin.
postgres:
	@if command -v pg_ctl >/dev/null || ls /usr/lib/postgresql/*/bin/pg_ctl >/dev/null 2>&1; then \
		true; \
	elif [ "$$(id -u)" = 0 ]; then \
		apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq postgresql; \
	else \
		echo "PostgreSQL is missing: run 'sudo apt-get install -y postgresql'" >&2; exit 1; \
	fi

# pytest-xdist: each test file runs whole on one of PYTEST_WORKERS processes (loadfile:
# a file's module fixtures run once), the longest files first (tests/conftest.py, hence
# --no-loadscope-reorder). Most tests wait (servers starting, processes killed, fresh
# interpreters importing torch), so 3 processes keep 2 cores busy.
PYTEST_WORKERS ?= 3

pytest: install-dev postgres
	$(BIN)/pytest -q -n $(PYTEST_WORKERS) --dist loadfile --no-loadscope-reorder

# lint, typecheck and pytest at once (the type checkers use the cores that pytest leaves
# idle while it waits); each one's output is printed whole when it ends.
test: install-dev postgres
	$(MAKE) --no-print-directory -j3 --output-sync=target lint typecheck pytest

# Training-thread cost against the anchors, each measured interleaved in one process:
# SB3's own Logger, the seed's per-key log_metric against a real mlflow server, and
# wandb.Video's GIF encoding; a row per episode (EpisodeCallback); then background
# delivery with all six outputs (PPO end to end, and a 2-minute MLflow outage: several
# minutes; --quick for a smoke run).
bench: install-dev
	$(PY) bench/bench_dump.py
	$(PY) bench/bench_mlflow.py
	$(PY) bench/bench_video.py
	$(PY) bench/bench_episodes.py
	$(PY) bench/bench_delivery.py

# A sweep into one mlflow server on PostgreSQL: points/s from 1, 4 and 8 processes
# through tracklog beside the ceiling (direct MlflowClient.log_batch), zero loss checked.
bench-scale: install-dev postgres
	$(PY) bench/bench_scale.py

clean:
	rm -rf $(VENV) runs mlruns mlflow.db .pytest_cache .mypy_cache .ruff_cache .hypothesis

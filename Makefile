# Quick start: `make run` (set up + run the whole pipeline), `make test` (set up + run the tests).
SHELL := /bin/bash
PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV := .venv
BIN := $(CURDIR)/$(VENV)/bin

# Stages are `python -m tasks.<stage>` in dvc.yaml: put the project's interpreter first.
export PATH := $(BIN):$(PATH)
# No network for telemetry here, and nobody asked for it.
export DO_NOT_TRACK := 1
export DVC_NO_ANALYTICS := 1
export PREFECT_SERVER_ANALYTICS_ENABLED := false
export MPLBACKEND := Agg

.PHONY: setup run test tensorboard plots clean
.DEFAULT_GOAL := run

$(VENV)/.installed: pyproject.toml
	@$(PYTHON) -c 'import sys; assert sys.version_info[:2] == (3, 11), "qatflow needs Python 3.11, got " + sys.version' 
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet -e '.[dev]'
	touch $@

.dvc/config:
	@if git rev-parse --git-dir >/dev/null 2>&1; then $(BIN)/dvc init --quiet; \
	else $(BIN)/dvc init --quiet --no-scm; fi
	$(BIN)/dvc config core.analytics false

setup: $(VENV)/.installed .dvc/config

run: setup
	$(BIN)/dvc repro

test: setup
	$(BIN)/python -m pytest

tensorboard: setup
	$(BIN)/tensorboard --logdir runs --host 127.0.0.1

plots: setup
	$(BIN)/dvc plots show --open || $(BIN)/dvc plots show

clean:
	rm -rf $(VENV) runs .pytest_cache

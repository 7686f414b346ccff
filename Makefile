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

.PHONY: setup lock run test flow sweep server serve deploy worker cpp bench bench-orchestration bench-prepare bench-ddp bench-families bench-nets bench-train docs check-model gpu-check tensorboard plots clean
.DEFAULT_GOAL := run

CHECK_PYTHON := $(PYTHON) -c 'import sys; assert sys.version_info[:2] == (3, 11), "qatflow needs Python 3.11, got " + sys.version'

# pyproject.toml says which packages (ranges), requirements.lock which versions: the exact ones of
# the reference run. A changed lock re-installs.
$(VENV)/.installed: pyproject.toml requirements.lock
	@$(CHECK_PYTHON)
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet -c requirements.lock -e '.[dev]'
	touch $@

# Re-pin every dependency after changing pyproject.toml's: installs pyproject's ranges (dev extra,
# no lock) into a throwaway venv in a temp folder, freezes it into requirements.lock (written beside
# it as requirements.lock.tmp, then renamed) and removes the venv. Local version labels are dropped:
# torch 2.13.0+cpu is pinned as torch==2.13.0, which pip resolves to that CPU wheel where it lies.
lock:
	@$(CHECK_PYTHON)
	@set -euo pipefail; \
	tmp=$$(mktemp -d); trap 'rm -rf "$$tmp" requirements.lock.tmp' EXIT; \
	echo "lock: installing pyproject.toml's ranges into a throwaway venv in $$tmp"; \
	$(PYTHON) -m venv "$$tmp/venv"; \
	"$$tmp/venv/bin/python" -m pip install --quiet -e '.[dev]'; \
	{ echo "# requirements.lock: pip constraints pinning every package qatflow installs, direct or"; \
	  echo "# transitive, to one exact version (the project itself excluded). \`make setup\` installs"; \
	  echo "# with \`pip install -c requirements.lock -e '.[dev]'\`; pyproject.toml keeps the ranges."; \
	  echo "# Made by \`make lock\`, the one command that refreshes it: a fresh venv in a temp folder,"; \
	  echo "# pyproject.toml's ranges installed with the dev extra and no constraints, then \`pip freeze\`"; \
	  echo "# with local version labels dropped (torch==2.13.0 takes the 2.13.0+cpu wheel where it lies)."; \
	  "$$tmp/venv/bin/python" -c 'import platform; print(f"# Resolved on {platform.system()} {platform.machine()}, CPython {platform.python_version()}.")'; \
	  "$$tmp/venv/bin/python" -m pip freeze --exclude-editable --exclude qatflow \
	    | sed -E 's/^([^=[:space:]]+==[^+[:space:]]+)\+[^[:space:]]*$$/\1/'; \
	} > requirements.lock.tmp; \
	grep -q '^torch==' requirements.lock.tmp || { echo "lock: no torch pin in the freeze" >&2; exit 1; }; \
	if grep -v '^#' requirements.lock.tmp | grep -qv '=='; then \
	  echo "lock: a line without an == pin:" >&2; grep -v '^#' requirements.lock.tmp | grep -v '==' >&2; exit 1; fi; \
	mv -f requirements.lock.tmp requirements.lock; \
	echo "lock: wrote requirements.lock ($$(grep -vc '^#' requirements.lock) packages pinned)"

.dvc/config:
	@if git rev-parse --git-dir >/dev/null 2>&1; then $(BIN)/dvc init --quiet; \
	else $(BIN)/dvc init --quiet --no-scm; fi
	$(BIN)/dvc config core.analytics false

setup: $(VENV)/.installed .dvc/config

# DVC parses params.yaml itself, with no guard against a YAML alias bomb: qatflow's reader first.
run: setup
	$(BIN)/python -m tasks.params --check params.yaml
	$(BIN)/dvc repro

# Whole test files per worker (--dist loadfile): a file's module fixtures (a flow run, a Prefect
# server) are made once, and the session's one `dvc repro` is shared by all workers.
TEST_WORKERS ?= 2
test: setup
	$(BIN)/python -m pytest -n $(TEST_WORKERS) --dist loadfile

# The same pipeline as a Prefect flow, saved as a DVC experiment (FLOW_ARGS="--set train.epochs=3").
flow: setup
	$(BIN)/python -m flows.pipeline $(FLOW_ARGS)

# A parameter sweep, each point a DVC experiment, in parallel on Dask
# (SWEEP_ARGS="--grid train.lr=1e-3,3e-3 --grid qat.epochs=2,4"; docs/scaling-out.md).
sweep: setup
	$(BIN)/python -m flows.sweep $(SWEEP_ARGS)

# Schedules need a real server: `make server` in one terminal, then `make serve`, or `make deploy`
# and `make worker`, in another. They talk to the local server unless PREFECT_API_URL says otherwise.
serve deploy worker: export PREFECT_API_URL ?= http://127.0.0.1:4200/api

server: setup
	$(BIN)/prefect server start --host 127.0.0.1 --port 4200

serve: setup
	$(BIN)/python -m flows.serve $(SERVE_ARGS)

deploy: setup
	$(BIN)/prefect work-pool inspect qatflow >/dev/null 2>&1 || $(BIN)/prefect work-pool create qatflow --type process
	$(BIN)/prefect --no-prompt deploy --all

worker: setup
	$(BIN)/prefect worker start --pool qatflow

# C++ runner for the exported models, linked against the libtorch inside the venv's torch wheel.
CPP_BUILD := deploy/cpp/build
CPP_JOBS ?= 2
cpp: setup
	cmake -S deploy/cpp -B $(CPP_BUILD) -DCMAKE_BUILD_TYPE=Release \
	  -DCMAKE_PREFIX_PATH="$$($(BIN)/python -c 'import torch; print(torch.utils.cmake_prefix_path)')"
	cmake --build $(CPP_BUILD) -j$(CPP_JOBS)

# Every model variant side by side: Python and C++ latency, sizes, accuracy, training-loop and
# no-op `dvc repro` overhead, the quantize_static comparison and latency under a competing load the
# bench starts itself, against the targets -> bench/results.json, bench/results.png (~14 min here).
# BENCHMARK_ARGS=--quick for a seconds-long run.
bench: cpp
	$(BIN)/python -m bench.benchmark $(BENCHMARK_ARGS)

# Prefect flow vs dvc repro on the same work (minutes; BENCH_ARGS=--tiny for seconds).
bench-orchestration: setup
	$(BIN)/python -m bench.orchestration $(BENCH_ARGS)

# prepare on a generated ~1 GB .npz: throughput and peak memory (BENCH_ARGS=--quick for seconds).
bench-prepare: setup
	$(BIN)/python -m bench.prepare_large $(BENCH_ARGS)

# Train-stage epoch time at DDP nproc 1 and 2 (one thread each), scaling efficiency -> bench/ddp.json.
bench-ddp: setup
	$(BIN)/python -m bench.ddp $(BENCH_ARGS)

# Test accuracy of each model family on real data (digits, a tabular CSV, sequences) -> bench/families.json.
bench-families: setup
	$(BIN)/python -m bench.families $(BENCH_ARGS)

# The example nets of nets/ through every stage and runtime on the built-in data -> bench/nets.json.
bench-nets: setup
	$(BIN)/python -m bench.nets $(BENCH_ARGS)

# Training samples/s of the default CNN in fp32, bf16, channels_last and both, side by side, with
# accuracy and bitwise repeatability per mode -> bench/train_speed.json (BENCH_ARGS=--quick).
bench-train: setup
	$(BIN)/python -m bench.train_speed $(BENCH_ARGS)

# The measured tables of README.md and docs/, rewritten from the committed bench JSON.
docs: setup
	$(BIN)/python -m bench.tables

# Your net (train.model.family) through every target before any training: a table of ok / why not.
# Needs data/prepared (`dvc repro prepare`) for the sample shape and classes.
check-model: setup
	$(BIN)/dvc repro prepare
	$(BIN)/python -m tasks.preflight $(CHECK_ARGS)

# On a CUDA machine, with the python that has its CUDA torch (PYTHON=..., no venv): train and both
# QAT engines on the GPU on tiny data, export on CPU, beside a CPU run (GPU_CHECK_ARGS="--precision bf16").
gpu-check:
	$(PYTHON) -m bench.gpu_check $(GPU_CHECK_ARGS)

tensorboard: setup
	$(BIN)/tensorboard --logdir runs --host 127.0.0.1

plots: setup
	$(BIN)/dvc plots show --open || $(BIN)/dvc plots show

clean:
	rm -rf $(VENV) runs .pytest_cache .prefect $(CPP_BUILD)

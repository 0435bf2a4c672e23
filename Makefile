# Two entry points for a fresh machine (Python 3.11, nothing else installed):
#   make demo   -> create .venv, install torch (CPU build) then the project, run the embedded default job
#   make test   -> same setup, then the default test suite (what CI runs)
PYTHON ?= python3.11
VENV   ?= .venv
BIN    := $(VENV)/bin
TORCH  ?= torch==2.13.0
PYTEST_ARGS ?=
GPU_CHECK_ARGS ?=

.PHONY: setup demo test test-all lint aot bench gpu-check docs clean

setup: $(VENV)/.installed

$(VENV)/.installed: setup.py pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	# torch first: a bare `torch` requirement on an empty venv would pull a multi-GB CUDA build.
	$(BIN)/python -m pip install -q $(TORCH)
	$(BIN)/python -m pip install -q -e '.[dev,trl,docs,megatron]'
	touch $@

demo: setup
	$(BIN)/mallowspo-train --demo

test: setup
	$(BIN)/python -m pytest -m "not slow" $(PYTEST_ARGS)

test-all: setup
	$(BIN)/python -m pytest $(PYTEST_ARGS)

lint: setup
	$(BIN)/ruff check .

aot: setup
	$(BIN)/python -m mallowspo_fast.ops.aot

bench: setup
	$(BIN)/python -m benchmarks --quick

gpu-check: setup
	$(BIN)/python -m benchmarks.gpu_check $(GPU_CHECK_ARGS)

docs: setup
	$(BIN)/mkdocs build --strict

clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache .ruff_cache

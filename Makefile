# megatron-step: thin targets. `make install` then `make test`; `make demo` runs the tiny pipeline.
SHELL := /bin/bash
VENV  ?= .venv
PY    := $(VENV)/bin/python
# Tests: CPU suite (unit + 2-process gloo). `slow` and `gpu` tests are opt-in.
PYTEST_ARGS ?=

# A Python 3.12 interpreter: PATH first, then pyenv's versions (megatron-core 0.19 needs 3.12).
PYTHON312 ?= $(shell for p in python3.12 $$(ls -d $${PYENV_ROOT:-$$HOME/.pyenv}/versions/3.12*/bin/python3.12 2>/dev/null | sort -Vr); do \
  command -v $$p >/dev/null 2>&1 && $$p -c 'import sys; sys.exit(sys.version_info[:2] != (3, 12))' 2>/dev/null \
  && { command -v $$p; break; }; done)

.PHONY: install test test-all test-gpu lint format demo demo-platform bench clean

install: $(VENV)/.installed

$(VENV)/.installed: requirements.txt pyproject.toml
	@if [ -z "$(PYTHON312)" ]; then \
	  echo "error: no Python 3.12 found on PATH or in pyenv; install one (e.g. 'pyenv install 3.12') or run 'make install PYTHON312=/path/to/python3.12'." >&2; exit 1; fi
	@echo "Using $(PYTHON312)"
	$(PYTHON312) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -r requirements.txt
	$(PY) -m pip install -q --no-deps --no-build-isolation -e .
	@touch $@

test: install
	$(PY) -m pytest -m "not slow and not gpu" $(PYTEST_ARGS)

test-all: install
	$(PY) -m pytest -m "not gpu" $(PYTEST_ARGS)

test-gpu: install
	$(PY) -m pytest -m gpu $(PYTEST_ARGS)

lint: install
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .

format: install
	$(VENV)/bin/ruff format .
	$(VENV)/bin/ruff check --fix .

# The main job: embedded corpus -> tokenizer -> indexed data -> tiny Step 3.5 Flash pretraining
# (300 steps on CPU), TensorBoard logs and checkpoints under runs/tiny.
demo: install
	$(PY) pretrain/pretrain_step.py --config examples/tiny/tiny.yaml train.overwrite=true

# The platform demo: one small MoE GPT under 1 process, TP=2 and DP=2 with matching loss curves.
demo-platform: install
	$(PY) -m benchmarks.demo

bench: install
	$(PY) -m benchmarks.bench

clean:
	rm -rf $(VENV) runs .pytest_cache .ruff_cache

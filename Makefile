# medeman: `make demo` runs the main job on sample_data/, `make test` runs the tests.
# Both create or reuse .venv and install into it: torch first, pinned (override with
# `make test TORCH='torch==2.5.1'`, e.g. for a CUDA build), then the package with its extras.

PYTHON ?= python3
VENV ?= .venv
TORCH ?= torch==2.13.0
PY := $(VENV)/bin/python
STAMP := $(VENV)/.medeman-installed
RUN ?= runs/demo
PYTEST_ARGS ?=

.PHONY: install test lint demo bench clean-demo

$(STAMP): pyproject.toml Makefile
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet "$(TORCH)"
	$(PY) -m pip install --quiet -e ".[dev]"
	touch $(STAMP)

install: $(STAMP)

test: $(STAMP)
	$(PY) -m pytest -q $(PYTEST_ARGS)

lint: $(STAMP)
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .

demo: $(STAMP)
	$(PY) -m medeman.demo --out $(RUN)

bench: $(STAMP)
	$(PY) benchmarks/bench_eman_update.py

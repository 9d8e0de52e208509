# `make demo` and `make test` each build .venv with pip on first use.
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed-stamp

.PHONY: demo test test-fast lint bench-engine bench-enqueue bench-worker bench-soak bench-faults gpu-check

$(STAMP): pyproject.toml
	test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e '.[dev]'
	touch $(STAMP)

demo: $(STAMP)
	$(VENV)/bin/trapq demo

# Everything, on JOBS pytest-xdist workers: most tests wait on workers and servers, so more
# processes than cores pay off. Each xdist worker has its own database, queues and processes;
# tests of one xdist_group (the `serial` and shared-worker ones, tests/tiers.py) share one.
JOBS ?= 4
test: $(STAMP)
	$(VENV)/bin/pytest -n $(JOBS) --dist loadgroup

# The tests that start no worker, CLI subprocess or server (tests/tiers.py): under a minute.
FAST_JOBS ?= 2
test-fast: $(STAMP)
	$(VENV)/bin/pytest -m "not slow" -n $(FAST_JOBS) --dist loadgroup

lint: $(STAMP)
	$(VENV)/bin/ruff check .

# Benchmarks print side-by-side figures and end with a `RESULT k=v ...` line.
# IMAGES=DIR runs the image benchmarks on real captures, e.g. IMAGES=../shared/data/moth-trap-captures
IMAGES ?=
IMAGES_ARG := $(if $(IMAGES),--images $(IMAGES),)

bench-engine: $(STAMP)
	$(PY) -m bench.engine $(IMAGES_ARG)

bench-enqueue: $(STAMP)
	$(PY) -m bench.enqueue

bench-worker: $(STAMP)
	$(PY) -m bench.worker

bench-soak: $(STAMP)
	$(PY) -m bench.soak $(IMAGES_ARG)

bench-faults: $(STAMP)
	$(PY) -m bench.faults

# The one-shot GPU check for a lent GPU machine: its own python3, torch and torchvision, no
# venv and none of trapq's other dependencies. IMAGES=DIR adds real captures.
GPU_PYTHON ?= python3
gpu-check:
	PYTHONPATH=. $(GPU_PYTHON) -m bench.gpu_check $(IMAGES_ARG)

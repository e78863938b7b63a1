# Two commands set everything up on a fresh machine: `make demo` and `make test`.
# torch is installed FIRST and pinned, so that pip never pulls a multi-GB CUDA build
# on a CPU-only machine. GPU hosts: `make setup TORCH_SPEC="torch==2.13.0 --index-url https://download.pytorch.org/whl/cu128"`.
PYTHON ?= python3
VENV ?= .venv
TORCH_SPEC ?= torch==2.13.0
PY := $(VENV)/bin/python
STAMP := $(VENV)/.medseg-installed

.PHONY: setup demo test lint bench clean

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

lint: $(STAMP)
	$(VENV)/bin/ruff check medseg tests benchmarks workflows

bench: $(STAMP)
	$(PY) benchmarks/crf_benchmark.py

clean:
	rm -rf runs .pytest_cache

# Docker images + the compose MLflow stack, built and exercised (needs a Docker engine; not part of `make test`).
# HOST_PYTHON: a Python with nibabel and mlflow for the host-side checks (default: this venv).
.PHONY: docker-test
docker-test:
	HOST_PYTHON=$${HOST_PYTHON:-$(abspath $(PY))} bash docker/test.sh

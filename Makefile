# Two commands set everything up on a fresh machine: `make demo` and `make test`.
# torch is installed FIRST and pinned, so that pip never pulls a multi-GB CUDA build
# on a CPU-only machine. GPU hosts: `make setup TORCH_SPEC="torch==2.13.0 --index-url https://download.pytorch.org/whl/cu128"`.
PYTHON ?= python3
VENV ?= .venv
TORCH_SPEC ?= torch==2.13.0
PY := $(VENV)/bin/python
STAMP := $(VENV)/.medseg-installed

.PHONY: setup demo test test-fast lint bench clean constraints

$(STAMP): pyproject.toml constraints.txt
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet $(TORCH_SPEC)
	$(PY) -m pip install --quiet -c constraints.txt -e ".[test]"
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

# speed beside the MONAI reference (quick mode, about 15 minutes on 2 cores)
bench: $(STAMP)
	$(PY) -m pip install --quiet -c constraints.txt -e ".[bench]"
	$(PY) benchmarks/run_all.py

clean:
	rm -rf runs .pytest_cache

# the tested set, pinned (torch excluded: TORCH_SPEC chooses the build)
constraints: $(STAMP)
	{ sed -n '1,4p' constraints.txt; $(PY) -m pip freeze --exclude-editable | grep -v -i -E '^(medseg|torch|nvidia-|triton)[=@ ]'; } > constraints.txt.new
	mv constraints.txt.new constraints.txt

# Docker images + the compose MLflow stack, built and exercised (needs a Docker engine; not part of `make test`).
# HOST_PYTHON: a Python with nibabel and mlflow for the host-side checks (default: this venv).
.PHONY: docker-test
docker-test:
	HOST_PYTHON=$${HOST_PYTHON:-$(abspath $(PY))} bash docker/test.sh

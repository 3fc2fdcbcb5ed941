# Build the venv from nothing, then run the demo, tests or benchmark inside it.
PYTHON ?= python3
VENV := .venv
STAMP := $(VENV)/.installed
UV_VERSION := 0.13.9
# --compile-bytecode: the venv's .pyc files are written once here, since a PYTHONDONTWRITEBYTECODE
# environment would otherwise recompile torch's sources in every process the tests start (~8 s each).
# /opt/wheels holds the local CPU torch wheel where present; PyPI serves the rest.
FIND_LINKS := $(if $(wildcard /opt/wheels),--find-links /opt/wheels,)

# Two test workers, one test file each at a time (--dist loadfile keeps a file's module fixtures in one
# worker): most tests run one single-threaded process, so a second worker fills the second core.
TEST_WORKERS ?= 2
PYTEST := $(VENV)/bin/python -m pytest -q -n $(TEST_WORKERS) --dist loadfile

.PHONY: .venv demo test test-fast bench

.venv: $(STAMP)

$(STAMP): pyproject.toml constraints-cpu.txt
	test -x $(VENV)/bin/python || $(PYTHON) -m venv $(VENV)
	$(VENV)/bin/pip install -q uv==$(UV_VERSION)
	$(VENV)/bin/uv pip install --python $(VENV)/bin/python $(FIND_LINKS) --compile-bytecode -c constraints-cpu.txt -e '.[dev]'
	touch $@

demo: $(STAMP)
	$(VENV)/bin/python -m and_dist.train --config demo

test: $(STAMP)
	$(PYTEST) --durations=25 tests

# the in-process checks of the method, the trainer and evaluation (no process started): minutes, not a quarter hour
test-fast: $(STAMP)
	$(PYTEST) -m "not slow" --durations=10 tests

bench: $(STAMP)
	$(VENV)/bin/python benchmarks/discovery.py

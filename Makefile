# Build the venv from nothing, then run the demo, tests or benchmark inside it.
PYTHON ?= python3
VENV := .venv
STAMP := $(VENV)/.installed
UV_VERSION := 0.13.9
# /opt/wheels holds the local CPU torch wheel where present; PyPI serves the rest.
FIND_LINKS := $(if $(wildcard /opt/wheels),--find-links /opt/wheels,)

.PHONY: .venv demo test bench

.venv: $(STAMP)

$(STAMP): pyproject.toml constraints-cpu.txt
	test -x $(VENV)/bin/python || $(PYTHON) -m venv $(VENV)
	$(VENV)/bin/pip install -q uv==$(UV_VERSION)
	$(VENV)/bin/uv pip install --python $(VENV)/bin/python $(FIND_LINKS) -c constraints-cpu.txt -e '.[dev]'
	touch $@

demo: $(STAMP)
	$(VENV)/bin/python -m and_dist.train --config demo

test: $(STAMP)
	$(VENV)/bin/python -m pytest -q tests

bench: $(STAMP)
	$(VENV)/bin/python benchmarks/discovery.py

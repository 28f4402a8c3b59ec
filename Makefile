# Two commands on a fresh machine:
#   make demo   - set up, export the shipped all-MiniLM-L6-v2, compile it for x86, print before/after
#   make test   - set up, run the whole test suite (slow real-model tests included)
VENV ?= .venv
PY := $(VENV)/bin/python

.PHONY: demo test test-fast setup

setup: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e '.[test,bench]'
	touch $@

demo: setup
	$(PY) -m passes.tools.demo

test: setup
	$(PY) -m pytest -q -n 2

test-fast: setup
	$(PY) -m pytest -q -n 2 -m "not slow"

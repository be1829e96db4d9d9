# Two commands do all set-up on a fresh machine: `make demo` and `make test` (see README).
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed-stamp

.PHONY: demo test test-quick lint typecheck install bench

install: $(STAMP)

# torch is pinned and installed first, alone: an unpinned torch would pull a multi-GB CUDA build.
$(STAMP): pyproject.toml
	python3 -m venv $(VENV)
	$(PY) -m pip install --quiet --disable-pip-version-check torch==2.13.0
	$(PY) -m pip install --quiet --disable-pip-version-check -e ".[dev,flower]"
	touch $(STAMP)

demo: $(STAMP)
	$(VENV)/bin/spmc demo

# ruff, then mypy strict on src/spmc (the files and options are in pyproject.toml's [tool.mypy]).
lint: $(STAMP)
	$(VENV)/bin/ruff check src tests benchmarks scripts
	$(VENV)/bin/mypy

typecheck: $(STAMP)
	$(VENV)/bin/mypy

test: lint
	$(PY) -m pytest

# The development subset: everything but the tests marked slow (the Flower deployment, ...).
test-quick: lint
	$(PY) -m pytest -m "not slow"

bench: $(STAMP)
	$(PY) benchmarks/bench_core.py

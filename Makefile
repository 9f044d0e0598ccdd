# One entry point for set-up, tests and benchmarks. `make test` works on a fresh machine:
# it creates .venv and installs the package with its test extras first.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: setup demo test lint bench clean

setup: $(STAMP)

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -e '.[test]'
	touch $(STAMP)

demo: $(STAMP)
	$(BIN)/audit demo

test: $(STAMP) lint
	$(BIN)/python -m pytest

lint: $(STAMP)
	$(BIN)/ruff check audit tests
	$(BIN)/ruff format --check audit tests

bench: $(STAMP)
	$(BIN)/audit bench engine

clean:
	rm -rf $(VENV) .pytest_cache build *.egg-info

# The same targets run on a developer's machine and in CI (.ci/run).
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
PORT   ?= 8000

.PHONY: install test lint typecheck serve bench clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip

install: $(BIN)/python
	$(BIN)/python -m pip install --quiet -e '.[dev]'

# Installs what it needs, then runs the whole suite with branch coverage.
test: install
	$(BIN)/python -m pytest --cov=aioserve --cov-branch --cov-report=term-missing:skip-covered

lint: install
	$(BIN)/ruff check aioserve tests benchmarks examples
	$(BIN)/ruff format --check aioserve tests benchmarks examples

typecheck: install
	$(BIN)/mypy

# A server with the example deployment (examples/deployment.toml) on 127.0.0.1:$(PORT).
serve: install
	$(BIN)/aioserve run examples/deployment.toml --port $(PORT)

bench: install
	$(BIN)/python -m benchmarks

clean:
	rm -rf $(VENV) .pytest_cache .mypy_cache .ruff_cache .coverage htmlcov

# mlmesh: the two commands of the quick start are `make demo` and `make test`.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin

.PHONY: demo up test setup setup-dev lint format proto bench clean

$(BIN)/mlmesh: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -e .
	touch $@

$(VENV)/.dev: $(BIN)/mlmesh
	$(BIN)/pip install --quiet -e '.[dev]'
	touch $@

setup: $(BIN)/mlmesh  ## install mlmesh into .venv

setup-dev: $(VENV)/.dev  ## install mlmesh with the test and lint tools

demo: setup  ## start the mesh on the embedded defaults and walk the whole MLOps loop (mlmesh demo)
	$(BIN)/mlmesh demo

up: setup  ## start the whole mesh on the embedded defaults (SQLite, embedded NATS)
	$(BIN)/mlmesh up

test: setup-dev  ## check generated code and lint, then run every test
	$(BIN)/python -m services.tools.genproto --check
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/pytest -ra

lint: setup-dev
	$(BIN)/ruff check . && $(BIN)/ruff format --check .

format: setup-dev
	$(BIN)/ruff check --fix . && $(BIN)/ruff format .

proto: setup-dev  ## regenerate services/_proto from protos/
	$(BIN)/python -m services.tools.genproto

bench: setup-dev  ## run the benchmarks (prints JSON)
	$(BIN)/python bench/registry.py
	$(BIN)/python bench/serving.py
	$(BIN)/python bench/builder.py
	$(BIN)/python bench/drift.py
	$(BIN)/python bench/profiler.py
	$(BIN)/python bench/notifier.py

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache

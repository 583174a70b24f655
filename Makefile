# The two-command quick start: `make run` (the main job) and `make test` (lint, types, tests).
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.nestlearn-installed

.PHONY: run test install lint typecheck pytest clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)

# torch goes in first and on its own, so that a CPU-only machine takes the local CPU wheel
# and never resolves a CUDA build; a torch the user already installed in .venv is kept (its
# pin is left out of the constraints, requirements/constraints.py).
$(STAMP): $(BIN)/python pyproject.toml requirements/pinned.txt requirements/constraints.py
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -c "import torch" 2>/dev/null || $(BIN)/python -m pip install --quiet torch==2.13.0
	$(BIN)/python requirements/constraints.py requirements/pinned.txt > $(VENV)/constraints.txt
	$(BIN)/python -m pip install --quiet -c $(VENV)/constraints.txt -e ".[dev,hf,eval,rl]"
	touch $(STAMP)

install: $(STAMP)

run: $(STAMP)
	$(BIN)/nestlearn run $(ARGS)

lint: $(STAMP)
	$(BIN)/ruff check .

typecheck: $(STAMP)
	$(BIN)/mypy src

pytest: $(STAMP)
	$(BIN)/python -m pytest $(PYTEST_ARGS)

test: lint typecheck pytest

clean:
	rm -rf $(VENV) .pytest_cache .mypy_cache .ruff_cache

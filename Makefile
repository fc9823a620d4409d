# The README's two commands. Both install into .venv first (torch 2.13.0 CPU before anything
# else: an unpinned torch would pull several GB of CUDA packages).
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin

.PHONY: install simulate test lint

$(BIN)/fedglm: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet torch==2.13.0
	$(BIN)/pip install --quiet -e ".[dev]"
	touch $(BIN)/fedglm

install: $(BIN)/fedglm

simulate: install
	$(BIN)/fedglm simulate

lint: install
	$(BIN)/ruff check fedglm tests bench
	$(BIN)/ruff format --check fedglm tests bench
	$(BIN)/mypy fedglm tests bench

test: lint
	$(BIN)/pytest -q

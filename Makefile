# One command each for the main job and the tests, on a machine with only Python 3.10+.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin

.PHONY: setup demo test lint clean

setup: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q -e '.[dev]'
	$(BIN)/python -m pip install -q --no-deps 'facenet-pytorch==2.6.0'  # face detector weights; its metadata pins torch<2.3
	touch $@

demo: setup  ## the demo study end to end: stand-in data, 2 CPU workers, summary and dashboard command
	$(BIN)/python -m hpo.run --study demo --workers 2

test: lint  ## lint, type check and the whole suite, as CI runs it
	$(BIN)/python -m pytest

lint: setup  ## ruff (lint and format) and mypy on maskcls and hpo
	$(BIN)/ruff check maskcls hpo tests bench
	$(BIN)/ruff format --check maskcls hpo tests bench
	$(BIN)/mypy

clean:
	rm -rf runs .pytest_cache

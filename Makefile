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
	touch $@

demo: setup  ## make the stand-in data set (300 people) and check it
	test -d runs/demo/data || $(BIN)/python -m maskcls.data.synth runs/demo/data --people 300 --eval-people 100 --size 96x128
	$(BIN)/python -m maskcls.data.check runs/demo/data

test: setup  ## the whole suite, as CI runs it
	$(BIN)/ruff check maskcls hpo tests bench
	$(BIN)/python -m pytest

lint: setup
	$(BIN)/ruff check maskcls hpo tests bench

clean:
	rm -rf runs .pytest_cache

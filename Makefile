# One command each for the main job and the tests, on a machine with only Python 3.10+.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin

.PHONY: setup system-tools demo test test-fast test-floors lint clean

setup: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q -e '.[dev]'
	$(BIN)/mask-hpo weights fetch --detector  # the face detector's weights, read out of facenet-pytorch's wheel
	touch $@

demo: setup  ## the demo study end to end: stand-in data, 2 CPU workers, summary and dashboard command
	$(BIN)/python -m hpo.run --study demo --workers 2

test: lint  ## lint, type check and the whole suite (about 10 min on 2 cores), as CI runs it
	$(BIN)/python -m pytest --durations=25

test-fast: setup  ## the tests that neither train, start processes nor wait (under 1 min): the edit loop
	$(BIN)/python -m pytest -m "not slow and not cuda" --durations=10

test-floors:  ## the fast lane on the lowest versions pyproject.toml allows (uv --resolution lowest-direct), in .venv-floors
	test -x .venv-floors/bin/python || $(PYTHON) -m venv .venv-floors
	.venv-floors/bin/python -m pip install -q uv
	.venv-floors/bin/python -m uv pip install -q --python .venv-floors/bin/python --resolution lowest-direct -e '.[dev]'
	.venv-floors/bin/mask-hpo weights fetch --detector
	# (less the check that the Docker image pins the torch the setup venv tests: these floors differ by design)
	.venv-floors/bin/python -m pytest -m "not slow and not cuda" -p no:cacheprovider -k "not the_image_runs_the_tested_torch"

system-tools:  ## what some tests drive besides Python (headless Chromium, docker-compose), from Debian
	command -v chromium >/dev/null && command -v docker-compose >/dev/null || \
	  (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium docker-compose)

lint: setup  ## ruff (lint and format) and mypy on maskcls and hpo
	$(BIN)/ruff check maskcls hpo tests bench docker
	$(BIN)/ruff format --check maskcls hpo tests bench docker
	$(BIN)/mypy

clean:
	rm -rf runs .pytest_cache .venv-floors

# The two commands of the README. Each creates .venv and installs what it needs on a machine with only Python.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin

.PHONY: demo test lint bench clean

$(BIN)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e '.[test]'
	touch $@

demo: $(BIN)/.installed
	$(BIN)/fund-agent demo

test: $(BIN)/.installed
	$(BIN)/ruff check agent tests bench migrations
	$(BIN)/python -m pytest -q

lint: $(BIN)/.installed
	$(BIN)/ruff check agent tests bench migrations

bench: $(BIN)/.installed
	$(BIN)/python bench/run_all.py

clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache

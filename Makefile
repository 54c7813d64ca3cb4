# The two commands of the README. Each creates .venv and installs what it needs on a machine with only Python.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin

.PHONY: demo test lint bench clean constraints

$(BIN)/.installed: pyproject.toml constraints.txt
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -c constraints.txt -e '.[test]'
	touch $@

demo: $(BIN)/.installed
	$(BIN)/fund-agent demo

# The suite runs twice: on SQLite ledgers, then on PostgreSQL ones (a private cluster the tests start on
# 127.0.0.1); a machine without the PostgreSQL server binaries skips the second run and says so.
test: $(BIN)/.installed
	$(BIN)/ruff check agent tests bench migrations
	FUND_AGENT_TEST_LEDGER=sqlite $(BIN)/python -m pytest -q
	@if ls /usr/lib/postgresql/*/bin/initdb >/dev/null 2>&1 || command -v initdb >/dev/null 2>&1; then \
		echo "FUND_AGENT_TEST_LEDGER=postgresql $(BIN)/python -m pytest -q"; \
		FUND_AGENT_TEST_LEDGER=postgresql $(BIN)/python -m pytest -q; \
	else \
		echo "make test: PostgreSQL run SKIPPED: no PostgreSQL server binaries (initdb) here; apt-get install postgresql"; \
	fi

lint: $(BIN)/.installed
	$(BIN)/ruff check agent tests bench migrations

bench: $(BIN)/.installed
	$(BIN)/python bench/run_all.py

# Refresh the pins after changing dependencies: newest allowed versions, then frozen into constraints.txt.
constraints: $(BIN)/.installed
	$(BIN)/python -m pip install --quiet --upgrade -e '.[test]'
	$(BIN)/python -m pip freeze --exclude-editable > constraints.txt

clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache

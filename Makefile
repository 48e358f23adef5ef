# Two commands do all the set-up on a fresh machine: `make demo` and `make test`.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin

.PHONY: venv tools test lint unit demo demo-down cluster-up cluster-down clean

$(BIN)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -e '.[dev]'
	touch $@

venv: $(BIN)/.installed

lint: venv
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/mypy
	$(BIN)/lint-imports

# System tools the tests use that no Python or Go registry provides: Lua for the Argo CD health check.
tools:
	command -v lua5.4 >/dev/null || (apt-get update && apt-get install -y lua5.4)

test: lint tools
	$(BIN)/pytest

demo: venv
	$(BIN)/python demo/run.py

demo-down: venv
	$(BIN)/python demo/run.py --down
	$(BIN)/modeldeploy cluster down

clean:
	rm -rf $(VENV) .mypy_cache .ruff_cache .pytest_cache

# Two commands do all the set-up on a fresh machine: `make demo` and `make test`.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin

.PHONY: venv test lint unit demo demo-down cluster-up cluster-down clean

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

test: lint
	$(BIN)/pytest

demo: venv
	$(BIN)/modeldeploy cluster up
	$(BIN)/kubectl --kubeconfig "$$($(BIN)/modeldeploy cluster kubeconfig)" get nodes -o wide

demo-down: venv
	$(BIN)/modeldeploy cluster down

clean:
	rm -rf $(VENV) .mypy_cache .ruff_cache .pytest_cache

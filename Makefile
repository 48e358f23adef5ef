# Two commands do all the set-up on a fresh machine: `make demo` and `make test`.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin

.PHONY: venv tools test lint demo demo-down clean

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

# System tools the tests use that no Python or Go registry provides, from Debian's packages:
# Lua for the Argo CD health check, Prometheus for the metrics end-to-end test, wrk for the
# benchmarks and their smoke tests.
DEBIAN_TOOLS := lua5.4:lua5.4 prometheus:prometheus wrk:wrk
tools:
	@missing=""; for pair in $(DEBIAN_TOOLS); do \
		command -v $${pair%%:*} >/dev/null || missing="$$missing $${pair#*:}"; done; \
	if [ -n "$$missing" ]; then \
		apt-get update && DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends $$missing; \
	fi

test: lint tools
	$(BIN)/pytest

demo: venv
	$(BIN)/python demo/run.py

demo-down: venv
	$(BIN)/python demo/run.py --down
	$(BIN)/modeldeploy cluster down

clean:
	rm -rf $(VENV) .mypy_cache .ruff_cache .pytest_cache

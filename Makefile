# Two commands do all the set-up on a fresh machine: `make demo` and `make test`.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin

.PHONY: venv tools test lint demo demo-down clean lock

# The locked dependencies (hashes checked), then the project and the development package
# (dev/, the local cluster and generators) editable, without dependencies of their own.
$(BIN)/.installed: pyproject.toml dev/pyproject.toml requirements/dev.txt
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet --require-hashes -r requirements/dev.txt
	$(BIN)/pip install --quiet --no-deps -e . -e ./dev
	touch $@

venv: $(BIN)/.installed

lint: venv
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/mypy
	$(BIN)/lint-imports

# System tools the tests use that no Python or Go registry provides, from Debian's packages:
# Lua for the Argo CD health check, Prometheus for the metrics end-to-end test, wrk for the
# benchmarks and their smoke tests, ip and nft for the local cluster's pod network; buildah,
# mmdebstrap and runc to build the images from the Dockerfile and run them, busybox-static for the
# pod sandbox image (`modeldeploy-dev images`); iptables for the kubelet's chains, iptables and
# ipset for kube-router, the real node's NetworkPolicy enforcer.
DEBIAN_TOOLS := lua5.4:lua5.4 prometheus:prometheus wrk:wrk ip:iproute2 nft:nftables \
	buildah:buildah mmdebstrap:mmdebstrap runc:runc busybox:busybox-static \
	iptables:iptables ipset:ipset
tools:
	@missing=""; for pair in $(DEBIAN_TOOLS); do \
		command -v $${pair%%:*} >/dev/null || missing="$$missing $${pair#*:}"; done; \
	if [ -n "$$missing" ]; then \
		apt-get update && DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends $$missing; \
	fi

# The cluster's binaries are built first (nothing to do when cached): a cold build takes longer
# than any one test may (pytest-timeout), and the first test to use the cluster would pay it.
test: lint tools
	$(BIN)/modeldeploy-dev cluster build
	$(BIN)/pytest

demo: venv tools
	$(BIN)/python demo/run.py

demo-down: venv
	$(BIN)/python demo/run.py --down
	$(BIN)/modeldeploy-dev cluster down

clean:
	rm -rf $(VENV) .mypy_cache .ruff_cache .pytest_cache

# The lock files: every dependency pinned with its hashes. `make venv`, CI (`.ci/run`, which runs
# `make test`) and the Dockerfile install from them. After changing a dependency in
# pyproject.toml, `make lock` recompiles all three (add `LOCK_FLAGS=--upgrade` to take the newest
# versions allowed).
lock:
	$(BIN)/pip-compile --quiet --generate-hashes --strip-extras --allow-unsafe --no-emit-find-links \
		--extra operator $(LOCK_FLAGS) -o requirements/operator.txt pyproject.toml
	$(BIN)/pip-compile --quiet --generate-hashes --strip-extras --allow-unsafe --no-emit-find-links \
		--extra runtime $(LOCK_FLAGS) -o requirements/runtime.txt pyproject.toml
	$(BIN)/pip-compile --quiet --generate-hashes --strip-extras --allow-unsafe --no-emit-find-links \
		--extra operator --extra runtime --extra dev $(LOCK_FLAGS) -o requirements/dev.txt \
		pyproject.toml

"""Operator fixtures: the CRD installed once, and the operator running in-process per test."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager

import pytest
from kopf.testing import KopfRunner
from operator_helpers import install_crd, running_operator

from support import Cluster


@pytest.fixture(scope="session")
def modeldeploy_crd(cluster: Cluster) -> None:
    install_crd(cluster)


@pytest.fixture
def start_operator(
    cluster: Cluster, modeldeploy_crd: None, namespace: str, monkeypatch: pytest.MonkeyPatch
) -> Callable[[], AbstractContextManager[KopfRunner]]:
    """Starts the operator for the test's namespace; tests that restart it call this twice."""
    # Both kopf and the operator's own client read it; never the developer's real cluster.
    monkeypatch.setenv("KUBECONFIG", str(cluster.kubeconfig))
    return lambda: running_operator(namespace)


@pytest.fixture
def operator(
    start_operator: Callable[[], AbstractContextManager[KopfRunner]],
) -> Iterator[KopfRunner]:
    with start_operator() as runner:
        yield runner

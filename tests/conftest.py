"""Shared fixtures: the real local control plane and a fresh namespace per test.

The cluster is the project's own (`modeldeploy cluster up`), never whatever KUBECONFIG points
at, so a test can never touch a real cluster. When the binaries are missing they are built; when
the cluster cannot come up the test errors out: it never skips.
"""

from __future__ import annotations

import time
import uuid
from collections.abc import Iterator

import pytest

from modeldeploy_operator.localcluster import cluster as localcluster
from support import Cluster


@pytest.fixture(scope="session")
def cluster() -> Iterator[Cluster]:
    started_here = not localcluster.is_running()
    state = localcluster.up()
    yield Cluster(kubeconfig=state.kubeconfig, audit_log=state.audit_log)
    if started_here:
        localcluster.down()


@pytest.fixture
def namespace(cluster: Cluster) -> Iterator[str]:
    name = f"t-{uuid.uuid4().hex[:10]}"
    cluster.kubectl("create", "namespace", name)
    # Pods are refused until the controller-manager has made the default ServiceAccount.
    deadline = time.monotonic() + 30
    while cluster.kubectl("get", "serviceaccount", "default", "-n", name, check=False).returncode:
        assert time.monotonic() < deadline, f"no default ServiceAccount in {name} after 30s"
        time.sleep(0.2)
    yield name
    cluster.kubectl("delete", "namespace", name, "--wait=false", check=False)

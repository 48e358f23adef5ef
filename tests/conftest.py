"""Shared fixtures: the real local control plane and a fresh namespace per test; the images built
from the Dockerfile and the local registry holding them.

The cluster is the project's own (`modeldeploy-dev cluster up`), never whatever KUBECONFIG points
at, so a test can never touch a real cluster. When the binaries are missing they are built; when
the cluster cannot come up the test errors out: it never skips.
"""

from __future__ import annotations

import time
import uuid
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager

import pytest
from kopf.testing import KopfRunner

from modeldeploy_dev import cluster as localcluster
from modeldeploy_dev import images as localimages
from modeldeploy_dev import registry as localregistry
from operator_helpers import install_crd, running_operator
from support import Cluster


@pytest.fixture(scope="session")
def cluster() -> Iterator[Cluster]:
    started_here = not localcluster.is_running()
    if started_here:
        localcluster.down()  # whatever an earlier run left in etcd must not leak into this one
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


@pytest.fixture(scope="session")
def images() -> dict[str, localimages.Image]:
    """The operator and runtime images, built from the Dockerfile unless the tree is unchanged."""
    return localimages.build()


@pytest.fixture(scope="session")
def pushed_images(images: dict[str, localimages.Image]) -> Iterator[dict[str, str]]:
    """The images in the local registry: each target's `127.0.0.1:PORT/name@sha256:...`."""
    started_here = not localregistry.is_running()
    localregistry.up()
    yield {target: localregistry.push(image) for target, image in images.items()}
    if started_here:
        localregistry.down()

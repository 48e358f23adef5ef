"""Faults converge: whatever the control plane or the network did, every status ends up true.

Each test breaks something real while the operator is at work (the API server is killed, etcd is
killed, the operator's connections to the API server are cut), puts it back, and waits until
every ModelDeployment's status says what its Deployment really is. It prints the time that took
after the fault ended (run with `-s` to see it, or find `converge_s` in a JUnit report).
"""

from __future__ import annotations

import concurrent.futures
import json
import time
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager
from pathlib import Path
from typing import Any

import pytest
from kopf.testing import KopfRunner

from modeldeploy_dev import cluster as localcluster
from operator_helpers import condition, wait_for
from support import Cluster
from tcp_proxy import TcpProxy

pytestmark = pytest.mark.integration

COUNT = 30
SPEC: dict[str, Any] = {"model": {"uri": "s3://models/iris/3/model.onnx"}}
OUTAGE_S = 3
CUT_S = 15
CONVERGE_TIMEOUT_S = 90
RecordProperty = Callable[[str, object], None]


@pytest.fixture
def control_plane_restored(cluster: Cluster) -> Iterator[None]:
    """Whatever the test stopped is started again, even when it fails."""
    yield
    for component in localcluster.COMPONENTS:
        localcluster.start_component(component)


def _create(cluster: Cluster, namespace: str, count: int, created: list[str]) -> None:
    """Creates the ModelDeployments one by one, retrying through an outage as a user would."""
    for index in range(count):
        name = f"md-{index}"
        body = {
            "apiVersion": "modeldeploy.io/v1alpha1",
            "kind": "ModelDeployment",
            "metadata": {"name": name, "namespace": namespace},
            "spec": SPEC,
        }
        deadline = time.monotonic() + 60
        while cluster.kubectl(
            "apply", "--server-side", "-f", "-", input=json.dumps(body), check=False
        ).returncode:
            assert time.monotonic() < deadline, f"could not create {name} in 60s"
            time.sleep(0.2)
        created.append(name)


def _by_name(cluster: Cluster, namespace: str, kind: str) -> dict[str, dict[str, Any]]:
    listed = json.loads(cluster.kubectl("get", kind, "-n", namespace, "-o", "json").stdout)
    return {item["metadata"]["name"]: item for item in listed["items"]}


def _untrue(cluster: Cluster, namespace: str, replicas: int) -> list[str]:
    """What is not yet as it should end: every ModelDeployment Ready at its generation, saying
    as many ready replicas as its Deployment really has, `replicas` of them."""
    mds = _by_name(cluster, namespace, "md")
    deployments = _by_name(cluster, namespace, "deployments")
    wrong = [] if len(mds) == COUNT else [f"{len(mds)} of {COUNT} ModelDeployments exist"]
    for name, md in sorted(mds.items()):
        status = md.get("status", {})
        deployment = deployments.get(name, {})
        wanted = deployment.get("spec", {}).get("replicas")
        really = deployment.get("status", {}).get("readyReplicas", 0)
        ready = condition(md, "Ready").get("status")
        current = status.get("observedGeneration") == md["metadata"]["generation"]
        if not (
            ready == "True"
            and current
            and status.get("readyReplicas") == really == wanted == replicas
        ):
            wrong.append(
                f"{name} says Ready={ready} {status.get('replicaSummary')} (current: {current}); "
                f"its Deployment has {really}/{wanted} ready"
            )
    return wrong


def _converge(cluster: Cluster, namespace: str, replicas: int, since: float) -> float:
    """Waits until nothing is untrue; returns the seconds since `since`."""
    deadline = time.monotonic() + CONVERGE_TIMEOUT_S
    while untrue := _untrue(cluster, namespace, replicas):
        assert time.monotonic() < deadline, f"not converged in {CONVERGE_TIMEOUT_S}s: {untrue[:5]}"
        time.sleep(0.5)
    return time.monotonic() - since


def _report(record_property: RecordProperty, fault: str, seconds: float) -> None:
    record_property("converge_s", round(seconds, 1))
    print(f"{fault}: every status true to its children {seconds:.1f}s after the fault ended")


def test_the_api_server_killed_while_objects_are_created(
    cluster: Cluster,
    namespace: str,
    operator: KopfRunner,
    control_plane_restored: None,
    record_property: RecordProperty,
) -> None:
    created: list[str] = []
    with concurrent.futures.ThreadPoolExecutor(1) as pool:
        creating = pool.submit(_create, cluster, namespace, COUNT, created)
        wait_for("a third of them created", lambda: len(created) >= COUNT // 3)
        localcluster.stop_component("kube-apiserver")  # SIGKILL: a crash, mid-creation
        killed = time.monotonic()
        time.sleep(OUTAGE_S)
        localcluster.start_component("kube-apiserver")
        back = time.monotonic()
        creating.result()
    print(f"the API server was away {back - killed:.1f}s")
    _report(record_property, "API server killed", _converge(cluster, namespace, 1, back))


def test_etcd_killed_while_objects_are_scaled(
    cluster: Cluster,
    namespace: str,
    operator: KopfRunner,
    control_plane_restored: None,
    record_property: RecordProperty,
) -> None:
    _create(cluster, namespace, COUNT, [])
    _converge(cluster, namespace, 1, time.monotonic())
    cluster.kubectl("scale", "md", "--all", "--replicas=2", "-n", namespace)
    localcluster.stop_component("etcd")  # the operator is applying and writing status now
    time.sleep(OUTAGE_S)
    localcluster.start_component("etcd")
    back = time.monotonic()
    _report(record_property, "etcd killed", _converge(cluster, namespace, 2, back))


def test_the_operator_cut_off_from_the_api_server(
    cluster: Cluster,
    namespace: str,
    start_operator: Callable[[], AbstractContextManager[KopfRunner]],
    monkeypatch: pytest.MonkeyPatch,
    tmp_path: Path,
    record_property: RecordProperty,
) -> None:
    with TcpProxy("127.0.0.1", localcluster.APISERVER_PORT) as proxy:
        kubeconfig = proxy.kubeconfig(cluster.kubeconfig, tmp_path / "proxied.kubeconfig")
        monkeypatch.setenv("KUBECONFIG", str(kubeconfig))  # the operator's; the test's is direct
        with start_operator(), concurrent.futures.ThreadPoolExecutor(1) as pool:
            creating = pool.submit(_create, cluster, namespace, COUNT, [])

            def at_work() -> bool:
                return len(_by_name(cluster, namespace, "deployments")) >= COUNT // 3

            wait_for("the operator to be creating Deployments", at_work)
            proxy.cut()
            creating.result()  # the rest are created while the operator cannot see them
            cluster.kubectl("scale", "md", "--all", "--replicas=2", "-n", namespace)
            time.sleep(CUT_S)
            proxy.restore()
            back = time.monotonic()
            took = _converge(cluster, namespace, 2, back)
    _report(record_property, f"operator cut off for {CUT_S}s", took)

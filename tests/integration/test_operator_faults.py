"""Faults converge: whatever the control plane or the network did, every status ends up true.

Each test breaks something real while the operator is at work (the API server is killed, etcd is
killed, the operator's connections to the API server are cut), puts it back, and waits until
every ModelDeployment's status says what its Deployment really is. It prints the time that took
after the fault ended (run with `-s` to see it, or find `converge_s` in a JUnit report).
"""

from __future__ import annotations

import concurrent.futures
import json
import sys
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

COUNT = 24
SPEC: dict[str, Any] = {"model": {"uri": "s3://models/iris/3/model.onnx"}}
OUTAGE_S = 3
CUT_S = 10
CONVERGE_TIMEOUT_S = 60
SETTLE_S = 15
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


def _check(cluster: Cluster, namespace: str, replicas: int) -> tuple[list[str], int]:
    """The ModelDeployments whose status does not (yet) tell the truth about their Deployment,
    once it wants `replicas` (at the object's generation, as many ready replicas as the
    Deployment has, and Ready exactly when all are); and how many Deployments are not ready."""
    mds = _by_name(cluster, namespace, "md")
    deployments = _by_name(cluster, namespace, "deployments")
    untrue = [] if len(mds) == COUNT else [f"{len(mds)} of {COUNT} ModelDeployments exist"]
    unready = 0
    for name, md in sorted(mds.items()):
        status = md.get("status", {})
        deployment = deployments.get(name, {})
        wanted = deployment.get("spec", {}).get("replicas")
        really = deployment.get("status", {}).get("readyReplicas", 0)
        unready += really != replicas
        truth = ("True" if really == replicas else "False", really, md["metadata"]["generation"])
        says = (
            condition(md, "Ready").get("status"),
            status.get("readyReplicas"),
            status.get("observedGeneration"),
        )
        if wanted != replicas or says != truth:
            untrue.append(
                f"{name} says (Ready, ready replicas, generation) {says}, truth {truth}; "
                f"its Deployment wants {wanted}"
            )
    return untrue, unready


def _converge(cluster: Cluster, namespace: str, replicas: int, since: float) -> float:
    """Waits until every status tells the truth and every Deployment is ready, and returns the
    seconds from `since` until the statuses last became true.

    A Deployment may stay unready: KWOK, unlike a kubelet, does not retry a pod whose status
    it failed to write while the API was away. Its status must then say so, for `SETTLE_S`.
    """
    deadline = time.monotonic() + CONVERGE_TIMEOUT_S
    true_since: float | None = None
    while True:
        untrue, unready = _check(cluster, namespace, replicas)
        now = time.monotonic()
        true_since = None if untrue else true_since or now
        if true_since is not None and (not unready or now - true_since > SETTLE_S):
            return true_since - since
        assert now < deadline, f"not converged in {CONVERGE_TIMEOUT_S}s: {untrue[:5]}"
        time.sleep(0.5)


def _say(line: str) -> None:
    # Not to sys.stdout: kopf's test runner swaps it for its own while the operator runs.
    print(line, file=sys.__stdout__, flush=True)


def _report(
    record_property: RecordProperty, cluster: Cluster, namespace: str, fault: str, seconds: float
) -> None:
    record_property("converge_s", round(seconds, 1))
    ready = sum(
        condition(md, "Ready").get("status") == "True"
        for md in _by_name(cluster, namespace, "md").values()
    )
    _say(
        f"{fault}: every status true to its children {seconds:.1f}s after the fault ended "
        f"({ready} of {COUNT} Ready)"
    )


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
    took = _converge(cluster, namespace, 1, back)
    _report(
        record_property,
        cluster,
        namespace,
        f"API server killed, back after {back - killed:.1f}s",
        took,
    )


def test_etcd_killed_while_objects_are_scaled(
    cluster: Cluster,
    namespace: str,
    operator: KopfRunner,
    control_plane_restored: None,
    record_property: RecordProperty,
) -> None:
    started = time.monotonic()
    _create(cluster, namespace, COUNT, [])
    took = _converge(cluster, namespace, 1, started)
    _say(f"no fault: {COUNT} created, every status true {took:.1f}s after the first was")
    cluster.kubectl("scale", "md", "--all", "--replicas=2", "-n", namespace)
    localcluster.stop_component("etcd")  # the operator is applying and writing status now
    killed = time.monotonic()
    time.sleep(OUTAGE_S)
    localcluster.start_component("etcd")
    back = time.monotonic()
    took = _converge(cluster, namespace, 2, back)
    _report(
        record_property, cluster, namespace, f"etcd killed, back after {back - killed:.1f}s", took
    )


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
            cut = time.monotonic()
            creating.result()  # the rest are created while the operator cannot see them
            cluster.kubectl("scale", "md", "--all", "--replicas=2", "-n", namespace)
            time.sleep(max(0, cut + CUT_S - time.monotonic()))
            proxy.restore()
            back = time.monotonic()
            took = _converge(cluster, namespace, 2, back)
    _report(record_property, cluster, namespace, f"operator cut off for {back - cut:.1f}s", took)

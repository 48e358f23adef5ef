"""The real node: runtime pods as containers of the runtime image, pulled from the local registry
by the kubelet's containerd, under pod-security `restricted`; the chart's operator in pods."""

from __future__ import annotations

import hashlib
import ipaddress
import json
import os
import signal
import time
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import tritonclient.http as triton_http
from kopf.testing import KopfRunner

from chart_helm import CHART, helm, image_values, set_flags
from modeldeploy_dev import cluster as localcluster
from modeldeploy_dev import images as localimages
from modeldeploy_dev import ingress, network, node
from modeldeploy_dev import registry as localregistry
from operator_helpers import apply_md, get, place_on_node, ready_md, wait_for
from support import Cluster

pytestmark = pytest.mark.e2e


@pytest.fixture(autouse=True)
def real_node(cluster: Cluster) -> None:
    ready = cluster.kubectl("get", "node", node.NAME, "-o", "json")
    conditions = json.loads(ready.stdout)["status"]["conditions"]
    assert {"type": "Ready", "status": "True"} in [
        {"type": c["type"], "status": c["status"]} for c in conditions
    ]


@pytest.fixture
def model_server(demo_model: Path, served: Callable[[Path], str]) -> str:
    """The demo model over HTTP on the bridge's address, where pods can fetch it."""
    return served(demo_model)


@pytest.fixture
def other_namespace(cluster: Cluster) -> Iterator[str]:
    name = f"t-{time.time_ns() % 10**10:010d}"
    cluster.kubectl("create", "namespace", name)
    wait_for(
        f"the default ServiceAccount in {name}",
        lambda: cluster.kubectl("get", "sa", "default", "-n", name, check=False).returncode == 0,
    )
    yield name
    cluster.kubectl("delete", "namespace", name, "--wait=false", check=False)


@pytest.fixture
def node_operator(
    runtime_pods: None,
    start_operator: Callable[[], AbstractContextManager[KopfRunner]],
    monkeypatch: pytest.MonkeyPatch,
) -> Iterator[KopfRunner]:
    monkeypatch.setenv("MODELDEPLOY_METRICS_INTERVAL", "2")
    with start_operator() as runner:
        yield runner


def _spec(model_url: str, demo_model: Path, **extra: Any) -> dict[str, Any]:
    digest = hashlib.sha256(demo_model.read_bytes()).hexdigest()
    return {
        "model": {"uri": model_url, "sha256": digest, "version": "1"},
        "runtime": {"maxBatchSize": 8, "maxBatchDelayMs": 1},
        **extra,
    }


def _pods(cluster: Cluster, namespace: str) -> list[dict[str, Any]]:
    pods = json.loads(cluster.kubectl("get", "pods", "-n", namespace, "-o", "json").stdout)
    return list(pods["items"])


def _exec(cluster: Cluster, namespace: str, pod: str, script: str) -> str:
    return cluster.kubectl(
        "exec", "-n", namespace, pod, "-c", "runtime", "--", "python", "-c", script
    ).stdout.strip()


def test_runtime_pods_run_as_restricted_containers_of_the_runtime_image(
    cluster: Cluster,
    namespace: str,
    demo_model: Path,
    model_server: str,
    pushed_images: dict[str, str],
    node_operator: KopfRunner,
) -> None:
    started = time.monotonic()
    apply_md(cluster, namespace, "iris", _spec(model_server, demo_model))
    wait_for("iris Ready", lambda: ready_md(cluster, namespace, "iris"), timeout=180)
    print(f"apply to Ready on the real node: {time.monotonic() - started:.1f}s")
    (pod,) = _pods(cluster, namespace)
    assert pod["spec"]["nodeName"] == node.NAME
    assert ipaddress.ip_address(pod["status"]["podIP"]) in ipaddress.ip_network(network.POD_CIDR)
    serve = next(c for c in pod["status"]["containerStatuses"] if c["name"] == "runtime")
    assert serve["imageID"].endswith(pushed_images["runtime"].partition("@")[2])

    client = triton_http.InferenceServerClient(f"{pod['status']['podIP']}:8080")
    tensor = triton_http.InferInput("input", [2, 4], "FP32")
    tensor.set_data_from_numpy(np.array([[5.0, 3.4, 1.5, 0.2], [6.6, 3.0, 5.6, 2.0]], np.float32))
    result = client.infer("iris", [tensor]).as_numpy("probabilities")
    assert result is not None and list(result.argmax(axis=1)) == [0, 2]

    name = pod["metadata"]["name"]
    probe = (
        "import os\n"
        "status = dict(l.split(':', 1) for l in open('/proc/self/status'))\n"
        "try:\n"
        "    open('/probe', 'w')\n"
        "    writable = 'yes'\n"
        "except OSError as error:\n"
        "    writable = type(error).__name__\n"
        "print(os.getuid(), int(status['CapEff'], 16), status['Seccomp'].strip(), writable)\n"
    )
    uid, capabilities, seccomp, writable = _exec(cluster, namespace, name, probe).split()
    assert uid != "0" and capabilities == "0" and seccomp == "2", (uid, capabilities, seccomp)
    assert writable == "OSError" or writable.endswith("Error"), writable
    assert writable != "yes"


def _holder(cluster: Cluster, namespace: str) -> str | None:
    lease = get(cluster, namespace, "lease", "modeldeploy-operator") or {}
    holder: str | None = lease.get("spec", {}).get("holderIdentity")
    return holder


def _container_pid(container_id: str) -> int:
    """The host pid of a container on the node, from containerd (through crictl)."""
    state = node.paths(localcluster.paths().root)
    inspected = node.crictl(state, "inspect", container_id.removeprefix("containerd://"))
    return int(json.loads(inspected.stdout)["info"]["pid"])


def test_the_chart_runs_two_operators_in_pods_that_serve_through_traefik_and_hand_over(
    cluster: Cluster,
    namespace: str,
    other_namespace: str,
    demo_model: Path,
    model_server: str,
    images: dict[str, localimages.Image],
    pushed_images: dict[str, str],
) -> None:
    """helm install with the images built here; the operator pods work under the chart's
    ServiceAccount and RBAC, with leader election; the runtime pods they make pass pod-security
    `restricted`; tritonclient reaches the model at status.url through Traefik; status.metrics
    comes live; killing the leader's container hands over; helm upgrade rolls the operator."""
    operators, served = other_namespace, namespace
    for name in (operators, served):
        place_on_node(cluster, name)
    values = image_values(images, pushed_images) | {
        "watchNamespaces": [served],
    }
    release = f"md-{operators[-6:]}"
    install = ["install", release, str(CHART), "-n", operators, "--wait", "--timeout", "180s"]
    helm(*install, *set_flags(values), kubeconfig=cluster.kubeconfig)
    try:
        pods = _pods(cluster, operators)
        assert len(pods) == 2 and {p["spec"]["nodeName"] for p in pods} == {node.NAME}
        names = {p["metadata"]["name"] for p in pods}
        leader = wait_for("a leader", lambda: _holder(cluster, operators), timeout=60)
        assert leader.rpartition("_")[0] in names or leader in names, (leader, names)

        host = f"iris.{served}.example"
        started = time.monotonic()
        routed = _spec(model_server, demo_model, ingress={"host": host, "path": "/ml"})
        apply_md(cluster, served, "iris", routed)
        md = wait_for("iris Ready", lambda: ready_md(cluster, served, "iris"), timeout=180)
        print(f"apply to Ready, operator in a pod: {time.monotonic() - started:.1f}s")
        assert md["status"]["url"] == f"http://{host}/ml/v2/models/iris"
        client = triton_http.InferenceServerClient(f"127.0.0.1:{ingress.INGRESS_PORT}/ml")
        headers = {"Host": host}
        tensor = triton_http.InferInput("input", [2, 4], "FP32")
        tensor.set_data_from_numpy(
            np.array([[5.0, 3.4, 1.5, 0.2], [6.6, 3.0, 5.6, 2.0]], np.float32)
        )

        def answer() -> list[int] | None:
            try:
                result = client.infer("iris", [tensor], headers=headers).as_numpy("probabilities")
            except Exception:
                return None
            return None if result is None else [int(i) for i in result.argmax(axis=1)]

        assert wait_for("an answer through Traefik", answer, timeout=60) == [0, 2]

        def live_metrics() -> dict[str, Any] | None:
            answer()  # traffic for the operator's scrape of the pods to see
            found: dict[str, Any] | None = (
                (get(cluster, served, "md", "iris") or {}).get("status", {}).get("metrics")
            )
            return found if found and found.get("requestsPerSecond", 0) > 0 else None

        # The operator in its pod scrapes the runtime pods itself (no Prometheus configured).
        wait_for("status.metrics with traffic", live_metrics, timeout=150)

        # Killing the leader's container: the Lease passes on within its term (15 s).
        leader_pod = next(
            p for p in _pods(cluster, operators) if leader.startswith(p["metadata"]["name"])
        )
        (status,) = leader_pod["status"]["containerStatuses"]
        killed_at = time.monotonic()
        os.kill(_container_pid(status["containerID"]), signal.SIGKILL)
        # The kubelet restarts the container at once, as a new process with a new identity: it
        # or the other replica takes the Lease when the dead leader's term runs out.
        successor = wait_for(
            "another leader",
            lambda: (h := _holder(cluster, operators)) not in (None, leader) and h,
            timeout=60,
        )
        handover = time.monotonic() - killed_at
        print(f"leader killed, {successor} took over in {handover:.1f}s")
        # A standby counts the term from when it saw the last renewal (every 2 s), then tries
        # every 2 s: the chart's 15 s lease plus up to three retry periods.
        assert handover <= 15 + 3 * 2

        # helm upgrade to another tag of the operator image rolls both replicas; the new ones
        # keep the status current.
        retagged = f"{images['operator'].reference}-upgrade"
        localimages.buildah("tag", images["operator"].reference, retagged)
        localregistry.push(localimages.describe("operator", retagged))
        upgrade = ["upgrade", release, str(CHART), "-n", operators, "--reuse-values", "--wait",
                   "--timeout", "180s"]  # fmt: skip
        helm(*upgrade, *set_flags({"image.tag": retagged.rpartition(":")[2]}),
             kubeconfig=cluster.kubeconfig)  # fmt: skip
        rolled = [
            p for p in _pods(cluster, operators) if not p["metadata"].get("deletionTimestamp")
        ]
        assert len(rolled) == 2 and {p["metadata"]["name"] for p in rolled}.isdisjoint(names)
        assert all(p["spec"]["containers"][0]["image"].endswith("-upgrade") for p in rolled)
        cluster.kubectl("patch", "md", "iris", "-n", served, "--type=merge",
                        "-p", json.dumps({"spec": {"replicas": 2}}))  # fmt: skip
        md = wait_for("iris Ready at 2 replicas", lambda: ready_md(cluster, served, "iris"), 180)
        assert md["status"]["replicas"] == 2
    finally:
        helm("uninstall", release, "-n", operators, "--wait", kubeconfig=cluster.kubeconfig,
             check=False)  # fmt: skip


def _stalled(cluster: Cluster, namespace: str, name: str) -> dict[str, Any] | None:
    md = get(cluster, namespace, "md", name) or {}
    conditions = md.get("status", {}).get("conditions", [])
    found = next((c for c in conditions if c["type"] == "Stalled"), None)
    return found if found and found["status"] == "True" else None


def test_a_memory_limit_too_small_for_the_model_is_oom_killed_and_named_in_the_status(
    cluster: Cluster,
    namespace: str,
    demo_model: Path,
    model_server: str,
    node_operator: KopfRunner,
) -> None:
    spec = _spec(model_server, demo_model, resources={"limits": {"memory": "40Mi"}})
    apply_md(cluster, namespace, "iris", spec)
    stalled = wait_for("iris Stalled", lambda: _stalled(cluster, namespace, "iris"), 180)
    assert stalled["reason"] == "OOMKilled", stalled
    assert stalled["message"].startswith("runtime was OOM-killed at its memory limit (40Mi)")
    assert "last state: terminated, reason OOMKilled, exit code 137" in stalled["message"]


def test_a_model_that_cannot_be_fetched_gives_its_one_line_error_as_the_condition_message(
    cluster: Cluster,
    namespace: str,
    demo_model: Path,
    model_server: str,
    node_operator: KopfRunner,
) -> None:
    missing = model_server.replace("iris.onnx", "missing.onnx")
    apply_md(cluster, namespace, "iris", _spec(missing, demo_model))
    stalled = wait_for("iris Stalled", lambda: _stalled(cluster, namespace, "iris"), 180)
    # The container's termination message (terminationMessagePath), not the log's tail.
    assert (stalled["reason"], stalled["message"]) == (
        "ModelFetchFailed",
        f"fetch-model exited with 1: {missing}: HTTP 404 File not found",
    )

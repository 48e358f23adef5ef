"""The data plane a user's clients go through: a Service's ClusterIP (kube-proxy, nftables) in
front of runtime containers on the real node, Ready only when their readiness probe passes. Real
requests with an unchanged Open Inference Protocol client."""

from __future__ import annotations

import hashlib
import json
import shutil
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import tritonclient.http as triton_http
from kopf.testing import KopfRunner

from modeldeploy_dev import node
from operator_helpers import apply_md, condition, get, ready_md, wait_for
from support import Cluster

pytestmark = pytest.mark.e2e

EXAMPLE = np.array([[5.8, 3.0, 3.8, 1.2]], np.float32)


class Load:
    """Closed-loop clients sending single-example requests to one address; every outcome is
    counted, nothing is retried."""

    def __init__(self, url: str, clients: int) -> None:
        self.url = url
        self.succeeded = 0
        self.failures: list[str] = []
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._threads = [threading.Thread(target=self._client, daemon=True) for _ in range(clients)]

    def _client(self) -> None:
        client = triton_http.InferenceServerClient(self.url, network_timeout=10)
        tensor = triton_http.InferInput("input", list(EXAMPLE.shape), "FP32")
        tensor.set_data_from_numpy(EXAMPLE)
        while not self._stop.is_set():
            try:
                result = client.infer("iris", [tensor])
                probabilities = result.as_numpy("probabilities")
                assert probabilities is not None and probabilities.shape == (1, 3)
                with self._lock:
                    self.succeeded += 1
            except Exception as error:
                with self._lock:
                    self.failures.append(repr(error))
                client = triton_http.InferenceServerClient(self.url, network_timeout=10)

    def __enter__(self) -> Load:
        for thread in self._threads:
            thread.start()
        return self

    def __exit__(self, *_: object) -> None:
        self._stop.set()
        for thread in self._threads:
            thread.join(timeout=30)


def _pods(cluster: Cluster, namespace: str) -> list[dict[str, Any]]:
    out = cluster.kubectl("get", "pods", "-n", namespace, "-o", "json").stdout
    items: list[dict[str, Any]] = json.loads(out)["items"]
    return items


def _ready(pod: dict[str, Any]) -> bool:
    conditions = pod.get("status", {}).get("conditions", [])
    return any(c["type"] == "Ready" and c["status"] == "True" for c in conditions)


def _ready_endpoints(cluster: Cluster, namespace: str, service: str) -> set[str]:
    out = cluster.kubectl(
        "get", "endpointslices", "-n", namespace,
        "-l", f"kubernetes.io/service-name={service}", "-o", "json",
    ).stdout  # fmt: skip
    return {
        address
        for slice_ in json.loads(out)["items"]
        for endpoint in slice_.get("endpoints") or []
        if endpoint.get("conditions", {}).get("ready")
        for address in endpoint["addresses"]
    }


def _cluster_ip_url(cluster: Cluster, namespace: str) -> str:
    service = get(cluster, namespace, "service", "iris")
    assert service is not None
    return f"{service['spec']['clusterIP']}:8080"


def _serve(cluster: Cluster, namespace: str, uri: str, **extra: Any) -> str:
    spec = {
        "model": {"uri": uri, "version": "1", **extra},
        "runtime": {"maxBatchSize": 8, "maxBatchDelayMs": 1},
        "replicas": 2,
    }
    apply_md(cluster, namespace, "iris", spec)
    wait_for("iris Ready", lambda: ready_md(cluster, namespace, "iris"), timeout=120)
    url = _cluster_ip_url(cluster, namespace)
    # kube-proxy refuses a Service until its next sync after the endpoints became ready.
    wait_for("an answer at the ClusterIP", lambda: _answer(url) is not None, timeout=15)
    return url


def _answer(url: str) -> Any:
    """The model's answer for EXAMPLE at `url`, or None if the connection is refused."""
    tensor = triton_http.InferInput("input", list(EXAMPLE.shape), "FP32")
    tensor.set_data_from_numpy(EXAMPLE)
    try:
        client = triton_http.InferenceServerClient(url)
        return client.infer("iris", [tensor]).as_numpy("probabilities")
    except ConnectionRefusedError:
        return None


@contextmanager
def _frozen(pod: dict[str, Any]) -> Iterator[None]:
    """Freezes every process of the pod (its cgroup, through the v1 freezer): it stays alive
    but answers nothing."""
    root = Path("/sys/fs/cgroup/freezer") / node.CGROUP_ROOT.lstrip("/")
    (cgroup,) = root.rglob(f"pod{pod['metadata']['uid']}")
    state = cgroup / "freezer.state"
    state.write_text("FROZEN")
    try:
        yield
    finally:
        state.write_text("THAWED")


@pytest.fixture
def model(demo_model: Path, tmp_path: Path) -> Path:
    """A copy of the demo model that a test may corrupt."""
    copy = tmp_path / "iris.onnx"
    shutil.copyfile(demo_model, copy)
    return copy


def test_a_cluster_ip_reaches_ready_pods_and_an_unready_pod_leaves_the_endpoints(
    cluster: Cluster,
    namespace: str,
    model: Path,
    served: Callable[[Path], str],
    runtime_pods: None,
    operator: KopfRunner,
) -> None:
    url = _serve(cluster, namespace, served(model))
    pods = _pods(cluster, namespace)
    addresses = {p["status"]["podIP"] for p in pods}
    assert len(addresses) == 2
    assert all(a.startswith("10.244.") for a in addresses), addresses
    assert url.startswith("10.96.")
    wait_for(
        "both pods in the ready endpoints",
        lambda: _ready_endpoints(cluster, namespace, "iris") == addresses,
    )
    probabilities = _answer(url)
    assert probabilities is not None and probabilities.sum() == pytest.approx(1, abs=1e-3)

    frozen = pods[0]
    with _frozen(frozen):
        # readinessProbe: every 5 s, 1 s timeout, 3 failures.
        wait_for(
            "the frozen pod leaving the ready endpoints",
            lambda: (
                _ready_endpoints(cluster, namespace, "iris")
                == addresses - {frozen["status"]["podIP"]}
            ),
            timeout=30,
        )
        pod = get(cluster, namespace, "pod", frozen["metadata"]["name"])
        assert pod is not None and not _ready(pod)
        with Load(url, clients=2) as load:
            time.sleep(2)
        assert load.succeeded > 0 and load.failures == []
    wait_for(
        "the thawed pod back in the ready endpoints",
        lambda: _ready_endpoints(cluster, namespace, "iris") == addresses,
        timeout=20,
    )


@pytest.mark.parametrize(
    ("checked", "reason", "container"),
    [(True, "ModelFetchFailed", "initContainerStatuses"),
     (False, "ModelLoadFailed", "containerStatuses")],
    ids=["fails-its-sha256", "fails-to-load"],
)  # fmt: skip
def test_a_pod_with_a_corrupted_model_is_never_ready_and_never_gets_a_request(
    cluster: Cluster,
    namespace: str,
    model: Path,
    served: Callable[[Path], str],
    runtime_pods: None,
    operator: KopfRunner,
    checked: bool,
    reason: str,
    container: str,
) -> None:
    """The model file is corrupted under a serving ModelDeployment and a pod is replaced: with
    a sha256 in the spec the fetch refuses it, without one the runtime cannot load it."""
    digest = hashlib.sha256(model.read_bytes()).hexdigest()
    url = _serve(cluster, namespace, served(model), **({"sha256": digest} if checked else {}))
    good = {p["metadata"]["name"]: p["status"]["podIP"] for p in _pods(cluster, namespace)}
    victim = sorted(good)[0]
    model.write_bytes(b"\x00 not an onnx model " * 40)
    with Load(url, clients=4) as load:
        cluster.kubectl("delete", "pod", victim, "-n", namespace, "--wait=false")

        def replacement() -> dict[str, Any] | None:
            fresh = [p for p in _pods(cluster, namespace) if p["metadata"]["name"] not in good]
            return fresh[0] if fresh and fresh[0]["status"].get("podIP") else None

        bad = wait_for("the replacement pod", replacement)
        bad_ip = bad["status"]["podIP"]

        def failed() -> dict[str, Any] | None:
            md = get(cluster, namespace, "md", "iris")
            return md if condition(md, "Ready").get("reason") == reason else None

        # The operator reports it from the container states the kubelet wrote.
        md = wait_for(f"the operator reporting {reason}", failed, timeout=60)
        if checked:
            assert "sha256" in condition(md, "Ready")["message"]
        deadline = time.monotonic() + 5
        while time.monotonic() < deadline:
            assert bad_ip not in _ready_endpoints(cluster, namespace, "iris")
            time.sleep(0.5)
    pod = get(cluster, namespace, "pod", bad["metadata"]["name"])
    assert pod is not None and not _ready(pod)
    failing = pod["status"][container][0]
    assert (failing["lastState"] or failing["state"])["terminated"]["exitCode"] != 0
    # The good replica kept serving every request, through the deletion of the other one too.
    assert load.succeeded > 0 and load.failures == [], load.failures[:5]


def test_a_rolling_update_under_load_loses_no_request(
    cluster: Cluster,
    namespace: str,
    model: Path,
    served: Callable[[Path], str],
    runtime_pods: None,
    operator: KopfRunner,
    record_property: Callable[[str, object], None],
) -> None:
    url = _serve(cluster, namespace, served(model))
    before = {p["metadata"]["name"] for p in _pods(cluster, namespace)}
    with Load(url, clients=8) as load:
        time.sleep(2)
        spec = {
            "model": {"uri": served(model), "version": "2"},
            "runtime": {"maxBatchSize": 8, "maxBatchDelayMs": 1},
            "replicas": 2,
        }
        apply_md(cluster, namespace, "iris", spec)

        def rolled_out() -> bool:
            pods = _pods(cluster, namespace)
            return (
                ready_md(cluster, namespace, "iris") is not None
                and len(pods) == 2
                and not {p["metadata"]["name"] for p in pods} & before
                and all(_ready(p) for p in pods)
            )

        wait_for("the rollout, old pods gone", rolled_out, timeout=150)
        time.sleep(2)
    md = get(cluster, namespace, "md", "iris")
    assert md is not None and md["status"]["model"]["version"] == "2"
    record_property("requests", load.succeeded + len(load.failures))
    record_property("failed", len(load.failures))
    assert load.succeeded > 100
    assert load.failures == [], load.failures[:5]

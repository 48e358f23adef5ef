"""The real node (`MODELDEPLOY_NODE=kubelet`): runtime pods as containers of the runtime image,
pulled from the local registry by the kubelet's containerd, under pod-security `restricted`."""

from __future__ import annotations

import functools
import hashlib
import http.server
import ipaddress
import json
import shutil
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import tritonclient.http as triton_http
from kopf.testing import KopfRunner

from modeldeploy_dev import network, node
from operator_helpers import apply_md, free_port, ready_md, wait_for
from support import Cluster

pytestmark = [pytest.mark.e2e, pytest.mark.node]
_POD_RANGE = ipaddress.ip_network("10.244.128.0/17")


@pytest.fixture(autouse=True)
def real_node(cluster: Cluster) -> None:
    assert node.enabled(), (
        "these tests need the real node: MODELDEPLOY_NODE=kubelet (make test-node)"
    )
    ready = cluster.kubectl("get", "node", node.NAME, "-o", "json")
    conditions = json.loads(ready.stdout)["status"]["conditions"]
    assert {"type": "Ready", "status": "True"} in [
        {"type": c["type"], "status": c["status"]} for c in conditions
    ]


def _on_node(cluster: Cluster, namespace: str, restricted: bool = True) -> None:
    labels = [f"{node.NAMESPACE_LABEL}={node.NAMESPACE_VALUE}"]
    if restricted:
        labels.append("pod-security.kubernetes.io/enforce=restricted")
    cluster.kubectl("label", "namespace", namespace, *labels, "--overwrite")


@pytest.fixture
def model_server(demo_model: Path, tmp_path: Path) -> Iterator[str]:
    """The demo model over HTTP on the bridge's address, where pods can fetch it."""
    shutil.copy(demo_model, tmp_path / "iris.onnx")
    handler = functools.partial(http.server.SimpleHTTPRequestHandler, directory=str(tmp_path))
    server = http.server.ThreadingHTTPServer((network.GATEWAY, free_port()), handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield f"http://{network.GATEWAY}:{server.server_address[1]}/iris.onnx"
    server.shutdown()


@pytest.fixture
def node_operator(
    pushed_images: dict[str, str],
    start_operator: Callable[[], AbstractContextManager[KopfRunner]],
    monkeypatch: pytest.MonkeyPatch,
) -> Iterator[KopfRunner]:
    monkeypatch.setenv("MODELDEPLOY_RUNTIME_IMAGE", pushed_images["runtime"])
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
        "exec", "-n", namespace, pod, "-c", "serve", "--", "python", "-c", script
    ).stdout.strip()


def test_runtime_pods_run_as_restricted_containers_of_the_runtime_image(
    cluster: Cluster,
    namespace: str,
    demo_model: Path,
    model_server: str,
    pushed_images: dict[str, str],
    node_operator: KopfRunner,
) -> None:
    _on_node(cluster, namespace)
    started = time.monotonic()
    apply_md(cluster, namespace, "iris", _spec(model_server, demo_model))
    wait_for("iris Ready", lambda: ready_md(cluster, namespace, "iris"), timeout=180)
    print(f"apply to Ready on the real node: {time.monotonic() - started:.1f}s")
    (pod,) = _pods(cluster, namespace)
    assert pod["spec"]["nodeName"] == node.NAME
    assert ipaddress.ip_address(pod["status"]["podIP"]) in _POD_RANGE
    serve = next(c for c in pod["status"]["containerStatuses"] if c["name"] == "serve")
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

"""NetworkPolicy enforced on the real node (kube-router, `modeldeploy_dev.netpol`): a
ModelDeployment's `spec.networkPolicy.allowFrom` admits its clients and refuses the others, and
still admits the operator's own scrape of the runtime's metrics when the operator runs in a pod.

Clients are pods of the runtime image (it has Python) under pod-security `restricted`; each
request is made inside one with `kubectl exec`.
"""

from __future__ import annotations

import json
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import test_e2e_node as node_tests
import tritonclient.http as triton_http
from kopf.testing import KopfRunner

from chart_helm import CHART, helm, image_values, set_flags
from modeldeploy_dev import cluster as localcluster
from modeldeploy_dev import images as localimages
from operator_helpers import apply_md, get, place_on_node, ready_md, wait_for
from support import Cluster

# The real node's fixtures and helpers: it must be Ready (autouse), the model is served to pods,
# the operator runs in this process.
real_node = node_tests.real_node
model_server = node_tests.model_server
node_operator = node_tests.node_operator
other_namespace = node_tests.other_namespace
_pods, _spec = node_tests._pods, node_tests._spec


pytestmark = pytest.mark.e2e

# In a client pod: one request per argument, `GET url` or `POST url json`; prints one line each,
# the status and body, or the error's name.
_REQUEST = """
import sys, urllib.request
for line in sys.argv[1:]:
    method, url, *body = line.split(" ", 2)
    data = body[0].encode() if body else None
    request = urllib.request.Request(url, data=data, method=method)
    request.add_header("Content-Type", "application/json")
    try:
        with urllib.request.urlopen(request, timeout=3) as response:
            print(response.status, response.read().decode().replace("\\n", " "))
    except Exception as error:
        reason = getattr(error, "reason", None)
        print("error", type(reason if isinstance(reason, Exception) else error).__name__)
"""
_INFER = json.dumps(
    {
        "inputs": [
            {"name": "input", "shape": [2, 4], "datatype": "FP32",
             "data": [5.0, 3.4, 1.5, 0.2, 6.6, 3.0, 5.6, 2.0]}
        ]
    }
)  # fmt: skip


def _namespace(cluster: Cluster, prefix: str) -> Iterator[str]:
    name = f"{prefix}-{time.time_ns() % 10**10:010d}"
    cluster.kubectl("create", "namespace", name)
    wait_for(
        f"the default ServiceAccount in {name}",
        lambda: cluster.kubectl("get", "sa", "default", "-n", name, check=False).returncode == 0,
    )
    place_on_node(cluster, name)
    yield name
    cluster.kubectl("delete", "namespace", name, "--wait=false", check=False)


@pytest.fixture
def allowed_namespace(cluster: Cluster) -> Iterator[str]:
    yield from _namespace(cluster, "np-allowed")


@pytest.fixture
def denied_namespace(cluster: Cluster) -> Iterator[str]:
    yield from _namespace(cluster, "np-denied")


def _client(cluster: Cluster, namespace: str, image: str) -> str:
    """A long-running pod of the runtime image to make requests from; returns its name."""
    restricted = {
        "allowPrivilegeEscalation": False,
        "readOnlyRootFilesystem": True,
        "runAsNonRoot": True,
        "capabilities": {"drop": ["ALL"]},
        "seccompProfile": {"type": "RuntimeDefault"},
    }
    pod = {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {"name": "client", "namespace": namespace},
        "spec": {
            "terminationGracePeriodSeconds": 0,
            "containers": [
                {
                    "name": "client",
                    "image": image,
                    "command": ["python", "-c", "import time; time.sleep(3600)"],
                    "securityContext": restricted,
                }
            ],
        },
    }
    cluster.kubectl("apply", "-f", "-", input=json.dumps(pod))
    cluster.kubectl("wait", "--for=condition=Ready", "pod/client", "-n", namespace,
                    "--timeout=120s")  # fmt: skip
    return "client"


def _requests(cluster: Cluster, namespace: str, pod: str, *lines: str) -> list[str]:
    result = cluster.kubectl(
        "exec", "-n", namespace, pod, "-c", pod, "--", "python", "-c", _REQUEST, *lines
    )
    return result.stdout.strip().splitlines()


def _answers(cluster: Cluster, namespace: str, pod: str, addresses: list[str]) -> list[str]:
    """For each address: the health check's and the inference's outcome, summarised."""
    lines = []
    for address in addresses:
        base = f"http://{address}:8080/v2"
        lines += [f"GET {base}/health/ready", f"POST {base}/models/iris/infer {_INFER}"]
    outcomes = []
    for index, line in enumerate(_requests(cluster, namespace, pod, *lines)):
        status, _, body = line.partition(" ")
        if status == "200" and index % 2:
            (output,) = json.loads(body)["outputs"]
            scores = np.array(output["data"]).reshape(output["shape"])
            outcomes.append(f"classes {[int(i) for i in scores.argmax(axis=1)]}")
        else:
            outcomes.append("200" if status == "200" else line)
    return outcomes


def _served(cluster: Cluster, namespace: str) -> list[str]:
    """The Service's ClusterIP and the runtime pod's address."""
    service = get(cluster, namespace, "service", "iris")
    assert service is not None
    (pod,) = [p for p in _pods(cluster, namespace) if not p["metadata"].get("deletionTimestamp")]
    return [service["spec"]["clusterIP"], pod["status"]["podIP"]]


def _all_answered(outcomes: list[str]) -> bool:
    health, infer = outcomes[0::2], outcomes[1::2]
    return all(h == "200" for h in health) and all(i == "classes [0, 2]" for i in infer)


def _all_refused(outcomes: list[str]) -> bool:
    # kube-router rejects (ICMP port unreachable) what no policy admits.
    return all(o == "error ConnectionRefusedError" for o in outcomes)


def test_the_enforcer_listens_on_no_address(cluster: Cluster) -> None:
    """kube-router's health and metrics servers would listen on every address: both are off."""
    pid = localcluster.paths().pid("kube-router").read_text().strip()
    listening = subprocess.run(["ss", "-ltunpH"], capture_output=True, text=True, check=True)
    assert f"pid={pid}," not in listening.stdout, listening.stdout


def test_allow_from_admits_the_named_namespace_and_refuses_another(
    cluster: Cluster,
    namespace: str,
    allowed_namespace: str,
    denied_namespace: str,
    demo_model: Path,
    model_server: str,
    pushed_images: dict[str, str],
    node_operator: KopfRunner,
) -> None:
    apply_md(cluster, namespace, "iris", _spec(model_server, demo_model))
    wait_for("iris Ready", lambda: ready_md(cluster, namespace, "iris"), timeout=180)
    allowed = _client(cluster, allowed_namespace, pushed_images["runtime"])
    denied = _client(cluster, denied_namespace, pushed_images["runtime"])
    addresses = _served(cluster, namespace)

    # No policy: every client is answered, through the Service and at the pod.
    for client_namespace, client in ((allowed_namespace, allowed), (denied_namespace, denied)):
        outcomes = _answers(cluster, client_namespace, client, addresses)
        assert _all_answered(outcomes), (client_namespace, outcomes)

    peer = {
        "namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": allowed_namespace}}
    }
    policy = {"networkPolicy": {"allowFrom": [peer]}}
    apply_md(cluster, namespace, "iris", _spec(model_server, demo_model, **policy))
    wait_for(
        "the other namespace's client refused",
        lambda: _all_refused(_answers(cluster, denied_namespace, denied, addresses)) or None,
        timeout=60,
    )
    outcomes = _answers(cluster, allowed_namespace, allowed, addresses)
    assert _all_answered(outcomes), outcomes
    refused = _answers(cluster, denied_namespace, denied, addresses)
    assert _all_refused(refused), refused

    # The policy removed: the other namespace is answered again.
    apply_md(cluster, namespace, "iris", _spec(model_server, demo_model))
    wait_for(
        "the other namespace's client answered again",
        lambda: _all_answered(_answers(cluster, denied_namespace, denied, addresses)) or None,
        timeout=60,
    )


def test_the_operator_in_a_pod_still_scrapes_status_metrics_under_the_policy(
    cluster: Cluster,
    namespace: str,
    other_namespace: str,
    allowed_namespace: str,
    demo_model: Path,
    model_server: str,
    images: dict[str, localimages.Image],
    pushed_images: dict[str, str],
) -> None:
    """The chart's operator, in a pod of its own namespace, which allowFrom does not name: the
    policy the builder writes admits its scrape of /metrics on the HTTP port, and that port
    only (its gRPC port stays closed to the operator)."""
    operators, served = other_namespace, namespace
    for name in (operators, served):
        place_on_node(cluster, name)
    values = image_values(images, pushed_images) | {
        "watchNamespaces": [served],
        "replicaCount": 1,
        "metricsInterval": 2,
    }
    release = f"np-{operators[-6:]}"
    install = ["install", release, str(CHART), "-n", operators, "--wait", "--timeout", "180s"]
    helm(*install, *set_flags(values), kubeconfig=cluster.kubeconfig)
    try:
        peer = {
            "namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": allowed_namespace}}
        }
        spec = _spec(model_server, demo_model, networkPolicy={"allowFrom": [peer]})
        apply_md(cluster, served, "iris", spec)
        wait_for("iris Ready", lambda: ready_md(cluster, served, "iris"), timeout=180)
        policy = get(cluster, served, "networkpolicy", "iris")
        assert policy is not None
        (operator_pod,) = _pods(cluster, operators)
        scrape = policy["spec"]["ingress"][1]["from"][0]
        assert scrape["namespaceSelector"]["matchLabels"] == {
            "kubernetes.io/metadata.name": operators
        }
        assert scrape["podSelector"]["matchLabels"].items() <= (
            operator_pod["metadata"]["labels"].items()
        )

        # The policy is enforced on the operator's pod too: the gRPC port is not for it.
        (runtime_pod,) = _pods(cluster, served)
        address = runtime_pod["status"]["podIP"]
        probe = (
            "import socket\n"
            "for port in (8080, 8081):\n"
            "    try:\n"
            f"        socket.create_connection(('{address}', port), timeout=3).close()\n"
            "        print(port, 'open')\n"
            "    except OSError as error:\n"
            "        print(port, type(error).__name__)\n"
        )

        def ports() -> list[str] | None:
            reached = cluster.kubectl(
                "exec", "-n", operators, operator_pod["metadata"]["name"], "-c", "operator",
                "--", "python", "-c", probe,
            ).stdout.strip().splitlines()  # fmt: skip
            return reached if reached[0] == "8080 open" and "open" not in reached[1] else None

        print(f"from the operator's pod: {wait_for('the policy synced', ports, timeout=60)}")

        # Traffic from this machine (the node itself, which policies do not restrict).
        client = triton_http.InferenceServerClient(f"{address}:8080")
        tensor = triton_http.InferInput("input", [2, 4], "FP32")
        tensor.set_data_from_numpy(
            np.array([[5.0, 3.4, 1.5, 0.2], [6.6, 3.0, 5.6, 2.0]], np.float32)
        )

        def live_metrics() -> dict[str, Any] | None:
            client.infer("iris", [tensor])
            found: dict[str, Any] | None = (
                (get(cluster, served, "md", "iris") or {}).get("status", {}).get("metrics")
            )
            return found if found and found.get("requestsPerSecond", 0) > 0 else None

        metrics = wait_for("status.metrics with traffic", live_metrics, timeout=120)
        print(f"status.metrics under the policy: {metrics}")
    finally:
        helm("uninstall", release, "-n", operators, "--wait", kubeconfig=cluster.kubeconfig,
             check=False)  # fmt: skip

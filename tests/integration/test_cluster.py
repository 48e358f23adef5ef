"""The local control plane is real: scheduling, GPU capacity, garbage collection, validation."""

from __future__ import annotations

import json
import time

import pytest

from modeldeploy_dev import build
from modeldeploy_dev import cluster as localcluster
from modeldeploy_dev.node import NAME as NODE
from support import Cluster

pytestmark = pytest.mark.integration


def _apply(cluster: Cluster, namespace: str, obj: dict[str, object]) -> None:
    cluster.kubectl("apply", "-n", namespace, "-f", "-", input=json.dumps(obj))


def _pod(name: str, gpus: int | None = None) -> dict[str, object]:
    container: dict[str, object] = {"name": "main", "image": "registry.invalid/none:1"}
    spec: dict[str, object] = {"containers": [container]}
    if gpus is not None:
        container["resources"] = {"limits": {"nvidia.com/gpu": str(gpus)}}
        spec["tolerations"] = [
            {"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"}
        ]
    return {"apiVersion": "v1", "kind": "Pod", "metadata": {"name": name}, "spec": spec}


def test_version_is_the_pinned_release(cluster: Cluster) -> None:
    version = json.loads(cluster.kubectl("version", "-o", "json").stdout)
    assert version["serverVersion"]["gitVersion"] == build.KUBERNETES_VERSION
    assert version["clientVersion"]["gitVersion"] == build.KUBERNETES_VERSION


def test_nodes_are_ready_with_gpu_capacity(cluster: Cluster) -> None:
    nodes = json.loads(cluster.kubectl("get", "nodes", "-o", "json").stdout)["items"]
    by_name = {n["metadata"]["name"]: n for n in nodes}
    assert set(localcluster.CPU_NODES + localcluster.GPU_NODES) <= set(by_name)
    for name in localcluster.GPU_NODES:
        node = by_name[name]
        assert node["status"]["allocatable"]["nvidia.com/gpu"] == "8"
        assert node["metadata"]["labels"]["nvidia.com/gpu.product"] == localcluster.GPU_PRODUCT
        assert {"key": "nvidia.com/gpu", "value": "present", "effect": "NoSchedule"} in node[
            "spec"
        ]["taints"]
    # KWOK's nodes, and the real one (its kubelet's own report).
    for node in (by_name[n] for n in (*localcluster.CPU_NODES, *localcluster.GPU_NODES, NODE)):
        ready = next(c for c in node["status"]["conditions"] if c["type"] == "Ready")
        assert ready["status"] == "True"


def test_deployment_pods_are_scheduled_and_become_ready(cluster: Cluster, namespace: str) -> None:
    labels = {"app": "web"}
    deployment = {
        "apiVersion": "apps/v1",
        "kind": "Deployment",
        "metadata": {"name": "web"},
        "spec": {
            "replicas": 3,
            "selector": {"matchLabels": labels},
            "template": {"metadata": {"labels": labels}, "spec": _pod("x")["spec"]},
        },
    }
    _apply(cluster, namespace, deployment)
    cluster.kubectl(
        "wait", "-n", namespace, "--for=condition=Available", "deployment/web", "--timeout=60s"
    )
    pods = json.loads(cluster.kubectl("get", "pods", "-n", namespace, "-o", "json").stdout)
    assert len(pods["items"]) == 3
    for pod in pods["items"]:
        assert pod["spec"]["nodeName"] in localcluster.CPU_NODES  # GPU nodes are tainted
        assert pod["status"]["phase"] == "Running"
        assert pod["status"]["podIP"].startswith("127.")


def test_gpu_pod_lands_only_on_a_gpu_node(cluster: Cluster, namespace: str) -> None:
    for index in range(3):
        _apply(cluster, namespace, _pod(f"gpu-{index}", gpus=2))
    cluster.kubectl(
        "wait", "-n", namespace, "--for=condition=Ready", "pod", "--all", "--timeout=60s"
    )
    pods = json.loads(cluster.kubectl("get", "pods", "-n", namespace, "-o", "json").stdout)
    assert {p["spec"]["nodeName"] for p in pods["items"]} <= set(localcluster.GPU_NODES)


def test_impossible_gpu_request_stays_pending_with_failed_scheduling(
    cluster: Cluster, namespace: str
) -> None:
    _apply(cluster, namespace, _pod("greedy", gpus=9))
    deadline = time.monotonic() + 30
    message = ""
    while time.monotonic() < deadline and "nvidia.com/gpu" not in message:
        events = json.loads(
            cluster.kubectl(
                "get", "events", "-n", namespace,
                "--field-selector=reason=FailedScheduling,involvedObject.name=greedy",
                "-o", "json",
            ).stdout
        )["items"]  # fmt: skip
        message = " ".join(e["message"] for e in events)
        time.sleep(0.5)
    assert "Insufficient nvidia.com/gpu" in message
    phase = cluster.kubectl(
        "get", "pod", "greedy", "-n", namespace, "-o", "jsonpath={.status.phase}"
    )
    assert phase.stdout == "Pending"


def test_deleting_an_owner_garbage_collects_what_it_owns(cluster: Cluster, namespace: str) -> None:
    _apply(
        cluster, namespace, {"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": "owner"}}
    )
    uid = cluster.kubectl(
        "get", "configmap", "owner", "-n", namespace, "-o", "jsonpath={.metadata.uid}"
    ).stdout
    owned = {
        "apiVersion": "v1",
        "kind": "Secret",
        "metadata": {
            "name": "owned",
            "ownerReferences": [
                {"apiVersion": "v1", "kind": "ConfigMap", "name": "owner", "uid": uid}
            ],
        },
        "stringData": {"k": "v"},
    }
    _apply(cluster, namespace, owned)
    cluster.kubectl("delete", "configmap", "owner", "-n", namespace)
    cluster.kubectl("wait", "-n", namespace, "--for=delete", "secret/owned", "--timeout=60s")


def test_api_server_rejects_an_invalid_object_with_a_field_error(
    cluster: Cluster, namespace: str
) -> None:
    bad = {
        "apiVersion": "apps/v1",
        "kind": "Deployment",
        "metadata": {"name": "bad"},
        "spec": {
            "replicas": -1,
            "selector": {"matchLabels": {"app": "bad"}},
            "template": {"metadata": {"labels": {"app": "bad"}}, "spec": _pod("x")["spec"]},
        },
    }
    result = cluster.kubectl(
        "apply", "-n", namespace, "-f", "-", input=json.dumps(bad), check=False
    )
    assert result.returncode != 0
    assert "spec.replicas: Invalid value: -1" in result.stderr

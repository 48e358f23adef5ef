"""GPU placement, impossible requests, and autoscaling against the real scheduler."""

from __future__ import annotations

import json
import time
from typing import Any

import pytest
from kopf.testing import KopfRunner

from operator_helpers import apply_md, condition, events_about, get, ready_md, wait_for
from support import Cluster

pytestmark = pytest.mark.integration

GPU_PRODUCT = "NVIDIA-A100-SXM4-80GB"
MODEL = {"uri": "gs://models/resnet/1/model.onnx", "version": "1"}


def test_gpu_model_runs_only_on_gpu_nodes(
    cluster: Cluster, namespace: str, operator: KopfRunner
) -> None:
    apply_md(
        cluster,
        namespace,
        "resnet",
        {"model": MODEL, "replicas": 3, "accelerator": {"count": 1, "product": GPU_PRODUCT}},
    )
    wait_for("resnet Ready", lambda: ready_md(cluster, namespace, "resnet"))
    pods = json.loads(
        cluster.kubectl(
            "get", "pods", "-n", namespace, "-l", "app.kubernetes.io/instance=resnet", "-o", "json"
        ).stdout
    )["items"]
    nodes = json.loads(cluster.kubectl("get", "nodes", "-o", "json").stdout)["items"]
    gpu_nodes = {
        n["metadata"]["name"]
        for n in nodes
        if n["metadata"]["labels"].get("nvidia.com/gpu.product") == GPU_PRODUCT
    }
    assert len(pods) == 3
    assert {p["spec"]["nodeName"] for p in pods} <= gpu_nodes


def test_impossible_gpu_request_is_not_ready_and_says_why(
    cluster: Cluster, namespace: str, operator: KopfRunner
) -> None:
    # Each GPU node has 8 GPUs; no node can take 16.
    apply_md(cluster, namespace, "huge", {"model": MODEL, "accelerator": {"count": 16}})

    def unschedulable() -> dict[str, Any] | None:
        ready = condition(get(cluster, namespace, "md", "huge"), "Ready")
        return ready if ready.get("reason") == "PodsUnschedulable" else None

    ready = wait_for("Ready=False with the scheduler's reason", unschedulable)
    assert ready["status"] == "False"
    nodes = json.loads(cluster.kubectl("get", "nodes", "-o", "json").stdout)["items"]
    expected = f"0/1 replicas ready, pods Pending: 0/{len(nodes)} nodes are available"
    assert ready["message"].startswith(expected)
    assert "Insufficient nvidia.com/gpu" in ready["message"]
    warnings = [e for e in events_about(cluster, namespace, "huge") if e["type"] == "Warning"]
    assert any(e["reason"] == "PodsUnschedulable" for e in warnings)


def test_under_autoscaling_the_operator_never_writes_replicas(
    cluster: Cluster, namespace: str, operator: KopfRunner
) -> None:
    spec = {
        "model": MODEL,
        "autoscaling": {"minReplicas": 1, "maxReplicas": 4, "metric": "concurrency", "target": 8},
    }
    apply_md(cluster, namespace, "scaled", spec)
    wait_for("scaled Ready", lambda: ready_md(cluster, namespace, "scaled"))
    hpa = get(cluster, namespace, "horizontalpodautoscaler", "scaled")
    assert hpa is not None
    assert hpa["spec"]["metrics"][0]["pods"]["metric"]["name"] == "modeldeploy_inflight_requests"

    # What the HPA would do: scale the Deployment through its scale subresource.
    cluster.kubectl("scale", "deployment", "scaled", "-n", namespace, "--replicas=3")
    wait_for(
        "3/3 reported",
        lambda: (
            (get(cluster, namespace, "md", "scaled") or {}).get("status", {}).get("replicaSummary")
            == "3/3"
        ),
    )
    time.sleep(3)
    shown = cluster.kubectl(
        "get", "deployment", "scaled", "-n", namespace, "-o", "json", "--show-managed-fields"
    )
    deployment = json.loads(shown.stdout)
    assert deployment["spec"]["replicas"] == 3
    ours = [m for m in deployment["metadata"]["managedFields"] if m["manager"] == "modeldeploy"]
    assert ours
    assert all("f:replicas" not in json.dumps(m["fieldsV1"].get("f:spec", {})) for m in ours)

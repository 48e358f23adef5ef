"""Create, update, delete, drift repair and unwanted children, against the real control plane."""

from __future__ import annotations

import json
from typing import Any

import pytest
from kopf.testing import KopfRunner

from operator_helpers import apply_md, condition, events_about, get, ready_md, wait_for
from support import Cluster

pytestmark = pytest.mark.integration

SPEC: dict[str, Any] = {
    "model": {"uri": "s3://models/iris/3/model.onnx", "version": "3"},
    "replicas": 2,
    "ingress": {"host": "iris.example.com"},
    "disruptionBudget": {"minAvailable": 1},
    "networkPolicy": {"allowFrom": [{"namespaceSelector": {}}]},
}
CHILDREN = ("deployment", "service", "ingress", "poddisruptionbudget", "networkpolicy")


def _pods(cluster: Cluster, namespace: str) -> list[dict[str, Any]]:
    pods = cluster.kubectl(
        "get", "pods", "-n", namespace, "-l", "app.kubernetes.io/instance=iris", "-o", "json"
    )
    items: list[dict[str, Any]] = json.loads(pods.stdout)["items"]
    return items


def test_create_makes_every_child_owned_and_reports_ready(
    cluster: Cluster, namespace: str, operator: KopfRunner
) -> None:
    apply_md(cluster, namespace, "iris", SPEC)
    md = wait_for("iris Ready", lambda: ready_md(cluster, namespace, "iris"))

    for kind in CHILDREN:
        child = get(cluster, namespace, kind, "iris")
        assert child is not None, f"no {kind}"
        (owner,) = child["metadata"]["ownerReferences"]
        assert (owner["kind"], owner["uid"], owner["controller"]) == (
            "ModelDeployment",
            md["metadata"]["uid"],
            True,
        )
    deployment = get(cluster, namespace, "deployment", "iris")
    assert deployment is not None
    assert deployment["spec"]["replicas"] == 2
    serve = deployment["spec"]["template"]["spec"]["containers"][0]
    assert serve["args"][0] == "serve"
    assert deployment["spec"]["template"]["spec"]["initContainers"][0]["args"][:3] == [
        "fetch",
        "--uri",
        "s3://models/iris/3/model.onnx",
    ]
    assert get(cluster, namespace, "horizontalpodautoscaler", "iris") is None

    status = md["status"]
    assert (status["replicas"], status["readyReplicas"], status["replicaSummary"]) == (2, 2, "2/2")
    assert status["url"] == "http://iris.example.com/v2/models/iris"
    assert status["model"]["version"] == "3"
    assert condition(md, "Stalled")["status"] == "False"
    assert condition(md, "Reconciling")["status"] == "False"
    # GitOps tools compare annotations: kopf must have left none.
    assert not any("kopf" in key for key in md["metadata"].get("annotations", {}))
    assert not md["metadata"].get("finalizers")
    reasons = {e["reason"] for e in events_about(cluster, namespace, "iris")}
    assert "Available" in reasons


def test_model_update_rolls_the_pods(
    cluster: Cluster, namespace: str, operator: KopfRunner
) -> None:
    apply_md(cluster, namespace, "iris", SPEC)
    wait_for("iris Ready", lambda: ready_md(cluster, namespace, "iris"))
    before = {pod["metadata"]["name"] for pod in _pods(cluster, namespace)}

    apply_md(
        cluster,
        namespace,
        "iris",
        SPEC | {"model": {"uri": "s3://models/iris/4/model.onnx", "version": "4"}},
    )

    def rolled() -> bool:
        pods = [p for p in _pods(cluster, namespace) if not p["metadata"].get("deletionTimestamp")]
        versions = {p["metadata"]["labels"].get("modeldeploy.io/model-version") for p in pods}
        names = {p["metadata"]["name"] for p in pods}
        return len(pods) == 2 and versions == {"4"} and not names & before

    wait_for("pods of version 4 only", rolled)
    md = wait_for("iris Ready again", lambda: ready_md(cluster, namespace, "iris"))
    assert md["status"]["model"]["uri"] == "s3://models/iris/4/model.onnx"


def test_delete_garbage_collects_the_children(
    cluster: Cluster, namespace: str, operator: KopfRunner
) -> None:
    apply_md(cluster, namespace, "iris", SPEC)
    wait_for("iris Ready", lambda: ready_md(cluster, namespace, "iris"))
    cluster.kubectl("delete", "md", "iris", "-n", namespace, "--wait=true")
    for kind in CHILDREN:
        wait_for(f"{kind} deleted", lambda kind=kind: get(cluster, namespace, kind, "iris") is None)


def test_children_edited_or_deleted_by_hand_are_put_back(
    cluster: Cluster, namespace: str, operator: KopfRunner
) -> None:
    apply_md(cluster, namespace, "iris", SPEC)
    wait_for("iris Ready", lambda: ready_md(cluster, namespace, "iris"))
    service = get(cluster, namespace, "service", "iris")
    assert service is not None

    cluster.kubectl(
        "patch",
        "deployment",
        "iris",
        "-n",
        namespace,
        "--type=json",
        "-p",
        '[{"op": "replace", "path": "/spec/template/spec/containers/0/image", "value": "evil:1"}]',
    )
    cluster.kubectl("delete", "service", "iris", "-n", namespace)
    cluster.kubectl("delete", "networkpolicy", "iris", "-n", namespace)

    def image() -> str:
        deployment = get(cluster, namespace, "deployment", "iris") or {}
        return str(deployment["spec"]["template"]["spec"]["containers"][0]["image"])

    wait_for("image restored", lambda: image() != "evil:1", timeout=10)

    def recreated(kind: str, old_uid: str | None = None) -> bool:
        child = get(cluster, namespace, kind, "iris")
        return child is not None and child["metadata"]["uid"] != old_uid

    wait_for(
        "service recreated", lambda: recreated("service", service["metadata"]["uid"]), timeout=10
    )
    wait_for("network policy recreated", lambda: recreated("networkpolicy"), timeout=10)


def test_removing_the_ingress_deletes_it(
    cluster: Cluster, namespace: str, operator: KopfRunner
) -> None:
    apply_md(cluster, namespace, "iris", SPEC)
    wait_for("iris Ready", lambda: ready_md(cluster, namespace, "iris"))
    assert get(cluster, namespace, "ingress", "iris") is not None

    without = {k: v for k, v in SPEC.items() if k != "ingress"}
    apply_md(cluster, namespace, "iris", without)
    wait_for("ingress deleted", lambda: get(cluster, namespace, "ingress", "iris") is None)
    md = wait_for("iris Ready", lambda: ready_md(cluster, namespace, "iris"))
    assert md["status"]["url"] == f"http://iris.{namespace}.svc:8080/v2/models/iris"

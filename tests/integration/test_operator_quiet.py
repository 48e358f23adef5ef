"""Level-based and quiet: no writes when nothing changed, convergence after a restart."""

from __future__ import annotations

import time
from collections.abc import Callable
from contextlib import AbstractContextManager
from typing import Any

import prometheus_client
import pytest
from kopf.testing import KopfRunner

from operator_helpers import apply_md, get, operator_writes, ready_md, wait_for
from support import Cluster

pytestmark = pytest.mark.integration

SPEC: dict[str, Any] = {
    "model": {"uri": "s3://models/iris/3/model.onnx", "version": "3"},
    "replicas": 2,
    "ingress": {"host": "iris.example.com"},
    "disruptionBudget": {"maxUnavailable": "50%"},
    "networkPolicy": {},
    "resources": {"requests": {"cpu": "0.5", "memory": "1024Mi"}, "limits": {"cpu": 1}},
}
StartOperator = Callable[[], AbstractContextManager[KopfRunner]]
RESYNC_INTERVAL_S = 1


def _reconciles() -> float:
    """Reconciles so far by the operators this process ran (kopf runs them in-process)."""
    return sum(
        prometheus_client.REGISTRY.get_sample_value(
            "modeldeploy_operator_reconciles_total", {"result": result}
        )
        or 0
        for result in ("success", "invalid", "error")
    )


def test_resync_of_an_unchanged_object_makes_zero_writes(
    cluster: Cluster, namespace: str, start_operator: StartOperator, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The periodic resync reconciles every object every second here: it must cost no write.
    monkeypatch.setenv("MODELDEPLOY_RESYNC_INTERVAL", str(RESYNC_INTERVAL_S))
    start = cluster.audit_log.stat().st_size
    with start_operator():
        apply_md(cluster, namespace, "iris", SPEC)
        apply_md(cluster, namespace, "scaled", {"model": SPEC["model"], "autoscaling": {}})
        wait_for("iris Ready", lambda: ready_md(cluster, namespace, "iris"))
        wait_for("scaled Ready", lambda: ready_md(cluster, namespace, "scaled"))
        time.sleep(2)  # the last status writes echo back through the watches
        assert operator_writes(cluster.audit_log, start, namespace), "the audit filter sees none"
        offset = cluster.audit_log.stat().st_size
        reconciles = _reconciles()
        # A change that is not the operator's business still triggers a reconcile of the owner.
        cluster.kubectl("label", "deployment", "iris", "-n", namespace, "team=ml")
        cluster.kubectl("annotate", "service", "iris", "-n", namespace, "note=hand-made")
        time.sleep(5)
        assert operator_writes(cluster.audit_log, offset, namespace) == []
        # Both objects were reconciled by the resync in every interval of that wait.
        assert _reconciles() - reconciles >= 2 * (5 / RESYNC_INTERVAL_S - 1)

    offset = cluster.audit_log.stat().st_size
    with start_operator():  # resume: every object is reconciled again
        time.sleep(8)
    assert operator_writes(cluster.audit_log, offset, namespace) == []


def test_restart_in_the_middle_of_a_rollout_converges(
    cluster: Cluster, namespace: str, start_operator: StartOperator
) -> None:
    with start_operator():
        apply_md(cluster, namespace, "iris", SPEC)
        wait_for("iris Ready", lambda: ready_md(cluster, namespace, "iris"))
        apply_md(
            cluster,
            namespace,
            "iris",
            SPEC | {"model": {"uri": "s3://models/iris/4/model.onnx", "version": "4"}},
        )

        def rollout_started() -> bool:
            deployment = get(cluster, namespace, "deployment", "iris") or {}
            labels = deployment["spec"]["template"]["metadata"]["labels"]
            return labels.get("modeldeploy.io/model-version") == "4"

        wait_for("the rollout to start", rollout_started, timeout=10)
    # Stopped mid-rollout: the status still describes generation 1 (or a rollout in progress).
    apply_md(
        cluster,
        namespace,
        "iris",
        SPEC | {"model": {"uri": "s3://models/iris/5/model.onnx", "version": "5"}, "replicas": 3},
    )

    with start_operator():
        md = wait_for("iris Ready at generation 3", lambda: ready_md(cluster, namespace, "iris"))
    assert md["metadata"]["generation"] == 3
    assert md["status"]["model"]["version"] == "5"
    assert md["status"]["replicaSummary"] == "3/3"
    deployment = get(cluster, namespace, "deployment", "iris")
    assert deployment is not None
    assert deployment["status"]["updatedReplicas"] == 3

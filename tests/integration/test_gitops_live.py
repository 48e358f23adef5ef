"""Flux (the real kstatus library) and Argo CD (health.lua in real Lua) judge live ModelDeployments
that the real operator reconciled: Current/Healthy when Ready, InProgress/Progressing while a new
generation is not yet handled, Failed/Degraded when Stalled."""

from __future__ import annotations

import json
from collections.abc import Callable
from contextlib import AbstractContextManager
from typing import Any

import pytest
from kopf.testing import KopfRunner

from gitops_health import argocd_health, kstatus
from operator_helpers import apply_md, condition, get, ready_md, wait_for
from support import Cluster

SPEC = {"model": {"uri": "s3://models/iris/3/model.onnx", "version": "3"}, "replicas": 2}

pytestmark = pytest.mark.integration


def _verdicts(obj: dict[str, Any]) -> tuple[str, str]:
    return kstatus(obj).status, argocd_health(obj).status


def test_ready_then_a_new_generation_in_progress_then_converged(
    cluster: Cluster,
    namespace: str,
    start_operator: Callable[[], AbstractContextManager[KopfRunner]],
) -> None:
    with start_operator():
        apply_md(cluster, namespace, "iris", SPEC)
        ready = wait_for("iris Ready", lambda: ready_md(cluster, namespace, "iris"))
        assert _verdicts(ready) == ("Current", "Healthy")
    # The operator is down: a spec change is a generation nobody has handled yet.
    apply_md(cluster, namespace, "iris", {**SPEC, "model": {**SPEC["model"], "version": "4"}})
    pending = get(cluster, namespace, "md", "iris")
    assert pending is not None
    assert pending["metadata"]["generation"] > pending["status"]["observedGeneration"]
    assert _verdicts(pending) == ("InProgress", "Progressing")
    with start_operator():
        converged = wait_for("iris Ready again", lambda: ready_md(cluster, namespace, "iris"))
        assert _verdicts(converged) == ("Current", "Healthy")


def test_stalled_is_failed_and_degraded(
    cluster: Cluster, namespace: str, operator: KopfRunner
) -> None:
    # A Service of that name already controlled by something else: the operator cannot take it.
    owner = json.loads(
        cluster.kubectl("create", "configmap", "someone-else", "-n", namespace, "-o", "json").stdout
    )
    service = {
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": {
            "name": "iris",
            "ownerReferences": [
                {
                    "apiVersion": "v1",
                    "kind": "ConfigMap",
                    "name": "someone-else",
                    "uid": owner["metadata"]["uid"],
                    "controller": True,
                }
            ],
        },
        "spec": {"ports": [{"port": 80}]},
    }
    cluster.kubectl("apply", "-n", namespace, "-f", "-", input=json.dumps(service))
    apply_md(cluster, namespace, "iris", SPEC)

    def stalled() -> dict[str, Any] | None:
        md = get(cluster, namespace, "md", "iris")
        return md if condition(md, "Stalled").get("status") == "True" else None

    md = wait_for("iris Stalled", stalled)
    assert _verdicts(md) == ("Failed", "Degraded")

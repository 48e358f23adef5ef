"""Argo CD (health.lua in real Lua) and Flux (the real kstatus library) read the operator's status.

The statuses come from the operator's own status computation, for the situations a GitOps tool
waits through: just created, a new generation not yet observed, rolling out, pods that cannot be
scheduled, served, and stalled (invalid spec, failed rollout).
"""

from __future__ import annotations

from typing import Any

import pytest

from gitops_health import Health, argocd_health, kstatus, lua_literal
from modeldeploy_operator import builders, status
from modeldeploy_operator import spec as api

OWNER = builders.Owner(name="iris", namespace="ml", uid="9d4a2c1e-0000-4000-8000-000000000001")
SPEC: dict[str, Any] = {"model": {"uri": "https://models.example.com/iris.onnx"}, "replicas": 2}
NOW = "2026-01-01T00:00:00Z"


def model_deployment(generation: int, computed: api.ModelDeploymentStatus | None) -> dict[str, Any]:
    obj: dict[str, Any] = {
        "apiVersion": f"{api.GROUP}/{api.VERSION}",
        "kind": api.KIND,
        "metadata": {
            "name": OWNER.name,
            "namespace": OWNER.namespace,
            "uid": OWNER.uid,
            "generation": generation,
        },
        "spec": SPEC,
    }
    if computed is not None:
        obj["status"] = computed.model_dump(by_alias=True, exclude_none=True, mode="json")
    return obj


def deployment(ready: int, updated: int, conditions: list[dict[str, Any]] | None = None) -> dict:
    return {
        "metadata": {"name": OWNER.name, "generation": 1},
        "spec": {"replicas": 2},
        "status": {
            "observedGeneration": 1,
            "replicas": 2,
            "updatedReplicas": updated,
            "readyReplicas": ready,
            "availableReplicas": ready,
            "conditions": conditions or [],
        },
    }


def computed(**observed: Any) -> api.ModelDeploymentStatus:
    spec_error = observed.pop("spec_error", None)
    spec = None if spec_error else api.ModelDeploymentSpec.model_validate(SPEC)
    observation = status.Observation(
        owner=OWNER, generation=1, spec=spec, spec_error=spec_error, **observed
    )
    return status.compute(observation, NOW)


def pending_pod() -> dict[str, Any]:
    spec = api.ModelDeploymentSpec.model_validate(SPEC)
    return {
        "metadata": {
            "name": "iris-7d9f-abcde",
            "annotations": {builders.ANNOTATION_MODEL_DIGEST: builders.model_digest(spec)},
        },
        "status": {
            "phase": "Pending",
            "conditions": [
                {
                    "type": "PodScheduled",
                    "status": "False",
                    "reason": "Unschedulable",
                    "message": "0/3 nodes are available: 3 Insufficient nvidia.com/gpu.",
                }
            ],
        },
    }


DEADLINE = {
    "type": "Progressing",
    "status": "False",
    "reason": "ProgressDeadlineExceeded",
    "message": 'ReplicaSet "iris-7d9f" has timed out progressing.',
}

# (situation, object, Argo CD status, kstatus status)
CASES = [
    # kstatus counts an object without any status as Current: see gitops/README.md.
    ("just created", lambda: model_deployment(1, None), "Progressing", "Current"),
    (
        "new generation not yet observed",
        lambda: model_deployment(2, computed(deployment=deployment(2, 2))),
        "Progressing",
        "InProgress",
    ),
    ("no Deployment yet", lambda: model_deployment(1, computed()), "Progressing", "InProgress"),
    (
        "rolling out",
        lambda: model_deployment(1, computed(deployment=deployment(1, 1))),
        "Progressing",
        "InProgress",
    ),
    (
        "pods unschedulable",
        lambda: model_deployment(1, computed(deployment=deployment(0, 2), pods=[pending_pod()])),
        "Progressing",
        "InProgress",
    ),
    (
        "served",
        lambda: model_deployment(1, computed(deployment=deployment(2, 2))),
        "Healthy",
        "Current",
    ),
    (
        "invalid spec",
        lambda: model_deployment(1, computed(spec_error="spec.replicas: must be >= 0")),
        "Degraded",
        "Failed",
    ),
    (
        "rollout deadline exceeded",
        lambda: model_deployment(1, computed(deployment=deployment(1, 1, [DEADLINE]))),
        "Degraded",
        "Failed",
    ),
]


@pytest.mark.parametrize(("situation", "make", "argocd", "flux"), CASES, ids=[c[0] for c in CASES])
def test_gitops_tools_read_the_status(situation: str, make: Any, argocd: str, flux: str) -> None:
    obj = make()
    assert argocd_health(obj).status == argocd, situation
    assert kstatus(obj).status == flux, situation


def test_argocd_shows_the_operators_message() -> None:
    unschedulable = model_deployment(1, computed(deployment=deployment(0, 2), pods=[pending_pod()]))
    assert "Insufficient nvidia.com/gpu" in argocd_health(unschedulable).message
    stalled = model_deployment(1, computed(spec_error="spec.replicas: must be >= 0"))
    assert argocd_health(stalled) == Health("Degraded", kstatus(stalled).message)
    assert "generation 2" in argocd_health(model_deployment(2, computed())).message


def test_lua_literals_survive_any_string() -> None:
    tricky = 'quote " backslash \\ newline \n tab \t unicode é ✓ ]] [['
    obj = model_deployment(1, computed(spec_error=tricky))
    assert tricky in argocd_health(obj).message
    assert lua_literal({"a": None, "b": [1, 2.5, True]}) == '{["b"] = {1, 2.5, true}}'

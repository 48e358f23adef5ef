"""Status computation from the observed Deployment and pods."""

from __future__ import annotations

from typing import Any

from modeldeploy_contract import values
from modeldeploy_operator import builders, status
from modeldeploy_operator import spec as api

OWNER = builders.Owner(name="iris", namespace="ml", uid="uid-1")
NOW = "2030-01-01T00:00:00Z"
SPEC = api.ModelDeploymentSpec.model_validate(
    {"model": {"uri": "s3://m/iris.onnx", "version": "3"}, "replicas": 2}
)
UNSCHEDULABLE = (
    "0/4 nodes are available: 2 Insufficient nvidia.com/gpu, 2 node(s) had untolerated taint."
)


def _deployment(ready: int, updated: int = 2, replicas: int = 2, **extra: Any) -> dict[str, Any]:
    return {
        "metadata": {"generation": 2},
        "spec": {"replicas": 2},
        "status": {
            "observedGeneration": 2,
            "replicas": replicas,
            "updatedReplicas": updated,
            "readyReplicas": ready,
            "availableReplicas": ready,
            **extra,
        },
    }


def _pod(**pod_status: Any) -> dict[str, Any]:
    digest = builders.model_digest(SPEC)
    return {
        "metadata": {"name": "iris-1", "annotations": {builders.ANNOTATION_MODEL_DIGEST: digest}},
        "status": pod_status,
    }


def _compute(now: str = NOW, **fields: Any) -> api.ModelDeploymentStatus:
    base: dict[str, Any] = {"owner": OWNER, "generation": 4, "spec": SPEC}
    return status.compute(status.Observation(**(base | fields)), now)


def _conditions(result: api.ModelDeploymentStatus) -> dict[str, api.Condition]:
    return {c.type: c for c in result.conditions}


def test_rolled_out_is_ready_with_counts_url_and_model() -> None:
    result = _compute(deployment=_deployment(ready=2))
    conditions = _conditions(result)
    assert (conditions["Ready"].status, conditions["Ready"].reason) == ("True", "Available")
    assert conditions["Reconciling"].status == "False"
    assert conditions["Stalled"].status == "False"
    assert result.observed_generation == 4
    assert (result.replicas, result.ready_replicas, result.updated_replicas) == (2, 2, 2)
    assert result.replica_summary == "2/2"
    assert result.url == "http://iris.ml.svc:8080/v2/models/iris"
    assert result.model == api.ModelStatus(uri="s3://m/iris.onnx", version="3", quantization="none")


def test_no_deployment_yet_is_reconciling() -> None:
    conditions = _conditions(_compute())
    assert conditions["Ready"].status == "False"
    assert conditions["Reconciling"].status == "True"


def test_rollout_in_progress_is_not_ready() -> None:
    deployment = _deployment(ready=2, updated=1, replicas=3)
    conditions = _conditions(_compute(deployment=deployment))
    assert (conditions["Ready"].status, conditions["Ready"].reason) == ("False", "RollingOut")
    assert conditions["Reconciling"].status == "True"


def test_stale_deployment_status_is_not_ready() -> None:
    deployment = _deployment(ready=2)
    deployment["metadata"]["generation"] = 3
    assert _conditions(_compute(deployment=deployment))["Ready"].status == "False"


def test_unschedulable_pods_give_the_schedulers_reason() -> None:
    pending = _pod(
        phase="Pending",
        conditions=[
            {
                "type": "PodScheduled",
                "status": "False",
                "reason": "Unschedulable",
                "message": UNSCHEDULABLE,
            }
        ],
    )
    conditions = _conditions(_compute(deployment=_deployment(ready=0), pods=[pending]))
    ready = conditions["Ready"]
    assert (ready.status, ready.reason) == ("False", "PodsUnschedulable")
    assert ready.message == f"0/2 replicas ready, pods Pending: {UNSCHEDULABLE}"
    assert conditions["Stalled"].status == "False"


def test_a_model_that_fails_to_fetch_stalls() -> None:
    failing = _pod(
        initContainerStatuses=[
            {
                "name": "fetch-model",
                "state": {"waiting": {"reason": "CrashLoopBackOff"}},
                "lastState": {
                    "terminated": {"exitCode": 1, "message": "sha256 mismatch: a != b\n"}
                },
            }
        ]
    )
    conditions = _conditions(_compute(deployment=_deployment(ready=0), pods=[failing]))
    assert conditions["Stalled"].status == "True"
    assert conditions["Stalled"].reason == "ModelFetchFailed"
    assert conditions["Stalled"].message == "fetch-model exited with 1: sha256 mismatch: a != b"
    assert conditions["Reconciling"].status == "False"


def test_an_oom_killed_container_stalls_naming_its_limit_and_last_state() -> None:
    killed = _pod(
        containerStatuses=[
            {
                "name": "serve",
                "restartCount": 3,
                "state": {"waiting": {"reason": "CrashLoopBackOff"}},
                "lastState": {
                    "terminated": {
                        "exitCode": 137,
                        "reason": "OOMKilled",
                        "finishedAt": "2026-12-05T01:00:00Z",
                    }
                },
            }
        ]
    )
    deployment = _deployment(ready=0)
    limited = {"name": "serve", "resources": {"limits": {"memory": "64Mi"}}}
    deployment["spec"]["template"] = {"spec": {"containers": [limited]}}
    stalled = _conditions(_compute(deployment=deployment, pods=[killed]))["Stalled"]
    assert (stalled.status, stalled.reason) == ("True", "OOMKilled")
    assert stalled.message == (
        "serve was OOM-killed at its memory limit (64Mi); last state: terminated, reason "
        "OOMKilled, exit code 137, finished at 2026-12-05T01:00:00Z, restarts: 3"
    )


def test_a_model_below_its_accuracy_gate_stalls_with_the_figure_and_the_floor() -> None:
    line = (
        "validation failed on 200 samples: agreement with the unquantized model 0.4850 is "
        "below minAgreement 0.95"
    )
    failing = _pod(
        containerStatuses=[
            {
                "name": "runtime",
                "state": {"waiting": {"reason": "CrashLoopBackOff"}},
                "lastState": {
                    "terminated": {"exitCode": values.EXIT_VALIDATION_FAILED, "message": line}
                },
            }
        ]
    )
    conditions = _conditions(_compute(deployment=_deployment(ready=0), pods=[failing]))
    assert (conditions["Stalled"].status, conditions["Stalled"].reason) == (
        "True",
        "ValidationFailed",
    )
    assert conditions["Stalled"].message == f"runtime exited with 4: {line}"
    assert conditions["Ready"].status == "False"


def test_a_failed_warm_up_the_user_asked_for_stalls_with_its_own_reason() -> None:
    failing = _pod(
        containerStatuses=[
            {
                "name": "runtime",
                "state": {"waiting": {"reason": "CrashLoopBackOff"}},
                "lastState": {
                    "terminated": {
                        "exitCode": values.EXIT_WARMUP_FAILED,
                        "message": "the warm-up with the warm-up shapes failed: Concat: Axis 2\n",
                    }
                },
            }
        ]
    )
    conditions = _conditions(_compute(deployment=_deployment(ready=0), pods=[failing]))
    assert conditions["Stalled"].status == "True"
    assert conditions["Stalled"].reason == "WarmupFailed"
    assert "warm-up with the warm-up shapes failed: Concat" in conditions["Stalled"].message
    other = _pod(
        containerStatuses=[
            {"name": "runtime", "state": {"terminated": {"exitCode": 1, "message": "boom"}}}
        ]
    )
    conditions = _conditions(_compute(deployment=_deployment(ready=0), pods=[other]))
    assert conditions["Stalled"].reason == "ModelLoadFailed"


def test_pods_of_an_older_model_do_not_count() -> None:
    old = _pod(containerStatuses=[{"name": "runtime", "state": {"terminated": {"exitCode": 1}}}])
    old["metadata"]["annotations"] = {builders.ANNOTATION_MODEL_DIGEST: "older"}
    assert (
        _conditions(_compute(deployment=_deployment(ready=2), pods=[old]))["Ready"].status == "True"
    )


def test_invalid_spec_stalls_and_says_why() -> None:
    result = _compute(spec=None, spec_error="spec.model.uri: must start with one of https://")
    stalled = _conditions(result)["Stalled"]
    assert (stalled.status, stalled.reason) == ("True", "InvalidSpec")
    assert "spec.model.uri" in stalled.message
    assert result.url is None


def test_last_transition_time_kept_while_status_holds() -> None:
    first = _compute(deployment=_deployment(ready=1))
    previous = [c.model_dump(by_alias=True) for c in first.conditions]
    again = _compute(now="2031-01-01T00:00:00Z", deployment=_deployment(ready=1), previous=previous)
    assert again == first
    ready = _compute(now="2031-01-01T00:00:00Z", deployment=_deployment(ready=2), previous=previous)
    times = {c.type: c.last_transition_time for c in ready.conditions}
    assert times == {
        "Ready": "2031-01-01T00:00:00Z",
        "Reconciling": "2031-01-01T00:00:00Z",
        "Stalled": NOW,
    }


def test_events_on_readiness_transitions_and_problems_only() -> None:
    progressing = _compute(deployment=_deployment(ready=1))
    assert status.transition([], progressing) is None  # a new object is not ready yet: no news
    previous = [c.model_dump(by_alias=True) for c in progressing.conditions]
    assert status.transition(previous, progressing) is None
    event = status.transition(previous, _compute(deployment=_deployment(ready=2)))
    assert event == status.Event("Normal", "Available", "2/2 replicas ready")
    stalled = status.transition([], _compute(spec=None, spec_error="bad"))
    assert stalled is not None and (stalled.type, stalled.reason) == ("Warning", "InvalidSpec")


def test_autoscaled_desired_count_comes_from_the_deployment() -> None:
    scaled = api.ModelDeploymentSpec.model_validate(
        {"model": {"uri": "s3://m/iris.onnx"}, "autoscaling": {"minReplicas": 1}}
    )
    deployment = _deployment(ready=2)
    result = _compute(spec=scaled, deployment=deployment)
    assert result.replica_summary == "2/2"
    assert _conditions(result)["Ready"].status == "True"


ROUTED = api.ModelDeploymentSpec.model_validate(
    {
        "model": {"uri": "s3://m/iris.onnx", "version": "3"},
        "replicas": 2,
        "gateway": {
            "parentRefs": [{"name": "public", "namespace": "gateways"}],
            "hostnames": ["iris.example.com"],
            "path": "/ml",
        },
    }
)


def _route(generation: int = 3, **conditions: tuple[str, str]) -> dict[str, Any]:
    """An HTTPRoute as a Gateway reported on it: {type: (status, reason)}."""
    reported = [
        {"type": kind, "status": value, "reason": reason, "message": f"{kind} says {reason}",
         "observedGeneration": generation}
        for kind, (value, reason) in conditions.items()
    ]  # fmt: skip
    return {
        "metadata": {"generation": 3},
        "status": {
            "parents": [
                {
                    "parentRef": {
                        "group": "gateway.networking.k8s.io",
                        "kind": "Gateway",
                        "name": "public",
                        "namespace": "gateways",
                    },
                    "controllerName": "traefik.io/gateway-controller",
                    "conditions": reported,
                }
            ]
        },
    }


ACCEPTED = {"Accepted": ("True", "Accepted"), "ResolvedRefs": ("True", "ResolvedRefs")}


def _routed(route: dict[str, Any] | None, **fields: Any) -> dict[str, api.Condition]:
    return _conditions(
        _compute(spec=ROUTED, deployment=_deployment(ready=2), http_route=route, **fields)
    )


def test_an_accepted_route_with_resolved_refs_is_ready_at_the_gateways_url() -> None:
    result = _compute(spec=ROUTED, deployment=_deployment(ready=2), http_route=_route(**ACCEPTED))
    assert _conditions(result)["Ready"].status == "True"
    assert result.url == "http://iris.example.com/ml/v2/models/iris"


def test_a_route_no_gateway_has_answered_yet_keeps_it_reconciling() -> None:
    unknown = {"Accepted": ("Unknown", "Pending"), "ResolvedRefs": ("True", "ResolvedRefs")}
    for route in (_route(), _route(generation=2, **ACCEPTED), _route(**unknown)):
        conditions = _routed(route)
        assert conditions["Ready"].status == "False"
        assert conditions["Reconciling"].status == "True"
        assert conditions["Ready"].reason == "RouteProgressing"
        assert conditions["Ready"].message == (
            "2/2 replicas ready, waiting for Gateway gateways/public to accept the HTTPRoute"
        )


def test_a_refused_route_stalls_with_the_gateways_reason() -> None:
    refused = _route(Accepted=("False", "NotAllowedByListeners"), ResolvedRefs=("True", "R"))
    conditions = _routed(refused)
    assert (conditions["Ready"].status, conditions["Stalled"].status) == ("False", "True")
    assert conditions["Ready"].reason == "RouteNotAccepted"
    assert conditions["Ready"].message == (
        "HTTPRoute Accepted=False for Gateway gateways/public: NotAllowedByListeners: "
        "Accepted says NotAllowedByListeners"
    )
    unresolved = _route(Accepted=("True", "Accepted"), ResolvedRefs=("False", "BackendNotFound"))
    assert _routed(unresolved)["Ready"].reason == "RouteRefsNotResolved"


def test_missing_gateway_api_is_explained_and_the_rest_is_still_reported() -> None:
    result = _compute(spec=ROUTED, deployment=_deployment(ready=2), gateway_api_missing=True)
    ready = _conditions(result)["Ready"]
    assert (ready.status, ready.reason) == ("False", "GatewayAPIMissing")
    assert "install its CRDs" in ready.message and "HTTPRoute" in ready.message
    assert _conditions(result)["Stalled"].status == "True"
    assert result.replica_summary == "2/2"


_FULL_STATUSES: list[dict[str, Any]] = [
    # Pending: the scheduler's reason (as a v1.34 API server returns it, every field).
    {
        "phase": "Pending",
        "qosClass": "Burstable",
        "conditions": [
            {"type": "PodScheduled", "status": "False", "reason": "Unschedulable",
             "message": UNSCHEDULABLE, "lastProbeTime": None,
             "lastTransitionTime": "2030-01-01T00:00:00Z", "observedGeneration": 1},
        ],
    },
    # The model fetch failed: the init container exited, and waits to be restarted.
    {
        "phase": "Pending", "hostIP": "10.0.0.1", "podIP": "10.1.0.7",
        "podIPs": [{"ip": "10.1.0.7"}], "startTime": "2030-01-01T00:00:00Z",
        "initContainerStatuses": [
            {"name": "fetch-model", "image": "runtime:1", "imageID": "sha256:1",
             "containerID": "containerd://1", "ready": False, "restartCount": 3, "started": False,
             "state": {"waiting": {"reason": "CrashLoopBackOff", "message": "back-off 40s"}},
             "lastState": {"terminated": {"exitCode": 2, "reason": "Error",
                                          "message": "s3://m/iris.onnx: NoSuchKey\n",
                                          "startedAt": "2030-01-01T00:00:00Z",
                                          "finishedAt": "2030-01-01T00:00:01Z",
                                          "containerID": "containerd://1"}},
             "volumeMounts": [{"name": "model", "mountPath": "/models"}]},
        ],
    },
    # The image cannot be pulled.
    {
        "phase": "Pending", "podIP": "10.1.0.8",
        "containerStatuses": [
            {"name": "runtime", "image": "runtime:nope", "imageID": "", "ready": False,
             "restartCount": 0, "started": False,
             "state": {"waiting": {"reason": "ImagePullBackOff",
                                   "message": 'Back-off pulling image "runtime:nope"'}}},
        ],
    },
    # Serving.
    {
        "phase": "Running", "podIP": "10.1.0.9",
        "conditions": [{"type": "Ready", "status": "True", "lastProbeTime": None,
                        "lastTransitionTime": "2030-01-01T00:00:00Z"}],
        "containerStatuses": [
            {"name": "runtime", "image": "runtime:1", "imageID": "sha256:1", "ready": True,
             "restartCount": 0, "started": True,
             "state": {"running": {"startedAt": "2030-01-01T00:00:00Z"}},
             "allocatedResources": {"cpu": "1"}, "resources": {"limits": {"cpu": "1"}}},
        ],
    },
]  # fmt: skip


def test_the_indexed_pod_summary_gives_the_same_status_and_metrics_targets() -> None:
    """The pod index keeps only part of a pod's status: what it drops changes nothing the
    status computation or the metrics collection conclude."""
    from modeldeploy_operator import collect, handlers

    for full in _FULL_STATUSES:
        slim = handlers._slim_pod_status(full)
        assert len(repr(slim)) < len(repr(full))
        for deployment in (_deployment(ready=0), _deployment(ready=2)):
            assert _compute(deployment=deployment, pods=[_pod(**slim)]) == _compute(
                deployment=deployment, pods=[_pod(**full)]
            ), full
        assert collect.ready_pod_urls([_pod(**slim)], 8080) == collect.ready_pod_urls(
            [_pod(**full)], 8080
        )

"""Pure status computation: what the children and pods say about a ModelDeployment.

Conditions follow the kstatus conventions (Ready, Reconciling, Stalled), so that Flux, Argo CD
and `kubectl wait --for=condition=Ready` understand them without configuration.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from modeldeploy_contract import values
from modeldeploy_operator import builders
from modeldeploy_operator import spec as api

_MESSAGE_LIMIT = 1024
# Deployment condition reason that means the rollout gave up (progressDeadlineSeconds passed).
_DEADLINE_EXCEEDED = "ProgressDeadlineExceeded"
# Waiting reasons that keep a container from ever starting without a change by someone.
_BROKEN_WAITING = {"CrashLoopBackOff", "ImagePullBackOff", "ErrImagePull", "InvalidImageName"}
GATEWAY_API_MISSING = (
    "spec.gateway needs the Gateway API, which this cluster does not serve (no "
    "gateway.networking.k8s.io/v1 HTTPRoute): install its CRDs (standard channel): the operator "
    "picks them up, no restart needed; everything else is served without the HTTPRoute"
)
# The HTTPRoute parent conditions that must be True for the route to carry traffic.
_ROUTE_CONDITIONS = ("Accepted", "ResolvedRefs")


@dataclass(frozen=True)
class Observation:
    """Everything the status is computed from; gathered by the reconciler."""

    owner: builders.Owner
    generation: int
    spec: api.ModelDeploymentSpec | None
    spec_error: str | None = None
    apply_error: str | None = None
    deployment: api.Object | None = None
    http_route: api.Object | None = None
    gateway_api_missing: bool = False
    pods: list[api.Object] = field(default_factory=list)
    previous: list[api.Object] = field(default_factory=list)


@dataclass(frozen=True)
class Verdict:
    ready: bool
    stalled: bool
    reason: str
    message: str


@dataclass(frozen=True)
class Event:
    type: str
    reason: str
    message: str


def compute(observation: Observation, now: str) -> api.ModelDeploymentStatus:
    verdict = _verdict(observation)
    previous = {c.get("type"): c for c in observation.previous}
    conditions = [
        _condition("Ready", verdict.ready, verdict.reason, verdict.message, previous, now),
        _condition(
            "Reconciling",
            not verdict.ready and not verdict.stalled,
            verdict.reason,
            verdict.message,
            previous,
            now,
        ),
        _condition("Stalled", verdict.stalled, verdict.reason, verdict.message, previous, now),
    ]
    status = api.ModelDeploymentStatus(
        observed_generation=observation.generation, conditions=conditions
    )
    spec = observation.spec
    if spec is None:
        return status
    deployment_status = (observation.deployment or {}).get("status", {})
    ready = deployment_status.get("readyReplicas", 0)
    return status.model_copy(
        update={
            "replicas": deployment_status.get("replicas", 0),
            "ready_replicas": ready,
            "updated_replicas": deployment_status.get("updatedReplicas", 0),
            "replica_summary": f"{ready}/{_desired_replicas(spec, observation.deployment)}",
            "url": builders.url(observation.owner, spec),
            "model": api.ModelStatus(
                uri=spec.model.uri,
                sha256=spec.model.sha256,
                version=spec.model.version,
                quantization=spec.quantization,
            ),
        }
    )


def transition(previous: list[api.Object], current: api.ModelDeploymentStatus) -> Event | None:
    """The Event to emit: readiness changed, or a problem someone must act on appeared."""
    before = next((c for c in previous if c.get("type") == "Ready"), {})
    ready = next(c for c in current.conditions if c.type == "Ready")
    stalled = any(c.type == "Stalled" and c.status == "True" for c in current.conditions)
    warning = stalled or ready.reason == "PodsUnschedulable"
    flipped = before and before.get("status") != ready.status
    if flipped or (warning and before.get("reason") != ready.reason):
        return Event("Warning" if warning else "Normal", ready.reason, ready.message)
    return None


def _condition(
    kind: str, value: bool, reason: str, message: str, previous: dict[Any, api.Object], now: str
) -> api.Condition:
    status: api.ConditionStatus = "True" if value else "False"
    before = previous.get(kind, {})
    since = before.get("lastTransitionTime") if before.get("status") == status else None
    return api.Condition(
        type=kind,
        status=status,
        reason=reason,
        message=message[:_MESSAGE_LIMIT],
        last_transition_time=since or now,
    )


def _desired_replicas(spec: api.ModelDeploymentSpec, deployment: api.Object | None) -> int:
    if spec.autoscaling is not None:
        replicas: int = (deployment or {}).get("spec", {}).get("replicas", 0)
        return replicas
    return 1 if spec.replicas is None else spec.replicas


def _verdict(observation: Observation) -> Verdict:
    spec = observation.spec
    if spec is None:
        return Verdict(False, True, "InvalidSpec", f"invalid spec: {observation.spec_error}")
    if observation.apply_error:
        return Verdict(False, True, "ApplyFailed", observation.apply_error)
    if spec.gateway and observation.gateway_api_missing:
        return Verdict(False, True, "GatewayAPIMissing", GATEWAY_API_MISSING)
    deployment = observation.deployment
    if deployment is None:
        return Verdict(False, False, "Progressing", "waiting for the Deployment to be created")

    current_pods = [
        pod
        for pod in observation.pods
        if not pod["metadata"].get("deletionTimestamp")
        and pod["metadata"].get("annotations", {}).get(builders.ANNOTATION_MODEL_DIGEST)
        == builders.model_digest(spec)
    ]
    failure = _pod_failure(current_pods, deployment)
    if failure:
        return failure
    route = _route_verdict(observation.owner, spec, observation.http_route)
    if route and route.stalled:
        return route

    desired = _desired_replicas(spec, deployment)
    status = deployment.get("status", {})
    ready = status.get("readyReplicas", 0)
    progress = f"{ready}/{desired} replicas ready"
    for condition in status.get("conditions", []):
        if condition.get("reason") == _DEADLINE_EXCEEDED:
            return Verdict(False, True, _DEADLINE_EXCEEDED, f"{progress}: {condition['message']}")

    rolled_out = (
        status.get("observedGeneration", 0) >= deployment["metadata"].get("generation", 0)
        and status.get("updatedReplicas", 0) == desired
        and status.get("replicas", 0) == desired
        and ready == desired
        and status.get("availableReplicas", 0) == desired
    )
    if rolled_out and route:
        return Verdict(False, False, route.reason, f"{progress}, {route.message}")
    if rolled_out:
        return Verdict(True, False, "Available", progress if desired else "scaled to zero")
    return _waiting(current_pods, progress)


def _route_verdict(
    owner: builders.Owner, spec: api.ModelDeploymentSpec, route: api.Object | None
) -> Verdict | None:
    """What the Gateways said of the HTTPRoute: refused (stalled), not yet (waiting), or None
    when every parent accepted it and resolved its backend."""
    if spec.gateway is None:
        return None
    if route is None:
        return Verdict(False, False, "RouteProgressing", "waiting for the HTTPRoute to be created")
    generation = route["metadata"].get("generation", 0)
    parents = route.get("status", {}).get("parents", [])
    for ref in spec.gateway.parent_refs:
        gateway = f"{ref.namespace or owner.namespace}/{ref.name}"
        entry = next((p for p in parents if _same_parent(p.get("parentRef", {}), ref, owner)), None)
        conditions = {c.get("type"): c for c in (entry or {}).get("conditions", [])}
        for kind in _ROUTE_CONDITIONS:
            condition = conditions.get(kind, {})
            current = condition.get("observedGeneration", 0) >= generation
            if not current or condition.get("status") not in ("True", "False"):
                return Verdict(
                    False,
                    False,
                    "RouteProgressing",
                    f"waiting for Gateway {gateway} to accept the HTTPRoute",
                )
            if condition["status"] == "False":
                return Verdict(
                    False,
                    True,
                    "RouteNotAccepted" if kind == "Accepted" else "RouteRefsNotResolved",
                    f"HTTPRoute {kind}=False for Gateway {gateway}: "
                    f"{condition.get('reason', '')}: {condition.get('message', '')}".rstrip(": "),
                )
    return None


def _same_parent(reported: api.Object, ref: api.ParentReference, owner: builders.Owner) -> bool:
    return (
        reported.get("name") == ref.name
        and reported.get("namespace", owner.namespace) == (ref.namespace or owner.namespace)
        and reported.get("sectionName") == ref.section_name
        and reported.get("port") == ref.port
    )


def _pod_failure(pods: list[api.Object], deployment: api.Object) -> Verdict | None:
    """A pod of the current model whose model cannot be fetched or loaded, or image pulled."""
    for pod in pods:
        pod_status = pod.get("status", {})
        for statuses, reason in (
            (pod_status.get("initContainerStatuses", []), "ModelFetchFailed"),
            (pod_status.get("containerStatuses", []), "ModelLoadFailed"),
        ):
            for container in statuses:
                state = container.get("state", {})
                waiting = state.get("waiting", {})
                terminated = state.get("terminated") or container.get("lastState", {}).get(
                    "terminated"
                )
                crashed = terminated and terminated.get("exitCode", 0) != 0
                if waiting.get("reason") in ("ImagePullBackOff", "ErrImagePull"):
                    return Verdict(
                        False,
                        True,
                        "ImagePullFailed",
                        f"{container['name']}: {waiting.get('message', waiting['reason'])}",
                    )
                if crashed and (waiting.get("reason") in _BROKEN_WAITING or "terminated" in state):
                    if terminated.get("reason") == "OOMKilled":
                        return _oom_killed(deployment, container, terminated)
                    detail = terminated.get("message") or terminated.get("reason", "error")
                    serving_reasons = {
                        values.EXIT_WARMUP_FAILED: "WarmupFailed",
                        values.EXIT_VALIDATION_FAILED: "ValidationFailed",
                    }
                    if reason == "ModelLoadFailed":
                        reason = serving_reasons.get(terminated["exitCode"], reason)
                    return Verdict(
                        False,
                        True,
                        reason,
                        f"{container['name']} exited with {terminated['exitCode']}: "
                        f"{detail.strip()}",
                    )
    return None


def _oom_killed(deployment: api.Object, container: api.Object, terminated: api.Object) -> Verdict:
    """The kernel killed the container at its memory limit: say which limit (the pod template's:
    the watched pods carry their status only), and the container's last state."""
    spec = deployment.get("spec", {}).get("template", {}).get("spec", {})
    specs = spec.get("initContainers", []) + spec.get("containers", [])
    limits: api.Object = next(
        (c.get("resources", {}).get("limits", {}) for c in specs if c["name"] == container["name"]),
        {},
    )
    limit = limits.get("memory", "none set")
    return Verdict(
        False,
        True,
        "OOMKilled",
        f"{container['name']} was OOM-killed at its memory limit ({limit}); last state: "
        f"terminated, reason OOMKilled, exit code {terminated.get('exitCode')}, finished at "
        f"{terminated.get('finishedAt', 'unknown')}, restarts: {container.get('restartCount', 0)}",
    )


def _waiting(pods: list[api.Object], progress: str) -> Verdict:
    """Why a rollout is not done yet, from the first pod that says so."""
    for pod in pods:
        pod_status = pod.get("status", {})
        for condition in pod_status.get("conditions", []):
            if condition.get("type") == "PodScheduled" and condition.get("status") == "False":
                return Verdict(
                    False,
                    False,
                    "PodsUnschedulable",
                    f"{progress}, pods Pending: {condition.get('message', '').strip()}",
                )
        containers = pod_status.get("initContainerStatuses", []) + pod_status.get(
            "containerStatuses", []
        )
        for container in containers:
            waiting = container.get("state", {}).get("waiting", {})
            if waiting.get("reason") not in (None, "PodInitializing", "ContainerCreating"):
                return Verdict(
                    False,
                    False,
                    "PodsNotReady",
                    f"{progress}, {container['name']} waiting: {waiting['reason']}: "
                    f"{waiting.get('message', '')}".rstrip(": "),
                )
    return Verdict(False, False, "RollingOut", progress)

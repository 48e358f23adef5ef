"""The operator's settings: one model, from `modeldeploy run`'s flags or `MODELDEPLOY_<NAME>`.

A flag wins over the environment; both are validated here, once, by the same rules
(`--metrics-interval 0` and `MODELDEPLOY_METRICS_INTERVAL=0` are refused alike).
"""

from __future__ import annotations

import importlib.metadata
from typing import Annotated, Literal

import pydantic
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict

ENV_PREFIX = "MODELDEPLOY_"
RUNTIME_IMAGE_REPOSITORY = "ghcr.io/modeldeploy/modeldeploy-runtime"


def default_runtime_image() -> str:
    """The runtime image of this operator's own release."""
    return f"{RUNTIME_IMAGE_REPOSITORY}:{importlib.metadata.version('modeldeploy')}"


class OperatorSettings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix=ENV_PREFIX, frozen=True, extra="forbid")

    kubeconfig: str | None = pydantic.Field(
        default=None,
        description="kubeconfig file(s) to use, separated by the path separator as in "
        "$KUBECONFIG (default: $KUBECONFIG, else ~/.kube/config; in a pod its service account)",
    )
    context: str | None = pydantic.Field(
        default=None,
        description="the kubeconfig context to use (default: its current context)",
    )
    namespaces: Annotated[tuple[str, ...], NoDecode] = pydantic.Field(
        default=(),
        description="serve these namespaces (exact names; the operator is not allowed to list "
        "namespaces); empty: all",
    )
    runtime_image: str = pydantic.Field(
        default_factory=default_runtime_image,
        min_length=1,
        description="runtime image for ModelDeployments that name none",
    )
    prometheus_url: str | None = pydantic.Field(
        default=None,
        description="summarise status.metrics with PromQL from this Prometheus, "
        "else scrape the ready pods directly",
    )
    metrics_interval: float = pydantic.Field(
        default=30.0, gt=0, description="seconds between status.metrics updates"
    )
    metrics_window: int = pydantic.Field(
        default=60, gt=0, description="seconds of history PromQL rates cover"
    )
    resync_interval: float = pydantic.Field(
        default=300.0,
        gt=0,
        description="seconds between reconciles of every ModelDeployment, whether or not an "
        "event asked for one: catches what the watches missed",
    )
    # A reconcile spends most of its time waiting for the API server (a write takes tens of
    # milliseconds, SSA applies up to a second under load): at 1000 ModelDeployments applied at
    # once, 16 workers halved the time a key waited in the queue against 8.
    reconcile_workers: int = pydantic.Field(
        default=16, gt=0, le=64, description="ModelDeployments reconciled at once"
    )
    log_format: Literal["json", "plain"] = "plain"
    verbose: bool = False
    bind_address: str = pydantic.Field(
        default="0.0.0.0",
        description="address the /healthz and /metrics servers listen on (127.0.0.1 off-cluster)",
    )
    health_port: int = pydantic.Field(default=8080, ge=0, le=65535, description="serves /healthz")
    metrics_port: int = pydantic.Field(
        default=9090, ge=0, le=65535, description="serves Prometheus /metrics"
    )
    pod_namespace: str | None = pydantic.Field(
        default=None,
        description="the namespace of the operator's own pod (the chart sets it from the "
        "downward API): NetworkPolicies with allowFrom also admit the operator's pods there to "
        "the runtime's HTTP port, which it scrapes for status.metrics (unset: outside a cluster, "
        "no such rule)",
    )
    pod_labels: dict[str, str] = pydantic.Field(
        default_factory=dict,
        description="labels that select the operator's own pods, as JSON (the chart sets its "
        "selector labels); with pod_namespace",
    )
    leader_election_namespace: str | None = pydantic.Field(
        default=None,
        description="of all replicas only the one holding a Lease in this namespace acts; the "
        "others stand by (default: no election, for a single replica)",
    )
    leader_election_id: str = pydantic.Field(
        default="modeldeploy-operator", min_length=1, description="the Lease's name"
    )
    leader_election_lease_seconds: int = pydantic.Field(
        default=15,
        gt=0,
        description="a leader that has not renewed the Lease for this long is replaced",
    )

    @pydantic.field_validator("namespaces", mode="before")
    @classmethod
    def _comma_separated(cls, value: object) -> object:
        # MODELDEPLOY_NAMESPACES=a,b; flags arrive as a list already.
        if isinstance(value, str):
            return tuple(part.strip() for part in value.split(",") if part.strip())
        return value

    @pydantic.field_validator(
        "kubeconfig",
        "context",
        "prometheus_url",
        "pod_namespace",
        "leader_election_namespace",
        mode="before",
    )
    @classmethod
    def _empty_is_unset(cls, value: object) -> object:
        return None if value == "" else value


def flag(field: str) -> str:
    """The `modeldeploy run` flag of a setting."""
    return "--namespace" if field == "namespaces" else "--" + field.replace("_", "-")


def problems(error: pydantic.ValidationError) -> list[str]:
    """One line per problem, naming the setting's flag and environment variable, and the value."""
    lines = []
    for problem in error.errors():
        field = str(problem["loc"][0]) if problem["loc"] else ""
        where = f"{flag(field)} / {ENV_PREFIX}{field.upper()}" if field else "settings"
        lines.append(f"{where}: {problem['msg']} (got {problem.get('input')!r})")
    return lines

"""Helpers for the operator's integration tests."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any, TypeVar

from kopf.testing import KopfRunner

from modeldeploy_dev import crd, node
from modeldeploy_operator import spec as api
from support import Cluster

T = TypeVar("T")
WRITE_VERBS = {"create", "update", "patch", "delete", "deletecollection"}
OPERATOR_AGENTS = ("modeldeploy-operator", "kopf/")


def install_crd(cluster: Cluster) -> None:
    # Client-side apply on purpose: users do it, and it caps the schema's size.
    cluster.kubectl("apply", "-f", str(crd.crd_paths()[0]))
    cluster.kubectl(
        "wait", "--for=condition=Established", "--timeout=60s", f"crd/{api.PLURAL}.{api.GROUP}"
    )


def ready_through_route(
    cluster: Cluster, namespace: str, name: str, timeout: float = 150
) -> dict[str, Any]:
    """Waits for a ModelDeployment served through an HTTPRoute to be Ready.

    Traefik may judge a route before its cache has the Service's EndpointSlices ("endpointslices
    not found": seen just after Traefik starts, and on a loaded machine) and not look again until
    the route changes. So while the route's refs are unresolved it is touched (an annotation, not
    a field of ours) every 10 s; the operator's status must then follow.
    """
    touched = 0.0

    def probe() -> dict[str, Any] | None:
        nonlocal touched
        if md := ready_md(cluster, namespace, name):
            return md
        route = get(cluster, namespace, "httproute", name) or {}
        unresolved = any(
            c["type"] == "ResolvedRefs" and c["status"] == "False"
            for parent in route.get("status", {}).get("parents", [])
            for c in parent.get("conditions", [])
        )
        if unresolved and time.monotonic() - touched > 10:
            cluster.kubectl("annotate", "--overwrite", "httproute", name, "-n", namespace,
                            f"test/touched={time.time()}")  # fmt: skip
            touched = time.monotonic()
        return None

    try:
        return wait_for(f"{name} Ready", probe, timeout=timeout)
    except AssertionError as error:
        route = get(cluster, namespace, "httproute", name)
        state = (get(cluster, namespace, "md", name) or {}).get("status")
        raise AssertionError(f"{error}\nstatus: {state}\nroute: {route}") from None


def place_on_node(cluster: Cluster, namespace: str, restricted: bool = True) -> None:
    """Every pod created in the namespace from now on runs on the local cluster's real node (its
    placement policy), under pod-security `restricted` unless told otherwise."""
    labels = [f"{node.NAMESPACE_LABEL}={node.NAMESPACE_VALUE}"]
    if restricted:
        labels.append("pod-security.kubernetes.io/enforce=restricted")
    cluster.kubectl("label", "namespace", namespace, *labels, "--overwrite")


def python_pod(
    name: str, image: str, script: str, *args: str, labels: dict[str, str] | None = None
) -> dict[str, Any]:
    """A pod running `python -c script args...` in `image` (the runtime image has Python), with
    the security context pod-security `restricted` asks for."""
    return {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {"name": name, "labels": labels or {}},
        "spec": {
            "automountServiceAccountToken": False,
            "terminationGracePeriodSeconds": 1,
            "restartPolicy": "Never",
            "securityContext": {"runAsNonRoot": True, "seccompProfile": {"type": "RuntimeDefault"}},
            "containers": [
                {
                    "name": "python",
                    "image": image,
                    "command": ["python", "-c", script, *args],
                    "securityContext": {
                        "allowPrivilegeEscalation": False,
                        "readOnlyRootFilesystem": True,
                        "capabilities": {"drop": ["ALL"]},
                    },
                }
            ],
        },
    }


@contextmanager
def running_operator(namespace: str) -> Iterator[KopfRunner]:
    args = ["run", "--standalone", "--namespace", namespace, "-m", "modeldeploy_operator.handlers"]
    with KopfRunner(args, timeout=60) as runner:
        yield runner


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port: int = probe.getsockname()[1]
        return port


class OperatorProcess:
    """`modeldeploy run` as a real process, as in a pod: its own health and metrics ports."""

    def __init__(self, log: Path, kubeconfig: Path, *args: str) -> None:
        self.log = log
        self.health_port = free_port()
        command = [sys.executable, "-m", "modeldeploy_cli", "run", "--log-format=plain"]
        command += [
            "--bind-address=127.0.0.1",
            f"--health-port={self.health_port}",
            f"--metrics-port={free_port()}",
            *args,
        ]
        self.process = subprocess.Popen(
            command,
            stdout=log.open("wb"),
            stderr=subprocess.STDOUT,
            env=os.environ | {"KUBECONFIG": str(kubeconfig)},
        )

    @property
    def pid(self) -> int:
        return self.process.pid

    def output(self) -> str:
        return self.log.read_text(errors="replace")

    def stop(self, sig: signal.Signals = signal.SIGTERM, timeout: float = 30) -> int:
        if self.process.poll() is None:
            self.process.send_signal(sig)
        return self.wait(timeout)

    def wait(self, timeout: float) -> int:
        try:
            return self.process.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.process.kill()
            raise


def wait_for(what: str, probe: Callable[[], T | None], timeout: float = 60) -> T:
    """Polls until `probe` returns something truthy; fails naming `what` and the last value."""
    deadline = time.monotonic() + timeout
    last: T | None = None
    while time.monotonic() < deadline:
        last = probe()
        if last:
            return last
        time.sleep(0.25)
    raise AssertionError(f"timed out after {timeout}s waiting for {what}; last: {last!r}")


def get(cluster: Cluster, namespace: str, kind: str, name: str) -> dict[str, Any] | None:
    result = cluster.kubectl("get", kind, name, "-n", namespace, "-o", "json", check=False)
    return json.loads(result.stdout) if result.returncode == 0 else None


def apply_md(cluster: Cluster, namespace: str, name: str, spec: dict[str, Any]) -> None:
    body = {
        "apiVersion": "modeldeploy.io/v1alpha1",
        "kind": "ModelDeployment",
        "metadata": {"name": name, "namespace": namespace},
        "spec": spec,
    }
    cluster.kubectl("apply", "--server-side", "-f", "-", input=json.dumps(body))


def events_about(cluster: Cluster, namespace: str, name: str) -> list[dict[str, Any]]:
    result = cluster.kubectl(
        "get", "events", "-n", namespace, f"--field-selector=involvedObject.name={name}",
        "-o", "json",
    )  # fmt: skip
    items: list[dict[str, Any]] = json.loads(result.stdout)["items"]
    return items


def condition(md: dict[str, Any] | None, kind: str) -> dict[str, Any]:
    conditions = (md or {}).get("status", {}).get("conditions", [])
    return next((c for c in conditions if c["type"] == kind), {})


def ready_md(cluster: Cluster, namespace: str, name: str) -> dict[str, Any] | None:
    """The object once it is Ready for its current generation, else None."""
    md = get(cluster, namespace, "md", name)
    if md is None or condition(md, "Ready").get("status") != "True":
        return None
    current = md["status"].get("observedGeneration") == md["metadata"]["generation"]
    return md if current else None


def audit_events(audit_log: Path, offset: int) -> Iterator[dict[str, Any]]:
    """The API server's audit events logged after `offset` bytes."""
    with audit_log.open() as log:
        log.seek(offset)
        for line in log:
            yield json.loads(line)


def operator_writes(audit_log: Path, offset: int, namespace: str) -> list[str]:
    """The operator's write requests in the namespace logged after `offset` bytes."""
    return [
        f"{event['verb']} {event['requestURI']}"
        for event in audit_events(audit_log, offset)
        if event.get("stage") == "ResponseComplete"
        and event["verb"] in WRITE_VERBS
        and event.get("objectRef", {}).get("namespace") == namespace
        and event.get("userAgent", "").startswith(OPERATOR_AGENTS)
    ]

"""The local cluster's ingress controller: Traefik, serving Ingresses and the Gateway API.

Traefik runs on this machine against the local API server, under its own identity
(`modeldeploy-traefik`) with the permissions its two Kubernetes providers need and no others. Its
`web` entry point listens on 127.0.0.1:INGRESS_PORT; a `traefik` GatewayClass, the Gateway
`modeldeploy-system/modeldeploy` (one listener, `http`, on that port, routes from every namespace)
and a default `traefik` IngressClass are created with it, after the standard-channel Gateway API
CRDs.

Reach a route with its host name: `curl -H 'Host: iris.example.com'
http://127.0.0.1:18080/v2/models/iris`, or tritonclient with url "127.0.0.1:18080/<path>" and the
Host header.
"""

from __future__ import annotations

import json
import os
from typing import Any

from modeldeploy_dev import build, cluster

INGRESS_PORT = int(os.environ.get("MODELDEPLOY_INGRESS_PORT", "18080"))
# Traefik's own entry point: /ping, which says when it is up.
_ADMIN_PORT = INGRESS_PORT + 1
COMPONENT = "traefik"
IDENTITY = "modeldeploy-traefik"
GATEWAY_CLASS = "traefik"
GATEWAY_CONTROLLER = "traefik.io/gateway-controller"
INGRESS_CLASS = "traefik"
NAMESPACE = "modeldeploy-system"
GATEWAY = "modeldeploy"
LISTENER = "http"

_READ = ["get", "list", "watch"]
_GATEWAY_API = "gateway.networking.k8s.io"
# What Traefik's kubernetesIngress and kubernetesGateway providers read and write, as its
# documentation lists it: they watch these kinds and write only the status of what they serve.
_RULES: list[dict[str, Any]] = [
    {"apiGroups": [""], "resources": ["services", "secrets", "nodes"], "verbs": _READ},
    {"apiGroups": [""], "resources": ["namespaces", "configmaps"], "verbs": _READ},
    {"apiGroups": ["discovery.k8s.io"], "resources": ["endpointslices"], "verbs": _READ},
    {
        "apiGroups": ["networking.k8s.io"],
        "resources": ["ingresses", "ingressclasses"],
        "verbs": _READ,
    },
    {"apiGroups": ["networking.k8s.io"], "resources": ["ingresses/status"], "verbs": ["update"]},
    {
        "apiGroups": [_GATEWAY_API],
        "resources": [
            "gatewayclasses",
            "gateways",
            "httproutes",
            "grpcroutes",
            "referencegrants",
            "backendtlspolicies",
        ],
        "verbs": _READ,
    },
    {
        "apiGroups": [_GATEWAY_API],
        "resources": [
            "gatewayclasses/status",
            "gateways/status",
            "httproutes/status",
            "grpcroutes/status",
            "backendtlspolicies/status",
        ],
        "verbs": ["update"],
    },
]


def url() -> str:
    """Where the Gateway's listener and the Ingresses are served."""
    return f"http://127.0.0.1:{INGRESS_PORT}"


def _argv(binaries: build.Binaries) -> list[str]:
    return [
        str(binaries.traefik),
        "--global.checkNewVersion=false",
        "--global.sendAnonymousUsage=false",
        f"--entryPoints.web.address=127.0.0.1:{INGRESS_PORT}",
        f"--entryPoints.traefik.address=127.0.0.1:{_ADMIN_PORT}",
        "--ping=true",
        "--ping.entryPoint=traefik",
        "--providers.kubernetesIngress=true",
        "--providers.kubernetesIngress.ingressEndpoint.ip=127.0.0.1",
        "--providers.kubernetesGateway=true",
        "--providers.kubernetesGateway.statusAddress.ip=127.0.0.1",
        "--log.level=INFO",
    ]


def _objects() -> list[dict[str, Any]]:
    """The identity's RBAC, the classes and the Gateway."""
    name = f"modeldeploy:{COMPONENT}"
    return [
        {"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": NAMESPACE}},
        {
            "apiVersion": "rbac.authorization.k8s.io/v1",
            "kind": "ClusterRole",
            "metadata": {"name": name},
            "rules": _RULES,
        },
        {
            "apiVersion": "rbac.authorization.k8s.io/v1",
            "kind": "ClusterRoleBinding",
            "metadata": {"name": name},
            "roleRef": {
                "apiGroup": "rbac.authorization.k8s.io",
                "kind": "ClusterRole",
                "name": name,
            },
            "subjects": [
                {"apiGroup": "rbac.authorization.k8s.io", "kind": "User", "name": IDENTITY}
            ],
        },
        {
            "apiVersion": "networking.k8s.io/v1",
            "kind": "IngressClass",
            "metadata": {
                "name": INGRESS_CLASS,
                "annotations": {"ingressclass.kubernetes.io/is-default-class": "true"},
            },
            "spec": {"controller": "traefik.io/ingress-controller"},
        },
        {
            "apiVersion": f"{_GATEWAY_API}/v1",
            "kind": "GatewayClass",
            "metadata": {"name": GATEWAY_CLASS},
            "spec": {"controllerName": GATEWAY_CONTROLLER},
        },
        {
            "apiVersion": f"{_GATEWAY_API}/v1",
            "kind": "Gateway",
            "metadata": {"name": GATEWAY, "namespace": NAMESPACE},
            "spec": {
                "gatewayClassName": GATEWAY_CLASS,
                # Traefik serves a listener on the entry point with the same port.
                "listeners": [
                    {
                        "name": LISTENER,
                        "protocol": "HTTP",
                        "port": INGRESS_PORT,
                        "allowedRoutes": {"namespaces": {"from": "All"}},
                    }
                ],
            },
        },
    ]


def install_gateway_api(binaries: build.Binaries) -> None:
    """The standard-channel Gateway API CRDs, established before anything uses them."""
    cluster.kubectl("apply", "--server-side", "-f", str(binaries.gateway_api_crds))
    cluster.kubectl(
        "wait", "--for=condition=Established", "--timeout=60s", "-f", str(binaries.gateway_api_crds)
    )


def up(state: cluster.Paths, binaries: build.Binaries) -> None:
    """Starts Traefik unless it runs; returns once its Gateway is programmed."""
    kubeconfig = state.component_kubeconfig(COMPONENT)
    install_gateway_api(binaries)
    objects = {"apiVersion": "v1", "kind": "List", "items": _objects()}
    cluster.kubectl("apply", "-f", "-", input=json.dumps(objects))
    if not cluster._pid_alive(state.pid(COMPONENT)):
        cluster._start(state, COMPONENT, _argv(binaries), env={"KUBECONFIG": str(kubeconfig)})
    ping = f"http://127.0.0.1:{_ADMIN_PORT}/ping"
    cluster._wait(COMPONENT, lambda: cluster._http_ok(ping), 60, state, COMPONENT)
    cluster.kubectl(
        "wait", "--for=condition=Programmed", "--timeout=60s", "-n", NAMESPACE, f"gateway/{GATEWAY}"
    )


def down(state: cluster.Paths) -> None:
    cluster._stop_processes(state, (COMPONENT,))


def remove_gateway_api(state: cluster.Paths, binaries: build.Binaries) -> None:
    """Stops Traefik and deletes the Gateway API CRDs (and every object of their kinds): for
    tests of a cluster without them. `up` puts everything back."""
    down(state)
    cluster.kubectl("delete", "--wait", "--ignore-not-found", "-f", str(binaries.gateway_api_crds))

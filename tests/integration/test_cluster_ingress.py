"""The local cluster's Traefik: its Gateway is programmed, it routes an Ingress and an HTTPRoute
to a real server in a container on the pod network, and its identity may do what its providers
need and nothing more."""

from __future__ import annotations

import json
import urllib.error
import urllib.request
from typing import Any

import pytest

from modeldeploy_dev import build, ingress
from operator_helpers import get, place_on_node, python_pod, wait_for
from support import Cluster

pytestmark = pytest.mark.integration

ECHO_PORT = 8081


_ECHO = """
import http.server, json, sys
class Echo(http.server.BaseHTTPRequestHandler):
    def do_GET(self):
        body = json.dumps({"path": self.path, "host": self.headers["Host"]}).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)
    def log_message(self, *args):
        pass
http.server.ThreadingHTTPServer((sys.argv[1], ECHO_PORT), Echo).serve_forever()
""".replace("ECHO_PORT", str(ECHO_PORT))


@pytest.fixture
def backend(cluster: Cluster, namespace: str, pushed_images: dict[str, str]) -> None:
    """The Service `echo` in front of a real HTTP server: a container on the real node, on the
    pod network."""
    place_on_node(cluster, namespace)
    labels = {"app": "echo"}
    pod = python_pod("echo", pushed_images["runtime"], _ECHO, "0.0.0.0", labels=labels)
    pod["spec"]["containers"][0]["ports"] = [{"name": "http", "containerPort": ECHO_PORT}]
    pod["spec"]["containers"][0]["readinessProbe"] = {
        "tcpSocket": {"port": "http"}, "periodSeconds": 1
    }  # fmt: skip
    service = {
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": {"name": "echo"},
        "spec": {
            "selector": labels,
            "ports": [{"name": "http", "port": 8080, "targetPort": "http"}],
        },
    }
    items = {"kind": "List", "apiVersion": "v1", "items": [pod, service]}
    cluster.kubectl("apply", "-n", namespace, "-f", "-", input=json.dumps(items))
    cluster.kubectl("wait", "-n", namespace, "--for=condition=Ready", "pod/echo", "--timeout=120s")


def _through_traefik(host: str, path: str) -> dict[str, Any] | None:
    request = urllib.request.Request(f"{ingress.url()}{path}", headers={"Host": host})
    try:
        with urllib.request.urlopen(request, timeout=5) as response:
            answer: dict[str, Any] = json.loads(response.read())
            return answer
    except (urllib.error.URLError, OSError, ValueError):
        return None


def test_the_gateway_is_programmed_on_the_loopback_port(cluster: Cluster) -> None:
    gateway = get(cluster, ingress.NAMESPACE, "gateway", ingress.GATEWAY)
    assert gateway is not None
    programmed = next(c for c in gateway["status"]["conditions"] if c["type"] == "Programmed")
    assert programmed["status"] == "True"
    assert gateway["spec"]["listeners"][0]["port"] == ingress.INGRESS_PORT
    version = json.loads(cluster.kubectl("get", "crd", "httproutes.gateway.networking.k8s.io",
                                         "-o", "json").stdout)  # fmt: skip
    annotations = version["metadata"]["annotations"]
    assert annotations["gateway.networking.k8s.io/bundle-version"] == build.GATEWAY_API_VERSION
    assert annotations["gateway.networking.k8s.io/channel"] == "standard"


def test_an_ingress_and_an_http_route_reach_a_real_server(
    cluster: Cluster, namespace: str, backend: None
) -> None:
    ingress_ = {
        "apiVersion": "networking.k8s.io/v1",
        "kind": "Ingress",
        "metadata": {"name": "echo", "namespace": namespace},
        "spec": {
            "rules": [
                {
                    "host": f"ingress.{namespace}.example",
                    "http": {
                        "paths": [
                            {
                                "path": "/ml",
                                "pathType": "Prefix",
                                "backend": {"service": {"name": "echo", "port": {"name": "http"}}},
                            }
                        ]
                    },
                }
            ]
        },
    }
    route = {
        "apiVersion": "gateway.networking.k8s.io/v1",
        "kind": "HTTPRoute",
        "metadata": {"name": "echo", "namespace": namespace},
        "spec": {
            "parentRefs": [{"name": ingress.GATEWAY, "namespace": ingress.NAMESPACE}],
            "hostnames": [f"route.{namespace}.example"],
            "rules": [
                {
                    "matches": [{"path": {"type": "PathPrefix", "value": "/ml"}}],
                    "backendRefs": [{"name": "echo", "port": 8080}],
                }
            ],
        },
    }
    for obj in (ingress_, route):
        cluster.kubectl("apply", "-f", "-", input=json.dumps(obj))
    for host in (f"ingress.{namespace}.example", f"route.{namespace}.example"):
        answer = wait_for(f"{host} through Traefik", lambda h=host: _through_traefik(h, "/ml/x"))
        # The path reaches the server unchanged: the runtime serves under it.
        assert answer == {"path": "/ml/x", "host": host}
    assert _through_traefik(f"elsewhere.{namespace}.example", "/ml/x") is None


@pytest.mark.parametrize(
    ("verb", "resource", "allowed"),
    [
        ("watch", "httproutes.gateway.networking.k8s.io", True),
        ("update", "httproutes.gateway.networking.k8s.io/status", True),
        ("watch", "endpointslices.discovery.k8s.io", True),
        ("update", "ingresses.networking.k8s.io/status", True),
        ("patch", "httproutes.gateway.networking.k8s.io", False),
        ("update", "ingresses.networking.k8s.io", False),
        ("get", "pods", False),
        ("create", "services", False),
        ("list", "modeldeployments.modeldeploy.io", False),
    ],
)
def test_traefik_may_do_what_its_providers_need_and_no_more(
    cluster: Cluster, verb: str, resource: str, allowed: bool
) -> None:
    subresource = []
    if "/" in resource:
        resource, _, sub = resource.partition("/")
        subresource = [f"--subresource={sub}"]
    answer = cluster.kubectl(
        "auth", "can-i", verb, resource, *subresource, "--all-namespaces",
        f"--as={ingress.IDENTITY}", check=False,
    )  # fmt: skip
    assert answer.stdout.strip() == ("yes" if allowed else "no"), answer.stderr

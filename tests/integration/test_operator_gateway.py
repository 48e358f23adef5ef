"""spec.gateway against the real API server and the local cluster's Traefik: the HTTPRoute is
created, accepted by the Gateway, feeds Ready, and is pruned; without the Gateway API CRDs the
status says so. (tests/e2e/test_e2e_gateway.py sends traffic through it.)"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from kopf.testing import KopfRunner

from modeldeploy_dev import build, ingress
from modeldeploy_dev import cluster as localcluster
from operator_helpers import (
    OperatorProcess,
    apply_md,
    condition,
    get,
    ready_md,
    ready_through_route,
    wait_for,
)
from support import Cluster

pytestmark = pytest.mark.integration

GATEWAY = {"name": ingress.GATEWAY, "namespace": ingress.NAMESPACE, "sectionName": ingress.LISTENER}
SPEC: dict[str, Any] = {
    "model": {"uri": "s3://models/iris/3/model.onnx", "version": "3"},
    "replicas": 2,
    "gateway": {"parentRefs": [GATEWAY], "hostnames": ["iris.example.com"], "path": "/iris"},
}


def _route_condition(route: dict[str, Any] | None, kind: str) -> str | None:
    for parent in (route or {}).get("status", {}).get("parents", []):
        if parent["parentRef"]["name"] == ingress.GATEWAY:
            for reported in parent["conditions"]:
                if reported["type"] == kind:
                    return str(reported["status"])
    return None


def test_the_route_is_owned_accepted_by_traefik_feeds_ready_and_is_pruned(
    cluster: Cluster, namespace: str, operator: KopfRunner
) -> None:
    # A Gateway nobody serves never accepts the route: not Ready, and the status says why.
    elsewhere = {"parentRefs": [{"name": "nowhere"}], "hostnames": ["iris.example.com"]}
    apply_md(cluster, namespace, "iris", SPEC | {"gateway": elsewhere})
    waiting = wait_for(
        "Ready=False waiting for the Gateway",
        lambda: (
            (md := get(cluster, namespace, "md", "iris"))
            and condition(md, "Ready").get("reason") == "RouteProgressing"
            and md
        ),
    )
    assert condition(waiting, "Ready")["status"] == "False"
    assert (
        f"waiting for Gateway {namespace}/nowhere to accept the HTTPRoute"
        in (condition(waiting, "Ready")["message"])
    )

    apply_md(cluster, namespace, "iris", SPEC)
    md = ready_through_route(cluster, namespace, "iris")
    route = get(cluster, namespace, "httproute", "iris")
    assert route is not None
    (owner,) = route["metadata"]["ownerReferences"]
    assert (owner["kind"], owner["uid"]) == ("ModelDeployment", md["metadata"]["uid"])
    assert _route_condition(route, "Accepted") == "True"
    assert _route_condition(route, "ResolvedRefs") == "True"
    assert route["spec"]["rules"][0]["backendRefs"][0]["name"] == "iris"
    assert md["status"]["url"] == "http://iris.example.com/iris/v2/models/iris"

    spec = {key: value for key, value in SPEC.items() if key != "gateway"}
    apply_md(cluster, namespace, "iris", spec)
    wait_for("the HTTPRoute pruned", lambda: get(cluster, namespace, "httproute", "iris") is None)
    pruned = wait_for("iris Ready again", lambda: ready_md(cluster, namespace, "iris"))
    assert pruned["status"]["url"] == f"http://iris.{namespace}.svc:8080/v2/models/iris"


@pytest.fixture
def without_gateway_api(cluster: Cluster) -> Iterator[None]:
    """The Gateway API CRDs removed for the test; put back, with Traefik's objects, after it."""
    state, binaries = localcluster.paths(), build.binaries()
    ingress.remove_gateway_api(state, binaries)
    try:
        yield
    finally:
        ingress.up(state, binaries)


def test_without_the_gateway_api_the_status_explains_and_the_rest_is_served(
    cluster: Cluster, without_gateway_api: None, namespace: str, operator: KopfRunner
) -> None:
    apply_md(cluster, namespace, "iris", SPEC)
    md = wait_for(
        "Stalled: GatewayAPIMissing",
        lambda: (
            (md := get(cluster, namespace, "md", "iris"))
            and condition(md, "Stalled").get("reason") == "GatewayAPIMissing"
            and md
        ),
    )
    assert condition(md, "Ready")["status"] == "False"
    assert "install its CRDs" in condition(md, "Ready")["message"]
    assert get(cluster, namespace, "deployment", "iris") is not None
    assert get(cluster, namespace, "service", "iris") is not None
    wait_for("2/2 replicas", lambda: get(cluster, namespace, "md", "iris")["status"].get(
        "replicaSummary") == "2/2")  # fmt: skip


def test_the_gateway_api_installed_after_the_start_is_picked_up_without_a_restart(
    cluster: Cluster,
    without_gateway_api: None,
    namespace: str,
    modeldeploy_crd: None,
    tmp_path: Path,
) -> None:
    """`modeldeploy run` (as in the chart's pod), started before the Gateway API's CRDs exist:
    once they are installed, the HTTPRoute is created, watched, accepted and feeds Ready, and
    the status moves from GatewayAPIMissing to serving, in the same process."""
    operator = OperatorProcess(
        tmp_path / "operator.log", cluster.kubeconfig, f"--namespace={namespace}"
    )
    try:
        apply_md(cluster, namespace, "iris", SPEC)
        wait_for(
            "Stalled: GatewayAPIMissing",
            lambda: (
                condition(get(cluster, namespace, "md", "iris"), "Stalled").get("reason")
                == "GatewayAPIMissing"
            ),
            timeout=90,
        )
        ingress.up(localcluster.paths(), build.binaries())  # the CRDs, Traefik and its Gateway
        md = ready_through_route(cluster, namespace, "iris")
        assert md["status"]["url"] == "http://iris.example.com/iris/v2/models/iris"
        assert condition(md, "Stalled").get("status") != "True"
        route = get(cluster, namespace, "httproute", "iris")
        assert route is not None and _route_condition(route, "Accepted") == "True"
        assert operator.process.poll() is None, "the operator restarted"
    finally:
        operator.stop()
    assert "Traceback" not in operator.output(), operator.output()[-3000:]

"""The chart against the real API server: server-side dry run, install, upgrade, and RBAC.

KWOK's nodes mark the operator pods Ready without running them, so `helm install --wait`
completes; what the operator may do is asked of the API server's authorizer with
`kubectl auth can-i` as the chart's ServiceAccount.
"""

from __future__ import annotations

import uuid
from collections.abc import Iterator

import pytest

from chart_helm import CHART, helm, set_flags, template
from support import Cluster

pytestmark = pytest.mark.integration

CHILDREN = [
    "deployments.apps",
    "services",
    "ingresses.networking.k8s.io",
    "networkpolicies.networking.k8s.io",
    "horizontalpodautoscalers.autoscaling",
    "poddisruptionbudgets.policy",
    "httproutes.gateway.networking.k8s.io",
]
LEASE = "leases.coordination.k8s.io"
MD = "modeldeployments.modeldeploy.io"


@pytest.fixture
def watched(cluster: Cluster) -> Iterator[str]:
    """A second namespace, served by the operator in namespace mode."""
    name = f"t-{uuid.uuid4().hex[:10]}"
    cluster.kubectl("create", "namespace", name)
    yield name
    cluster.kubectl("delete", "namespace", name, "--wait=false", check=False)


@pytest.fixture
def release(cluster: Cluster, namespace: str) -> Iterator[str]:
    name = f"md-{namespace[2:]}"
    yield name
    helm("uninstall", name, "-n", namespace, "--wait", kubeconfig=cluster.kubeconfig, check=False)


class Permissions:
    def __init__(self, cluster: Cluster, namespace: str, service_account: str) -> None:
        self._cluster = cluster
        self._as = [
            f"--as=system:serviceaccount:{namespace}:{service_account}",
            "--as-group=system:serviceaccounts",
            f"--as-group=system:serviceaccounts:{namespace}",
            "--as-group=system:authenticated",
        ]

    def allowed(self, *request: str) -> bool:
        result = self._cluster.kubectl("auth", "can-i", *request, *self._as, check=False)
        assert result.stdout.strip() in ("yes", "no"), result.stderr
        return result.returncode == 0


def _what_the_operator_needs(namespace: str) -> list[tuple[str, ...]]:
    needs = [(verb, MD, "-n", namespace) for verb in ("get", "list", "watch", "patch")]
    needs.append(("patch", MD, "--subresource=status", "-n", namespace))
    for child in CHILDREN:
        for verb in ("get", "list", "watch", "create", "patch", "delete"):
            needs.append((verb, child, "-n", namespace))
    needs += [(verb, "pods", "-n", namespace) for verb in ("get", "list", "watch")]
    needs.append(("create", "events", "-n", namespace))
    return needs


def _what_it_must_not_do(namespace: str) -> list[tuple[str, ...]]:
    return [
        ("get", "secrets", "-n", namespace),
        ("list", "secrets", "-n", namespace),
        ("list", "configmaps", "-n", namespace),
        ("create", "pods", "-n", namespace),
        ("delete", "pods", "-n", namespace),
        ("create", "pods", "--subresource=exec", "-n", namespace),
        ("create", "pods", "--subresource=portforward", "-n", namespace),
        ("create", MD, "-n", namespace),
        ("delete", MD, "-n", namespace),
        ("update", "deployments.apps", "-n", namespace),
        ("patch", "events", "-n", namespace),
        ("create", "serviceaccounts", "--subresource=token", "-n", namespace),
        ("create", "rolebindings.rbac.authorization.k8s.io", "-n", namespace),
        ("create", "clusterrolebindings.rbac.authorization.k8s.io"),
        ("patch", "nodes"),
        ("delete", "customresourcedefinitions.apiextensions.k8s.io"),
        ("*", "*", "-n", namespace),
    ]


def _lease_rules(permissions: Permissions, namespace: str, other: str) -> None:
    assert permissions.allowed("create", LEASE, "-n", namespace)
    for verb in ("get", "update"):
        assert permissions.allowed(verb, f"{LEASE}/modeldeploy-operator", "-n", namespace)
        assert not permissions.allowed(verb, f"{LEASE}/someone-elses", "-n", namespace)
    assert not permissions.allowed("delete", f"{LEASE}/modeldeploy-operator", "-n", namespace)
    assert not permissions.allowed("create", LEASE, "-n", other)


@pytest.mark.parametrize("scope", ["cluster", "namespace"])
def test_the_api_server_accepts_the_rendered_chart(
    cluster: Cluster, namespace: str, watched: str, scope: str
) -> None:
    values = {
        "rbac.scope": scope,
        "watchNamespaces": [namespace, watched] if scope == "namespace" else [],
        "grafana.dashboard.enabled": True,
    }
    manifests = template(values, release="dry", namespace=namespace, extra=("--include-crds",))
    result = cluster.kubectl("apply", "--dry-run=server", "-f", "-", input=manifests)
    assert "deployment.apps/dry-modeldeploy created (server dry run)" in result.stdout


def test_install_upgrade_and_least_privilege_cluster_wide(
    cluster: Cluster, namespace: str, watched: str, release: str
) -> None:
    install = ["install", release, str(CHART), "-n", namespace, "--wait", "--timeout", "120s"]
    helm(*install, kubeconfig=cluster.kubeconfig)
    deployment = f"deployment/{release}-modeldeploy"
    # helm --wait is content with replicas - maxUnavailable ready; both come up shortly after.
    cluster.kubectl(
        "wait", deployment, "-n", namespace, "--for=jsonpath={.status.readyReplicas}=2",
        "--timeout=60s",
    )  # fmt: skip

    permissions = Permissions(cluster, namespace, f"{release}-modeldeploy")
    for other in (namespace, watched):
        for request in _what_the_operator_needs(other):
            assert permissions.allowed(*request), request
        for request in _what_it_must_not_do(other):
            assert not permissions.allowed(*request), request
    assert permissions.allowed("list", MD, "--all-namespaces")
    _lease_rules(permissions, namespace, watched)

    upgrade = ["upgrade", release, str(CHART), "-n", namespace, "--wait", "--timeout", "120s"]
    helm(*upgrade, *set_flags({"runtimeImage.tag": "0.2.0"}), kubeconfig=cluster.kubeconfig)
    args = cluster.kubectl(
        "get", deployment, "-n", namespace, "-o=jsonpath={.spec.template.spec.containers[0].args}"
    )
    assert "--runtime-image=ghcr.io/modeldeploy/modeldeploy-runtime:0.2.0" in args.stdout
    history = helm("history", release, "-n", namespace, "-o", "json", kubeconfig=cluster.kubeconfig)
    assert '"revision":2' in history.stdout and '"status":"deployed"' in history.stdout


def test_namespace_scope_stays_in_its_namespaces(
    cluster: Cluster, namespace: str, watched: str, release: str
) -> None:
    values = {"rbac.scope": "namespace", "watchNamespaces": [watched]}
    install = ["install", release, str(CHART), "-n", namespace, "--wait", "--timeout", "120s"]
    helm(*install, *set_flags(values), kubeconfig=cluster.kubeconfig)

    permissions = Permissions(cluster, namespace, f"{release}-modeldeploy")
    for request in _what_the_operator_needs(watched):
        assert permissions.allowed(*request), request
    for request in _what_it_must_not_do(watched):
        assert not permissions.allowed(*request), request
    # Its own namespace is not served, only its Lease lives there.
    for request in _what_the_operator_needs(namespace):
        assert not permissions.allowed(*request), request
    for cluster_wide in [*CHILDREN, MD, "pods"]:
        assert not permissions.allowed("list", cluster_wide, "--all-namespaces")
    assert not permissions.allowed("list", "namespaces")
    _lease_rules(permissions, namespace, watched)

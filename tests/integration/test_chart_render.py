"""The chart lints, its values schema rejects what cannot work, and it renders what it should.

These need only the project's helm, no cluster; test_chart_install.py takes the output to the
API server.
"""

from __future__ import annotations

from typing import Any

import pytest

from chart_helm import CHART, helm, render, set_flags
from modeldeploy_dev import build

pytestmark = pytest.mark.integration

NAMESPACED = {"rbac.scope": "namespace", "watchNamespaces": ["ml", "ml-staging"]}
EVERYTHING = {
    "metrics.serviceMonitor.enabled": True,
    "metrics.podMonitor.enabled": True,
    "grafana.dashboard.enabled": True,
}
CHILD_KINDS = {
    ("apps", "deployments"),
    ("", "services"),
    ("networking.k8s.io", "ingresses"),
    ("networking.k8s.io", "networkpolicies"),
    ("autoscaling", "horizontalpodautoscalers"),
    ("policy", "poddisruptionbudgets"),
    ("gateway.networking.k8s.io", "httproutes"),
}


def _kinds(docs: list[dict[str, Any]]) -> list[str]:
    return [doc["kind"] for doc in docs]


def _one(docs: list[dict[str, Any]], kind: str) -> dict[str, Any]:
    (found,) = [doc for doc in docs if doc["kind"] == kind]
    return found


def _grants(rules: list[dict[str, Any]]) -> dict[tuple[str, str], set[str]]:
    grants: dict[tuple[str, str], set[str]] = {}
    for rule in rules:
        assert "resourceNames" not in rule or rule["resources"] == ["leases"]
        for group in rule["apiGroups"]:
            for resource in rule["resources"]:
                grants.setdefault((group, resource), set()).update(rule["verbs"])
    return grants


@pytest.mark.parametrize("values", [{}, NAMESPACED, {**NAMESPACED, **EVERYTHING}, EVERYTHING])
def test_helm_lint(values: dict[str, Any]) -> None:
    result = helm("lint", "--strict", str(CHART), *set_flags(values))
    assert "0 chart(s) failed" in result.stdout


@pytest.mark.parametrize(
    ("values", "complaint"),
    [
        ({"rbac.scope": "everywhere"}, "/rbac/scope"),
        ({"rbac.scope": "namespace"}, "/watchNamespaces"),
        ({"watchNamespaces": ["ml"]}, "/watchNamespaces"),
        ({"replicaCount": -1}, "/replicaCount"),
        ({"logFormat": "xml"}, "/logFormat"),
        ({"imageTag": "typo"}, "imageTag"),
        ({"watchNamespaces": ["Not_A_Namespace"], "rbac.scope": "namespace"}, "/watchNamespaces"),
    ],
)
def test_the_values_schema_rejects(values: dict[str, Any], complaint: str) -> None:
    args = ["template", "md", str(CHART), "--kube-version", build.KUBERNETES_VERSION]
    result = helm(*args, *set_flags(values), check=False)
    assert result.returncode != 0
    assert complaint in result.stderr


def test_cluster_scope_rbac_is_exactly_what_the_operator_uses() -> None:
    docs = render()
    assert "Role" in _kinds(docs) and "ClusterRole" in _kinds(docs)
    grants = _grants(_one(docs, "ClusterRole")["rules"])
    assert grants == {
        ("modeldeploy.io", "modeldeployments"): {"get", "list", "watch", "patch"},
        ("modeldeploy.io", "modeldeployments/status"): {"patch"},
        **{kind: {"get", "list", "watch", "create", "patch", "delete"} for kind in CHILD_KINDS},
        ("", "pods"): {"get", "list", "watch"},
        ("", "events"): {"create"},
    }
    binding = _one(docs, "ClusterRoleBinding")
    assert binding["subjects"] == [
        {"kind": "ServiceAccount", "name": "md-modeldeploy", "namespace": "modeldeploy-system"}
    ]


def test_leader_election_may_touch_only_its_lease() -> None:
    (role,) = [d for d in render() if d["kind"] == "Role"]
    assert role["metadata"]["namespace"] == "modeldeploy-system"
    assert role["rules"] == [
        {"apiGroups": ["coordination.k8s.io"], "resources": ["leases"], "verbs": ["create"]},
        {
            "apiGroups": ["coordination.k8s.io"],
            "resources": ["leases"],
            "resourceNames": ["modeldeploy-operator"],
            "verbs": ["get", "update"],
        },
    ]


def test_namespace_scope_grants_nothing_cluster_wide() -> None:
    docs = render(NAMESPACED)
    assert not {"ClusterRole", "ClusterRoleBinding"} & set(_kinds(docs))
    roles = {d["metadata"]["namespace"] for d in docs if d["kind"] == "Role"}
    assert roles == {"ml", "ml-staging", "modeldeploy-system"}
    bindings = [d for d in docs if d["kind"] == "RoleBinding"]
    assert {b["metadata"]["namespace"] for b in bindings} == roles
    args = _one(docs, "Deployment")["spec"]["template"]["spec"]["containers"][0]["args"]
    assert [a for a in args if a.startswith("--namespace")] == [
        "--namespace=ml",
        "--namespace=ml-staging",
    ]


def test_no_rule_grants_secrets_or_wildcards() -> None:
    for values in ({}, NAMESPACED):
        for doc in render(values):
            for rule in doc.get("rules", []):
                assert "*" not in rule["verbs"] + rule["resources"] + rule["apiGroups"]
                assert "secrets" not in rule["resources"]
                assert not any(
                    r.endswith(("/exec", "/attach", "/proxy")) for r in rule["resources"]
                )


def test_the_operator_deployment() -> None:
    deployment = _one(render({"runtimeImage.tag": "0.2.0"}), "Deployment")
    assert deployment["spec"]["replicas"] == 2
    pod = deployment["spec"]["template"]["spec"]
    assert pod["serviceAccountName"] == "md-modeldeploy"
    assert pod["securityContext"]["runAsNonRoot"] is True
    assert pod["securityContext"]["seccompProfile"] == {"type": "RuntimeDefault"}
    (container,) = pod["containers"]
    assert container["image"] == "ghcr.io/modeldeploy/modeldeploy-operator:0.1.0"
    assert container["args"][0] == "run"
    assert "--runtime-image=ghcr.io/modeldeploy/modeldeploy-runtime:0.2.0" in container["args"]
    assert "--leader-election-namespace=modeldeploy-system" in container["args"]
    assert "--leader-election-id=modeldeploy-operator" in container["args"]
    assert not [a for a in container["args"] if a.startswith("--namespace")]
    security = container["securityContext"]
    assert security["readOnlyRootFilesystem"] is True
    assert security["allowPrivilegeEscalation"] is False
    assert security["capabilities"] == {"drop": ["ALL"]}
    assert container["resources"]["limits"]["memory"]
    ports = {p["name"]: p["containerPort"] for p in container["ports"]}
    assert ports == {"health": 8080, "metrics": 9090}
    assert "--health-port=8080" in container["args"] and "--metrics-port=9090" in container["args"]
    assert "--metrics-interval=30" in container["args"]
    assert container["livenessProbe"]["httpGet"] == {"path": "/healthz", "port": "health"}


def test_optional_monitoring_objects() -> None:
    assert not {"ServiceMonitor", "PodMonitor", "ConfigMap"} & set(_kinds(render()))
    docs = render(EVERYTHING)
    assert _one(docs, "ServiceMonitor")["spec"]["endpoints"][0]["port"] == "metrics"
    assert _one(docs, "Service")["spec"]["ports"][0]["name"] == "metrics"
    pod_monitor = _one(docs, "PodMonitor")["spec"]
    assert pod_monitor["namespaceSelector"] == {"any": True}
    assert pod_monitor["selector"]["matchLabels"]["app.kubernetes.io/managed-by"] == "modeldeploy"
    dashboard = _one(docs, "ConfigMap")
    assert dashboard["metadata"]["labels"]["grafana_dashboard"] == "1"
    shipped = (CHART / "dashboards" / "modeldeploy.json").read_text()
    assert dashboard["data"]["modeldeploy.json"] == shipped.rstrip("\n")
    namespaced = _one(render({**NAMESPACED, **EVERYTHING}), "PodMonitor")["spec"]
    assert namespaced["namespaceSelector"] == {"matchNames": ["ml", "ml-staging"]}


def test_the_operator_knows_its_own_pods_for_the_network_policies_it_writes(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Its namespace from the downward API and exactly the labels of its pods: the
    NetworkPolicy of a ModelDeployment admits the operator's scrape by them."""
    from modeldeploy_operator import settings

    deployment = _one(render(), "Deployment")
    (container,) = deployment["spec"]["template"]["spec"]["containers"]
    env = {e["name"]: e for e in container["env"]}
    assert env["MODELDEPLOY_POD_NAMESPACE"]["valueFrom"] == {
        "fieldRef": {"fieldPath": "metadata.namespace"}
    }
    monkeypatch.setenv("MODELDEPLOY_POD_LABELS", env["MODELDEPLOY_POD_LABELS"]["value"])
    parsed = settings.OperatorSettings()
    pod_labels = deployment["spec"]["template"]["metadata"]["labels"]
    assert parsed.pod_labels == deployment["spec"]["selector"]["matchLabels"]
    assert parsed.pod_labels.items() <= pod_labels.items()

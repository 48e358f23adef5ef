"""The credentials real clusters hand out, against the real API server: an exec-plugin
kubeconfig, several kubeconfig files with a context chosen by flag, and the in-cluster service
account whose projected token rotates. In every case kopf's watches and the operator's writes
act as one identity, as the API server's audit log shows.

The operators here are real `modeldeploy run` processes, under the chart's RBAC (namespace
mode) for a ServiceAccount of the test's namespace.
"""

from __future__ import annotations

import os
import stat
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
import yaml

from chart_helm import template
from operator_helpers import OperatorProcess, apply_md, audit_events, free_port, ready_md, wait_for
from support import Cluster

pytestmark = pytest.mark.integration

ACCOUNT = "creds-modeldeploy"
SPEC: dict[str, Any] = {"model": {"uri": "s3://models/iris/3/model.onnx"}}
AGENTS = ("modeldeploy-operator", "kopf/")


def _service_account(cluster: Cluster, namespace: str) -> str:
    """The chart's ServiceAccount and namespace-mode RBAC; returns the account's user name."""
    values = {"rbac.scope": "namespace", "watchNamespaces": [namespace]}
    rendered = yaml.safe_load_all(template(values, release="creds", namespace=namespace))
    wanted = {"ServiceAccount", "Role", "RoleBinding"}
    rbac = [doc for doc in rendered if doc and doc["kind"] in wanted]
    cluster.kubectl("apply", "-f", "-", input="\n---\n".join(yaml.safe_dump(d) for d in rbac))
    return f"system:serviceaccount:{namespace}:{ACCOUNT}"


def _token(cluster: Cluster, namespace: str, *args: str) -> str:
    return cluster.kubectl("create", "token", ACCOUNT, "-n", namespace, *args).stdout.strip()


def _admin(cluster: Cluster) -> dict[str, Any]:
    config: dict[str, Any] = yaml.safe_load(cluster.kubeconfig.read_text())
    return config


def _operator_requests(audit_log: Path, offset: int, namespace: str) -> list[dict[str, Any]]:
    """The operator's and kopf's requests about the namespace after `offset`, each once: as
    answered, or for a watch still open, as started."""
    requests: dict[str, dict[str, Any]] = {}
    for event in audit_events(audit_log, offset):
        if (
            event.get("stage") in ("ResponseStarted", "ResponseComplete")
            and event.get("userAgent", "").startswith(AGENTS)
            and event.get("objectRef", {}).get("namespace") == namespace
        ):
            requests[event["auditID"]] = event
    return list(requests.values())


def _one_identity(cluster: Cluster, offset: int, namespace: str, user: str) -> dict[str, int]:
    """Asserts that every request of kopf and of the operator was made as `user`; returns the
    count of requests by verb (watches, lists and writes all present)."""
    time.sleep(2)  # the audit log is written in batches of up to a second
    requests = _operator_requests(cluster.audit_log, offset, namespace)
    users = {(e["user"]["username"], e["userAgent"].split("/")[0]) for e in requests}
    assert {name for name, _ in users} == {user}, users
    agents = {agent for _, agent in users}
    assert agents == {"kopf", "modeldeploy-operator"}, agents  # kopf's watches, our writes
    verbs: dict[str, int] = {}
    for event in requests:
        verbs[event["verb"]] = verbs.get(event["verb"], 0) + 1
    assert verbs.get("watch") and verbs.get("patch"), verbs
    return verbs


def test_an_exec_plugin_kubeconfig_is_used_by_kopf_and_the_writes_alike(
    cluster: Cluster, namespace: str, modeldeploy_crd: None, tmp_path: Path
) -> None:
    """As EKS, GKE and AKS kubeconfigs: the user is a command that prints an ExecCredential."""
    user = _service_account(cluster, namespace)
    (tmp_path / "token").write_text(_token(cluster, namespace))
    calls = tmp_path / "calls"
    plugin = tmp_path / "credential-plugin"
    plugin.write_text(
        f"#!{sys.executable}\n"
        "import json, pathlib\n"
        f"pathlib.Path({str(calls)!r}).open('a').write('called\\n')\n"
        f"token = pathlib.Path({str(tmp_path / 'token')!r}).read_text().strip()\n"
        "print(json.dumps({'apiVersion': 'client.authentication.k8s.io/v1',\n"
        "                  'kind': 'ExecCredential', 'status': {'token': token}}))\n"
    )
    plugin.chmod(plugin.stat().st_mode | stat.S_IXUSR)
    admin = _admin(cluster)
    kubeconfig = tmp_path / "exec.kubeconfig"
    exec_user = {
        "exec": {
            "apiVersion": "client.authentication.k8s.io/v1",
            "command": str(plugin),
            "interactiveMode": "Never",
        }
    }
    kubeconfig.write_text(
        yaml.safe_dump(
            {
                "apiVersion": "v1",
                "kind": "Config",
                "clusters": admin["clusters"],
                "users": [{"name": "plugin", "user": exec_user}],
                "contexts": [
                    {
                        "name": "plugin",
                        "context": {"cluster": admin["clusters"][0]["name"], "user": "plugin"},
                    }
                ],
                "current-context": "plugin",
            }
        )
    )
    offset = cluster.audit_log.stat().st_size
    operator = OperatorProcess(tmp_path / "operator.log", kubeconfig, f"--namespace={namespace}")
    try:
        apply_md(cluster, namespace, "iris", SPEC)
        wait_for("iris Ready", lambda: ready_md(cluster, namespace, "iris"), timeout=90)
        verbs = _one_identity(cluster, offset, namespace, user)
    finally:
        operator.stop()
    assert calls.read_text().count("called") >= 1
    print(f"exec plugin: every request as {user}: {verbs}")


def test_two_kubeconfig_files_and_a_context_that_is_not_current(
    cluster: Cluster, namespace: str, modeldeploy_crd: None, tmp_path: Path
) -> None:
    """$KUBECONFIG lists two files; the first one's current context is a cluster that does not
    answer. `--context` picks the wanted one, which the second file defines."""
    user = _service_account(cluster, namespace)
    admin = _admin(cluster)
    cluster_name = admin["clusters"][0]["name"]
    nowhere = {
        "apiVersion": "v1",
        "kind": "Config",
        "clusters": [
            {"name": "nowhere", "cluster": {"server": f"https://127.0.0.1:{free_port()}"}}
        ],
        "users": [{"name": "nobody", "user": {"token": "not-a-token"}}],
        "contexts": [{"name": "nowhere", "context": {"cluster": "nowhere", "user": "nobody"}}],
        "current-context": "nowhere",
    }
    wanted = {
        "apiVersion": "v1",
        "kind": "Config",
        "clusters": admin["clusters"],
        "users": [{"name": "operator", "user": {"token": _token(cluster, namespace)}}],
        "contexts": [{"name": "local", "context": {"cluster": cluster_name, "user": "operator"}}],
    }
    first, second = tmp_path / "first.kubeconfig", tmp_path / "second.kubeconfig"
    first.write_text(yaml.safe_dump(nowhere))
    second.write_text(yaml.safe_dump(wanted))
    kubeconfig = Path(f"{first}{os.pathsep}{second}")

    # A context no file defines: refused at once, naming it.
    refused = subprocess.run(
        [sys.executable, "-m", "modeldeploy_cli", "run", "--context=missing",
         f"--namespace={namespace}"],
        env=os.environ | {"KUBECONFIG": str(kubeconfig)},
        capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert refused.returncode == 1, refused.stderr
    assert "'missing'" in refused.stderr and "kubeconfig" in refused.stderr, refused.stderr

    offset = cluster.audit_log.stat().st_size
    operator = OperatorProcess(
        tmp_path / "operator.log", kubeconfig, "--context=local", f"--namespace={namespace}"
    )
    try:
        apply_md(cluster, namespace, "iris", SPEC)
        wait_for("iris Ready", lambda: ready_md(cluster, namespace, "iris"), timeout=90)
        _one_identity(cluster, offset, namespace, user)
    finally:
        operator.stop()


_IN_CLUSTER = """
import sys
from kubernetes.config import incluster_config

# Where the kubelet mounts the projected token and the CA, pointed at this test's files.
incluster_config.SERVICE_TOKEN_FILENAME, incluster_config.SERVICE_CERT_FILENAME = sys.argv[1:3]
sys.argv[1:3] = []
from modeldeploy_cli import main

sys.exit(main.main())
"""


def test_in_cluster_with_a_projected_token_that_rotates(
    cluster: Cluster, namespace: str, modeldeploy_crd: None, tmp_path: Path
) -> None:
    """As in a pod: $KUBERNETES_SERVICE_HOST/PORT, a token file and a CA file (the kubernetes
    package's loader, pointed at this test's files). The kubelet replaces the token before it
    expires; here the first token is revoked once the second is in place, and the operator goes
    on (kopf's watches and the writes) with the second."""
    user = _service_account(cluster, namespace)
    admin = _admin(cluster)
    server = admin["clusters"][0]["cluster"]["server"]
    host, port = server.removeprefix("https://").rsplit(":", 1)
    ca = admin["clusters"][0]["cluster"]["certificate-authority"]

    def bound_token(secret: str) -> str:
        # A token bound to a Secret is invalid once the Secret is deleted: a revocable token.
        cluster.kubectl("create", "secret", "generic", secret, "-n", namespace)
        return _token(cluster, namespace, "--bound-object-kind=Secret",
                      f"--bound-object-name={secret}")  # fmt: skip

    token_file = tmp_path / "token"
    token_file.write_text(bound_token("first-token"))
    launcher = tmp_path / "in_cluster.py"
    launcher.write_text(_IN_CLUSTER)
    env = {k: v for k, v in os.environ.items() if k != "KUBECONFIG"}
    env |= {"KUBERNETES_SERVICE_HOST": host, "KUBERNETES_SERVICE_PORT": port}
    log = tmp_path / "operator.log"
    health, metrics = free_port(), free_port()
    offset = cluster.audit_log.stat().st_size
    process = subprocess.Popen(
        [sys.executable, str(launcher), str(token_file), ca, "run", "--log-format=plain",
         "--bind-address=127.0.0.1", f"--health-port={health}", f"--metrics-port={metrics}",
         f"--namespace={namespace}"],
        env=env, stdout=log.open("wb"), stderr=subprocess.STDOUT,
    )  # fmt: skip
    try:
        apply_md(cluster, namespace, "first", SPEC)
        wait_for("first Ready", lambda: ready_md(cluster, namespace, "first"), timeout=90)

        # The kubelet's rotation: a new file moved in place of the old one.
        rotated = tmp_path / "token.new"
        rotated.write_text(bound_token("second-token"))
        rotated.replace(token_file)
        # The client re-reads the token file every minute (kopf on its next login, on a 401).
        time.sleep(65)
        cluster.kubectl("delete", "secret", "first-token", "-n", namespace)
        revoked = cluster.audit_log.stat().st_size

        apply_md(cluster, namespace, "second", SPEC)
        wait_for("second Ready", lambda: ready_md(cluster, namespace, "second"), timeout=120)
        # A change kopf must see through a watch (re)started after the revocation.
        apply_md(cluster, namespace, "second", SPEC | {"replicas": 2})
        wait_for(
            "second Ready for its new generation",
            lambda: (md := ready_md(cluster, namespace, "second")) and md["spec"]["replicas"] == 2,
            timeout=120,
        )
        _one_identity(cluster, offset, namespace, user)
        after = _operator_requests(cluster.audit_log, revoked, namespace)
        writes = [e for e in after if e["verb"] == "patch"]
        assert writes and all(e["responseStatus"]["code"] < 300 for e in after), [
            (e["verb"], e["requestURI"], e["responseStatus"]) for e in after
        ]
    finally:
        process.terminate()
        process.wait(timeout=30)
    output = log.read_text(errors="replace")
    assert "Traceback" not in output, output[-3000:]

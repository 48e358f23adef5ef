"""Two replicas, one active (the Lease election, also when the leader's connection to the API
server is slow), and the operator under the chart's RBAC.

The operators here are real `modeldeploy run` processes, as in the chart's pods.
"""

from __future__ import annotations

import datetime
import json
import re
import signal
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from chart_helm import template
from modeldeploy_dev import cluster as localcluster
from operator_helpers import OperatorProcess, apply_md, audit_events, get, ready_md, wait_for
from support import Cluster
from tcp_proxy import TcpProxy

pytestmark = pytest.mark.integration

LEASE = "modeldeploy-operator"
LEASE_SECONDS = 5
SPEC: dict[str, Any] = {"model": {"uri": "s3://models/iris/3/model.onnx"}}


def _holder(cluster: Cluster, namespace: str, lease: str) -> str | None:
    found = get(cluster, namespace, "lease", lease)
    return (found or {}).get("spec", {}).get("holderIdentity")


def _healthy(operator: OperatorProcess) -> bool:
    url = f"http://127.0.0.1:{operator.health_port}/healthz"
    try:
        with urllib.request.urlopen(url, timeout=2) as response:
            return response.status == 200
    except OSError:
        return False


@pytest.fixture
def operators(tmp_path: Path) -> Iterator[list[OperatorProcess]]:
    """The test's operator processes; stopped and their logs shown when the test ends."""
    started: list[OperatorProcess] = []
    yield started
    for operator in started:
        operator.stop(signal.SIGKILL)
        print(f"--- operator {operator.pid} ---\n{operator.output()[-3000:]}")


def _elect(
    cluster: Cluster,
    namespace: str,
    tmp_path: Path,
    operators: list[OperatorProcess],
    kubeconfig: Path | None = None,
) -> OperatorProcess:
    """Starts an operator that takes part in the election for the Lease `LEASE`."""
    election = [f"--leader-election-namespace={namespace}", f"--leader-election-id={LEASE}"]
    election.append(f"--leader-election-lease-seconds={LEASE_SECONDS}")
    log = tmp_path / f"operator-{len(operators)}.log"
    config = kubeconfig or cluster.kubeconfig
    operator = OperatorProcess(log, config, f"--namespace={namespace}", *election)
    operators.append(operator)
    return operator


def _leader(
    cluster: Cluster, namespace: str, among: list[OperatorProcess]
) -> OperatorProcess | None:
    holder = _holder(cluster, namespace, LEASE)
    if not holder:
        return None
    # Each start of the process has an identity of its own, which it logs when it leads.
    return next((o for o in among if f" as {holder}" in o.output()), None)


def test_one_replica_acts_and_a_standby_takes_over(
    cluster: Cluster, namespace: str, modeldeploy_crd: None, tmp_path: Path, operators: list[Any]
) -> None:
    def start() -> OperatorProcess:
        return _elect(cluster, namespace, tmp_path, operators)

    def leader(among: list[OperatorProcess]) -> OperatorProcess | None:
        return _leader(cluster, namespace, among)

    def children(name: str) -> bool:
        return get(cluster, namespace, "deployment", name) is not None

    pair = [start(), start()]
    active = wait_for("one of the two to hold the Lease", lambda: leader(pair))
    (standby,) = [o for o in pair if o is not active]
    apply_md(cluster, namespace, "first", SPEC)
    wait_for("first Ready", lambda: ready_md(cluster, namespace, "first"))
    wait_for("the standby to say so", lambda: "Standing by" in standby.output(), timeout=10)
    assert "Deployment" not in standby.output() and "kopf" not in standby.output()
    assert f"Deployment {namespace}/first" in active.output()
    assert _healthy(active) and _healthy(standby)  # the liveness probe passes on both

    # The leader dies: the standby waits out the Lease, then acts.
    active.stop(signal.SIGKILL)
    killed_at = time.monotonic()
    apply_md(cluster, namespace, "second", SPEC)
    wait_for("the standby to hold the Lease", lambda: leader([standby]), timeout=30)
    wait_for("second reconciled", lambda: children("second"), timeout=30)
    takeover = time.monotonic() - killed_at
    print(f"HA takeover: {takeover:.1f}s (SIGKILL, lease {LEASE_SECONDS}s)")
    assert takeover < LEASE_SECONDS + 10
    wait_for("the new leader's liveness endpoint", lambda: _healthy(standby), timeout=10)

    # A rolling update: the leader is stopped gracefully and hands the Lease over at once.
    active, standby = standby, start()
    wait_for("the new standby to stand by", lambda: "Standing by" in standby.output())
    stopped_at = time.monotonic()
    assert active.stop(signal.SIGTERM) == 0
    released = time.monotonic() - stopped_at
    apply_md(cluster, namespace, "third", SPEC)
    wait_for("the standby to hold the Lease", lambda: leader([standby]), timeout=30)
    wait_for("third reconciled", lambda: children("third"), timeout=30)
    takeover = time.monotonic() - stopped_at
    print(f"HA takeover: {takeover:.1f}s (SIGTERM, lease released after {released:.1f}s)")
    assert "Released the Lease" in active.output()
    assert takeover < LEASE_SECONDS, "the Lease was not handed over: the standby waited it out"

    # Someone else holds the Lease: the leader stops acting at once, and fails so it is restarted.
    cluster.kubectl(
        "patch", "lease", LEASE, "-n", namespace, "--type=merge",
        "-p", json.dumps({"spec": {"holderIdentity": "someone-else"}}),
    )  # fmt: skip
    assert standby.wait(timeout=LEASE_SECONDS) == 1
    assert "Lost the Lease" in standby.output()


def _logged_at(output: str, message: str) -> datetime.datetime:
    """When an operator logged `message` (kopf's plain format starts with the time)."""
    line = next(line for line in output.splitlines() if message in line)
    return datetime.datetime.strptime(line[1:24], "%Y-%m-%d %H:%M:%S,%f")


def test_a_leader_on_a_slow_connection_leads_until_it_must_step_down(
    cluster: Cluster, namespace: str, modeldeploy_crd: None, tmp_path: Path, operators: list[Any]
) -> None:
    # 0.2 s round trips: a renewal (a GET and a PUT; the first one also a TLS handshake) takes
    # under 1 s of the renew deadline (2/3 of the lease, 3.3 s). At a lease's length per pass
    # through the proxy none can finish in time.
    slow_s, stalled_s = 0.1, float(LEASE_SECONDS)
    with TcpProxy("127.0.0.1", localcluster.APISERVER_PORT, delay=slow_s) as proxy:
        slow_path = proxy.kubeconfig(cluster.kubeconfig, tmp_path / "slow.kubeconfig")
        slow = _elect(cluster, namespace, tmp_path, operators, kubeconfig=slow_path)
        wait_for("the slow one to lead", lambda: _leader(cluster, namespace, [slow]))
        other = _elect(cluster, namespace, tmp_path, operators)
        wait_for("the other to stand by", lambda: "Standing by" in other.output(), timeout=20)

        # Slow, within the deadline: the leader renews and keeps leading, and acts.
        before, watched = get(cluster, namespace, "lease", LEASE), time.monotonic()
        apply_md(cluster, namespace, "first", SPEC)
        wait_for("first Ready", lambda: ready_md(cluster, namespace, "first"))
        time.sleep(max(0.0, 2 * LEASE_SECONDS - (time.monotonic() - watched)))
        after = get(cluster, namespace, "lease", LEASE)
        assert before is not None and after is not None
        assert _leader(cluster, namespace, [slow]) is slow
        assert after["spec"]["renewTime"] > before["spec"]["renewTime"]
        assert after["spec"]["leaseTransitions"] == before["spec"]["leaseTransitions"]
        assert slow.process.poll() is None, slow.output()[-3000:]

        # Too slow: the leader stops acting before its Lease expires, then the other leads.
        proxy.delay = stalled_s
        stalled = time.monotonic()
        wait_for("the other to lead", lambda: _leader(cluster, namespace, [other]), timeout=30)
        takeover = time.monotonic() - stalled
    assert slow.wait(timeout=10) == 1
    stepped_down = _logged_at(slow.output(), "Lost the Lease")
    leading = _logged_at(other.output(), "Leading:")
    gap = (leading - stepped_down).total_seconds()
    print(f"slow leader: stepped down {gap:.1f}s before the other led; takeover {takeover:.1f}s")
    assert gap > 0, "two leaders at once"
    apply_md(cluster, namespace, "second", SPEC)
    wait_for("second Ready", lambda: ready_md(cluster, namespace, "second"))
    assert f"Deployment {namespace}/second" in other.output()


def _service_account_kubeconfig(cluster: Cluster, token: str, path: Path) -> Path:
    admin = yaml.safe_load(cluster.kubeconfig.read_text())
    config = {
        "apiVersion": "v1",
        "kind": "Config",
        "clusters": admin["clusters"],
        "users": [{"name": "operator", "user": {"token": token}}],
        "contexts": [
            {
                "name": "operator",
                "context": {"cluster": admin["clusters"][0]["name"], "user": "operator"},
            }
        ],
        "current-context": "operator",
    }
    path.write_text(yaml.safe_dump(config))
    return path


def _forbidden(audit_log: Path, offset: int, user: str) -> list[str]:
    return [
        f"{event['verb']} {event['requestURI']}"
        for event in audit_events(audit_log, offset)
        if event.get("user", {}).get("username") == user
        and event.get("responseStatus", {}).get("code") == 403
    ]


def test_the_charts_service_account_is_enough_and_no_more(
    cluster: Cluster, namespace: str, modeldeploy_crd: None, tmp_path: Path, operators: list[Any]
) -> None:
    # The chart's RBAC in namespace mode: nothing cluster-wide, so this test's operator cannot
    # touch what other tests run in the shared cluster.
    values = {"rbac.scope": "namespace", "watchNamespaces": [namespace]}
    rendered = yaml.safe_load_all(template(values, release="ha", namespace=namespace))
    wanted = {"ServiceAccount", "Role", "RoleBinding"}
    rbac = [doc for doc in rendered if doc and doc["kind"] in wanted]
    cluster.kubectl("apply", "-f", "-", input="\n---\n".join(yaml.safe_dump(d) for d in rbac))
    account = "ha-modeldeploy"
    token = cluster.kubectl("create", "token", account, "-n", namespace).stdout.strip()
    kubeconfig = _service_account_kubeconfig(cluster, token, tmp_path / "operator.kubeconfig")

    offset = cluster.audit_log.stat().st_size
    operator = OperatorProcess(
        tmp_path / "operator.log",
        kubeconfig,
        f"--namespace={namespace}",
        f"--leader-election-namespace={namespace}",
        "--leader-election-id=modeldeploy-operator",
    )
    operators.append(operator)
    everything = SPEC | {
        "ingress": {"host": "iris.example.com"},
        "autoscaling": {},
        "disruptionBudget": {"minAvailable": 1},
        "networkPolicy": {},
    }
    apply_md(cluster, namespace, "iris", everything)
    md = wait_for("iris Ready", lambda: ready_md(cluster, namespace, "iris"), timeout=90)
    assert md["status"]["readyReplicas"] >= 1
    for kind in ("deployment", "service", "ingress", "hpa", "pdb", "networkpolicy"):
        assert get(cluster, namespace, kind, "iris") is not None, kind
    time.sleep(2)  # the operator's last requests after Ready

    user = f"system:serviceaccount:{namespace}:{account}"
    assert _forbidden(cluster.audit_log, offset, user) == []
    output = operator.output()
    # (not a timestamp's milliseconds, ",403]")
    assert not re.search(r"(?<!,)\b403\b|forbidden", output, re.IGNORECASE), output[-3000:]

    def can_i(*request: str) -> bool:
        answer = cluster.kubectl(
            "--kubeconfig", str(kubeconfig), "auth", "can-i", *request, check=False
        )
        assert answer.stdout.strip() in ("yes", "no"), answer.stderr
        return answer.returncode == 0

    # As the token itself (test_chart_install.py asks the same by impersonation, in depth).
    assert can_i("patch", "deployments.apps", "-n", namespace)
    for refused in [
        ("get", "secrets", "-n", namespace),
        ("create", "pods", "-n", namespace),
        ("delete", "modeldeployments.modeldeploy.io", "-n", namespace),
        ("list", "namespaces"),
        ("watch", "customresourcedefinitions.apiextensions.k8s.io"),
        ("list", "modeldeployments.modeldeploy.io", "--all-namespaces"),
        ("update", "leases.coordination.k8s.io/someone-elses", "-n", namespace),
    ]:
        assert not can_i(*refused), refused

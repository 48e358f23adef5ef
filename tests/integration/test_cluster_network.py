"""The local cluster's addresses stay on this machine, and Services answer on it."""

from __future__ import annotations

import json
import socket
import subprocess
import time

import pytest

from modeldeploy_dev import network
from support import Cluster

pytestmark = pytest.mark.integration


def _route(address: str) -> str:
    result = subprocess.run(
        ["ip", "-j", "route", "get", address], capture_output=True, text=True, check=True
    )
    device: str = json.loads(result.stdout)[0]["dev"]
    return device


@pytest.mark.parametrize("address", ["10.244.200.7", "10.96.200.7"])
def test_pod_and_service_addresses_are_routed_onto_the_clusters_bridge(
    cluster: Cluster, address: str
) -> None:
    assert _route(address) == network.BRIDGE


def test_a_cluster_ip_without_ready_pods_is_refused_on_this_machine(
    cluster: Cluster, namespace: str
) -> None:
    service = {
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": {"name": "nobody"},
        "spec": {"selector": {"app": "nobody"}, "ports": [{"port": 8080}]},
    }
    cluster.kubectl("apply", "-n", namespace, "-f", "-", input=json.dumps(service))
    cluster_ip = cluster.kubectl(
        "get", "service", "nobody", "-n", namespace, "-o", "jsonpath={.spec.clusterIP}"
    ).stdout
    # kube-proxy rejects it (no endpoints) once it has seen the Service: refused, not lost.
    deadline = time.monotonic() + 15
    while True:
        started = time.monotonic()
        try:
            socket.create_connection((cluster_ip, 8080), timeout=2).close()
            raise AssertionError(f"{cluster_ip}:8080 accepted a connection with no pod behind it")
        except ConnectionRefusedError:
            break
        except OSError:
            assert time.monotonic() < deadline, f"{cluster_ip}:8080 never refused"
    # The first refusal may come on a retransmitted SYN (sent before kube-proxy's sync); from
    # then on a connection is refused at once, never left to time out.
    started = time.monotonic()
    with pytest.raises(ConnectionRefusedError):
        socket.create_connection((cluster_ip, 8080), timeout=2).close()
    assert time.monotonic() - started < 1

"""NetworkPolicy on the real node: kube-router's network policy controller, and nothing else of
kube-router (no routing, no service proxy: kube-proxy does Services).

It enforces each policy on the node's pods with iptables chains (the nf_tables backend, in the `ip
filter` table, beside the kubelet's) and ipsets of the peers' addresses. Bridged pod-to-pod
packets reach those chains through br_netfilter (`bridge-nf-call-iptables`). The nftables guard
of `network` and kube-proxy's own table are separate tables, each with its own hooks: a packet
passes only if every one of them accepts it, so kube-router can add refusals and no more.

Why not `sigs.k8s.io/kube-network-policies`: its rules hand packets to user space with the
nftables `queue` expression, which this kernel lacks (no CONFIG_NFT_QUEUE).

kube-router runs under an identity of its own (`pki.CLIENTS`), allowed to read what it watches
and no more (`rbac`). Its health and metrics servers would listen on every address: both are off
(port 0). Its `--cleanup-config` would also clean up after the router and the proxy (routes,
IPVS), which never ran here; `clean` removes exactly what the policy controller makes.
"""

from __future__ import annotations

import shlex
import shutil
import subprocess
from pathlib import Path
from typing import Any

from modeldeploy_dev import build, network

USER = "modeldeploy-kube-router"
# What kube-router's informers list and watch (it starts them all whatever it runs), and its node.
_READS = (
    ("", ("pods", "namespaces", "nodes", "services", "endpoints")),
    ("discovery.k8s.io", ("endpointslices",)),
    ("networking.k8s.io", ("networkpolicies",)),
)
_READ = ["get", "list", "watch"]
_CHAIN_PREFIXES = ("KUBE-ROUTER-", "KUBE-POD-FW-", "KUBE-NWPLCY-")
_SET_PREFIXES = ("KUBE-SRC-", "KUBE-DST-")
# Made on kube-router's first sync; every pod's traffic passes through it from then on.
_FORWARD_CHAIN = "KUBE-ROUTER-FORWARD"


def required_tools() -> list[str]:
    return [tool for tool in ("iptables", "ipset") if shutil.which(tool) is None]


def argv(kubeconfig: Path, node_name: str) -> list[str]:
    return [
        str(build.kube_router_binary()),
        f"--kubeconfig={kubeconfig}",
        f"--hostname-override={node_name}",
        "--run-firewall=true",
        "--run-router=false",
        "--run-service-proxy=false",
        f"--service-cluster-ip-range={network.SERVICE_CIDR}",
        # Both would listen on every address of the machine.
        "--health-port=0",
        "--metrics-port=0",
    ]


def rbac() -> list[dict[str, Any]]:
    name = "modeldeploy:kube-router"
    group = "rbac.authorization.k8s.io"
    return [
        {
            "apiVersion": f"{group}/v1",
            "kind": "ClusterRole",
            "metadata": {"name": name},
            "rules": [
                {"apiGroups": [api], "resources": list(resources), "verbs": _READ}
                for api, resources in _READS
            ],
        },
        {
            "apiVersion": f"{group}/v1",
            "kind": "ClusterRoleBinding",
            "metadata": {"name": name},
            "roleRef": {"apiGroup": group, "kind": "ClusterRole", "name": name},
            "subjects": [{"apiGroup": group, "kind": "User", "name": USER}],
        },
    ]


def _iptables(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["iptables", "-t", "filter", *args], capture_output=True, text=True)


def ready() -> bool:
    """kube-router has synced once: its top-level chain is in place."""
    return _iptables("-S", _FORWARD_CHAIN).returncode == 0


def _ours(chain: str) -> bool:
    return chain.startswith(_CHAIN_PREFIXES)


def clean() -> None:
    """Removes kube-router's chains, the jumps to them from the built-in chains, and its ipsets
    (which the chains' rules reference, so they go last)."""
    if shutil.which("iptables") is not None:
        rules = _iptables("-S").stdout.splitlines()
        for rule in rules:
            words = shlex.split(rule)
            if words[0] == "-A" and not _ours(words[1]) and _ours(words[-1]):
                _iptables("-D", *words[1:])
        chains = [words[1] for words in map(shlex.split, rules) if words[0] == "-N"]
        for chain in filter(_ours, chains):
            _iptables("-F", chain)
        for chain in filter(_ours, chains):
            _iptables("-X", chain)
    if shutil.which("ipset") is not None:
        listed = subprocess.run(["ipset", "list", "-n"], capture_output=True, text=True)
        for name in listed.stdout.split():
            if name.startswith(_SET_PREFIXES):
                subprocess.run(["ipset", "destroy", name], capture_output=True)

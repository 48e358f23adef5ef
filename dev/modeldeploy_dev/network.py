"""The local cluster's data plane on this machine.

The pods the pod runner runs each get a network namespace of their own, joined by a veth pair to
one bridge (`mdbr0`, 10.244.0.1/16) that this module creates; the Service range is routed onto
that bridge, and an nftables table of ours drops any packet for a cluster address (pod or Service)
that would leave through another interface, and any packet a pod sends off the bridge. So
nothing of the cluster's reaches the network this machine sits on, and the host's own interfaces,
routes and rules are never touched. kube-proxy (nftables mode) adds its own table for Services.

The pod runner's pods live on one node, `pod-runner`, that KWOK does not simulate; a
MutatingAdmissionPolicy steers the CPU runtime pods of namespaces labelled
`modeldeploy.io/pod-runner=true` onto it. All other pods stay on KWOK's nodes, simulated.
"""

from __future__ import annotations

import contextlib
import hashlib
import ipaddress
import json
import os
import shutil
import signal
import subprocess
from pathlib import Path
from typing import Any

BRIDGE = "mdbr0"
POD_CIDR = "10.244.0.0/16"
GATEWAY = "10.244.0.1"
SERVICE_CIDR = "10.96.0.0/16"
NODE_NAME = "pod-runner"
NAMESPACE_LABEL = "modeldeploy.io/pod-runner"
_NETNS_PREFIX = "mdpod-"
_NETNS_DIR = Path("/run/netns")
# `ip netns exec` mounts the files of /etc/netns/<name>/ over /etc/ for the command it runs.
_NETNS_ETC = Path("/etc/netns")
_NFT_TABLE = "modeldeploy-dev"
_TAINT = {"key": NAMESPACE_LABEL, "value": "true", "effect": "NoSchedule"}


def _ip(*args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    result = subprocess.run(["ip", *args], capture_output=True, text=True)
    if check and result.returncode != 0:
        raise RuntimeError(f"ip {' '.join(args)} failed: {result.stderr.strip()}")
    return result


def _require_tools() -> None:
    if os.geteuid() != 0:
        raise RuntimeError("the local cluster's pod network needs root (network namespaces)")
    missing = [tool for tool in ("ip", "nft") if shutil.which(tool) is None]
    if missing:
        raise RuntimeError(
            f"the local cluster's pod network needs {' and '.join(missing)} (Debian: iproute2, "
            "nftables; `make tools` installs them)"
        )


def kubernetes_service_address() -> str:
    """The `kubernetes` Service's ClusterIP: the first address of the Service range."""
    return str(ipaddress.ip_network(SERVICE_CIDR)[1])


def _guard_rules(apiserver_port: int) -> str:
    cluster = f"{{ {POD_CIDR}, {SERVICE_CIDR} }}"
    return f"""
table inet {_NFT_TABLE} {{
    chain apiserver {{
        type nat hook prerouting priority dstnat - 10; policy accept;
        iifname "{BRIDGE}" ip daddr {kubernetes_service_address()} tcp dport 443 \
            dnat ip to 127.0.0.1:{apiserver_port}
    }}
    chain postrouting {{
        type filter hook postrouting priority 200; policy accept;
        ip daddr {cluster} oifname != {{ "{BRIDGE}", "lo" }} drop
        ip saddr {POD_CIDR} oifname != {{ "{BRIDGE}", "lo" }} drop
    }}
    chain forward {{
        type filter hook forward priority 0; policy accept;
        iifname "{BRIDGE}" oifname != "{BRIDGE}" reject with icmp type admin-prohibited
        oifname "{BRIDGE}" iifname != "{BRIDGE}" drop
    }}
}}
"""


def setup(apiserver_port: int) -> None:
    """The bridge, the Service route and the guard rules; idempotent.

    A pod's in-cluster client calls the `kubernetes` Service (no endpoint can be a loopback
    address): packets for it from the bridge go to the API server on 127.0.0.1, which the
    bridge alone may route to (`route_localnet`).
    """
    _require_tools()
    if _ip("link", "show", BRIDGE, check=False).returncode != 0:
        _ip("link", "add", BRIDGE, "type", "bridge")
    prefix = ipaddress.ip_network(POD_CIDR).prefixlen
    _ip("addr", "replace", f"{GATEWAY}/{prefix}", "dev", BRIDGE)
    _ip("link", "set", BRIDGE, "up")
    # Services are answered here (kube-proxy's DNAT); a ClusterIP nobody serves must not follow
    # the default route off the machine.
    _ip("route", "replace", SERVICE_CIDR, "dev", BRIDGE)
    # Only for packets arriving on our own bridge (a pod calling a Service); the guard keeps
    # them on it. The host's global forwarding setting is left alone.
    Path(f"/proc/sys/net/ipv4/conf/{BRIDGE}/forwarding").write_text("1")
    Path(f"/proc/sys/net/ipv4/conf/{BRIDGE}/route_localnet").write_text("1")
    rules = (
        f"table inet {_NFT_TABLE}\ndelete table inet {_NFT_TABLE}\n{_guard_rules(apiserver_port)}"
    )
    result = subprocess.run(["nft", "-f", "-"], input=rules, capture_output=True, text=True)
    if result.returncode != 0:
        raise RuntimeError(f"nft refused the guard rules: {result.stderr.strip()}")


def teardown() -> None:
    """Removes every pod namespace, the bridge (and with it the Service route) and our rules."""
    for name in pod_namespaces():
        _kill_all_in(name)
        _ip("netns", "delete", name, check=False)
    if _NETNS_ETC.is_dir():
        for leftover in _NETNS_ETC.glob(_NETNS_PREFIX + "*"):
            shutil.rmtree(leftover, ignore_errors=True)
    _ip("link", "delete", BRIDGE, check=False)
    if shutil.which("nft"):
        # The cluster's kube-proxy leaves its tables behind when it stops.
        for family, table in (("inet", _NFT_TABLE), ("ip", "kube-proxy"), ("ip6", "kube-proxy")):
            subprocess.run(["nft", "delete", "table", family, table], capture_output=True)


def is_set_up() -> bool:
    return _ip("link", "show", BRIDGE, check=False).returncode == 0


def pod_namespaces() -> list[str]:
    if not _NETNS_DIR.is_dir():
        return []
    return sorted(p.name for p in _NETNS_DIR.iterdir() if p.name.startswith(_NETNS_PREFIX))


def netns_name(pod_uid: str) -> str:
    return _NETNS_PREFIX + pod_uid


def _veth_name(pod_uid: str) -> str:
    # Interface names have at most 15 characters.
    return "mdv" + hashlib.sha256(pod_uid.encode()).hexdigest()[:12]


def attach(pod_uid: str, address: str, hostname: str) -> str:
    """A fresh network namespace for the pod with `address` on eth0; returns its name.

    Its processes see an /etc/hosts with the pod's name and address, as the kubelet writes one,
    and no name server (this cluster has no DNS): a lookup fails at once instead of timing out
    on the host's name server, which a pod cannot reach.
    """
    netns = netns_name(pod_uid)
    detach(pod_uid)
    etc = _NETNS_ETC / netns
    etc.mkdir(parents=True, exist_ok=True)
    (etc / "hosts").write_text(f"127.0.0.1\tlocalhost\n{address}\t{hostname}\n")
    (etc / "resolv.conf").write_text("nameserver 127.0.0.1\noptions timeout:1 attempts:1\n")
    veth = _veth_name(pod_uid)
    prefix = ipaddress.ip_network(POD_CIDR).prefixlen
    _ip("netns", "add", netns)
    _ip("link", "add", veth, "type", "veth", "peer", "name", "eth0", "netns", netns)
    _ip("link", "set", veth, "master", BRIDGE, "up")
    _ip("-n", netns, "addr", "add", f"{address}/{prefix}", "dev", "eth0")
    _ip("-n", netns, "link", "set", "eth0", "up")
    _ip("-n", netns, "link", "set", "lo", "up")
    _ip("-n", netns, "route", "add", "default", "via", GATEWAY)
    return netns


def _kill_all_in(netns: str) -> None:
    """Whatever still runs in the namespace (a container's leftover children, or what a stopped
    pod runner left behind) goes with it, as a container runtime kills a container's cgroup."""
    for pid in _ip("netns", "pids", netns, check=False).stdout.split():
        with contextlib.suppress(ProcessLookupError):
            os.kill(int(pid), signal.SIGKILL)


def detach(pod_uid: str) -> None:
    """Removes the pod's namespace (its veth pair goes with it)."""
    netns = netns_name(pod_uid)
    if (_NETNS_DIR / netns).exists():
        _kill_all_in(netns)
        _ip("netns", "delete", netns, check=False)
    shutil.rmtree(_NETNS_ETC / netns, ignore_errors=True)
    _ip("link", "delete", _veth_name(pod_uid), check=False)


def in_namespace(netns: str, argv: list[str]) -> list[str]:
    """`argv` run inside the pod's namespace (`ip netns exec` execs it: the pid stays the
    process's own, so signals reach it)."""
    return ["ip", "netns", "exec", netns, *argv]


def free_address(used: set[str]) -> str:
    """The first pod address not in `used` (the bridge keeps the first)."""
    for host in ipaddress.ip_network(POD_CIDR).hosts():
        address = str(host)
        if address != GATEWAY and address not in used:
            return address
    raise RuntimeError(f"no free address left in {POD_CIDR}")


def node() -> dict[str, Any]:
    """The pod runner's node: not KWOK's, tainted so only the pods steered to it land there."""
    capacity = {"cpu": "16", "memory": "64Gi", "pods": "110", "ephemeral-storage": "100Gi"}
    return {
        "apiVersion": "v1",
        "kind": "Node",
        "metadata": {
            "name": NODE_NAME,
            "labels": {
                "kubernetes.io/hostname": NODE_NAME,
                "kubernetes.io/os": "linux",
                "kubernetes.io/arch": "amd64",
                NAMESPACE_LABEL: "true",
            },
        },
        "spec": {"taints": [_TAINT]},
        "status": {
            "capacity": capacity,
            "allocatable": capacity,
            "addresses": [
                {"type": "InternalIP", "address": GATEWAY},
                {"type": "Hostname", "address": NODE_NAME},
            ],
        },
    }


def placement_policy() -> list[dict[str, Any]]:
    """Runtime pods without GPUs in labelled namespaces go to the pod runner's node.

    GPU pods keep going to KWOK's GPU nodes, and every other namespace stays simulated.
    """
    api = "admissionregistration.k8s.io/v1beta1"
    name = "modeldeploy-pod-runner"
    toleration = json.dumps(_TAINT | {"operator": "Equal"})
    node_selector = json.dumps({NAMESPACE_LABEL: "true"})
    uses_gpu = (
        "object.spec.containers.exists(c, has(c.resources) && has(c.resources.limits) && "
        "'nvidia.com/gpu' in c.resources.limits)"
    )
    return [
        {
            "apiVersion": api,
            "kind": "MutatingAdmissionPolicy",
            "metadata": {"name": name},
            "spec": {
                "failurePolicy": "Fail",
                "reinvocationPolicy": "Never",
                "matchConstraints": {
                    "resourceRules": [
                        {
                            "apiGroups": [""],
                            "apiVersions": ["v1"],
                            "operations": ["CREATE"],
                            "resources": ["pods"],
                        }
                    ]
                },
                "matchConditions": [
                    {
                        "name": "runtime-pod",
                        "expression": "has(object.metadata.labels) && "
                        "'app.kubernetes.io/managed-by' in object.metadata.labels && "
                        "object.metadata.labels['app.kubernetes.io/managed-by'] == 'modeldeploy'",
                    },
                    {"name": "no-gpu", "expression": f"!({uses_gpu})"},
                ],
                "mutations": [
                    {
                        "patchType": "JSONPatch",
                        "jsonPatch": {
                            "expression": (
                                "(has(object.spec.tolerations) ? "
                                f"[JSONPatch{{op: 'add', path: '/spec/tolerations/-', "
                                f"value: {toleration}}}] : "
                                f"[JSONPatch{{op: 'add', path: '/spec/tolerations', "
                                f"value: [{toleration}]}}]) + "
                                "(has(object.spec.nodeSelector) ? "
                                f"[JSONPatch{{op: 'add', path: '/spec/nodeSelector/' + "
                                f"jsonpatch.escapeKey('{NAMESPACE_LABEL}'), value: 'true'}}] : "
                                f"[JSONPatch{{op: 'add', path: '/spec/nodeSelector', "
                                f"value: {node_selector}}}])"
                            )
                        },
                    }
                ],
            },
        },
        {
            "apiVersion": api,
            "kind": "MutatingAdmissionPolicyBinding",
            "metadata": {"name": name},
            "spec": {
                "policyName": name,
                "matchResources": {"namespaceSelector": {"matchLabels": {NAMESPACE_LABEL: "true"}}},
            },
        },
    ]

"""The local cluster's pod network on this machine: the bridge and the guard around it.

The real node's pods (`node`) are attached to one bridge (`mdbr0`, 10.244.0.1/16) that this
module creates, by the CNI bridge plugin; the Service range is routed onto that bridge, and an
nftables table of ours drops any packet for a cluster address (pod or Service) that would leave
through another interface, and any packet a pod sends off the bridge. So nothing of the
cluster's reaches the network this machine sits on, and the host's own interfaces, routes and
rules are never touched. kube-proxy (nftables mode) adds its own table for Services.
"""

from __future__ import annotations

import ipaddress
import os
import shutil
import subprocess
from pathlib import Path

BRIDGE = "mdbr0"
POD_CIDR = "10.244.0.0/16"
GATEWAY = "10.244.0.1"
SERVICE_CIDR = "10.96.0.0/16"
_NFT_TABLE = "modeldeploy-dev"


def _ip(*args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    result = subprocess.run(["ip", *args], capture_output=True, text=True)
    if check and result.returncode != 0:
        raise RuntimeError(f"ip {' '.join(args)} failed: {result.stderr.strip()}")
    return result


def _require_tools() -> None:
    if os.geteuid() != 0:
        raise RuntimeError("the local cluster's pod network needs root (a bridge, nftables)")
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
    """Removes the bridge (and with it the Service route) and our rules."""
    _ip("link", "delete", BRIDGE, check=False)
    if shutil.which("nft"):
        # The cluster's kube-proxy leaves its tables behind when it stops.
        for family, table in (("inet", _NFT_TABLE), ("ip", "kube-proxy"), ("ip6", "kube-proxy")):
            subprocess.run(["nft", "delete", "table", family, table], capture_output=True)

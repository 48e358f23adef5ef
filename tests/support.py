"""Helpers the tests share (importable because pytest puts tests/ on the path)."""

from __future__ import annotations

import socket
import subprocess
from dataclasses import dataclass
from pathlib import Path

from modeldeploy_dev import cluster


@dataclass(frozen=True)
class Cluster:
    kubeconfig: Path
    audit_log: Path

    def kubectl(
        self, *args: str, input: str | None = None, check: bool = True
    ) -> subprocess.CompletedProcess[str]:
        result = cluster.run_kubectl(self.kubeconfig, *args, input=input)
        if check and result.returncode != 0:
            raise AssertionError(f"kubectl {' '.join(args)} failed:\n{result.stderr}")
        return result


def host_address() -> str:
    """This machine's address outside 127.0.0.0/8, on the interface of its default route: an
    EndpointSlice may not name a loopback address."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as probe:
        probe.connect(("198.51.100.1", 9))  # UDP: sends nothing, only picks the interface
        address: str = probe.getsockname()[0]
    assert not address.startswith("127."), address
    return address

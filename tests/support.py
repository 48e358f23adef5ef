"""Helpers the tests share (importable because pytest puts tests/ on the path)."""

from __future__ import annotations

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

"""`make demo` end to end: from a running cluster to a Ready ModelDeployment with live metrics."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest

from support import Cluster

ROOT = Path(__file__).resolve().parents[2]
DEMO = [sys.executable, str(ROOT / "demo" / "run.py")]

pytestmark = pytest.mark.e2e


def test_demo_ends_with_a_ready_model_and_live_metrics(cluster: Cluster) -> None:
    try:
        result = subprocess.run(
            [*DEMO, "--traffic-seconds", "5"], capture_output=True, text=True, timeout=300
        )
        assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
        header, row = (
            line for line in result.stdout.splitlines() if line.startswith(("NAME", "iris"))
        )
        columns = dict(zip(header.split(), row.split(), strict=True))
        assert columns["READY"] == "True" and columns["REPLICAS"] == "2/2"
        metrics = json.loads(
            result.stdout[result.stdout.index("{") : result.stdout.rindex("}") + 1]
        )
        # The traffic goes where a user's would: the status URL, through the ingress controller.
        assert "http://iris.demo.example/iris/v2/models/iris through the ingress" in result.stdout
        measured = re.search(r"clients saw (\d+) req/s", result.stdout)
        assert measured, result.stdout
        client_rps = float(measured.group(1))
        assert metrics["requestsPerSecond"] == pytest.approx(client_rps, rel=0.25)
        assert metrics["errorRate"] == 0 and metrics["latencyP99Ms"] > 0
    finally:
        subprocess.run([*DEMO, "--down"], check=True, timeout=120)
    leftover = cluster.kubectl(
        "get", "namespace", "demo", "-o", "jsonpath={.status.phase}", check=False
    )
    assert leftover.returncode != 0, "the demo namespace is still there"

"""Every example in examples/ is accepted by the real API server and reconciled by the operator."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml
from kopf.testing import KopfRunner

from operator_helpers import get, ready_md, ready_through_route, wait_for
from support import Cluster

EXAMPLES = sorted((Path(__file__).resolve().parents[2] / "examples").glob("*.yaml"))
CHILDREN = {
    "ingress-tls.yaml": ["deployment", "service", "ingress", "networkpolicy"],
    "autoscaled.yaml": ["deployment", "service", "horizontalpodautoscaler"],
    "cpu.yaml": ["deployment", "service", "poddisruptionbudget"],
    "gateway.yaml": ["deployment", "service", "httproute"],
}

pytestmark = pytest.mark.integration


def test_every_example_has_a_child_list() -> None:
    assert {p.name for p in EXAMPLES} >= set(CHILDREN)
    assert len(EXAMPLES) >= 5


@pytest.mark.parametrize("example", EXAMPLES, ids=lambda p: p.name)
def test_example_is_reconciled_to_ready(
    example: Path, cluster: Cluster, namespace: str, operator: KopfRunner
) -> None:
    manifest = yaml.safe_load(example.read_text())
    name = manifest["metadata"]["name"]
    cluster.kubectl("apply", "-n", namespace, "-f", str(example))
    if "gateway" in manifest["spec"]:
        md = ready_through_route(cluster, namespace, name)
    else:
        md = wait_for(f"{name} Ready", lambda: ready_md(cluster, namespace, name), timeout=90)
    for kind in CHILDREN.get(example.name, ["deployment", "service"]):
        child = get(cluster, namespace, kind, name)
        assert child is not None, f"{example.name}: no {kind}"
        assert child["metadata"]["ownerReferences"][0]["uid"] == md["metadata"]["uid"]

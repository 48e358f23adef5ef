"""The accuracy gate on the real node: a quantized model below `spec.validation.minAgreement`
never becomes Ready and never gets a request, and the ModelDeployment says why with the figure
and the floor; under a floor it reaches, the same model serves."""

from __future__ import annotations

import hashlib
import json
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from kopf.testing import KopfRunner

import onnx_models
from operator_helpers import apply_md, condition, get, ready_md, wait_for
from support import Cluster

pytestmark = pytest.mark.e2e

FEATURES = 8


def _endpoints(cluster: Cluster, namespace: str) -> list[str]:
    slices = cluster.kubectl(
        "get", "endpointslices", "-n", namespace, "-l", "kubernetes.io/service-name=ties",
        "-o", "json",
    ).stdout  # fmt: skip
    return [
        address
        for item in json.loads(slices)["items"]
        for endpoint in item.get("endpoints") or []
        if endpoint.get("conditions", {}).get("ready")
        for address in endpoint["addresses"]
    ]


def test_a_quantized_model_below_its_floor_never_serves_and_the_status_says_why(
    cluster: Cluster,
    namespace: str,
    tmp_path: Path,
    served: Callable[[Path], str],
    runtime_pods: None,
    operator: KopfRunner,
) -> None:
    model = onnx_models.near_ties(tmp_path / "ties.onnx", FEATURES)
    samples = tmp_path / "samples.npz"
    np.savez(samples, x=np.random.default_rng(1).standard_normal((200, FEATURES), np.float32))

    def spec(floor: float) -> dict[str, Any]:
        return {
            "model": {
                "uri": served(model),
                "sha256": hashlib.sha256(model.read_bytes()).hexdigest(),
            },
            "quantization": "dynamic-int8",
            "validation": {
                "uri": served(samples),
                "sha256": hashlib.sha256(samples.read_bytes()).hexdigest(),
                "minAgreement": floor,
            },
        }

    apply_md(cluster, namespace, "ties", spec(0.9))

    def stalled() -> dict[str, Any] | None:
        found = condition(get(cluster, namespace, "md", "ties"), "Stalled")
        return found if found.get("status") == "True" else None

    verdict = wait_for("ties Stalled", stalled, timeout=180)
    assert verdict["reason"] == "ValidationFailed", verdict
    assert verdict["message"].startswith(
        "runtime exited with 4: validation failed on 200 samples: agreement with the unquantized "
        "model 0."
    )
    assert verdict["message"].endswith("is below minAgreement 0.9")
    md = get(cluster, namespace, "md", "ties")
    assert condition(md, "Ready")["status"] == "False"
    # Never Ready, so never behind the Service.
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        assert _endpoints(cluster, namespace) == []
        time.sleep(1)

    # A floor the model reaches: the same model serves.
    apply_md(cluster, namespace, "ties", spec(0.1))
    wait_for("ties Ready", lambda: ready_md(cluster, namespace, "ties"), timeout=180)
    assert len(_endpoints(cluster, namespace)) == 1

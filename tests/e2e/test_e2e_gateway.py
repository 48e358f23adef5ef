"""A client at status.url, through Traefik and the HTTPRoute the operator made, reaches the model.

Pods on this cluster get no routable address yet, so the model is served by `modeldeploy serve`
from the same manifest (the same builder turns spec.gateway.path into the runtime's prefix) on
this machine's own address, and the route's Service gets an EndpointSlice naming it by hand.
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import tritonclient.http as httpclient
import yaml
from kopf.testing import KopfRunner

from modeldeploy_dev import ingress
from operator_helpers import apply_md, free_port, ready_md, wait_for
from support import Cluster, host_address

pytestmark = pytest.mark.e2e

MODELDEPLOY = str(Path(sys.executable).parent / "modeldeploy")
GATEWAY = {"name": ingress.GATEWAY, "namespace": ingress.NAMESPACE, "sectionName": ingress.LISTENER}


def _spec(model: Path) -> dict[str, Any]:
    return {
        "model": {"uri": f"file://{model}", "name": "iris"},
        "gateway": {"parentRefs": [GATEWAY], "hostnames": ["iris.example.com"], "path": "/ml"},
    }


@pytest.fixture
def served_here(tmp_path: Path, demo_model: Path) -> Iterator[tuple[str, int]]:
    manifest = tmp_path / "md.yaml"
    body = {
        "apiVersion": "modeldeploy.io/v1alpha1",
        "kind": "ModelDeployment",
        "metadata": {"name": "iris"},
        "spec": _spec(demo_model),
    }
    manifest.write_text(yaml.safe_dump(body))
    address, port = host_address(), free_port()
    process = subprocess.Popen(
        [MODELDEPLOY, "serve", "-f", str(manifest), "--host", address,
         "--http-port", str(port), "--grpc-port", str(free_port()),
         "--workdir", str(tmp_path / "work")],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
    )  # fmt: skip
    try:
        yield address, port
    finally:
        process.terminate()
        process.wait(timeout=30)


def _ready(client: httpclient.InferenceServerClient, headers: dict[str, str]) -> bool:
    try:
        return bool(client.is_model_ready("iris", headers=headers))
    except Exception:
        return False


def test_tritonclient_at_status_url_goes_through_traefik_to_the_model(
    cluster: Cluster,
    namespace: str,
    operator: KopfRunner,
    demo_model: Path,
    served_here: tuple[str, int],
) -> None:
    address, port = served_here
    apply_md(cluster, namespace, "iris", _spec(demo_model))
    md = wait_for("iris Ready", lambda: ready_md(cluster, namespace, "iris"))
    url = md["status"]["url"]
    assert url == "http://iris.example.com/ml/v2/models/iris"
    slice_ = {
        "apiVersion": "discovery.k8s.io/v1",
        "kind": "EndpointSlice",
        "metadata": {
            "name": "iris-here",
            "namespace": namespace,
            "labels": {
                "kubernetes.io/service-name": "iris",
                "endpointslice.kubernetes.io/managed-by": "modeldeploy-tests",
            },
        },
        "addressType": "IPv4",
        "endpoints": [{"addresses": [address], "conditions": {"ready": True}}],
        "ports": [{"name": "http", "port": port, "protocol": "TCP"}],
    }
    cluster.kubectl("apply", "-f", "-", input=json.dumps(slice_))

    # What a client does with status.url: the host goes into the Host header (no DNS here),
    # the base path into tritonclient's url.
    host, _, path = url.removeprefix("http://").partition("/")
    base = path.removesuffix("/v2/models/iris")
    client = httpclient.InferenceServerClient(f"127.0.0.1:{ingress.INGRESS_PORT}/{base}")
    headers = {"Host": host}
    try:
        wait_for("the model through Traefik", lambda: _ready(client, headers), timeout=60)
        metadata = client.get_model_metadata("iris", headers=headers)
        (source,) = metadata["inputs"]
        x = np.random.default_rng(0).standard_normal((3, int(source["shape"][-1])))
        tensor = httpclient.InferInput(source["name"], [3, int(source["shape"][-1])], "FP32")
        tensor.set_data_from_numpy(x.astype(np.float32))
        started = time.monotonic()
        result = client.infer("iris", [tensor], headers=headers)
        assert time.monotonic() - started < 10
        probabilities = result.as_numpy("probabilities")
        assert probabilities.shape[0] == 3
        np.testing.assert_allclose(probabilities.sum(axis=1), 1.0, rtol=1e-4)
    finally:
        client.close()

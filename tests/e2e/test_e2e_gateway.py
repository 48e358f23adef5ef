"""A client at status.url reaches the model that runtime containers on the real node serve,
through Traefik: once by the Ingress the operator made, once by the HTTPRoute (the ClusterIP path
is test_e2e_dataplane's). The two ModelDeployments share one namespace and operator."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import onnxruntime as ort
import pytest
import tritonclient.http as httpclient
from kopf.testing import KopfRunner

from modeldeploy_dev import ingress
from operator_helpers import apply_md, get, ready_md, wait_for
from support import Cluster

pytestmark = pytest.mark.e2e

GATEWAY = {"name": ingress.GATEWAY, "namespace": ingress.NAMESPACE, "sectionName": ingress.LISTENER}
# Near the centres of the demo data's three classes.
EXAMPLES = np.array([[5.0, 3.4, 1.5, 0.2], [5.9, 2.8, 4.3, 1.3], [6.6, 3.0, 5.6, 2.0]], np.float32)


def _ready(client: httpclient.InferenceServerClient, headers: dict[str, str]) -> bool:
    try:
        return bool(client.is_model_ready("iris", headers=headers))
    except Exception:
        return False


def _infer(client: httpclient.InferenceServerClient, headers: dict[str, str]) -> Any:
    tensor = httpclient.InferInput("input", list(EXAMPLES.shape), "FP32")
    tensor.set_data_from_numpy(EXAMPLES)
    return client.infer("iris", [tensor], headers=headers).as_numpy("probabilities")


def test_tritonclient_at_status_url_reaches_the_pods_through_the_ingress_and_the_http_route(
    cluster: Cluster,
    namespace: str,
    demo_model: Path,
    served: Callable[[Path], str],
    runtime_pods: None,
    operator: KopfRunner,
) -> None:
    model = {"uri": served(demo_model), "name": "iris"}
    routes = {
        "iris-ingress": {"ingress": {"host": f"ing.{namespace}.example", "path": "/ml"}},
        "iris-route": {
            "gateway": {
                "parentRefs": [GATEWAY],
                "hostnames": [f"route.{namespace}.example"],
                # Starts like the pod's model volume's mount path (/models): only a path.
                "path": "/models/iris",
            }
        },
    }
    for name, route in routes.items():
        apply_md(cluster, namespace, name, {"model": model, **route})
    urls = {
        name: wait_for(f"{name} Ready", lambda n=name: ready_md(cluster, namespace, n), 120)[
            "status"
        ]["url"]
        for name in routes
    }
    assert urls == {
        "iris-ingress": f"http://ing.{namespace}.example/ml/v2/models/iris",
        "iris-route": f"http://route.{namespace}.example/models/iris/v2/models/iris",
    }
    # Real pods on the pod network are the only endpoints of each route's Service.
    for name in routes:
        service = get(cluster, namespace, "service", name)
        assert service is not None and service["spec"]["clusterIP"].startswith("10.96.")
    pods = cluster.kubectl("get", "pods", "-n", namespace, "-o",
                           "jsonpath={.items[*].status.podIP}").stdout.split()  # fmt: skip
    assert len(pods) == 2 and all(p.startswith("10.244.") for p in pods), pods

    answers = {}
    for name, url in urls.items():
        # What a client does with status.url: the host goes into the Host header (no DNS
        # here), the base path into tritonclient's url, in front of Traefik's loopback port.
        host, _, path = url.removeprefix("http://").partition("/")
        base = path.removesuffix("/v2/models/iris")
        client = httpclient.InferenceServerClient(f"127.0.0.1:{ingress.INGRESS_PORT}/{base}")
        headers = {"Host": host}
        try:
            wait_for(f"{name} through Traefik", lambda c=client, h=headers: _ready(c, h), 60)
            metadata = client.get_model_metadata("iris", headers=headers)
            assert [i["name"] for i in metadata["inputs"]] == ["input"]
            answers[name] = _infer(client, headers)
            # Another host, or the path without its prefix, is not routed.
            assert not _ready(client, {"Host": f"elsewhere.{namespace}.example"})
        finally:
            client.close()
        unprefixed = httpclient.InferenceServerClient(f"127.0.0.1:{ingress.INGRESS_PORT}")
        try:
            assert not _ready(unprefixed, headers)
        finally:
            unprefixed.close()

    # The model's own outputs, as onnxruntime computes them here from the same file.
    (expected,) = ort.InferenceSession(str(demo_model)).run(["probabilities"], {"input": EXAMPLES})
    assert expected.argmax(axis=1).tolist() == [0, 1, 2]
    for name, probabilities in answers.items():
        np.testing.assert_allclose(probabilities, expected, rtol=1e-5, atol=1e-6, err_msg=name)

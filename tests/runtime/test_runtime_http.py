"""The HTTP side of the Open Inference Protocol, driven by the unchanged tritonclient."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest
import tritonclient.http as httpclient
from runtime_fixtures import (
    MLP_CLASSES,
    MLP_FEATURES,
    examples,
    get,
    metric_value,
    post,
    running_server,
)
from tritonclient.utils import InferenceServerException

from modeldeploy_runtime import server


@pytest.fixture(scope="module")
def mlp_server(busy_model: Path) -> Iterator[server.Server]:
    # The classifier's answers from a model busy for a while per run: concurrent requests
    # queue while it runs and share batches reliably (adaptive batching).
    with running_server(
        model_path=busy_model, model_name="mlp", model_version="7", max_batch_delay_ms=20
    ) as runtime:
        yield runtime


@pytest.fixture
def client(mlp_server: server.Server) -> Iterator[httpclient.InferenceServerClient]:
    client = httpclient.InferenceServerClient(f"127.0.0.1:{mlp_server.http_port}", concurrency=32)
    yield client
    client.close()


def expected(model: Path, x: np.ndarray) -> np.ndarray:
    session = ort.InferenceSession(str(model), providers=["CPUExecutionProvider"])
    result: np.ndarray = session.run(None, {"x": x})[0]
    return result


def infer_input(x: np.ndarray, *, binary: bool = True) -> httpclient.InferInput:
    tensor = httpclient.InferInput("x", list(x.shape), "FP32")
    tensor.set_data_from_numpy(x, binary_data=binary)
    return tensor


def test_health_and_metadata(client: httpclient.InferenceServerClient) -> None:
    assert client.is_server_live()
    assert client.is_server_ready()
    assert client.is_model_ready("mlp")
    assert client.is_model_ready("mlp", "7")
    assert not client.is_model_ready("mlp", "8")
    assert "binary_tensor_data" in client.get_server_metadata()["extensions"]
    metadata = client.get_model_metadata("mlp", "7")
    assert metadata["versions"] == ["7"]
    assert metadata["inputs"] == [{"name": "x", "datatype": "FP32", "shape": [-1, MLP_FEATURES]}]
    assert metadata["outputs"] == [
        {"name": "probabilities", "datatype": "FP32", "shape": [-1, MLP_CLASSES]}
    ]


@pytest.mark.parametrize("binary", [True, False], ids=["binary", "json"])
def test_infer_matches_onnx_runtime(
    client: httpclient.InferenceServerClient, mlp_model: Path, binary: bool
) -> None:
    x = examples(5)
    outputs = [httpclient.InferRequestedOutput("probabilities", binary_data=binary)]
    result = client.infer("mlp", [infer_input(x, binary=binary)], outputs=outputs, request_id="r1")
    np.testing.assert_allclose(result.as_numpy("probabilities"), expected(mlp_model, x), rtol=1e-5)
    assert result.get_response()["id"] == "r1"
    assert result.get_response()["model_version"] == "7"


def test_concurrent_requests_are_batched(
    client: httpclient.InferenceServerClient, mlp_server: server.Server, mlp_model: Path
) -> None:
    before = metric_value(
        mlp_server.stats.exposition().decode(), "modeldeploy_batch_size_count", model="mlp"
    )
    xs = [examples(1, seed=i) for i in range(48)]
    pending = [client.async_infer("mlp", [infer_input(x)]) for x in xs]
    for x, request in zip(xs, pending, strict=True):
        got = request.get_result().as_numpy("probabilities")
        np.testing.assert_allclose(got, expected(mlp_model, x), rtol=1e-5)
    text = get(f"http://127.0.0.1:{mlp_server.http_port}/metrics")[1].decode()
    batches = metric_value(text, "modeldeploy_batch_size_count", model="mlp") - before
    assert 0 < batches < 48, "48 concurrent requests should have shared batches"
    assert metric_value(text, "modeldeploy_batch_size_bucket", model="mlp", le="1.0") < (
        metric_value(text, "modeldeploy_batch_size_count", model="mlp")
    )


def test_metrics_exposed_with_contract_names(
    client: httpclient.InferenceServerClient, mlp_server: server.Server
) -> None:
    client.infer("mlp", [infer_input(examples(2))])
    status, body = get(f"http://127.0.0.1:{mlp_server.http_port}/metrics")
    text = body.decode()
    assert status == 200
    labels = {"model": "mlp", "protocol": "http"}
    assert metric_value(text, "modeldeploy_requests_total", outcome="success", **labels) >= 1
    assert metric_value(text, "modeldeploy_request_duration_seconds_count", **labels) >= 1
    assert metric_value(text, "modeldeploy_queue_duration_seconds_count", model="mlp") >= 1
    assert metric_value(text, "modeldeploy_inference_duration_seconds_count", model="mlp") >= 1
    assert metric_value(text, "modeldeploy_inflight_requests", model="mlp") == 0
    assert 'modeldeploy_batch_size_bucket{le="256.0",model="mlp"}' in text
    assert (
        metric_value(text, "modeldeploy_model_info", version="7", quantization="none", device="cpu")
        == 1
    )


def _error(status: int, body: bytes) -> tuple[int, str]:
    return status, json.loads(body)["error"]


BAD_REQUESTS = {
    "malformed-json": (b'{"inputs": [', {}, 400, "not valid JSON"),
    "not-an-object": (b"[1, 2]", {}, 400, "JSON object"),
    "no-inputs": (b"{}", {}, 400, "'inputs'"),
    "unknown-input": (
        json.dumps(
            {"inputs": [{"name": "y", "shape": [1, 8], "datatype": "FP32", "data": [0] * 8}]}
        ),
        {},
        400,
        "unknown input 'y'",
    ),
    "wrong-shape": (
        json.dumps(
            {"inputs": [{"name": "x", "shape": [1, 5], "datatype": "FP32", "data": [0] * 5}]}
        ),
        {},
        400,
        "input 'x': shape [1, 5]",
    ),
    "wrong-dtype": (
        json.dumps(
            {"inputs": [{"name": "x", "shape": [1, 8], "datatype": "INT64", "data": [0] * 8}]}
        ),
        {},
        400,
        "input 'x': datatype INT64, but the model expects FP32",
    ),
    "unknown-dtype": (
        json.dumps(
            {"inputs": [{"name": "x", "shape": [1, 8], "datatype": "FP8", "data": [0] * 8}]}
        ),
        {},
        400,
        "input 'x': datatype FP8, but the model expects FP32",
    ),
    "data-count": (
        json.dumps(
            {"inputs": [{"name": "x", "shape": [1, 8], "datatype": "FP32", "data": [0] * 7}]}
        ),
        {},
        400,
        "7 values of data, but shape [1, 8] needs 8",
    ),
    "not-numbers": (
        json.dumps(
            {"inputs": [{"name": "x", "shape": [1, 8], "datatype": "FP32", "data": ["a"] * 8}]}
        ),
        {},
        400,
        "input 'x': data is not a list of FP32 values",
    ),
    "binary-too-short": (
        json.dumps(
            {
                "inputs": [
                    {
                        "name": "x",
                        "shape": [1, 8],
                        "datatype": "FP32",
                        "parameters": {"binary_data_size": 32},
                    }
                ]
            }
        ).encode()
        + b"\0" * 16,
        "header",
        400,
        "binary_data_size 32",
    ),
    "bad-header-length": (
        b"{}",
        {"Inference-Header-Content-Length": "99"},
        400,
        "Inference-Header",
    ),
    "unknown-output": (
        json.dumps(
            {
                "inputs": [{"name": "x", "shape": [1, 8], "datatype": "FP32", "data": [0] * 8}],
                "outputs": [{"name": "logits"}],
            }
        ),
        {},
        400,
        "unknown output(s) ['logits']",
    ),
}


@pytest.mark.parametrize("case", BAD_REQUESTS, ids=list(BAD_REQUESTS))
def test_bad_input_gets_4xx_naming_the_problem(
    mlp_server: server.Server, client: httpclient.InferenceServerClient, case: str
) -> None:
    body, headers, want_status, want_message = BAD_REQUESTS[case]
    payload = body.encode() if isinstance(body, str) else body
    if headers == "header":
        headers = {"Inference-Header-Content-Length": str(len(payload) - 16)}
    url = f"http://127.0.0.1:{mlp_server.http_port}/v2/models/mlp/infer"
    status, message = _error(*post(url, payload, headers))
    assert status == want_status
    assert want_message in message
    # The server keeps serving.
    assert client.infer("mlp", [infer_input(examples(1))]).as_numpy("probabilities").shape == (1, 4)


def test_unknown_model_and_version_are_404(mlp_server: server.Server) -> None:
    base = f"http://127.0.0.1:{mlp_server.http_port}/v2/models"
    body = json.dumps(
        {"inputs": [{"name": "x", "shape": [1, 8], "datatype": "FP32", "data": [0] * 8}]}
    )
    status, message = _error(*post(f"{base}/other/infer", body.encode()))
    assert status == 404
    assert "model 'other' is not served here" in message
    status, message = _error(*post(f"{base}/mlp/versions/3/infer", body.encode()))
    assert status == 404
    assert "no version '3'" in message
    assert post(f"{base}/mlp/versions/7/infer", body.encode())[0] == 200


def test_oversized_body_is_413(mlp_model: Path) -> None:
    with running_server(model_path=mlp_model, model_name="mlp", max_request_bytes=4096) as runtime:
        url = f"http://127.0.0.1:{runtime.http_port}/v2/models/mlp/infer"
        status, message = _error(*post(url, b" " * 10_000))
        assert status == 413
        assert "larger than the limit of 4096 bytes" in message
        client = httpclient.InferenceServerClient(f"127.0.0.1:{runtime.http_port}")
        assert client.infer("mlp", [infer_input(examples(1))]).as_numpy("probabilities") is not None
        text = runtime.stats.exposition().decode()
        labels = {"model": "mlp", "protocol": "http"}
        assert (
            metric_value(text, "modeldeploy_requests_total", outcome="client_error", **labels) == 1
        )


def test_full_queue_answers_429(slow_model: Path) -> None:
    # The first request keeps the model busy for a while; two queue behind it, four are refused.
    with running_server(
        model_path=slow_model, model_name="slow", max_batch_size=4, max_queue_size=2
    ) as runtime:
        client = httpclient.InferenceServerClient(f"127.0.0.1:{runtime.http_port}", concurrency=8)
        x = examples(1)
        pending = [client.async_infer("slow", [infer_input(x)]) for _ in range(6)]
        outcomes = []
        for request in pending:
            try:
                request.get_result()
                outcomes.append("ok")
            except InferenceServerException as error:
                assert error.status() == "429"
                assert "queue is full" in error.message()
                outcomes.append("429")
        assert outcomes.count("ok") == 3
        assert outcomes.count("429") == 3
        text = runtime.stats.exposition().decode()
        labels = {"model": "slow", "protocol": "http"}
        assert metric_value(text, "modeldeploy_requests_total", outcome="rejected", **labels) == 3


def test_fixed_batch_model_is_served_unbatched(fixed_model: Path) -> None:
    with running_server(model_path=fixed_model, model_name="fixed") as runtime:
        client = httpclient.InferenceServerClient(f"127.0.0.1:{runtime.http_port}", concurrency=8)
        xs = [examples(1, seed=i) for i in range(8)]
        pending = [client.async_infer("fixed", [infer_input(x)]) for x in xs]
        for x, request in zip(xs, pending, strict=True):
            got = request.get_result().as_numpy("probabilities")
            np.testing.assert_allclose(got, expected(fixed_model, x), rtol=1e-5)
        with pytest.raises(InferenceServerException, match=r"shape \[2, 8\] does not match"):
            client.infer("fixed", [infer_input(examples(2))])


def test_a_path_prefix_serves_the_model_under_it_and_at_the_root(mlp_model: Path) -> None:
    """tritonclient takes status.url's base ("host:port/prefix"); probes keep the root paths."""
    with running_server(model_path=mlp_model, model_name="mlp", path_prefix="/teams/ml") as runtime:
        x = examples(2)
        for base in ("/teams/ml", ""):
            client = httpclient.InferenceServerClient(f"127.0.0.1:{runtime.http_port}{base}")
            try:
                assert client.is_server_ready()
                result = client.infer("mlp", [infer_input(x)])
                got = result.as_numpy("probabilities")
                np.testing.assert_allclose(got, expected(mlp_model, x), rtol=1e-5)
            finally:
                client.close()
        assert get(f"http://127.0.0.1:{runtime.http_port}/ml/v2/health/ready")[0] == 404

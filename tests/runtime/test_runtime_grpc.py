"""The gRPC side (inference.GRPCInferenceService), driven by the unchanged tritonclient."""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest
import tritonclient.grpc as grpcclient
from runtime_fixtures import (
    MLP_FEATURES,
    examples,
    metric_value,
    running_server,
)
from tritonclient.utils import InferenceServerException

from modeldeploy_runtime import server


@pytest.fixture(scope="module")
def mlp_server(busy_model: Path) -> Iterator[server.Server]:
    # Busy for a while per run, so concurrent requests share batches (adaptive batching).
    with running_server(model_path=busy_model, model_name="mlp", max_batch_delay_ms=20) as runtime:
        yield runtime


@pytest.fixture
def client(mlp_server: server.Server) -> Iterator[grpcclient.InferenceServerClient]:
    client = grpcclient.InferenceServerClient(f"127.0.0.1:{mlp_server.grpc_port}")
    yield client
    client.close()


def infer_input(x: np.ndarray, name: str = "x", datatype: str = "FP32") -> grpcclient.InferInput:
    tensor = grpcclient.InferInput(name, list(x.shape), datatype)
    tensor.set_data_from_numpy(x)
    return tensor


def wait_for(condition: Callable[[], bool], timeout: float = 10) -> None:
    deadline = time.monotonic() + timeout
    while not condition() and time.monotonic() < deadline:
        time.sleep(0.02)


def test_health_and_metadata(client: grpcclient.InferenceServerClient) -> None:
    assert client.is_server_live()
    assert client.is_server_ready()
    assert client.is_model_ready("mlp")
    metadata = client.get_model_metadata("mlp", as_json=True)
    assert metadata["versions"] == ["1"]
    assert metadata["inputs"] == [{"name": "x", "datatype": "FP32", "shape": ["-1", "8"]}]
    assert client.get_server_metadata(as_json=True)["name"] == "modeldeploy"
    with pytest.raises(InferenceServerException, match="not served here"):
        client.get_model_metadata("other")


def test_infer_matches_onnx_runtime(
    client: grpcclient.InferenceServerClient, mlp_model: Path
) -> None:
    x = examples(3)
    result = client.infer(
        "mlp", [infer_input(x)], outputs=[grpcclient.InferRequestedOutput("probabilities")]
    )
    session = ort.InferenceSession(str(mlp_model), providers=["CPUExecutionProvider"])
    np.testing.assert_allclose(
        result.as_numpy("probabilities"), session.run(None, {"x": x})[0], rtol=1e-5
    )


def test_concurrent_requests_are_batched(
    client: grpcclient.InferenceServerClient, mlp_server: server.Server
) -> None:
    done: list[object] = []
    for i in range(32):
        client.async_infer(
            "mlp", [infer_input(examples(1, seed=i))], lambda result, error: done.append(error)
        )
    wait_for(lambda: len(done) == 32)
    assert done == [None] * 32
    text = mlp_server.stats.exposition().decode()
    labels = {"model": "mlp", "protocol": "grpc"}
    assert metric_value(text, "modeldeploy_requests_total", outcome="success", **labels) >= 32
    assert metric_value(text, "modeldeploy_batch_size_count", model="mlp") < 32


@pytest.mark.parametrize(
    ("tensor", "message"),
    [
        (lambda: infer_input(examples(1), name="y"), "unknown input 'y'"),
        (lambda: infer_input(examples(1, features=5)), "input 'x': shape [1, 5]"),
        (
            lambda: infer_input(np.zeros((1, MLP_FEATURES), np.int64), datatype="INT64"),
            "input 'x': datatype INT64, but the model expects FP32",
        ),
    ],
    ids=["name", "shape", "dtype"],
)
def test_bad_input_is_invalid_argument(
    client: grpcclient.InferenceServerClient, tensor: object, message: str
) -> None:
    with pytest.raises(InferenceServerException) as caught:
        client.infer("mlp", [tensor()])  # type: ignore[operator]
    assert caught.value.status() == "StatusCode.INVALID_ARGUMENT"
    assert message in caught.value.message()
    assert client.infer("mlp", [infer_input(examples(1))]).as_numpy("probabilities") is not None


def test_full_queue_is_resource_exhausted(slow_model: Path) -> None:
    # The first request keeps the model busy for a while; two queue behind it, two are refused.
    with running_server(
        model_path=slow_model, model_name="slow", max_batch_size=4, max_queue_size=2
    ) as runtime:
        client = grpcclient.InferenceServerClient(f"127.0.0.1:{runtime.grpc_port}")
        errors: list[InferenceServerException | None] = []
        x = examples(1)
        for _ in range(5):
            client.async_infer("slow", [infer_input(x)], lambda result, error: errors.append(error))
        wait_for(lambda: len(errors) == 5)
        rejected = [e for e in errors if e is not None]
        assert len(rejected) == 2
        assert all(e.status() == "StatusCode.RESOURCE_EXHAUSTED" for e in rejected)
        assert "queue is full" in rejected[0].message()

"""Front-end worker processes in front of one model process, and the shapes ONNX Runtime sees.

Real processes (the console script, as the container runs it), real ONNX Runtime; which
batch shapes the sessions ran is read from ONNX Runtime's own profile of every run.
"""

from __future__ import annotations

import json
import signal
import subprocess
from collections.abc import Iterator
from concurrent import futures
from pathlib import Path
from typing import Any

import numpy as np
import onnxruntime as ort
import pytest
import tritonclient.grpc as grpcclient
import tritonclient.http as httpclient
from runtime_fixtures import (
    examples,
    free_port,
    get,
    metric_value,
    running_server,
    start_process,
    wait_ready,
)

SIZES = (1, 4, 8)


def batch_dims_run(profile_dir: Path) -> set[int]:
    """The first dim of every node's first input, in every run ONNX Runtime profiled."""
    dims = set()
    for path in profile_dir.glob("*.json"):
        for event in json.loads(path.read_text()):
            shapes = event.get("args", {}).get("input_type_shape")
            if event.get("cat") == "Node" and shapes:
                (first,) = shapes[0].values()
                dims.add(first[0])
    return dims


def expected(model_path: Path, x: np.ndarray[Any, Any]) -> np.ndarray[Any, Any]:
    session = ort.InferenceSession(str(model_path), providers=["CPUExecutionProvider"])
    result: np.ndarray[Any, Any] = session.run(None, {"x": x})[0]
    return result


@pytest.fixture(scope="module")
def workers(
    mlp_model: Path, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[tuple[int, int, Path, subprocess.Popen[str]]]:
    profile_dir = tmp_path_factory.mktemp("profile")
    http_port, grpc_port = free_port(), free_port()
    process = start_process(
        [
            "serve",
            f"--model-path={mlp_model}",
            "--model-name=mlp",
            "--workers=2",
            "--max-batch-size=8",
            "--batch-sizes=1,4,8",
            "--max-batch-delay-ms=20",
            f"--http-port={http_port}",
            f"--grpc-port={grpc_port}",
        ],
        env={
            "MODELDEPLOY_PROFILE_DIR": str(profile_dir),
            "MODELDEPLOY_CACHE_DIR": str(tmp_path_factory.mktemp("cache")),
        },
    )
    wait_ready(process, http_port)
    yield http_port, grpc_port, profile_dir, process
    if process.poll() is None:
        process.send_signal(signal.SIGTERM)
        process.wait(30)


def test_workers_answer_http_and_grpc_with_the_models_own_results(
    workers: tuple[int, int, Path, subprocess.Popen[str]], mlp_model: Path
) -> None:
    http_port, grpc_port, _, _ = workers
    rows = [examples(1 + i % 3, seed=i) for i in range(24)]

    def over_http(x: np.ndarray[Any, Any]) -> np.ndarray[Any, Any]:
        client = httpclient.InferenceServerClient(f"127.0.0.1:{http_port}")
        tensor = httpclient.InferInput("x", list(x.shape), "FP32")
        tensor.set_data_from_numpy(x, binary_data=True)
        result: np.ndarray[Any, Any] = client.infer("mlp", [tensor]).as_numpy("probabilities")
        return result

    def over_grpc(x: np.ndarray[Any, Any]) -> np.ndarray[Any, Any]:
        client = grpcclient.InferenceServerClient(f"127.0.0.1:{grpc_port}")
        tensor = grpcclient.InferInput("x", list(x.shape), "FP32")
        tensor.set_data_from_numpy(x)
        result: np.ndarray[Any, Any] = client.infer("mlp", [tensor]).as_numpy("probabilities")
        return result

    with futures.ThreadPoolExecutor(12) as pool:
        answers = list(
            pool.map(lambda ix: (over_http, over_grpc)[ix[0] % 2](ix[1]), enumerate(rows))
        )
    for x, answer in zip(rows, answers, strict=True):
        np.testing.assert_allclose(answer, expected(mlp_model, x), rtol=1e-5, atol=1e-6)


def test_a_request_above_the_largest_batch_size_gets_400_naming_the_limit(
    workers: tuple[int, int, Path, subprocess.Popen[str]],
) -> None:
    http_port = workers[0]
    client = httpclient.InferenceServerClient(f"127.0.0.1:{http_port}")
    tensor = httpclient.InferInput("x", [9, 8], "FP32")
    tensor.set_data_from_numpy(examples(9))
    with pytest.raises(Exception, match="maxBatchSize 8"):
        client.infer("mlp", [tensor])


def test_metrics_are_one_view_of_every_process(
    workers: tuple[int, int, Path, subprocess.Popen[str]],
) -> None:
    http_port = workers[0]
    client = httpclient.InferenceServerClient(f"127.0.0.1:{http_port}", concurrency=8)
    tensor = httpclient.InferInput("x", [1, 8], "FP32")
    tensor.set_data_from_numpy(examples(1))
    url = f"http://127.0.0.1:{http_port}/metrics"
    text = get(url)[1].decode()
    before = metric_value(text, "modeldeploy_requests_total", outcome="success")
    examples_before = metric_value(text, "modeldeploy_batch_size_sum", model="mlp")
    batches_before = metric_value(text, "modeldeploy_batch_size_count", model="mlp")
    pending = [client.async_infer("mlp", [tensor]) for _ in range(40)]
    for request in pending:
        request.get_result()
    # Each scrape lands on either worker; every one must count the whole pod.
    for _ in range(6):
        text = get(url)[1].decode()
        after = metric_value(text, "modeldeploy_requests_total", outcome="success")
        assert after - before == 40
        assert metric_value(text, "modeldeploy_model_info", device="cpu", model="mlp") == 1
        assert metric_value(text, "modeldeploy_inflight_requests", model="mlp") == 0
    # One batcher behind both workers ran every example once, in at most one batch each
    # (requests share a batch when they arrive while the model is busy: adaptive batching).
    assert metric_value(text, "modeldeploy_batch_size_sum", model="mlp") - examples_before == 40
    assert metric_value(text, "modeldeploy_batch_size_count", model="mlp") - batches_before <= 40


def test_the_session_only_ever_sees_the_given_batch_sizes(
    workers: tuple[int, int, Path, subprocess.Popen[str]],
) -> None:
    http_port, _, profile_dir, process = workers
    client = httpclient.InferenceServerClient(f"127.0.0.1:{http_port}", concurrency=16)
    requests = []
    for i in range(60):
        x = examples(1 + i % 3, seed=i)
        tensor = httpclient.InferInput("x", list(x.shape), "FP32")
        tensor.set_data_from_numpy(x)
        requests.append(client.async_infer("mlp", [tensor]))
    for request in requests:
        request.get_result()
    # The profile is written when the sessions end: at shutdown.
    process.send_signal(signal.SIGTERM)
    assert process.wait(30) == 0
    seen = batch_dims_run(profile_dir)
    assert seen, "ONNX Runtime profiled no run"
    assert seen <= set(SIZES), f"the session saw batch sizes {sorted(seen)}"


def test_in_process_server_pads_to_its_sizes_too(mlp_model: Path, tmp_path: Path) -> None:
    with running_server(
        model_path=mlp_model,
        model_name="mlp",
        max_batch_size=8,
        batch_sizes="1,4,8",
        max_batch_delay_ms=20,
        profile_dir=tmp_path,
    ) as runtime:
        client = httpclient.InferenceServerClient(f"127.0.0.1:{runtime.http_port}", concurrency=8)
        pending = []
        for i in range(20):
            x = examples(1 + i % 2, seed=i)
            tensor = httpclient.InferInput("x", list(x.shape), "FP32")
            tensor.set_data_from_numpy(x)
            pending.append((x, client.async_infer("mlp", [tensor])))
        for x, request in pending:
            answer = request.get_result().as_numpy("probabilities")
            assert answer.shape == (len(x), 4)
            np.testing.assert_allclose(answer, expected(mlp_model, x), rtol=1e-5, atol=1e-6)
    assert batch_dims_run(tmp_path) <= set(SIZES)

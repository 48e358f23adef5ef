"""String (BYTES) tensors: ONNX string inputs and outputs over HTTP (JSON and binary) and
gRPC, driven by the unchanged tritonclient, in one process and through front-end workers
(whose shared memory carries strings serialised), compared to ONNX Runtime's own answers."""

from __future__ import annotations

import signal
from collections.abc import Callable, Iterator
from concurrent import futures
from pathlib import Path
from typing import Any

import grpc
import numpy as np
import onnxruntime as ort
import pytest
import tritonclient.grpc as grpcclient
import tritonclient.http as httpclient
from runtime_fixtures import (
    free_port,
    get,
    metric_value,
    post,
    running_server,
    start_process,
    wait_ready,
)

WORDS = ["cat", "dog", "café", "日本", "", "zèbre", "a b", "x" * 300]
OUTPUTS = ("ids", "names", "echo")


def _batches(count: int) -> list[np.ndarray]:
    rng = np.random.default_rng(5)
    return [
        np.array(rng.choice(WORDS, (1 + i % 3, 3)).tolist(), dtype=object) for i in range(count)
    ]


def _expected(model: Path, tokens: np.ndarray) -> list[np.ndarray]:
    session = ort.InferenceSession(str(model), providers=["CPUExecutionProvider"])
    return list(session.run(None, {"tokens": tokens}))


def _text(array: np.ndarray) -> np.ndarray:
    """tritonclient returns BYTES outputs as bytes (binary) or str (JSON): compare as text."""
    return np.vectorize(lambda v: v.decode() if isinstance(v, bytes) else v, otypes=[object])(array)


def _over_http(port: int, binary: bool) -> Callable[[np.ndarray], list[np.ndarray]]:
    def infer(tokens: np.ndarray) -> list[np.ndarray]:
        client = httpclient.InferenceServerClient(f"127.0.0.1:{port}")
        tensor = httpclient.InferInput("tokens", list(tokens.shape), "BYTES")
        tensor.set_data_from_numpy(tokens, binary_data=binary)
        wanted = [httpclient.InferRequestedOutput(n, binary_data=binary) for n in OUTPUTS]
        result = client.infer("strings", [tensor], outputs=wanted)
        return [result.as_numpy(name) for name in OUTPUTS]

    return infer


def _over_grpc(port: int) -> Callable[[np.ndarray], list[np.ndarray]]:
    def infer(tokens: np.ndarray) -> list[np.ndarray]:
        client = grpcclient.InferenceServerClient(f"127.0.0.1:{port}")
        tensor = grpcclient.InferInput("tokens", list(tokens.shape), "BYTES")
        tensor.set_data_from_numpy(tokens)
        result = client.infer("strings", [tensor])
        return [result.as_numpy(name) for name in OUTPUTS]

    return infer


def _check_concurrent_answers(model: Path, http_port: int, grpc_port: int) -> None:
    clients = [_over_http(http_port, True), _over_http(http_port, False), _over_grpc(grpc_port)]
    batches = _batches(36)
    with futures.ThreadPoolExecutor(12) as pool:
        answers = list(pool.map(lambda ib: clients[ib[0] % 3](ib[1]), enumerate(batches)))
    for tokens, answer in zip(batches, answers, strict=True):
        ids, names, echo = _expected(model, tokens)
        np.testing.assert_array_equal(answer[0], ids)
        assert _text(answer[1]).tolist() == names.tolist()
        assert _text(answer[2]).tolist() == echo.tolist() == tokens.tolist()


def test_strings_in_and_out_over_http_json_binary_and_grpc(string_model: Path) -> None:
    with running_server(
        model_path=string_model, model_name="strings", max_batch_delay_ms=20
    ) as runtime:
        status, body = get(f"http://127.0.0.1:{runtime.http_port}/v2/models/strings")
        assert status == 200
        assert b'"datatype":"BYTES"' in body
        _check_concurrent_answers(string_model, runtime.http_port, runtime.grpc_port)
        _, text = get(f"http://127.0.0.1:{runtime.http_port}/metrics")
        # Concurrent string requests shared batches.
        batches = metric_value(text.decode(), "modeldeploy_batch_size_count")
        assert batches < 36


@pytest.fixture(scope="module")
def workers(
    string_model: Path, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[tuple[int, int]]:
    http_port, grpc_port = free_port(), free_port()
    process = start_process(
        [
            "serve",
            f"--model-path={string_model}",
            "--model-name=strings",
            "--workers=2",
            "--max-batch-size=8",
            "--batch-sizes=1,4,8",
            "--max-batch-delay-ms=20",
            f"--http-port={http_port}",
            f"--grpc-port={grpc_port}",
        ],
        env={"MODELDEPLOY_CACHE_DIR": str(tmp_path_factory.mktemp("cache"))},
    )
    wait_ready(process, http_port)
    yield http_port, grpc_port
    process.send_signal(signal.SIGTERM)
    process.wait(30)


def test_strings_cross_the_workers_shared_memory_serialised(
    string_model: Path, workers: tuple[int, int]
) -> None:
    """Batches padded to the sizes 1, 4, 8 get empty strings as padding rows."""
    _check_concurrent_answers(string_model, *workers)


def test_bad_strings_get_400_naming_the_problem(workers: tuple[int, int]) -> None:
    http_port, _ = workers
    url = f"http://127.0.0.1:{http_port}/v2/models/strings/infer"

    def infer(data: Any, binary: bytes = b"") -> tuple[int, str]:
        header = (
            '{"inputs":[{"name":"tokens","datatype":"BYTES","shape":[1,3],'
            + (f'"parameters":{{"binary_data_size":{len(binary)}}}' if binary else f'"data":{data}')
            + "}]}"
        ).encode()
        headers = {"Inference-Header-Content-Length": str(len(header))} if binary else {}
        status, body = post(url, header + binary, headers)
        return status, body.decode()

    assert infer('["a", "b", 3]') == (
        400,
        '{"error":"input \'tokens\': data is not a list of strings"}',
    )
    status, message = infer('["a", "b"]')
    assert status == 400 and "2 values of data, but shape [1, 3] needs 3" in message
    status, message = infer(None, b"\x01\x00\x00\x00a\x01\x00\x00\x00b\x09\x00\x00\x00c")
    assert status == 400 and "element 2 is 9 bytes long, past the end" in message
    status, message = infer(None, b"\x01\x00\x00\x00a\x01\x00\x00\x00b\x01\x00\x00\x00\xff")
    assert status == 400 and "element 2 is not UTF-8" in message
    # The server keeps serving.
    assert infer('["cat", "dog", ""]')[0] == 200


def test_grpc_bytes_contents_are_read_like_raw_contents(workers: tuple[int, int]) -> None:
    """``contents.bytes_contents`` (typed) rather than ``raw_input_contents``."""
    from tritonclient.grpc import service_pb2 as pb
    from tritonclient.grpc import service_pb2_grpc as pb_grpc

    _, grpc_port = workers
    request = pb.ModelInferRequest(model_name="strings")
    tensor = request.inputs.add(name="tokens", datatype="BYTES", shape=[2, 3])
    tensor.contents.bytes_contents.extend(
        [w.encode() for w in ["cat", "x", "日本", "", "dog", "café"]]
    )
    with grpc.insecure_channel(f"127.0.0.1:{grpc_port}") as channel:
        response = pb_grpc.GRPCInferenceServiceStub(channel).ModelInfer(request, timeout=30)
        tensor.contents.bytes_contents[0] = b"\xff"
        with pytest.raises(grpc.RpcError) as refused:
            pb_grpc.GRPCInferenceServiceStub(channel).ModelInfer(request, timeout=30)
    assert np.frombuffer(response.raw_output_contents[0], np.int64).tolist() == [0, -1, 3, 4, 1, 2]
    assert refused.value.code() is grpc.StatusCode.INVALID_ARGUMENT
    assert "element 0 is not UTF-8" in (refused.value.details() or "")

"""Variable-length batching on a BERT-shaped model (embeddings, one masked attention block,
a per-token, a pooled and an attention-map output): requests of different lengths share
padded batches, and every answer equals the model's own unpadded run of that request alone."""

from __future__ import annotations

import json
import re
import signal
from collections.abc import Callable
from concurrent import futures
from pathlib import Path
from typing import Any

import numpy as np
import onnxruntime as ort
import pydantic
import pytest
import tritonclient.grpc as grpcclient
import tritonclient.http as httpclient
from runtime_fixtures import (
    free_port,
    get,
    metric_value,
    running_server,
    start_process,
    wait_ready,
)
from tritonclient.utils import InferenceServerException

from modeldeploy_runtime import batching, cli, model, settings

PADDING = {"inputs": {"input_ids": {"axis": 1}, "attention_mask": {"axis": 1, "value": 0}}}
OUTPUTS = ("last_hidden_state", "pooler_output", "attention")


def _requests(count: int, longest: int) -> list[dict[str, np.ndarray]]:
    rng = np.random.default_rng(11)
    requests = []
    for _ in range(count):
        rows, length = int(rng.integers(1, 3)), int(rng.integers(1, longest + 1))
        ids = rng.integers(1, 1000, (rows, length))
        requests.append({"input_ids": ids, "attention_mask": np.ones_like(ids)})
    return requests


def _alone(bert_model: Path, request: dict[str, np.ndarray]) -> list[np.ndarray]:
    session = ort.InferenceSession(str(bert_model), providers=["CPUExecutionProvider"])
    return list(session.run(None, request))


def _http(port: int) -> Callable[[dict[str, np.ndarray]], list[np.ndarray]]:
    def infer(request: dict[str, np.ndarray]) -> list[np.ndarray]:
        client = httpclient.InferenceServerClient(f"127.0.0.1:{port}")
        tensors = []
        for name, array in request.items():
            tensor = httpclient.InferInput(name, list(array.shape), "INT64")
            tensor.set_data_from_numpy(array, binary_data=True)
            tensors.append(tensor)
        result = client.infer("bert", tensors)
        return [result.as_numpy(name) for name in OUTPUTS]

    return infer


def _grpc(port: int) -> Callable[[dict[str, np.ndarray]], list[np.ndarray]]:
    def infer(request: dict[str, np.ndarray]) -> list[np.ndarray]:
        client = grpcclient.InferenceServerClient(f"127.0.0.1:{port}")
        tensors = []
        for name, array in request.items():
            tensor = grpcclient.InferInput(name, list(array.shape), "INT64")
            tensor.set_data_from_numpy(array)
            tensors.append(tensor)
        result = client.infer("bert", tensors)
        return [result.as_numpy(name) for name in OUTPUTS]

    return infer


@pytest.mark.parametrize(
    "padding",
    [PADDING, PADDING | {"buckets": [16, 32, 48]}],
    ids=["to-the-longest", "to-buckets"],
)
def test_padded_batches_answer_like_unpadded_single_runs(
    bert_model: Path, padding: dict[str, Any]
) -> None:
    requests = _requests(40, longest=48)
    with running_server(
        model_path=bert_model,
        model_name="bert",
        max_batch_delay_ms=30,
        max_batch_size=16,
        padding=padding,
    ) as runtime:
        clients = [_http(runtime.http_port), _grpc(runtime.grpc_port)]
        with futures.ThreadPoolExecutor(16) as pool:
            answers = list(pool.map(lambda ir: clients[ir[0] % 2](ir[1]), enumerate(requests)))
        _, text = get(f"http://127.0.0.1:{runtime.http_port}/metrics")
    for request, (per_token, pooled, attention) in zip(requests, answers, strict=True):
        own_per_token, own_pooled, own_attention = _alone(bert_model, request)
        rows, length = request["input_ids"].shape
        assert per_token.shape == own_per_token.shape == (rows, length, 64)
        assert attention.shape == own_attention.shape == (rows, length, length)
        np.testing.assert_allclose(per_token, own_per_token, rtol=1e-4, atol=1e-5)
        np.testing.assert_allclose(pooled, own_pooled, rtol=1e-4, atol=1e-5)
        np.testing.assert_allclose(attention, own_attention, rtol=1e-4, atol=1e-6)
    # Requests of different lengths shared batches.
    assert metric_value(text.decode(), "modeldeploy_batch_size_count") < len(requests) / 2


def test_a_request_longer_than_the_largest_bucket_gets_400(bert_model: Path) -> None:
    with running_server(
        model_path=bert_model, model_name="bert", padding=PADDING | {"buckets": [8]}
    ) as runtime:
        (request,) = _requests(1, longest=8)
        _http(runtime.http_port)(request)
        long = {name: np.ones((1, 9), np.int64) for name in request}
        with pytest.raises(InferenceServerException, match="longer than the largest padding"):
            _http(runtime.http_port)(long)
        uneven = {"input_ids": np.ones((1, 5), np.int64), "attention_mask": np.ones((1, 6))}
        uneven["attention_mask"] = uneven["attention_mask"].astype(np.int64)
        with pytest.raises(InferenceServerException, match="one length along their padded"):
            _http(runtime.http_port)(uneven)


def _signature(bert_model: Path) -> model.Signature:
    served = model.OnnxModel(bert_model, model.SessionConfig(threads=1))
    served.load((1, 2))
    return served.signature


def test_outputs_named_like_the_padded_axis_are_cut_back(bert_model: Path) -> None:
    served = _signature(bert_model)
    inputs = {"input_ids": (1, 0.0), "attention_mask": (1, 0.0)}
    padding = batching.Padding.for_model(served, inputs, {})
    # last_hidden_state [batch, sequence, 64] is cut on axis 1, attention [batch, sequence,
    # sequence] on both; pooler_output is left alone.
    assert padding.outputs == {0: (1,), 2: (1, 2)}
    explicit = batching.Padding.for_model(served, inputs, {"last_hidden_state": 1}, [64, 16])
    assert explicit.outputs == {0: (1,), 2: (1, 2)} and explicit.buckets == (16, 64)


@pytest.mark.parametrize(
    ("inputs", "outputs", "message"),
    [
        ({"ids": (1, 0.0)}, {}, "padding names input 'ids', which the model does not have"),
        ({"input_ids": (2, 0.0)}, {}, "has no variable axis there"),
        ({"input_ids": (1, 0.0)}, {"pooler_output": 1}, "'pooler_output' on axis 1"),
        ({"input_ids": (1, 0.0)}, {"logits": 1}, "output(s) ['logits'], which the model"),
    ],
)
def test_padding_that_does_not_fit_the_model_is_refused_naming_it(
    bert_model: Path, inputs: Any, outputs: Any, message: str
) -> None:
    with pytest.raises(ValueError, match=re.escape(message)):
        batching.Padding.for_model(_signature(bert_model), inputs, outputs)


def test_padding_is_read_from_its_flag_and_environment(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    flag = '{"inputs": {"input_ids": {"axis": 1}}, "buckets": [64, 32, 64]}'
    parsed = cli.parse(["serve", "--model-path=m.onnx", "--model-name=m", f"--padding={flag}"])
    assert isinstance(parsed, settings.ServeSettings) and parsed.padding is not None
    assert parsed.padding.inputs["input_ids"].axis == 1
    assert parsed.padding.inputs["input_ids"].value == 0
    assert parsed.padding.buckets == (32, 64)
    monkeypatch.setenv("MODELDEPLOY_PADDING", '{"inputs": {"x": {"axis": 2, "value": -1}}}')
    from_env = cli.parse(["serve", "--model-path=m.onnx", "--model-name=m"])
    assert isinstance(from_env, settings.ServeSettings) and from_env.padding is not None
    assert from_env.padding.inputs["x"].value == -1
    for bad, message in [
        ("{", "padding must be a JSON object"),
        ('{"inputs": {"x": {"axis": 0}}}', "greater than or equal to 1"),
        ('{"inputs": {}}', "at least 1 item"),
    ]:
        with pytest.raises(pydantic.ValidationError, match=message):
            cli.parse(["serve", "--model-path=m.onnx", "--model-name=m", f"--padding={bad}"])


def test_the_console_script_pads_behind_front_end_workers(bert_model: Path, tmp_path: Path) -> None:
    """The flag as the pod gets it; requests cross the workers' shared memory, and a refusal
    from the batcher comes back through them as a 400."""
    http_port, grpc_port = free_port(), free_port()
    padding = json.dumps(PADDING | {"buckets": [24, 48]})
    process = start_process(
        [
            "serve",
            f"--model-path={bert_model}",
            "--model-name=bert",
            "--workers=2",
            "--max-batch-size=8",
            "--batch-sizes=1,4,8",
            "--max-batch-delay-ms=20",
            f"--padding={padding}",
            f"--http-port={http_port}",
            f"--grpc-port={grpc_port}",
        ],
        env={"MODELDEPLOY_CACHE_DIR": str(tmp_path)},
    )
    try:
        wait_ready(process, http_port)
        requests = _requests(16, longest=48)
        clients = [_http(http_port), _grpc(grpc_port)]
        with futures.ThreadPoolExecutor(8) as pool:
            answers = list(pool.map(lambda ir: clients[ir[0] % 2](ir[1]), enumerate(requests)))
        for request, answer in zip(requests, answers, strict=True):
            for got, own in zip(answer, _alone(bert_model, request), strict=True):
                assert got.shape == own.shape
                np.testing.assert_allclose(got, own, rtol=1e-4, atol=1e-5)
        long = {name: np.ones((1, 49), np.int64) for name in ("input_ids", "attention_mask")}
        with pytest.raises(InferenceServerException, match="longer than the largest padding"):
            _http(http_port)(long)
        _, text = get(f"http://127.0.0.1:{http_port}/metrics")
        assert metric_value(text.decode(), "modeldeploy_batch_size_count") < len(requests)
    finally:
        process.send_signal(signal.SIGTERM)
        process.wait(30)

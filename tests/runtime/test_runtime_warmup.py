"""Warm-up never invents an input the model cannot take.

Real ONNX models built with onnx.helper: one whose dynamic dim must be at least 2 (a
reflect Pad, as in silero VAD), one fully static whose zeros are no valid input.
"""

from __future__ import annotations

import json
import logging
import subprocess
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper
from runtime_fixtures import post, running_server, runtime_command

from modeldeploy_contract import values


def reflect_model(path: Path) -> Path:
    """``y = Pad(x, reflect, 1 each side)``: ONNX Runtime refuses an ``n`` below 2."""
    pads = numpy_helper.from_array(np.array([0, 1, 0, 1], np.int64), "pads")
    graph = helper.make_graph(
        [helper.make_node("Pad", ["x", "pads"], ["y"], mode="reflect")],
        "reflect",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", "n"])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", "m"])],
        [pads],
    )
    built = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    built.ir_version = 8
    onnx.save(built, path)
    return path


def reshape_model(path: Path) -> Path:
    """Static dims, but zeros are no valid input: ``shape`` [0, 0] cannot hold 4 values."""
    graph = helper.make_graph(
        [helper.make_node("Reshape", ["x", "shape"], ["y"], allowzero=1)],
        "reshape",
        [
            helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 4]),
            helper.make_tensor_value_info("shape", TensorProto.INT64, [2]),
        ],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [None, None])],
    )
    built = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    built.ir_version = 8
    onnx.save(built, path)
    return path


def infer(port: int, name: str, tensors: dict[str, np.ndarray]) -> tuple[int, dict[str, Any]]:
    datatypes = {np.dtype(np.float32): "FP32", np.dtype(np.int64): "INT64"}
    body = {
        "inputs": [
            {
                "name": key,
                "datatype": datatypes[array.dtype],
                "shape": list(array.shape),
                "data": array.ravel().tolist(),
            }
            for key, array in tensors.items()
        ]
    }
    status, raw = post(f"http://127.0.0.1:{port}/v2/models/{name}/infer", json.dumps(body).encode())
    return status, json.loads(raw)


def test_unknown_dims_and_no_warmup_given_serve_without_warming_up(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    path = reflect_model(tmp_path / "reflect.onnx")
    caplog.set_level(logging.INFO)
    with running_server(model_path=path, model_name="reflect", max_batch_size=4) as runtime:
        assert "no warm-up: input dims unknown (x [-1, -1]" in caplog.text
        x = np.arange(10, dtype=np.float32).reshape(2, 5)
        status, body = infer(runtime.http_port, "reflect", {"x": x})
        assert status == 200, body
        want = ort.InferenceSession(str(path)).run(None, {"x": x})[0]
        np.testing.assert_array_equal(np.reshape(body["outputs"][0]["data"], (2, 7)), want)


def test_given_shapes_warm_every_batch_size(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    path = reflect_model(tmp_path / "reflect.onnx")
    caplog.set_level(logging.INFO)
    options = {"max_batch_size": 3, "warmup_shapes": '{"x": [1, 16]}'}
    with running_server(model_path=path, model_name="reflect", **options):
        assert "warmed up with the warm-up shapes at batch sizes [1, 2, 3]" in caplog.text


def test_given_samples_warm_up_a_model_that_needs_them(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    path = reshape_model(tmp_path / "reshape.onnx")
    samples = tmp_path / "samples.npz"
    np.savez(samples, x=np.ones((1, 4), np.float32), shape=np.array([2, 2], np.int64))
    caplog.set_level(logging.INFO)
    with running_server(model_path=path, model_name="reshape", warmup_path=samples):
        assert "warmed up with the warm-up samples samples.npz" in caplog.text


def test_a_warm_up_nobody_asked_for_that_fails_does_not_stop_the_model(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    path = reshape_model(tmp_path / "reshape.onnx")
    caplog.set_level(logging.INFO)
    with running_server(model_path=path, model_name="reshape") as runtime:
        assert "the warm-up with zeros of the model's own shapes failed" in caplog.text
        x = np.arange(4, dtype=np.float32).reshape(1, 4)
        status, body = infer(runtime.http_port, "reshape", {"x": x, "shape": np.array([2, -1])})
        assert status == 200, body
        assert body["outputs"][0]["shape"] == [2, 2]


@pytest.mark.parametrize(
    ("flag", "value", "needle"),
    [
        ("--warmup-shapes", '{"x": [1, 1]}', "the warm-up with the warm-up shapes failed"),
        ("--warmup-shapes", '{"y": [1, 4]}', "but the model's inputs are ['x']"),
        ("--warmup-shapes", '{"x": [4]}', "warm-up input 'x' has shape [4], the model's is"),
        ("--warmup-path", "samples.npz", "warm-up input 'x' is int64, the model takes FP32"),
        ("--warmup-path", "missing.npz", "warm-up samples"),
    ],
)
def test_a_warm_up_the_user_asked_for_that_fails_stops_the_start_naming_why(
    flag: str, value: str, needle: str, tmp_path: Path
) -> None:
    path = reflect_model(tmp_path / "reflect.onnx")
    np.savez(tmp_path / "samples.npz", x=np.ones((1, 4), np.int64))
    if flag == "--warmup-path":
        value = str(tmp_path / value)
    result = subprocess.run(
        runtime_command(
            "serve",
            f"--model-path={path}",
            "--model-name=reflect",
            "--http-port=0",
            "--grpc-port=0",
            "--max-batch-size=2",
            flag,
            value,
        ),
        capture_output=True,
        text=True,
        env={"MODELDEPLOY_HOST": "127.0.0.1", "PATH": "/usr/bin:/bin"},
        timeout=60,
    )
    assert result.returncode == values.EXIT_WARMUP_FAILED, result.stderr
    assert needle in result.stderr

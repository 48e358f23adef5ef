"""Shared pieces of the runtime tests: real ONNX models and real running servers."""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import os
import socket
import subprocess
import sys
import threading
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from modeldeploy_runtime import server, settings

MLP_FEATURES = 8
MLP_CLASSES = 4
HEAVY_FEATURES = 256


def mlp_layers(path: Path, widths: list[int], seed: int, *, batch: str | int = "batch") -> Path:
    """A MatMul/Add/Relu classifier ending in Softmax: input ``x``, output ``probabilities``."""
    rng = np.random.default_rng(seed)
    nodes = []
    initializers = []
    current = "x"
    for i, (fan_in, fan_out) in enumerate(itertools.pairwise(widths)):
        weight = rng.normal(0, 1 / np.sqrt(fan_in), (fan_in, fan_out)).astype(np.float32)
        bias = rng.normal(0, 0.1, fan_out).astype(np.float32)
        initializers += [
            numpy_helper.from_array(weight, f"w{i}"),
            numpy_helper.from_array(bias, f"b{i}"),
        ]
        nodes += [
            helper.make_node("MatMul", [current, f"w{i}"], [f"m{i}"]),
            helper.make_node("Add", [f"m{i}", f"b{i}"], [f"a{i}"]),
        ]
        current = f"a{i}"
        if i < len(widths) - 2:
            nodes.append(helper.make_node("Relu", [current], [f"r{i}"]))
            current = f"r{i}"
    nodes.append(helper.make_node("Softmax", [current], ["probabilities"], axis=-1))
    graph = helper.make_graph(
        nodes,
        "mlp",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [batch, widths[0]])],
        [helper.make_tensor_value_info("probabilities", TensorProto.FLOAT, [batch, widths[-1]])],
        initializers,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.checker.check_model(model)
    onnx.save(model, path)
    return path


def busy_mlp(path: Path, widths: list[int], seed: int, *, size: int = 384, rounds: int = 3) -> Path:
    """``mlp_layers``' classifier, plus per run ``rounds`` products of ``size``-square matrices.

    The products start from the input's mean (so they cannot be folded away at load) and
    reach the answer only multiplied by zero: every run keeps the model busy for a while,
    whatever the batch size, so concurrent requests queue behind it and share batches.
    """
    mlp_layers(path, widths, seed)
    model = onnx.load(path)
    graph = model.graph
    rng = np.random.default_rng(seed)
    square = rng.normal(0, 1 / np.sqrt(size), (size, size)).astype(np.float32)
    graph.initializer.extend(
        [
            numpy_helper.from_array(square, "busy_w"),
            numpy_helper.from_array(np.zeros(1, np.float32), "busy_zero"),
        ]
    )
    nodes = [helper.make_node("ReduceMean", ["x"], ["busy_mean"], keepdims=0)]
    nodes.append(helper.make_node("Add", ["busy_w", "busy_mean"], ["busy_0"]))
    for i in range(rounds):
        nodes.append(helper.make_node("MatMul", [f"busy_{i}", "busy_w"], [f"busy_{i + 1}"]))
    nodes += [
        helper.make_node("ReduceSum", [f"busy_{rounds}"], ["busy_sum"], keepdims=0),
        helper.make_node("Mul", ["busy_sum", "busy_zero"], ["busy_nothing"]),
    ]
    softmax = onnx.NodeProto()
    softmax.CopyFrom(graph.node[-1])
    del graph.node[-1]
    nodes.append(helper.make_node("Add", [softmax.input[0], "busy_nothing"], ["busy_logits"]))
    softmax.input[0] = "busy_logits"
    graph.node.extend([*nodes, softmax])
    onnx.checker.check_model(model)
    onnx.save(model, path)
    return path


def examples(rows: int, features: int = MLP_FEATURES, seed: int = 0) -> np.ndarray[Any, Any]:
    return np.random.default_rng(seed).standard_normal((rows, features)).astype(np.float32)


# One event loop for every in-process server: grpc.aio binds to the first loop it sees.
_loop = asyncio.new_event_loop()
threading.Thread(target=_loop.run_forever, name="test-servers", daemon=True).start()


def _on_loop(coroutine: Any, timeout: float = 120) -> Any:
    return asyncio.run_coroutine_threadsafe(coroutine, _loop).result(timeout)


@contextlib.contextmanager
def running_server(**overrides: Any) -> Iterator[server.Server]:
    """A real server in this process on ephemeral loopback ports, ready when yielded."""
    values: dict[str, Any] = {"host": "127.0.0.1", "http_port": 0, "grpc_port": 0, "threads": 1}
    config = settings.ServeSettings(**(values | overrides))

    async def create() -> server.Server:
        return server.Server(config)

    runtime: server.Server = _on_loop(create())
    try:
        _on_loop(runtime.start())
        yield runtime
    finally:
        _on_loop(runtime.stop())


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port: int = probe.getsockname()[1]
        return port


def runtime_command(*args: str) -> list[str]:
    """The installed console script, as the container runs it."""
    return [str(Path(sys.executable).parent / "modeldeploy-runtime"), *args]


def start_process(args: list[str], env: dict[str, str] | None = None) -> subprocess.Popen[str]:
    return subprocess.Popen(
        runtime_command(*args),
        env=os.environ | {"MODELDEPLOY_HOST": "127.0.0.1"} | (env or {}),
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )


def wait_ready(process: subprocess.Popen[str], http_port: int, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            output = process.stdout.read() if process.stdout else ""
            raise AssertionError(f"runtime exited with {process.returncode}:\n{output}")
        ready_url = f"http://127.0.0.1:{http_port}/v2/health/ready"
        with contextlib.suppress(OSError), urllib.request.urlopen(ready_url, timeout=1):
            return
        time.sleep(0.1)
    process.kill()
    raise AssertionError("runtime did not become ready")


def get(url: str) -> tuple[int, bytes]:
    try:
        with urllib.request.urlopen(url, timeout=10) as response:
            return response.status, response.read()
    except urllib.error.HTTPError as error:
        return error.code, error.read()


def post(url: str, body: bytes, headers: dict[str, str] | None = None) -> tuple[int, bytes]:
    request = urllib.request.Request(url, data=body, headers=headers or {}, method="POST")
    try:
        with urllib.request.urlopen(request, timeout=30) as response:
            return response.status, response.read()
    except urllib.error.HTTPError as error:
        return error.code, error.read()


def metric_value(text: str, name: str, **labels: str) -> float:
    """The value of one sample in Prometheus text exposition."""
    for line in text.splitlines():
        if not line.startswith(name + "{") and line.split(" ")[0] != name:
            continue
        sample, value = line.rsplit(" ", 1)
        if all(f'{k}="{v}"' in sample for k, v in labels.items()):
            return float(value)
    raise AssertionError(f"no sample {name} {labels} in:\n{text}")

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


@contextlib.contextmanager
def running_engine(workers: int, **overrides: Any) -> Iterator[server.Engine]:
    """The model process in this one and ``workers`` real front-end worker processes."""
    values: dict[str, Any] = {"host": "127.0.0.1", "http_port": 0, "grpc_port": 0, "threads": 1}
    config = settings.ServeSettings(**(values | overrides))

    async def create() -> server.Engine:
        return server.Engine(config, workers)

    runtime: server.Engine = _on_loop(create())
    try:
        _on_loop(runtime.start())
        _wait_serving(runtime.http_port)
        yield runtime
    finally:
        _on_loop(runtime.stop())


def on_servers_loop(call: Any) -> Any:
    """Call ``call()`` on the in-process servers' event loop and return what it returns."""

    async def run() -> Any:
        return call()

    return _on_loop(run())


def _wait_serving(port: int, timeout: float = 30) -> None:
    """Until readiness answers 200 on several fresh connections (every worker listens)."""
    deadline = time.monotonic() + timeout
    answered = 0
    while answered < 10:
        assert time.monotonic() < deadline, "the workers did not become ready"
        try:
            answered = (
                answered + 1 if get(f"http://127.0.0.1:{port}/v2/health/ready")[0] == 200 else 0
            )
        except OSError:
            answered = 0
            time.sleep(0.05)


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


def bert_like(
    path: Path,
    *,
    vocab: int = 1000,
    hidden: int = 64,
    ffn: int = 256,
    max_length: int = 512,
    attention_output: bool = False,
) -> Path:
    """A BERT-shaped encoder: token and position embeddings, one single-head attention block
    masked by ``attention_mask`` (1 = token, 0 = padding), a feed-forward block, and two
    outputs: ``last_hidden_state`` [batch, sequence, hidden] per token and
    ``pooler_output`` [batch, hidden] (tanh of a dense layer over the first token); with
    ``attention_output`` a third, ``attention`` [batch, sequence, sequence]."""
    rng = np.random.default_rng(7)

    def weight(name: str, *shape: int, scale: float | None = None) -> onnx.TensorProto:
        spread = scale if scale is not None else 1 / np.sqrt(shape[0])
        return numpy_helper.from_array(rng.normal(0, spread, shape).astype(np.float32), name)

    def constant(name: str, value: Any, dtype: Any = np.float32) -> onnx.TensorProto:
        return numpy_helper.from_array(np.array(value, dtype), name)

    initializers = [
        weight("word_embeddings", vocab, hidden, scale=0.5),
        weight("position_embeddings", max_length, hidden, scale=0.5),
        *(weight(name, hidden, hidden) for name in ("wq", "wk", "wv", "wo", "wp")),
        weight("w1", hidden, ffn),
        weight("w2", ffn, hidden),
        constant("gamma", np.ones(hidden)),
        constant("beta", np.zeros(hidden)),
        constant("scale", 1 / np.sqrt(hidden)),
        constant("one", 1.0),
        constant("neg", -10000.0),
        constant("zero_i", 0, np.int64),
        constant("one_i", 1, np.int64),
        constant("axis1", [1], np.int64),
    ]
    node = helper.make_node
    nodes = [
        node("Gather", ["word_embeddings", "input_ids"], ["tokens"]),
        node("Shape", ["input_ids"], ["ids_shape"]),
        node("Gather", ["ids_shape", "one_i"], ["length"], axis=0),
        node("Range", ["zero_i", "length", "one_i"], ["positions"]),
        node("Gather", ["position_embeddings", "positions"], ["placed"]),
        node("Add", ["tokens", "placed"], ["embedded"]),
        node("LayerNormalization", ["embedded", "gamma", "beta"], ["h0"], axis=-1),
        node("MatMul", ["h0", "wq"], ["q"]),
        node("MatMul", ["h0", "wk"], ["k"]),
        node("MatMul", ["h0", "wv"], ["v"]),
        node("Transpose", ["k"], ["kt"], perm=[0, 2, 1]),
        node("MatMul", ["q", "kt"], ["raw_scores"]),
        node("Mul", ["raw_scores", "scale"], ["scores"]),
        node("Cast", ["attention_mask"], ["mask"], to=TensorProto.FLOAT),
        node("Sub", ["one", "mask"], ["masked_out"]),
        node("Mul", ["masked_out", "neg"], ["mask_bias"]),
        node("Unsqueeze", ["mask_bias", "axis1"], ["mask_rows"]),
        node("Add", ["scores", "mask_rows"], ["biased"]),
        node("Softmax", ["biased"], ["attention"], axis=-1),
        node("MatMul", ["attention", "v"], ["context"]),
        node("MatMul", ["context", "wo"], ["attended"]),
        node("Add", ["attended", "h0"], ["residual1"]),
        node("LayerNormalization", ["residual1", "gamma", "beta"], ["h1"], axis=-1),
        node("MatMul", ["h1", "w1"], ["up"]),
        node("Relu", ["up"], ["activated"]),
        node("MatMul", ["activated", "w2"], ["down"]),
        node("Add", ["down", "h1"], ["residual2"]),
        node("LayerNormalization", ["residual2", "gamma", "beta"], ["last_hidden_state"], axis=-1),
        node("Gather", ["last_hidden_state", "zero_i"], ["cls"], axis=1),
        node("MatMul", ["cls", "wp"], ["pooled"]),
        node("Tanh", ["pooled"], ["pooler_output"]),
    ]
    dims = ["batch", "sequence"]
    graph = helper.make_graph(
        nodes,
        "bert_like",
        [
            helper.make_tensor_value_info("input_ids", TensorProto.INT64, dims),
            helper.make_tensor_value_info("attention_mask", TensorProto.INT64, dims),
        ],
        [
            helper.make_tensor_value_info("last_hidden_state", TensorProto.FLOAT, [*dims, hidden]),
            helper.make_tensor_value_info("pooler_output", TensorProto.FLOAT, ["batch", hidden]),
            *(
                [helper.make_tensor_value_info("attention", TensorProto.FLOAT, [*dims, dims[1]])]
                if attention_output
                else []
            ),
        ],
        initializers,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.checker.check_model(model, full_check=True)
    onnx.save(model, path)
    return path


def string_model(path: Path) -> Path:
    """String tensors in and out: ``tokens`` [batch, 3] (text) -> ``ids`` (a LabelEncoder,
    strings to ints, -1 for unknown words), ``names`` (ints back to canonical strings,
    "<unk>" for unknown) and ``echo`` (the input as it came)."""
    words = ["cat", "dog", "café", "日本", ""]
    graph = helper.make_graph(
        [
            helper.make_node(
                "LabelEncoder",
                ["tokens"],
                ["ids"],
                domain="ai.onnx.ml",
                keys_strings=words,
                values_int64s=list(range(len(words))),
                default_int64=-1,
            ),
            helper.make_node(
                "LabelEncoder",
                ["ids"],
                ["names"],
                domain="ai.onnx.ml",
                keys_int64s=list(range(len(words))),
                values_strings=[w.upper() or "<empty>" for w in words],
                default_string="<unk>",
            ),
            helper.make_node("Identity", ["tokens"], ["echo"]),
        ],
        "strings",
        [helper.make_tensor_value_info("tokens", TensorProto.STRING, ["batch", 3])],
        [
            helper.make_tensor_value_info("ids", TensorProto.INT64, ["batch", 3]),
            helper.make_tensor_value_info("names", TensorProto.STRING, ["batch", 3]),
            helper.make_tensor_value_info("echo", TensorProto.STRING, ["batch", 3]),
        ],
    )
    model = helper.make_model(
        graph, opset_imports=[helper.make_opsetid("", 17), helper.make_opsetid("ai.onnx.ml", 3)]
    )
    model.ir_version = 8
    onnx.checker.check_model(model, full_check=True)
    onnx.save(model, path)
    return path

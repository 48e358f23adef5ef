"""Benchmark: the served runtime against raw ONNX Runtime, on a GPU when there is one.

    .venv/bin/python benchmarks/runtime/bench_gpu.py [--models mlp,resnet] [--duration 10]
        [--connections 16,64,256] [--precision fp32,fp16] [--batch 64]
        [--runtime-arg=--workers=4 ...] [--wrk PATH] [--json results.json]
        [--no-open-loop] [--bound-ms MS] [--open-duration 5]
    .venv/bin/python benchmarks/runtime/bench_gpu.py --small --duration 1 --connections 4

It uses the CUDA execution provider when ONNX Runtime has one, the CPU one otherwise, and
needs no torch: both models are built with ``onnx.helper`` and cached in ``--workdir``.

- ``mlp``: MatMul/Add/Relu 2048-4096x3-1000 and a Softmax.
- ``resnet``: ResNet-50's shape (7x7 stem and max pool, bottleneck stages [3, 4, 6, 3] of
  widths 64-512 with 4x expansion, projection shortcuts, global average pool, a 1000-way
  Gemm, Softmax) on [N, 3, 224, 224] FP32, random He-initialised weights and no batch norm,
  which an inference graph folds into the convolutions anyway.

``--small`` swaps in tiny versions of both (MLP 64-128-10, ResNet widths 8-64 on 3x32x32).

For each model and precision it measures, in order:

1. Raw ONNX Runtime at fixed batch sizes, numpy in and out: the ceiling.
2. ``modeldeploy-runtime serve`` (time to Ready, then single-example inference requests at
   each connection count, with the binary tensor data extension and with JSON).
3. Open loop (``openloop.py``, ``--no-open-loop`` skips it): MLPerf's "server" figure, the
   highest rate of Poisson arrivals whose p99 stays within ``--bound-ms`` (10 ms for the
   MLP, 15 ms for ResNet-50), with its p50, p99 and mean batch, for each body format.  The load
   comes from ``wrk`` (PATH or ``--wrk``) when there is one, else from a built-in asyncio
   generator in a few processes.  Mean batch size comes from the server's ``/metrics``;
   GPU utilisation from ``nvidia-smi`` when it exists.

``--runtime-arg`` (repeatable; write it with ``=`` because its value starts with dashes)
passes a flag through to the runtime after the benchmark's own, so it also overrides them.
The process exits non-zero when a server or a load run failed.  It is not a timed test.
"""

from __future__ import annotations

import argparse
import asyncio
import concurrent.futures
import contextlib
import dataclasses
import hashlib
import itertools
import json
import multiprocessing
import os
import re
import shutil
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import onnxruntime as ort
import openloop
from onnx import TensorProto, helper, numpy_helper

HERE = Path(__file__).resolve().parent
REPO = HERE.parents[1]
WRK_SCRIPT = HERE / "gpu_post.lua"
# The open loop's default p99 bounds, ms: MLPerf-like for a small model and a ResNet-50.
BOUND_MS = {"mlp": 10.0, "resnet": 15.0}
DEFAULT_WORKDIR = Path.home() / ".cache" / "modeldeploy" / "bench-gpu"
OPSET = 17
# Part of every cached model's file name: bump it when a builder changes.
BUILDER_VERSION = 1


@dataclasses.dataclass(frozen=True)
class ResNetShape:
    stem: int
    widths: tuple[int, ...]
    blocks: tuple[int, ...]
    classes: int
    image: int


@dataclasses.dataclass(frozen=True)
class ModelSpec:
    name: str
    shape: tuple[int, ...] | ResNetShape  # MLP layer widths, or the ResNet's shape
    example_shape: tuple[int, ...]
    raw_batches: tuple[int, ...]


def model_specs(small: bool) -> dict[str, ModelSpec]:
    if small:
        mlp: tuple[int, ...] = (64, 128, 10)
        resnet = ResNetShape(
            stem=8, widths=(8, 16, 32, 64), blocks=(1, 1, 1, 1), classes=10, image=32
        )
    else:
        mlp = (2048, 4096, 4096, 4096, 1000)
        resnet = ResNetShape(
            stem=64, widths=(64, 128, 256, 512), blocks=(3, 4, 6, 3), classes=1000, image=224
        )
    return {
        "mlp": ModelSpec("mlp", mlp, (mlp[0],), (1, 8, 16, 32, 64, 128)),
        "resnet": ModelSpec("resnet", resnet, (3, resnet.image, resnet.image), (1, 8, 32, 64)),
    }


def build_mlp(widths: tuple[int, ...]) -> onnx.ModelProto:
    rng = np.random.default_rng(0)
    nodes: list[onnx.NodeProto] = []
    weights: list[onnx.TensorProto] = []
    current = "x"
    for i, (fan_in, fan_out) in enumerate(itertools.pairwise(widths)):
        w = rng.normal(0, np.sqrt(2 / fan_in), (fan_in, fan_out)).astype(np.float32)
        weights += [
            numpy_helper.from_array(w, f"w{i}"),
            numpy_helper.from_array(np.zeros(fan_out, np.float32), f"b{i}"),
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
    return _model(nodes, weights, [widths[0]], widths[-1])


def build_resnet(shape: ResNetShape) -> onnx.ModelProto:
    rng = np.random.default_rng(0)
    nodes: list[onnx.NodeProto] = []
    weights: list[onnx.TensorProto] = []
    ids = itertools.count()

    def conv(x: str, cin: int, cout: int, kernel: int, stride: int = 1, gain: float = 2.0) -> str:
        i = next(ids)
        w = rng.normal(0, np.sqrt(gain / (cin * kernel * kernel)), (cout, cin, kernel, kernel))
        weights.append(numpy_helper.from_array(w.astype(np.float32), f"conv{i}.w"))
        weights.append(numpy_helper.from_array(np.zeros(cout, np.float32), f"conv{i}.b"))
        nodes.append(
            helper.make_node(
                "Conv",
                [x, f"conv{i}.w", f"conv{i}.b"],
                [f"conv{i}"],
                kernel_shape=[kernel, kernel],
                strides=[stride, stride],
                pads=[kernel // 2] * 4,
            )
        )
        return f"conv{i}"

    def op(kind: str, *inputs: str, **attributes: Any) -> str:
        output = f"{kind.lower()}{next(ids)}"
        nodes.append(helper.make_node(kind, list(inputs), [output], **attributes))
        return output

    x = op("Relu", conv("x", 3, shape.stem, 7, 2))
    x = op("MaxPool", x, kernel_shape=[3, 3], strides=[2, 2], pads=[1, 1, 1, 1])
    channels = shape.stem
    for stage, (width, blocks) in enumerate(zip(shape.widths, shape.blocks, strict=True)):
        for block in range(blocks):
            stride = 2 if stage > 0 and block == 0 else 1
            out = width * 4
            branch = op("Relu", conv(x, channels, width, 1))
            branch = op("Relu", conv(branch, width, width, 3, stride))
            # Without batch norm every residual sum would grow the activations; a small
            # last layer per branch keeps them in FP16's range through all 16 blocks.
            branch = conv(branch, width, out, 1, gain=0.1)
            shortcut = (
                x if (stride, channels) == (1, out) else conv(x, channels, out, 1, stride, 1.0)
            )
            x = op("Relu", op("Add", branch, shortcut))
            channels = out
    x = op("Flatten", op("GlobalAveragePool", x), axis=1)
    w = rng.normal(0, np.sqrt(1 / channels), (shape.classes, channels)).astype(np.float32)
    weights += [
        numpy_helper.from_array(w, "fc.w"),
        numpy_helper.from_array(np.zeros(shape.classes, np.float32), "fc.b"),
    ]
    nodes.append(helper.make_node("Gemm", [x, "fc.w", "fc.b"], ["logits"], transB=1))
    nodes.append(helper.make_node("Softmax", ["logits"], ["probabilities"], axis=-1))
    return _model(nodes, weights, [3, shape.image, shape.image], shape.classes)


def _model(
    nodes: list[onnx.NodeProto], weights: list[onnx.TensorProto], example: list[int], classes: int
) -> onnx.ModelProto:
    graph = helper.make_graph(
        nodes,
        "bench",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", *example])],
        [helper.make_tensor_value_info("probabilities", TensorProto.FLOAT, ["batch", classes])],
        weights,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET)])
    model.ir_version = 8  # what ONNX Runtime 1.18, the oldest the runtime accepts, reads
    onnx.checker.check_model(model)
    return model


def cached_model(spec: ModelSpec, workdir: Path) -> Path:
    key = hashlib.sha256(repr((BUILDER_VERSION, spec.shape)).encode()).hexdigest()[:12]
    path = workdir / f"{spec.name}-{key}.onnx"
    if not path.exists():
        model = (
            build_resnet(spec.shape)
            if isinstance(spec.shape, ResNetShape)
            else build_mlp(spec.shape)
        )
        _save(model, path)
    return path


def fp16_model(path: Path) -> Path | None:
    """Float16 weights and compute, FP32 inputs and outputs; None without the converter."""
    try:
        from onnxruntime.transformers.float16 import convert_float_to_float16
    except ImportError:
        return None
    converted = path.with_name(f"{path.stem}-fp16.onnx")
    if not converted.exists():
        _save(convert_float_to_float16(onnx.load(path), keep_io_types=True), converted)
    return converted


def _save(model: onnx.ModelProto, path: Path) -> None:
    # Renamed into place so that an interrupted build is never taken for a cached model.
    partial = path.with_suffix(".partial")
    onnx.save(model, partial)
    partial.replace(path)


def providers_for(device: str) -> list[str]:
    if device == "cuda":
        return ["CUDAExecutionProvider", "CPUExecutionProvider"]
    return ["CPUExecutionProvider"]


def raw_throughput(
    path: Path, device: str, spec: ModelSpec, seconds: float
) -> tuple[dict[int, float], str]:
    """Examples per second of ``session.run`` per fixed batch size, and the provider used."""
    session = ort.InferenceSession(str(path), providers=providers_for(device))
    rng = np.random.default_rng(0)
    rates: dict[int, float] = {}
    for batch in spec.raw_batches:
        x = rng.standard_normal((batch, *spec.example_shape), dtype=np.float32)
        # The first runs of a shape pay for allocation and (CUDA) the cuDNN algorithm search.
        for _ in range(3):
            session.run(None, {"x": x})
        runs, start = 0, time.perf_counter()
        while runs < 3 or time.perf_counter() - start < seconds:
            session.run(None, {"x": x})
            runs += 1
        rates[batch] = runs * batch / (time.perf_counter() - start)
    return rates, session.get_providers()[0]


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port: int = probe.getsockname()[1]
        return port


def runtime_command() -> tuple[list[str], dict[str, str]]:
    """The console script when installed, else the package from this checkout."""
    script = Path(sys.executable).parent / "modeldeploy-runtime"
    if script.exists():
        return [str(script)], {}
    # After any PYTHONPATH given, so that a runtime put there on purpose wins.
    path = os.pathsep.join(filter(None, [os.environ.get("PYTHONPATH"), str(REPO / "runtime")]))
    code = "import sys; from modeldeploy_runtime.cli import main; sys.exit(main())"
    return [sys.executable, "-c", code], {"PYTHONPATH": path}


@dataclasses.dataclass(frozen=True)
class Server:
    base: str
    ready_s: float
    log: Path


@contextlib.contextmanager
def serving(args: list[str], log: Path, timeout: float) -> Iterator[Server]:
    command, env = runtime_command()
    http_port = free_port()
    flags = ["--http-port", str(http_port), "--grpc-port", str(free_port())]
    base = f"http://127.0.0.1:{http_port}"
    env = os.environ | env | {"MODELDEPLOY_HOST": "127.0.0.1"}
    with log.open("wb") as output:
        started = time.perf_counter()
        # Its own process group, so worker processes it may start are stopped with it.
        process = subprocess.Popen(
            [*command, "serve", *flags, *args],
            env=env,
            stdout=output,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        try:
            while not _ready(base):
                if process.poll() is not None:
                    raise RuntimeError(f"runtime exited with {process.returncode}: {_tail(log)}")
                if time.perf_counter() - started > timeout:
                    raise RuntimeError(f"runtime not ready after {timeout:.0f} s: {_tail(log)}")
                time.sleep(0.05)
            yield Server(base, time.perf_counter() - started, log)
        finally:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(process.pid, 15)
            try:
                process.wait(30)
            except subprocess.TimeoutExpired:
                os.killpg(process.pid, 9)
                process.wait()


def _ready(base: str) -> bool:
    try:
        # Any status but 2xx raises HTTPError, an OSError: 503 while the model warms up.
        urllib.request.urlopen(f"{base}/v2/health/ready", timeout=1).close()
    except OSError:
        return False
    return True


def _tail(log: Path) -> str:
    return log.read_text(errors="replace")[-1500:]


def request_body(spec: ModelSpec, binary: bool) -> tuple[bytes, dict[str, str]]:
    """One single-example v2 inference request: its body and headers."""
    data = np.random.default_rng(1).standard_normal((1, *spec.example_shape), dtype=np.float32)
    tensor: dict[str, Any] = {"name": "x", "shape": list(data.shape), "datatype": "FP32"}
    if not binary:
        # Four decimals keep the JSON body about half as long as full floats.
        tensor["data"] = data.round(4).ravel().tolist()
        return json.dumps({"inputs": [tensor]}).encode(), {"Content-Type": "application/json"}
    raw = data.tobytes()
    tensor["parameters"] = {"binary_data_size": len(raw)}
    header = json.dumps({"inputs": [tensor], "parameters": {"binary_data_output": True}}).encode()
    headers = {
        "Content-Type": "application/octet-stream",
        "Inference-Header-Content-Length": str(len(header)),
    }
    return header + raw, headers


def check_request(url: str, body: bytes, headers: dict[str, str]) -> None:
    """One request before the load, so that a body the server rejects fails with its reason."""
    request = urllib.request.Request(url, data=body, headers=headers, method="POST")
    try:
        with urllib.request.urlopen(request, timeout=120) as response:
            response.read()
    except urllib.error.HTTPError as error:
        raise RuntimeError(f"{url}: {error.code} {error.read()[:300]!r}") from None


@dataclasses.dataclass(frozen=True)
class Load:
    rps: float
    p50_ms: float
    p99_ms: float
    non_2xx: int
    socket_errors: int


def wrk_load(
    wrk: str,
    url: str,
    body: Path,
    headers: dict[str, str],
    connections: int,
    duration: int,
    threads: int,
) -> Load:
    command = [
        wrk,
        f"-t{min(threads, connections)}",
        f"-c{connections}",
        f"-d{duration}s",
        "--timeout",
        "30s",
        "--latency",
        "-s",
        str(WRK_SCRIPT),
        url,
        "--",
        str(body),
        *(f"{name}: {value}" for name, value in headers.items()),
    ]
    out = subprocess.run(command, capture_output=True, text=True, check=True).stdout

    def latency_ms(percent: int) -> float:
        match = re.search(rf"^\s+{percent}%\s+([\d.]+)(us|ms|s|m)\s*$", out, re.M)
        if match is None:
            raise RuntimeError(f"no {percent}% latency in wrk's output:\n{out}")
        return float(match[1]) * {"us": 1e-3, "ms": 1.0, "s": 1e3, "m": 6e4}[match[2]]

    rps = re.search(r"Requests/sec:\s+([\d.]+)", out)
    if rps is None:
        raise RuntimeError(f"no Requests/sec in wrk's output:\n{out}")
    non_2xx = re.search(r"Non-2xx or 3xx responses: (\d+)", out)
    socket_errors = re.search(r"Socket errors: (.*)", out)
    return Load(
        rps=float(rps[1]),
        p50_ms=latency_ms(50),
        p99_ms=latency_ms(99),
        non_2xx=int(non_2xx[1]) if non_2xx else 0,
        socket_errors=sum(map(int, re.findall(r"\d+", socket_errors[1]))) if socket_errors else 0,
    )


def builtin_load(
    pool: concurrent.futures.Executor,
    processes: int,
    url: str,
    body: bytes,
    headers: dict[str, str],
    connections: int,
    duration: int,
) -> Load:
    """Closed-loop load like wrk's: each connection sends its next request on a response."""
    processes = min(processes, connections)
    shares = [len(part) for part in np.array_split(np.arange(connections), processes)]
    futures = [pool.submit(_load_share, url, body, headers, share, duration) for share in shares]
    latencies: list[float] = []
    rps, non_2xx, socket_errors = 0.0, 0, 0
    for future in futures:
        share_latencies, share_non_2xx, share_errors, elapsed = future.result()
        latencies += share_latencies
        rps += (len(share_latencies) + share_errors) / elapsed
        non_2xx += share_non_2xx
        socket_errors += share_errors
    p50, p99 = np.percentile(latencies, [50, 99]) * 1e3 if latencies else (0.0, 0.0)
    return Load(rps, float(p50), float(p99), non_2xx, socket_errors)


def _load_share(
    url: str, body: bytes, headers: dict[str, str], connections: int, duration: int
) -> tuple[list[float], int, int, float]:
    """Runs in a load process: latencies (s), non-2xx count, failed requests, seconds."""
    try:
        import uvloop
    except ImportError:
        loop_factory = None
    else:
        loop_factory = uvloop.new_event_loop
    with asyncio.Runner(loop_factory=loop_factory) as runner:
        return runner.run(_drive(url, body, headers, connections, duration))


async def _drive(
    url: str, body: bytes, headers: dict[str, str], connections: int, duration: int
) -> tuple[list[float], int, int, float]:
    import aiohttp  # only the load processes need it

    latencies: list[float] = []
    counts = {"non_2xx": 0, "errors": 0}
    start = time.perf_counter()
    deadline = start + duration

    async def connection(session: aiohttp.ClientSession) -> None:
        while (sent := time.perf_counter()) < deadline:
            try:
                async with session.post(url, data=body, headers=headers) as response:
                    await response.read()
            except (aiohttp.ClientError, TimeoutError):
                counts["errors"] += 1
                continue
            latencies.append(time.perf_counter() - sent)
            counts["non_2xx"] += response.status >= 300

    connector = aiohttp.TCPConnector(limit=connections)
    timeout = aiohttp.ClientTimeout(total=30)
    async with aiohttp.ClientSession(connector=connector, timeout=timeout) as session:
        await asyncio.gather(*(connection(session) for _ in range(connections)))
    return latencies, counts["non_2xx"], counts["errors"], time.perf_counter() - start


class GpuSampler:
    """Mean GPU utilisation over a ``with`` block, from ``nvidia-smi``; None without one."""

    def __init__(self) -> None:
        self._samples: list[float] = []
        self._process: subprocess.Popen[str] | None = None
        self._reader: threading.Thread | None = None

    def __enter__(self) -> GpuSampler:
        nvidia_smi = shutil.which("nvidia-smi")
        if nvidia_smi is None:
            return self
        # ONNX Runtime's device 0 is the first of CUDA_VISIBLE_DEVICES; -i takes an index or UUID.
        device = os.environ.get("CUDA_VISIBLE_DEVICES", "0").split(",")[0] or "0"
        query = "--query-gpu=utilization.gpu"
        command = [nvidia_smi, query, "--format=csv,noheader,nounits", "-i", device, "-lms", "200"]
        self._process = subprocess.Popen(
            command, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True
        )
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()
        return self

    def _read(self) -> None:
        assert self._process is not None and self._process.stdout is not None
        for line in self._process.stdout:
            with contextlib.suppress(ValueError):  # "[N/A]" on devices that do not report it
                self._samples.append(float(line))

    def __exit__(self, *_: object) -> None:
        if self._process is not None:
            self._process.terminate()
            self._process.wait()
        if self._reader is not None:
            self._reader.join()

    @property
    def mean(self) -> float | None:
        return sum(self._samples) / len(self._samples) if self._samples else None


def batch_counters(base: str) -> tuple[float, float]:
    """``modeldeploy_batch_size`` histogram's sum and count, over every label set."""
    with urllib.request.urlopen(f"{base}/metrics", timeout=10) as response:
        text = response.read().decode()
    totals = {"modeldeploy_batch_size_sum": 0.0, "modeldeploy_batch_size_count": 0.0}
    for line in text.splitlines():
        name = re.split(r"[{ ]", line, maxsplit=1)[0]
        if name in totals:
            totals[name] += float(line.rsplit(" ", 1)[1])
    return totals["modeldeploy_batch_size_sum"], totals["modeldeploy_batch_size_count"]


@dataclasses.dataclass(frozen=True)
class RawRow:
    model: str
    precision: str
    provider: str
    batch: int
    examples_per_s: float


@dataclasses.dataclass(frozen=True)
class ReadyRow:
    model: str
    precision: str
    seconds: float


@dataclasses.dataclass(frozen=True)
class ServedRow:
    model: str
    precision: str
    body: str
    connections: int
    rps: float
    mean_batch: float | None
    p50_ms: float
    p99_ms: float
    served_over_raw: float | None
    non_2xx: int
    socket_errors: int
    gpu_util: float | None


@dataclasses.dataclass(frozen=True)
class PoissonRow:
    """MLPerf's server figure: the highest Poisson rate whose p99 stayed within the bound."""

    model: str
    precision: str
    body: str
    bound_ms: float
    max_rate: float
    p50_ms: float | None  # at that rate
    p99_ms: float | None
    mean_batch: float | None
    trials: list[tuple[float, float]]  # (rate, p99 ms) of every run of the search


@dataclasses.dataclass
class Report:
    environment: dict[str, Any]
    raw: list[RawRow] = dataclasses.field(default_factory=list)
    ready: list[ReadyRow] = dataclasses.field(default_factory=list)
    served: list[ServedRow] = dataclasses.field(default_factory=list)
    poisson: list[PoissonRow] = dataclasses.field(default_factory=list)
    notes: list[str] = dataclasses.field(default_factory=list)
    failures: list[str] = dataclasses.field(default_factory=list)

    def best_raw(self, model: str, precision: str, max_batch: int) -> RawRow | None:
        """The fastest raw batch size the server may use, the ceiling it is held against."""
        rows = [r for r in self.raw if (r.model, r.precision) == (model, precision)]
        usable = [r for r in rows if r.batch <= max_batch] or rows
        return max(usable, key=lambda r: r.examples_per_s, default=None)


class Bench:
    """Runs each model and precision: raw ceiling, then the served runtime under load."""

    def __init__(self, args: argparse.Namespace, device: str, report: Report) -> None:
        self.args = args
        self.device = device
        self.report = report
        self.wrk: str | None = report.environment["wrk"]
        self._pool: concurrent.futures.ProcessPoolExecutor | None = None

    def close(self) -> None:
        if self._pool is not None:
            self._pool.shutdown(cancel_futures=True)

    def run(self, spec: ModelSpec, path: Path, precision: str) -> None:
        self._raw(spec, path, precision)
        args = self.args
        flags = [
            "--model-path",
            str(path),
            "--model-name",
            spec.name,
            "--max-batch-size",
            str(args.batch),
            "--device",
            self.device,
            *(["--quantization", "fp16"] if precision == "fp16" else []),
            *args.runtime_arg,
        ]
        log = args.workdir / "logs" / f"{spec.name}-{precision}.log"
        log.parent.mkdir(exist_ok=True)
        try:
            with serving(flags, log, args.ready_timeout) as server:
                self.report.ready.append(ReadyRow(spec.name, precision, server.ready_s))
                self._served(spec, precision, server)
        except Exception as error:  # reported, and the other models still run
            detail = error.stderr if isinstance(error, subprocess.CalledProcessError) else ""
            self.report.failures.append(f"{spec.name}/{precision} served: {error} {detail}")

    def _raw(self, spec: ModelSpec, path: Path, precision: str) -> None:
        if precision == "fp16":
            converted = fp16_model(path)
            if converted is None:
                self.report.notes.append(
                    f"{spec.name}: raw fp16 skipped, onnxruntime.transformers is not importable"
                )
                return
            path = converted
        try:
            rates, provider = raw_throughput(path, self.device, spec, self.args.raw_duration)
        except Exception as error:  # e.g. a kernel the CPU provider lacks in FP16
            self.report.notes.append(f"{spec.name}/{precision}: raw run failed: {error}")
            return
        if self.device == "cuda" and provider != "CUDAExecutionProvider":
            self.report.notes.append(f"{spec.name}/{precision}: raw ran on {provider}, not CUDA")
        for batch, rate in rates.items():
            self.report.raw.append(RawRow(spec.name, precision, provider, batch, rate))

    def _served(self, spec: ModelSpec, precision: str, server: Server) -> None:
        args = self.args
        url = f"{server.base}/v2/models/{spec.name}/infer"
        ceiling = self.report.best_raw(spec.name, precision, args.batch)
        for body_format in args.formats:
            body, headers = request_body(spec, binary=body_format == "binary")
            body_file = args.workdir / f"{spec.name}-{body_format}.body"
            body_file.write_bytes(body)
            check_request(url, body, headers)
            if args.warmup:
                self._load(url, body, body_file, headers, max(args.connections), args.warmup)
            for connections in args.connections:
                before = batch_counters(server.base)
                with GpuSampler() as gpu:
                    load = self._load(url, body, body_file, headers, connections, args.duration)
                after = batch_counters(server.base)
                batches = after[1] - before[1]
                self.report.served.append(
                    ServedRow(
                        model=spec.name,
                        precision=precision,
                        body=body_format,
                        connections=connections,
                        rps=load.rps,
                        mean_batch=(after[0] - before[0]) / batches if batches else None,
                        p50_ms=load.p50_ms,
                        p99_ms=load.p99_ms,
                        served_over_raw=load.rps / ceiling.examples_per_s if ceiling else None,
                        non_2xx=load.non_2xx,
                        socket_errors=load.socket_errors,
                        gpu_util=gpu.mean,
                    )
                )
            if args.open_loop:
                self._poisson(spec, precision, server, body_format, body, headers)

    def _poisson(
        self,
        spec: ModelSpec,
        precision: str,
        server: Server,
        body_format: str,
        body: bytes,
        headers: dict[str, str],
    ) -> None:
        """Open loop: the highest Poisson rate whose p99 stays within the model's bound."""
        args = self.args
        url = f"{server.base}/v2/models/{spec.name}/infer"
        bound = args.bound_ms if args.bound_ms is not None else BOUND_MS[spec.name]
        batches: dict[float, float | None] = {}

        def measure(rate: float) -> openloop.Result:
            before = batch_counters(server.base)
            result = openloop.measure(
                url,
                body,
                headers,
                rate,
                duration=args.open_duration,
                warmup=min(1.0, args.open_duration),
                processes=args.load_threads,
            )
            after = batch_counters(server.base)
            count = after[1] - before[1]
            batches[rate] = (after[0] - before[0]) / count if count else None
            return result

        best, trials = openloop.max_rate(measure, bound, ceiling=args.open_ceiling)
        at_best = next((t for t in trials if t.rate == best and t.within(bound)), None)
        self.report.poisson.append(
            PoissonRow(
                model=spec.name,
                precision=precision,
                body=body_format,
                bound_ms=bound,
                max_rate=best,
                p50_ms=at_best.p50_ms if at_best else None,
                p99_ms=at_best.p99_ms if at_best else None,
                mean_batch=batches.get(best),
                trials=[(t.rate, t.p99_ms) for t in trials],
            )
        )

    def _load(
        self,
        url: str,
        body: bytes,
        body_file: Path,
        headers: dict[str, str],
        connections: int,
        duration: int,
    ) -> Load:
        threads = self.args.load_threads
        if self.wrk is not None:
            return wrk_load(self.wrk, url, body_file, headers, connections, duration, threads)
        if self._pool is None:
            # Spawned, not forked: the parent may hold a CUDA context, which forking breaks.
            context = multiprocessing.get_context("spawn")
            self._pool = concurrent.futures.ProcessPoolExecutor(threads, mp_context=context)
        return builtin_load(self._pool, threads, url, body, headers, connections, duration)


def print_table(header: tuple[str, ...], rows: list[tuple[str, ...]]) -> None:
    widths = [max(len(row[i]) for row in [header, *rows]) for i in range(len(header))]
    for row in [header, tuple("-" * w for w in widths), *rows]:
        print("  ".join(cell.rjust(w) for cell, w in zip(row, widths, strict=True)).rstrip())
    print()


def print_report(report: Report, max_batch: int) -> None:
    environment = report.environment
    print(
        f"device {environment['device']} ({environment['gpu'] or 'no GPU'}), "
        f"onnxruntime {environment['onnxruntime']}, {environment['cpus']} CPUs, "
        f"load from {environment['wrk'] or 'the built-in generator'}, "
        f"served max batch {max_batch}\n"
    )
    print_table(
        ("model", "precision", "provider", "batch", "examples/s"),
        [
            (r.model, r.precision, r.provider, str(r.batch), f"{r.examples_per_s:,.0f}")
            for r in report.raw
        ],
    )
    print_table(
        ("model", "precision", "time to Ready s"),
        [(r.model, r.precision, f"{r.seconds:.2f}") for r in report.ready],
    )

    def optional(value: float | None, spec: str) -> str:
        return "-" if value is None else format(value, spec)

    print_table(
        (
            "model",
            "precision",
            "body",
            "conns",
            "req/s",
            "mean batch",
            "p50 ms",
            "p99 ms",
            "served/raw",
            "errors",
            "GPU %",
        ),
        [
            (
                r.model,
                r.precision,
                r.body,
                str(r.connections),
                f"{r.rps:,.0f}",
                optional(r.mean_batch, ".1f"),
                f"{r.p50_ms:.2f}",
                f"{r.p99_ms:.2f}",
                optional(r.served_over_raw, ".1%"),
                str(r.non_2xx + r.socket_errors),
                optional(r.gpu_util, ".0f"),
            )
            for r in report.served
        ],
    )
    if report.poisson:
        print("open loop: Poisson arrivals, the highest rate whose p99 stays within the bound")
        print_table(
            (
                "model",
                "precision",
                "body",
                "p99 bound ms",
                "max req/s",
                "p50 ms",
                "p99 ms",
                "mean batch",
            ),
            [
                (
                    r.model,
                    r.precision,
                    r.body,
                    f"{r.bound_ms:g}",
                    f"{r.max_rate:,.0f}",
                    optional(r.p50_ms, ".2f"),
                    optional(r.p99_ms, ".2f"),
                    optional(r.mean_batch, ".1f"),
                )
                for r in report.poisson
            ],
        )
    print(
        "served/raw: served req/s over raw examples/s at the fastest raw batch size up to the "
        "served max batch; errors: non-2xx responses plus socket errors"
    )
    for note in report.notes:
        print("note:", note)
    for failure in report.failures:
        print("FAILED:", failure)


def _csv(convert: Callable[[str], Any]) -> Callable[[str], list[Any]]:
    return lambda text: [convert(item) for item in text.split(",") if item]


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--models", type=_csv(str), default=["mlp", "resnet"], help="mlp,resnet")
    parser.add_argument("--small", action="store_true", help="tiny models, for a smoke run")
    parser.add_argument("--precision", type=_csv(str), default=["fp32"], help="fp32,fp16")
    parser.add_argument("--formats", type=_csv(str), default=["binary", "json"], help="binary,json")
    parser.add_argument("--connections", type=_csv(int), default=[16, 64, 256])
    parser.add_argument("--duration", type=int, default=10, help="seconds per load cell")
    parser.add_argument("--warmup", type=int, help="seconds of load before the cells (2)")
    parser.add_argument(
        "--open-loop",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="also find the highest Poisson rate within the p99 bound (MLPerf's server)",
    )
    parser.add_argument(
        "--bound-ms", type=float, help="the open loop's p99 bound (default mlp 10, resnet 15)"
    )
    parser.add_argument("--open-duration", type=float, default=5, help="seconds per Poisson run")
    parser.add_argument("--open-ceiling", type=float, default=64_000, help="highest rate tried")
    parser.add_argument("--raw-duration", type=float, default=2.0, help="seconds per raw batch")
    parser.add_argument("--batch", type=int, default=64, help="the runtime's --max-batch-size")
    parser.add_argument("--device", choices=["auto", "cuda", "cpu"], default="auto")
    parser.add_argument(
        "--runtime-arg",
        action="append",
        default=[],
        metavar="FLAG",
        help="passed to `modeldeploy-runtime serve`, e.g. --runtime-arg=--workers=4",
    )
    parser.add_argument("--wrk", help="the wrk binary (default: wrk on PATH)")
    parser.add_argument("--load", choices=["auto", "wrk", "builtin"], default="auto")
    parser.add_argument(
        "--load-threads",
        type=int,
        default=max(1, min(8, (os.cpu_count() or 2) // 2)),
        help="wrk threads, or built-in load processes",
    )
    parser.add_argument("--ready-timeout", type=float, default=600, help="seconds")
    parser.add_argument("--workdir", type=Path, default=DEFAULT_WORKDIR, help="model cache, logs")
    parser.add_argument("--json", type=Path, help="also write the results here")
    args = parser.parse_args(argv)
    for name, allowed in (
        ("models", {"mlp", "resnet"}),
        ("precision", {"fp32", "fp16"}),
        ("formats", {"binary", "json"}),
    ):
        unknown = set(getattr(args, name)) - allowed
        if unknown:
            parser.error(f"--{name}: unknown {', '.join(sorted(unknown))}")
    if args.warmup is None:
        args.warmup = min(2, args.duration)
    return args


def gpu_name() -> str | None:
    nvidia_smi = shutil.which("nvidia-smi")
    if nvidia_smi is None:
        return None
    command = [nvidia_smi, "--query-gpu=name", "--format=csv,noheader"]
    result = subprocess.run(command, capture_output=True, text=True)
    return (
        result.stdout.splitlines()[0].strip() if result.returncode == 0 and result.stdout else None
    )


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    cuda = "CUDAExecutionProvider" in ort.get_available_providers()
    device = args.device if args.device != "auto" else "cuda" if cuda else "cpu"
    wrk = None
    if args.load != "builtin":
        wrk = args.wrk or shutil.which("wrk")
        if wrk is None and args.load == "wrk":
            print("--load wrk: no wrk on PATH and no --wrk given", file=sys.stderr)
            return 2
    args.workdir.mkdir(parents=True, exist_ok=True)
    report = Report(
        environment={
            "device": device,
            "gpu": gpu_name(),
            "onnxruntime": ort.__version__,
            "providers": ort.get_available_providers(),
            "cpus": os.cpu_count(),
            "python": sys.version.split()[0],
            "wrk": wrk,
            "arguments": sys.argv[1:] if argv is None else argv,
        }
    )
    specs = model_specs(args.small)
    bench = Bench(args, device, report)
    try:
        for name in args.models:
            path = cached_model(specs[name], args.workdir)
            for precision in args.precision:
                bench.run(specs[name], path, precision)
    finally:
        bench.close()
    print_report(report, args.batch)
    if args.json:
        args.json.write_text(json.dumps(dataclasses.asdict(report), indent=2))
    return 1 if report.failures else 0


if __name__ == "__main__":
    sys.exit(main())

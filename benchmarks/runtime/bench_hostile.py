"""Benchmark: do the probes keep answering while hostile or heavy bodies flood the server?

    .venv/bin/python benchmarks/runtime/bench_hostile.py [--duration 10] [--senders 4]
        [--baseline PATH_TO_OTHER_CHECKOUT]

For each flood it starts ``modeldeploy-runtime serve`` (one process, as a CPU pod runs it)
on a small model, lets ``--senders`` threads post the flood's body back to back, and
probes ``/v2/health/live`` every 50 ms meanwhile.  It prints, per flood, the probe
latency (p50, p99, worst; the kubelet gives up after 1 s) and what the flood's requests
got.  ``--baseline`` runs the same floods against the runtime of another checkout (its
``runtime/`` folder first on PYTHONPATH), side by side.  Not a timed test.

Floods:
- ``many-inputs``: 11 MB of JSON holding 200,000 tiny inputs, to any model name;
- ``big-json``: a valid 8 x 600,000 FP32 tensor as a JSON list (about 35 MB);
- ``big-binary``: the same tensor with the binary tensor extension (19 MB);
- ``bad-shape``: a binary body whose declared shape overflows (``[0, 2**63]``).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.request
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

HERE = Path(__file__).resolve().parent
REPO = HERE.parents[1]
WIDTH = 600_000
HEADER = "Inference-Header-Content-Length"


def build_model(path: Path) -> Path:
    """A wide input reduced to one number per example: decoding dominates, as in a flood."""
    weight = numpy_helper.from_array(np.full((WIDTH, 1), 1e-6, np.float32), "w")
    graph = helper.make_graph(
        [helper.make_node("MatMul", ["x", "w"], ["y"])],
        "wide",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", WIDTH])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", 1])],
        [weight],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.save(model, path)
    return path


def floods() -> dict[str, tuple[bytes, dict[str, str]]]:
    rows = np.random.default_rng(0).standard_normal((8, WIDTH)).astype(np.float32)
    tensor = {"name": "x", "datatype": "FP32", "shape": [8, WIDTH]}
    binary_header = json.dumps(
        {"inputs": [tensor | {"parameters": {"binary_data_size": rows.nbytes}}]}
    ).encode()
    bad_header = json.dumps(
        {
            "inputs": [
                {
                    "name": "x",
                    "datatype": "FP32",
                    "shape": [0, 2**63],
                    "parameters": {"binary_data_size": 16},
                }
            ]
        }
    ).encode()
    return {
        "many-inputs": (
            json.dumps(
                {
                    "inputs": [
                        {"name": f"i{i}", "datatype": "FP32", "shape": [1], "data": [0]}
                        for i in range(200_000)
                    ]
                }
            ).encode(),
            {},
        ),
        "big-json": (
            json.dumps(
                {"inputs": [tensor | {"data": rows.astype(np.float64).round(3).ravel().tolist()}]}
            ).encode(),
            {},
        ),
        "big-binary": (binary_header + rows.tobytes(), {HEADER: str(len(binary_header))}),
        "bad-shape": (bad_header + b"\0" * 16, {HEADER: str(len(bad_header))}),
    }


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port: int = probe.getsockname()[1]
        return port


@contextlib.contextmanager
def serving(model: Path, pythonpath: Path | None) -> Iterator[str]:
    port = free_port()
    env = os.environ | {"MODELDEPLOY_HOST": "127.0.0.1", "MODELDEPLOY_DRAIN_SECONDS": "0"}
    if pythonpath is not None:
        env["PYTHONPATH"] = str(pythonpath / "runtime")
    code = "import sys; from modeldeploy_runtime.cli import main; sys.exit(main())"
    process = subprocess.Popen(
        [
            sys.executable,
            "-c",
            code,
            "serve",
            f"--model-path={model}",
            "--model-name=wide",
            f"--http-port={port}",
            f"--grpc-port={free_port()}",
            "--max-batch-size=8",
        ],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 120
        while True:
            with contextlib.suppress(OSError):
                urllib.request.urlopen(f"{base}/v2/health/ready", timeout=1).close()
                break
            if time.monotonic() > deadline or process.poll() is not None:
                raise RuntimeError("the runtime did not become ready")
            time.sleep(0.1)
        yield base
    finally:
        process.terminate()
        process.wait(60)


def flood(
    base: str, body: bytes, headers: dict[str, str], senders: int, duration: float
) -> tuple[list[float], Counter[str]]:
    stop = threading.Event()
    outcomes: Counter[str] = Counter()
    probes: list[float] = []

    def send() -> None:
        while not stop.is_set():
            request = urllib.request.Request(
                f"{base}/v2/models/wide/infer", data=body, headers=headers
            )
            try:
                with urllib.request.urlopen(request, timeout=60) as response:
                    outcomes[str(response.status)] += 1
            except urllib.error.HTTPError as error:
                outcomes[str(error.code)] += 1
            except OSError as error:
                outcomes[type(error).__name__] += 1

    def probe() -> None:
        while not stop.is_set():
            started = time.perf_counter()
            try:
                urllib.request.urlopen(f"{base}/v2/health/live", timeout=5).close()
                probes.append(time.perf_counter() - started)
            except OSError:
                probes.append(float("inf"))
            time.sleep(0.05)

    threads = [threading.Thread(target=send) for _ in range(senders)]
    threads.append(threading.Thread(target=probe))
    for thread in threads:
        thread.start()
    time.sleep(duration)
    stop.set()
    for thread in threads:
        thread.join()
    return probes, outcomes


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--duration", type=float, default=10)
    parser.add_argument("--senders", type=int, default=4)
    parser.add_argument("--baseline", type=Path, help="another checkout, run side by side")
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="modeldeploy-hostile-"))
    model = build_model(work / "wide.onnx")
    bodies = floods()
    runtimes: list[tuple[str, Path | None]] = [("this checkout", None)]
    if args.baseline:
        runtimes.append((f"baseline {args.baseline}", args.baseline))
    print(
        f"{'runtime':<28} {'flood':<12} {'MB':>5} {'probe p50':>10} {'p99':>8} "
        f"{'worst':>8}  flood requests got"
    )
    for label, pythonpath in runtimes:
        for name, (body, headers) in bodies.items():
            with serving(model, pythonpath) as base:
                probes, outcomes = flood(base, body, headers, args.senders, args.duration)
            ms = sorted(p * 1000 for p in probes)
            p99 = ms[min(len(ms) - 1, int(len(ms) * 0.99))]
            got = ", ".join(f"{k} x{v}" for k, v in sorted(outcomes.items()))
            print(
                f"{label:<28} {name:<12} {len(body) / 1e6:>5.1f} "
                f"{statistics.median(ms):>8.1f}ms {p99:>6.1f}ms {ms[-1]:>6.1f}ms  {got}"
            )


if __name__ == "__main__":
    main()

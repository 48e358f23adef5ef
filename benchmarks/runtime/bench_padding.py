"""Benchmark: variable-length batching (``--padding``) against unpadded, on a BERT-shaped model.

    nice .venv/bin/python benchmarks/runtime/bench_padding.py [--duration 10] [--hidden 64]

Run from the repository root with the project's virtualenv.  The model is the tests' BERT-shaped
encoder (``tests/runtime/runtime_fixtures.bert_like``: embeddings, one masked attention
block, a feed-forward block, per-token and pooled outputs).  Every request is one sequence
whose length is drawn uniformly from 8-128 tokens, sent as binary tensors over HTTP by a
closed loop of ``--connections`` concurrent clients.  The runtime runs three times, each
time pinned to core 0 with one inference thread (the client gets core 1): unpadded
(requests of one length only share a batch: in practice batch size 1), padded to each
batch's longest request, and padded to length buckets.  Prints one table: requests/s, requests
per CPU-second of the server (which other load on the core skews least), latency p50/p99 and
the mean batch size the server's own histogram saw.  With ``--repeat N`` every cell runs N
times, in rounds, and keeps its best.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import aiohttp
import numpy as np

HERE = Path(__file__).resolve().parent
REPO = HERE.parents[1]
sys.path.insert(0, str(REPO / "tests" / "runtime"))

import runtime_fixtures  # noqa: E402  (the tests' model builder, one definition of the model)

SERVER_CORE, LOAD_CORE = "0", "1"
SHORTEST, LONGEST = 8, 128
PADDED = {"input_ids": {"axis": 1}, "attention_mask": {"axis": 1, "value": 0}}
MODES = {
    "unpadded": None,
    "padded to the longest": {"inputs": PADDED},
    "padded to buckets 32/64/96/128": {"inputs": PADDED, "buckets": [32, 64, 96, 128]},
}


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port: int = probe.getsockname()[1]
        return port


@contextlib.contextmanager
def runtime(
    model: Path, padding: dict[str, object] | None, workdir: Path
) -> Iterator[tuple[int, int]]:
    """The runtime's console script on core 0, one inference thread; yields its HTTP port
    and its pid (taskset execs it)."""
    http_port, grpc_port = free_port(), free_port()
    command = [
        "taskset",
        "-c",
        SERVER_CORE,
        str(Path(sys.executable).parent / "modeldeploy-runtime"),
        "serve",
        f"--model-path={model}",
        "--model-name=bert",
        "--threads=1",
        "--max-batch-size=32",
        f"--http-port={http_port}",
        f"--grpc-port={grpc_port}",
    ]
    if padding is not None:
        command.append(f"--padding={json.dumps(padding)}")
    log = (workdir / f"server-{http_port}.log").open("w")
    process = subprocess.Popen(
        command,
        env=os.environ | {"MODELDEPLOY_HOST": "127.0.0.1", "MODELDEPLOY_CACHE_DIR": str(workdir)},
        stdout=log,
        stderr=subprocess.STDOUT,
    )
    try:
        deadline = time.monotonic() + 120
        while True:
            if process.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"the runtime did not start; see {log.name}")
            with contextlib.suppress(OSError):
                urllib.request.urlopen(f"http://127.0.0.1:{http_port}/v2/health/ready", timeout=1)
                break
            time.sleep(0.2)
        yield http_port, process.pid
    finally:
        process.terminate()
        process.wait(60)
        log.close()


def bodies(count: int, seed: int = 0) -> list[tuple[bytes, dict[str, str]]]:
    """Binary v2 requests of one sequence each, lengths uniform in [SHORTEST, LONGEST]."""
    rng = np.random.default_rng(seed)
    made = []
    for _ in range(count):
        length = int(rng.integers(SHORTEST, LONGEST + 1))
        ids = rng.integers(1, 1000, (1, length)).astype(np.int64)
        mask = np.ones_like(ids)
        header = json.dumps(
            {
                "inputs": [
                    {
                        "name": name,
                        "datatype": "INT64",
                        "shape": [1, length],
                        "parameters": {"binary_data_size": array.nbytes},
                    }
                    for name, array in (("input_ids", ids), ("attention_mask", mask))
                ],
                "parameters": {"binary_data_output": True},
            }
        ).encode()
        headers = {
            "Inference-Header-Content-Length": str(len(header)),
            "Content-Type": "application/octet-stream",
        }
        made.append((header + ids.tobytes() + mask.tobytes(), headers))
    return made


def cpu_seconds(pid: int) -> float:
    """User + system CPU time of a process, all its threads."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


async def load(
    port: int, pid: int, connections: int, seconds: float, warmup: float
) -> tuple[float, float, list[float]]:
    """Closed loop: each connection sends its next request when the last one is answered."""
    url = f"http://127.0.0.1:{port}/v2/models/bert/infer"
    requests = bodies(512)
    latencies: list[float] = []
    failures = 0

    async def client(index: int, session: aiohttp.ClientSession, until: float) -> None:
        nonlocal failures
        turn = index
        while time.perf_counter() < until:
            body, headers = requests[turn % len(requests)]
            turn += connections
            started = time.perf_counter()
            async with session.post(url, data=body, headers=headers) as response:
                await response.read()
                if response.status != 200:
                    failures += 1
            latencies.append(time.perf_counter() - started)

    connector = aiohttp.TCPConnector(limit=connections)
    async with aiohttp.ClientSession(connector=connector) as session:
        warm = time.perf_counter() + warmup
        await asyncio.gather(*(client(i, session, warm) for i in range(connections)))
        latencies.clear()
        started, cpu = time.perf_counter(), cpu_seconds(pid)
        until = started + seconds
        await asyncio.gather(*(client(i, session, until) for i in range(connections)))
        elapsed, cpu = time.perf_counter() - started, cpu_seconds(pid) - cpu
    if failures:
        raise RuntimeError(f"{failures} requests failed")
    return len(latencies) / elapsed, len(latencies) / cpu, latencies


def mean_batch(port: int) -> float:
    text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics").read().decode()
    values = {}
    for line in text.splitlines():
        for name in ("modeldeploy_batch_size_sum", "modeldeploy_batch_size_count"):
            if line.startswith(name):
                values[name] = values.get(name, 0.0) + float(line.rsplit(" ", 1)[1])
    return values["modeldeploy_batch_size_sum"] / max(values["modeldeploy_batch_size_count"], 1)


def measure(
    port: int, pid: int, connections: int, seconds: float, warmup: float
) -> dict[str, float]:
    os.sched_setaffinity(0, {int(LOAD_CORE)})
    rate, per_cpu_second, latencies = asyncio.run(load(port, pid, connections, seconds, warmup))
    return {
        "rps": rate,
        "per_cpu_s": per_cpu_second,
        "p50": float(np.percentile(latencies, 50)) * 1e3,
        "p99": float(np.percentile(latencies, 99)) * 1e3,
        "batch": mean_batch(port),
    }


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--duration", type=float, default=10, help="seconds per measurement")
    parser.add_argument("--warmup", type=float, default=2, help="seconds before each")
    parser.add_argument("--connections", default="8,32", help="comma-separated")
    parser.add_argument("--hidden", type=int, default=64, help="the model's width")
    parser.add_argument("--repeat", type=int, default=1, help="rounds; each cell's best kept")
    parser.add_argument("--json", type=Path, help="also write the results here")
    args = parser.parse_args()
    connections = [int(c) for c in args.connections.split(",")]
    results: dict[str, dict[int, dict[str, float]]] = {}
    with tempfile.TemporaryDirectory() as tmp:
        workdir = Path(tmp)
        model = runtime_fixtures.bert_like(
            workdir / "bert.onnx", hidden=args.hidden, ffn=4 * args.hidden
        )
        # Rounds of every cell in turn, so that the machine's other load spreads over all;
        # each cell keeps its best round (the one least disturbed).
        for _ in range(args.repeat):
            for mode, padding in MODES.items():
                for count in connections:
                    # A fresh server per cell: the batch-size histogram is that cell's alone.
                    with runtime(model, padding, workdir) as (port, pid):
                        cell = measure(port, pid, count, args.duration, args.warmup)
                    print(f"{mode:32} c={count:<3} {cell}", file=sys.stderr)
                    best = results.setdefault(mode, {}).get(count)
                    if best is None or cell["rps"] > best["rps"]:
                        results[mode][count] = cell
    print(
        f"\nBERT-shaped model, hidden {args.hidden}, one sequence per request of "
        f"{SHORTEST}-{LONGEST} tokens (uniform); server on 1 core, 1 thread; "
        f"{args.duration:g} s per cell, best of {args.repeat}\n"
    )
    print("| mode | connections | requests/s | per CPU-second | p50 ms | p99 ms | mean batch |")
    print("|---|---:|---:|---:|---:|---:|---:|")
    for mode, cells in results.items():
        for count, cell in cells.items():
            print(
                f"| {mode} | {count} | {cell['rps']:.0f} | {cell['per_cpu_s']:.0f} | "
                f"{cell['p50']:.1f} | "
                f"{cell['p99']:.1f} | {cell['batch']:.1f} |"
            )
    if args.json:
        args.json.write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()

"""Benchmark: the modeldeploy runtime against Triton (PyTriton), MLServer and a naive server.

    nice .venv/bin/python benchmarks/runtime/bench.py [--duration 10] [--servers ...]
        [--loads closed,open] [--bound-ms 10] [--baseline OTHER_CHECKOUT]

Run from the repository root with the project's virtualenv.  The peers are installed
into their own virtualenv (``~/.cache/modeldeploy/bench-venv-debian``, created on
first use) because their pins conflict with ours; ``peer_base_python`` says which
Python builds it.  Every server gets core 0 (``taskset``), wrk
gets core 1, so the load generator never competes with the server.  Load: single-
example v2 JSON POSTs, in two kinds:

- closed loop: wrk at 32 and 128 connections (each sends its next request on an answer);
- open loop (``openloop.py``), on the small model: Poisson arrivals at 500 and 1,000
  requests/s (p50, p99), and MLPerf's "server" figure, the highest Poisson rate whose p99
  stays within ``--bound-ms`` (10 ms).

``--baseline`` also runs another checkout's runtime (its ``.venv``), as server
``baseline``, so a change is measured before and after in one run.  Prints the tables.
"""

from __future__ import annotations

import argparse
import contextlib
import itertools
import json
import os
import re
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import openloop
from onnx import TensorProto, helper, numpy_helper

HERE = Path(__file__).resolve().parent
REPO = HERE.parents[1]
BENCH_VENV = Path.home() / ".cache" / "modeldeploy" / "bench-venv-debian"
PEER_PACKAGES = ["nvidia-pytriton", "mlserver", "fastapi", "uvicorn", "onnxruntime", "numpy"]
SERVER_CORE, LOAD_CORE = "0", "1"
# Open loop: the fixed Poisson rates whose latency is printed, and the search's bound.
OPEN_RATES = (500, 1000)
MODELS = {"small": [64, 128, 10], "heavy": [2048, 4096, 4096, 4096, 1000]}


def build_mlp(path: Path, widths: list[int]) -> Path:
    """MatMul/Add/Relu layers and a Softmax: input ``x``, output ``probabilities``."""
    rng = np.random.default_rng(0)
    nodes, weights, current = [], [], "x"
    for i, (fan_in, fan_out) in enumerate(itertools.pairwise(widths)):
        w = rng.normal(0, 1 / np.sqrt(fan_in), (fan_in, fan_out)).astype(np.float32)
        weights += [
            numpy_helper.from_array(w, f"w{i}"),
            numpy_helper.from_array(rng.normal(0, 0.1, fan_out).astype(np.float32), f"b{i}"),
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
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", widths[0]])],
        [helper.make_tensor_value_info("probabilities", TensorProto.FLOAT, ["batch", widths[-1]])],
        weights,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.save(model, path)
    return path


def peer_base_python() -> str:
    """The interpreter the peers' virtualenv is built from: Debian's python3.11 if present.

    PyTriton runs each model in Triton's Python backend stub, a binary linked against
    the system's ``libpython3.11.so`` (Debian's 3.11.2) that imports the stdlib of the
    virtualenv's base Python.  A newer 3.11 (pyenv's 3.11.7) has a stdlib that calls
    ``RLock._recursion_count``, which 3.11.2's C core lacks, and the stub dies with an
    AttributeError before any model loads.  Debian's interpreter matches the library
    the stub links, so it is the only safe base when it exists.
    """
    system = Path("/usr/bin/python3.11")
    return str(system) if system.exists() else sys.executable


def ensure_peer_venv() -> Path | None:
    python = BENCH_VENV / "bin" / "python"
    # Written only after a complete install, so a failed one is retried next run.
    installed = BENCH_VENV / "installed.txt"
    if not python.exists():
        subprocess.run([peer_base_python(), "-m", "venv", str(BENCH_VENV)], check=True)
    if not installed.exists() or installed.read_text().split() != PEER_PACKAGES:
        command = [str(python), "-m", "pip", "install", "-q", *PEER_PACKAGES]
        result = subprocess.run(command, capture_output=True, text=True)
        if result.returncode != 0:
            print(f"peer install failed: {' '.join(command)}\n{result.stderr[-2000:]}")
            return None
        installed.write_text("\n".join(PEER_PACKAGES))
    return python


def wait_ready(url: str, process: subprocess.Popen[bytes], timeout: float = 180) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"server exited with {process.returncode}")
        with contextlib.suppress(OSError), urllib.request.urlopen(url, timeout=1) as response:
            if response.status == 200:
                return
        time.sleep(0.2)
    raise RuntimeError(f"{url} not ready after {timeout} s")


@contextlib.contextmanager
def server(command: list[str], ready_url: str, log: Path) -> Iterator[int]:
    """Runs the server on its core and yields its pid (taskset execs, so it is the server's)."""
    with log.open("wb") as output:
        process = subprocess.Popen(
            ["taskset", "-c", SERVER_CORE, *command],
            # Ours listens on loopback only (its default, 0.0.0.0, is for a pod's own address).
            env=os.environ | {"MODELDEPLOY_HOST": "127.0.0.1"},
            stdout=output,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        try:
            wait_ready(ready_url, process)
            yield process.pid
        finally:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(process.pid, 15)
            try:
                process.wait(30)
            except subprocess.TimeoutExpired:
                os.killpg(process.pid, 9)


def wrk(url: str, body: Path, connections: int, duration: int) -> dict[str, float]:
    command = [
        "taskset",
        "-c",
        LOAD_CORE,
        "wrk",
        "-t1",
        f"-c{connections}",
        f"-d{duration}s",
        "--latency",
        "-s",
        str(HERE / "post.lua"),
        url,
        "--",
        str(body),
    ]
    out = subprocess.run(command, capture_output=True, text=True, check=True).stdout

    def latency_ms(label: str) -> float:
        match = re.search(rf"^\s+{label}%\s+([\d.]+)(us|ms|s)", out, re.M)
        assert match, out
        return float(match[1]) * {"us": 1e-3, "ms": 1.0, "s": 1e3}[match[2]]

    errors = re.search(r"Non-2xx or 3xx responses: (\d+)", out)
    socket_errors = re.search(r"Socket errors: (.*)", out)
    return {
        "rps": float(re.search(r"Requests/sec:\s+([\d.]+)", out)[1]),  # type: ignore[index]
        "requests": float(re.search(r"(\d+) requests in", out)[1]),  # type: ignore[index]
        "p50": latency_ms("50"),
        "p99": latency_ms("99"),
        "errors": float(errors[1]) if errors else 0.0,
        "socket_errors": socket_errors[1] if socket_errors else "",
    }


def open_loop(url: str, body: Path, rate: float, duration: float) -> openloop.Result:
    """One Poisson run from the load core, as its own process (``openloop.py``)."""
    command = [
        "taskset",
        "-c",
        LOAD_CORE,
        sys.executable,
        str(HERE / "openloop.py"),
        url,
        str(body),
        "--rate",
        str(rate),
        "--duration",
        str(duration),
        "--header",
        "Content-Type: application/json",
    ]
    out = subprocess.run(command, capture_output=True, text=True, check=True).stdout
    return openloop.Result(**json.loads(out.splitlines()[-1]))


def free_port_block() -> int:
    """A port whose next two are free too (HTTP, gRPC, metrics)."""
    while True:
        with socket.socket() as probe:
            probe.bind(("127.0.0.1", 0))
            port: int = probe.getsockname()[1]
        if port + 2 > 65535:
            continue
        try:
            for offset in (1, 2):
                with socket.socket() as probe:
                    probe.bind(("127.0.0.1", port + offset))
        except OSError:
            continue
        return port


def cpu_seconds(pid: int) -> float:
    """User + system CPU time of a process, all its threads."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def metric_sum(url: str, name: str) -> float:
    text = urllib.request.urlopen(url).read().decode()
    return sum(
        float(line.rsplit(" ", 1)[1])
        for line in text.splitlines()
        if line.startswith(name + "{") or line.startswith(name + " ")
    )


def ort_throughput(path: Path, batch: int, seconds: float) -> tuple[float, float]:
    """Examples per second and per CPU-second of a bare ``predict`` loop: the ceiling.

    Fair by construction: the session comes from the runtime's own ``OnnxModel`` with
    ``threads=0``, so it gets the same options and the same intra-op thread count the
    server derives (the affinity mask, one core under ``taskset``), on the same core,
    for as long as one wrk run, right after the server it is compared with stopped.
    Per CPU-second is the comparison that other work on the core cannot skew.
    """
    code = (
        "import pathlib,sys,time,numpy as np\n"
        "from modeldeploy_runtime import model,settings\n"
        "m=model.OnnxModel(pathlib.Path(sys.argv[1]),model.SessionConfig(device=settings.Device.CPU))\n"
        "m.load();b=int(sys.argv[2])\n"
        "x={k:np.random.default_rng(0).standard_normal(v.shape).astype(v.dtype)"
        " for k,v in m.example_inputs(b).items()}\n"
        "[m.predict(x) for _ in range(3)]\n"
        "n=0;t=time.perf_counter();c=time.process_time()\n"
        "while time.perf_counter()-t<float(sys.argv[3]):m.predict(x);n+=1\n"
        "print(n*b/(time.perf_counter()-t),n*b/(time.process_time()-c))\n"
    )
    command = ["taskset", "-c", SERVER_CORE, sys.executable, "-c", code]
    out = subprocess.run(
        [*command, str(path), str(batch), str(seconds)], capture_output=True, text=True, check=True
    )
    wall, cpu = map(float, out.stdout.split())
    return wall, cpu


def print_table(header: tuple[str, ...], rows: list[tuple[str, ...]]) -> None:
    widths = [max(len(row[i]) for row in [header, *rows]) for i in range(len(header))]
    for row in [header, tuple("-" * w for w in widths), *rows]:
        print("  ".join(cell.ljust(w) for cell, w in zip(row, widths, strict=True)))


def open_table(
    poisson: dict[str, dict[str, Any]], bound_ms: float
) -> tuple[tuple[str, ...], list[tuple[str, ...]]]:
    header: tuple[str, ...] = ("server",)
    for rate in OPEN_RATES:
        header += (f"p50 @{rate}/s ms", f"p99 @{rate}/s ms")
    header += (f"max rate, p99 <= {bound_ms:g} ms", "generator late p99 ms")
    rows = []
    for kind, result in poisson.items():
        row: tuple[str, ...] = (kind,)
        for rate in OPEN_RATES:
            fixed = result["fixed"][rate]
            row += (f"{fixed.p50_ms:.2f}", f"{fixed.p99_ms:.2f}")
        late = max(t.late_p99_ms for t in [*result["fixed"].values(), *result["trials"]])
        rows.append((*row, f"{result['max_rate']:.0f}", f"{late:.2f}"))
    return header, rows


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--duration", type=int, default=10, help="seconds per wrk run")
    parser.add_argument("--servers", default="modeldeploy,triton,mlserver,naive")
    parser.add_argument("--loads", default="closed,open", help="closed (wrk), open (Poisson)")
    parser.add_argument("--bound-ms", type=float, default=10, help="open loop: the p99 bound")
    parser.add_argument("--open-duration", type=float, default=5, help="seconds per Poisson run")
    parser.add_argument("--baseline", type=Path, help="another checkout, run as a server too")
    args = parser.parse_args()
    loads = set(args.loads.split(","))
    kinds = args.servers.split(",")
    if args.baseline is not None:
        kinds.insert(kinds.index("modeldeploy") + 1 if "modeldeploy" in kinds else 0, "baseline")
    # The open loop runs on the small model only; without the closed loop, nothing else runs.
    models = list(MODELS) if "closed" in loads else ["small"]
    # Other work on this machine shares the server's core; the load average says how much.
    load_at_start = os.getloadavg()
    work = Path(tempfile.mkdtemp(prefix="modeldeploy-bench-"))
    peer_python = ensure_peer_venv()
    rows: list[tuple[str, ...]] = []
    notes: list[str] = []
    rng = np.random.default_rng(1)
    paths = {name: build_mlp(work / f"{name}.onnx", widths) for name, widths in MODELS.items()}
    ours = str(Path(sys.executable).parent / "modeldeploy-runtime")
    ports = [0]

    def commands(kind: str, model: str, quantization: str = "none") -> list[str]:
        path = str(paths[model])
        port = ports[0]
        if kind in ("modeldeploy", "baseline"):
            runtime = (
                ours
                if kind == "modeldeploy"
                else str(args.baseline / ".venv/bin/modeldeploy-runtime")
            )
            return [
                runtime,
                "serve",
                "--model-path",
                path,
                "--model-name",
                model,
                "--http-port",
                str(port),
                "--grpc-port",
                str(port + 1),
                "--quantization",
                quantization,
            ]
        assert peer_python is not None
        return [str(peer_python), str(HERE / "peers.py"), kind, path, model, str(port)]

    def run(kind: str, model: str, quantization: str = "none") -> dict[int, dict[str, float]]:
        features = MODELS[model][0]
        body = work / f"{model}.json"
        body.write_text(
            json.dumps(
                {
                    "inputs": [
                        {
                            "name": "x",
                            "shape": [1, features],
                            "datatype": "FP32",
                            "data": rng.standard_normal(features)
                            .astype(np.float32)
                            .round(4)
                            .tolist(),
                        }
                    ]
                }
            )
        )
        ports[0] = free_port_block()
        base = f"http://127.0.0.1:{ports[0]}"
        results = {}
        env_label = f"{kind}-{model}-{quantization}"
        # Examples and executed batches, from each server's own metrics where it has them.
        counters = {
            **dict.fromkeys(
                ("modeldeploy", "baseline"),
                (f"{base}/metrics", "modeldeploy_batch_size_sum", "modeldeploy_batch_size_count"),
            ),
            "triton": (
                f"http://127.0.0.1:{ports[0] + 2}/metrics",
                "nv_inference_request_success",
                "nv_inference_exec_count",
            ),
        }.get(kind)
        with server(
            commands(kind, model, quantization),
            f"{base}/v2/models/{model}/ready",
            work / f"{env_label}.log",
        ) as pid:
            url = f"{base}/v2/models/{model}/infer"
            if "open" in loads and model == "small" and quantization == "none":
                poisson[kind] = run_open(url, body)
            if "closed" not in loads:
                return results
            wrk(url, body, 32, 2)  # warm-up
            for connections in (32, 128):
                if counters:
                    before = [metric_sum(counters[0], name) for name in counters[1:]]
                cpu_before = cpu_seconds(pid)
                results[connections] = wrk(url, body, connections, args.duration)
                results[connections]["cpu_per_request"] = (cpu_seconds(pid) - cpu_before) / max(
                    results[connections]["requests"], 1
                )
                if counters:
                    examples, batches = (
                        metric_sum(counters[0], name) - start
                        for name, start in zip(counters[1:], before, strict=True)
                    )
                    results[connections]["batch"] = examples / max(batches, 1)
                if quantization != "none":
                    results[connections]["top1"] = metric_sum(
                        f"{base}/metrics", "modeldeploy_quantization_top1_agreement"
                    )
        if (kind, model, quantization) == ("modeldeploy", "heavy", "none"):
            # The ceiling, measured now, under the load the machine had a moment ago.
            for r in results.values():
                r["ceiling_batch"] = max(1, round(r["batch"]))
                r["ceiling"], r["ceiling_per_cpu"] = ort_throughput(
                    paths[model], int(r["ceiling_batch"]), args.duration
                )
        return results

    def run_open(url: str, body: Path) -> dict[str, Any]:
        def measure(rate: float) -> openloop.Result:
            return open_loop(url, body, rate, args.open_duration)

        fixed = {rate: measure(rate) for rate in OPEN_RATES}
        best, trials = openloop.max_rate(measure, args.bound_ms)
        return {"fixed": fixed, "max_rate": best, "trials": trials}

    poisson: dict[str, dict[str, Any]] = {}
    measured: dict[tuple[str, str], dict[int, dict[str, float]]] = {}
    for kind in kinds:
        if kind not in ("modeldeploy", "baseline") and peer_python is None:
            notes.append(f"{kind}: not run, the peer virtualenv could not be installed")
            continue
        for model in models:
            try:
                measured[kind, model] = run(kind, model)
            except Exception as error:  # report and go on with the other servers
                notes.append(f"{kind}/{model}: failed: {error} (log in {work})")
    for (kind, model), by_connections in measured.items():
        for connections, r in by_connections.items():
            batch = f"{r['batch']:.1f}" if "batch" in r else "-"
            rows.append(
                (
                    model,
                    kind,
                    str(connections),
                    f"{r['rps']:.0f}",
                    f"{r['p50']:.2f}",
                    f"{r['p99']:.2f}",
                    batch,
                    f"{r['errors']:.0f}",
                )
            )
    for connections, r in measured.get(("modeldeploy", "heavy"), {}).items():
        size = int(r["ceiling_batch"])
        rows.append(
            (
                "heavy",
                f"raw ORT @ batch {size}",
                str(connections),
                f"{r['ceiling']:.0f}",
                "-",
                "-",
                str(size),
                "-",
            )
        )
        per_cpu = 1 / r["cpu_per_request"]
        notes.append(
            f"heavy, {connections} connections: modeldeploy reaches "
            f"{r['rps'] / r['ceiling']:.0%} of raw ONNX Runtime at batch {size} per second, "
            f"{per_cpu / r['ceiling_per_cpu']:.0%} per CPU-second "
            f"({per_cpu:.0f} requests vs {r['ceiling_per_cpu']:.0f} examples)"
        )
    if "modeldeploy" in kinds and "closed" in loads:
        int8 = run("modeldeploy", "heavy", "dynamic-int8")
        for connections, r in int8.items():
            rows.append(
                (
                    "heavy",
                    "modeldeploy dynamic-int8",
                    str(connections),
                    f"{r['rps']:.0f}",
                    f"{r['p50']:.2f}",
                    f"{r['p99']:.2f}",
                    f"{r['batch']:.1f}",
                    f"{r['errors']:.0f} (top-1 agreement {r['top1']:.3f})",
                )
            )

    if rows:
        print("closed loop (wrk, fixed connections)")
        print_table(
            ("model", "server", "conns", "req/s", "p50 ms", "p99 ms", "mean batch", "non-2xx"),
            rows,
        )
    if poisson:
        print("\nopen loop (Poisson arrivals), small model, server on one core")
        print_table(*open_table(poisson, args.bound_ms))
        for kind, result in poisson.items():
            tried = ", ".join(
                f"{t.rate:.0f}: {t.p99_ms:.1f}{'' if t.within(args.bound_ms) else ' x'}"
                for t in result["trials"]
            )
            notes.append(f"{kind} search, rate: p99 ms (x over the bound): {tried}")
    if any(row[-1] not in ("0", "-") and not row[-1].startswith("0 ") for row in rows):
        notes.append("rows with non-2xx responses measured errors, not inference")
    for when, load in (("start", load_at_start), ("end", os.getloadavg())):
        notes.append(f"load average (1, 5, 15 min) at {when}: {' '.join(f'{x:.2f}' for x in load)}")
    for note in notes:
        print("note:", note)


if __name__ == "__main__":
    main()

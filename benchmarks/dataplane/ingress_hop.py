"""The latency the ingress hop adds: sequential single-example JSON requests (KServe v2) to one
model, straight to its pod's address on the pod network vs through Traefik (127.0.0.1:18080,
with the Ingress's Host header), alternating one of each so both see the same machine state.

Sets up its own ModelDeployment (one replica, `spec.ingress` host and path) in a namespace of its
own, with an operator for that namespace, its pod a container of the runtime image (built and
pushed unless cached) on the local cluster's real node; starts the local cluster if it is not
running (and stops it again at the end), and removes all it made.

    python benchmarks/dataplane/ingress_hop.py [--requests 1000]
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import tritonclient.http as triton_http

from modeldeploy_dev import cluster as localcluster
from modeldeploy_dev import images, ingress, network, node, registry

ROOT = Path(__file__).resolve().parents[2]
BIN = Path(sys.executable).parent
NAMESPACE = "bench-ingress-hop"
HOST = "hop.bench.example"
PATH = "/ml"
EXAMPLE = np.array([[5.9, 2.8, 4.3, 1.3]], np.float32)


def _wait(what: str, check: object, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while not check():  # type: ignore[operator]
        if time.monotonic() > deadline:
            raise SystemExit(f"timed out waiting for {what}")
        time.sleep(0.5)


def _ready() -> bool:
    md = json.loads(localcluster.kubectl("get", "md", "iris", "-n", NAMESPACE, "-o", "json"))
    conditions = md.get("status", {}).get("conditions", [])
    current = md.get("status", {}).get("observedGeneration") == md["metadata"]["generation"]
    return current and any(c["type"] == "Ready" and c["status"] == "True" for c in conditions)


@contextlib.contextmanager
def _process(argv: list[str], log: Path, env: dict[str, str] | None = None) -> Iterator[None]:
    env = os.environ | {"KUBECONFIG": str(localcluster.kubeconfig_path())} | (env or {})
    with log.open("wb") as out:
        process = subprocess.Popen(argv, stdout=out, stderr=subprocess.STDOUT, env=env)
    try:
        yield
    finally:
        process.terminate()
        process.wait(timeout=60)


@contextlib.contextmanager
def _deployment(workdir: Path) -> Iterator[str]:
    """The model served by one pod behind an Ingress; yields the pod's address."""
    localcluster.kubectl("apply", "--server-side", "-f", str(ROOT / "crds"))
    localcluster.kubectl("delete", "namespace", NAMESPACE, "--ignore-not-found", "--wait=true")
    localcluster.kubectl("create", "namespace", NAMESPACE)
    localcluster.kubectl(
        "label", "namespace", NAMESPACE, f"{node.NAMESPACE_LABEL}={node.NAMESPACE_VALUE}",
        "--overwrite",
    )  # fmt: skip
    registry.up()
    runtime_image = registry.push(images.build()["runtime"])
    model = workdir / "iris.onnx"
    subprocess.run([sys.executable, str(ROOT / "demo" / "train.py"), "--out", str(model)],
                   check=True, stdout=subprocess.DEVNULL)  # fmt: skip
    # The container sees no host file: the model is served to it from the bridge's address.
    port = 18192
    model_server = [sys.executable, "-m", "http.server", "--bind", network.GATEWAY,
                    "--directory", str(workdir), str(port)]  # fmt: skip
    operator = [str(BIN / "modeldeploy"), "run", "--namespace", NAMESPACE, "--bind-address",
                "127.0.0.1", "--health-port", "18190", "--metrics-port", "18191"]  # fmt: skip
    with (
        _process(operator, workdir / "operator.log", {"MODELDEPLOY_RUNTIME_IMAGE": runtime_image}),
        _process(model_server, workdir / "model-server.log"),
    ):
        manifest = {
            "apiVersion": "modeldeploy.io/v1alpha1",
            "kind": "ModelDeployment",
            "metadata": {"name": "iris", "namespace": NAMESPACE},
            "spec": {
                "model": {"uri": f"http://{network.GATEWAY}:{port}/iris.onnx", "name": "iris"},
                "replicas": 1,
                # No batching wait: one request at a time, so the figures are the paths' own.
                "runtime": {"maxBatchDelayMs": 0},
                "ingress": {"host": HOST, "path": PATH},
            },
        }
        localcluster.kubectl("apply", "-f", "-", input=json.dumps(manifest))
        try:
            _wait("the ModelDeployment Ready", _ready, 180)
            pod_ip = localcluster.kubectl(
                "get", "pods", "-n", NAMESPACE, "-o", "jsonpath={.items[0].status.podIP}"
            ).strip()
            yield pod_ip
        finally:
            localcluster.kubectl("delete", "md", "iris", "-n", NAMESPACE, "--wait=true")
            localcluster.kubectl("delete", "pods", "--all", "-n", NAMESPACE, "--wait=true",
                                 "--timeout=60s", check=False)  # fmt: skip
    localcluster.kubectl("delete", "namespace", NAMESPACE, "--wait=false", check=False)


def _request(client: triton_http.InferenceServerClient, headers: dict[str, str]) -> float:
    tensor = triton_http.InferInput("input", list(EXAMPLE.shape), "FP32")
    tensor.set_data_from_numpy(EXAMPLE, binary_data=False)
    output = triton_http.InferRequestedOutput("probabilities", binary_data=False)
    started = time.perf_counter()
    result = client.infer("iris", [tensor], outputs=[output], headers=headers)
    elapsed = time.perf_counter() - started
    assert result.as_numpy("probabilities").shape == (1, 3)
    return elapsed


def measure(pod_ip: str, requests: int, warmup: int = 100) -> dict[str, list[float]]:
    base = PATH.strip("/")
    paths = {
        "direct to the pod IP": (f"{pod_ip}:8080/{base}", {}),
        "through Traefik (Ingress)": (f"127.0.0.1:{ingress.INGRESS_PORT}/{base}", {"Host": HOST}),
    }
    clients = {name: triton_http.InferenceServerClient(url) for name, (url, _) in paths.items()}
    times: dict[str, list[float]] = {name: [] for name in paths}
    for i in range(warmup + requests):
        for name, (_, headers) in paths.items():
            elapsed = _request(clients[name], headers)
            if i >= warmup:
                times[name].append(elapsed)
    for client in clients.values():
        client.close()
    return times


def _table(times: dict[str, list[float]]) -> str:
    def pct(values: list[float], q: float) -> float:
        ordered = sorted(values)
        return ordered[min(len(ordered) - 1, int(q * len(ordered)))] * 1e3

    rows = [f"{'path':<28}{'n':>6}{'p50 ms':>9}{'p90 ms':>9}{'p99 ms':>9}{'mean ms':>9}"]
    for name, values in times.items():
        rows.append(
            f"{name:<28}{len(values):>6}{pct(values, 0.5):>9.3f}{pct(values, 0.9):>9.3f}"
            f"{pct(values, 0.99):>9.3f}{statistics.fmean(values) * 1e3:>9.3f}"
        )
    direct, routed = times.values()
    rows.append(
        f"{'added by the ingress hop':<28}{'':>6}{pct(routed, 0.5) - pct(direct, 0.5):>9.3f}"
        f"{pct(routed, 0.9) - pct(direct, 0.9):>9.3f}{pct(routed, 0.99) - pct(direct, 0.99):>9.3f}"
        f"{(statistics.fmean(routed) - statistics.fmean(direct)) * 1e3:>9.3f}"
    )
    return "\n".join(rows)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--requests", type=int, default=1000, help="requests on each path")
    args = parser.parse_args()
    started_here = not localcluster.is_running()
    localcluster.up()
    try:
        with tempfile.TemporaryDirectory() as tmp, _deployment(Path(tmp)) as pod_ip:
            times = measure(pod_ip, args.requests)
        print(f"{args.requests} sequential single-example JSON requests on each path, "
              f"alternating; pod {pod_ip}, Traefik {ingress.url()} Host: {HOST}")  # fmt: skip
        print(_table(times))
    finally:
        if started_here:
            localcluster.down()


if __name__ == "__main__":
    main()

"""`make demo`: the whole product on this machine, from nothing to live metrics in `kubectl get md`.

Brings up the local cluster (building it the first time), installs the CRD, builds the operator
and runtime images from the Dockerfile (unless the tree is unchanged) and installs the chart with
them, whose operator pods and runtime pods run as containers on the cluster's real node; trains a
small model, applies its ModelDeployment (with an Ingress), waits until it is Ready, sends real
traffic to the URL in its status through the ingress controller (Traefik, on this machine's
loopback) with an unchanged Open Inference Protocol client, and ends by showing the
ModelDeployment with its live metrics. Everything keeps running afterwards; `make demo-down` (this
script with `--down`) stops it all.
"""

from __future__ import annotations

import argparse
import calendar
import hashlib
import json
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import tritonclient.http as triton_http

from modeldeploy_dev import build, ingress, network, node
from modeldeploy_dev import cluster as localcluster

ROOT = Path(__file__).resolve().parents[1]
NAMESPACE = "demo"
NAME = "iris"
# No DNS here: clients reach the ingress controller on loopback and name this host in the Host
# header, as they would after DNS pointed the name at a load balancer.
HOST = "iris.demo.example"
METRICS_INTERVAL_S = 5
# The containers see no host file: the model is served to the pods over HTTP from the bridge.
MODEL_PORT = 18092
STARTED = time.monotonic()


def step(message: str) -> None:
    print(f"[demo {time.monotonic() - STARTED:6.1f}s] {message}", flush=True)


def demo_dir() -> Path:
    return build.cache_dir() / "demo"


def _background(name: str, argv: list[str]) -> None:
    """Starts a process that outlives this script; its pid goes where --down finds it."""
    pid_file = demo_dir() / f"{name}.pid"
    if pid_file.exists() and _alive(int(pid_file.read_text())):
        step(f"{name} already running (pid {pid_file.read_text()})")
        return
    log = (demo_dir() / f"{name}.log").open("ab")
    env = os.environ | {"KUBECONFIG": str(localcluster.kubeconfig_path())}
    process = subprocess.Popen(
        argv, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, env=env,
        start_new_session=True,
    )  # fmt: skip
    pid_file.write_text(str(process.pid))
    step(f"started {name} (pid {process.pid}, log {demo_dir() / f'{name}.log'})")


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


def _wait_for(what: str, check: Callable[[], object], timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        if time.monotonic() > deadline:
            raise SystemExit(f"demo: {what} did not happen within {timeout:.0f}s")
        time.sleep(0.5)


def _md() -> dict[str, Any]:
    text = localcluster.kubectl("get", "md", NAME, "-n", NAMESPACE, "-o", "json", check=False)
    return json.loads(text) if text else {}


def _ready() -> bool:
    conditions = _md().get("status", {}).get("conditions", [])
    return any(c["type"] == "Ready" and c["status"] == "True" for c in conditions)


def _traffic(url: str, stop: threading.Event, done: list[tuple[float, float]]) -> None:
    """One client sending single-example requests back to back until `stop`."""
    rng = np.random.default_rng(1)
    client = triton_http.InferenceServerClient(url)
    tensor = triton_http.InferInput("input", [1, 4], "FP32")
    headers = {"Host": HOST}
    while not stop.is_set():
        tensor.set_data_from_numpy(rng.normal([5.8, 3.0, 3.8, 1.2], 0.5, (1, 4)).astype("f4"))
        started = time.perf_counter()
        client.infer(NAME, [tensor], headers=headers)
        finished = time.perf_counter()
        done.append((finished, finished - started))  # list.append is atomic


def _routed(url: str) -> bool:
    try:
        return bool(
            triton_http.InferenceServerClient(url).is_model_ready(NAME, headers={"Host": HOST})
        )
    except Exception:
        return False


def _fresh_metrics(since: float) -> dict[str, Any] | None:
    """status.metrics written after `since` (epoch seconds), else None."""
    metrics: dict[str, Any] | None = _md().get("status", {}).get("metrics")
    if not metrics:
        return None
    written = calendar.timegm(time.strptime(metrics["updatedAt"], "%Y-%m-%dT%H:%M:%SZ"))
    return metrics if written >= since else None


def _install_chart() -> None:
    """The images built from the Dockerfile, pushed to the local registry, and the chart
    installed with them: the operator's two replicas and the runtime pods run as containers on
    the real node, under pod-security `restricted`."""
    from modeldeploy_dev import images, registry

    localcluster.kubectl(
        "label", "namespace", NAMESPACE, f"{node.NAMESPACE_LABEL}={node.NAMESPACE_VALUE}",
        "pod-security.kubernetes.io/enforce=restricted", "--overwrite",
    )  # fmt: skip
    step("building the operator and runtime images (unless the tree is unchanged), pushing them")
    built = images.build()
    address = registry.up()
    for image in built.values():
        registry.push(image)
    values = {
        "image.repository": f"{address}/{built['operator'].name}",
        "image.tag": built["operator"].tag,
        "runtimeImage.repository": f"{address}/{built['runtime'].name}",
        "runtimeImage.tag": built["runtime"].tag,
        "rbac.scope": "namespace",
        "watchNamespaces": [NAMESPACE],
        "metricsInterval": METRICS_INTERVAL_S,
    }
    flags = [
        f for key, value in values.items() for f in ("--set-json", f"{key}={json.dumps(value)}")
    ]
    step(f"helm install of the chart in {NAMESPACE}: the operator's pods on {node.NAME}")
    subprocess.run(
        [str(build.build_all().helm), "upgrade", "--install", "modeldeploy",
         str(ROOT / "charts" / "modeldeploy"), "-n", NAMESPACE, "--wait", "--timeout", "180s",
         "--kubeconfig", str(localcluster.kubeconfig_path()), *flags],
        check=True, stdout=subprocess.DEVNULL,
    )  # fmt: skip


def up(traffic_seconds: float) -> None:
    demo_dir().mkdir(parents=True, exist_ok=True)
    step("local cluster: building it the first time (many minutes), then starting it")
    localcluster.up()
    step("installing the ModelDeployment CRD")
    localcluster.kubectl("apply", "--server-side", "-f", str(ROOT / "crds"))
    localcluster.kubectl(
        "wait", "--for=condition=Established", "crd/modeldeployments.modeldeploy.io"
    )
    # A namespace left terminating by an earlier `--down` refuses new objects; one left by an
    # earlier `make demo` is simply reused.
    terminating = localcluster.kubectl(
        "get", "namespace", NAMESPACE, "--ignore-not-found",
        "-o", "jsonpath={.metadata.deletionTimestamp}",
    )  # fmt: skip
    if terminating.strip():
        step(f"waiting for the namespace {NAMESPACE} left by an earlier run to go")
        localcluster.kubectl("wait", "--for=delete", f"namespace/{NAMESPACE}", "--timeout=120s")
    localcluster.kubectl("create", "namespace", NAMESPACE, check=False)
    _install_chart()

    model = demo_dir() / "model" / "iris.onnx"
    model.parent.mkdir(exist_ok=True)
    step("training the demo model (an MLP classifier on generated data) and exporting it to ONNX")
    subprocess.run(
        [sys.executable, str(ROOT / "demo" / "train.py"), "--out", str(model)], check=True
    )
    digest = hashlib.sha256(model.read_bytes()).hexdigest()
    _background(
        "model-server",
        [sys.executable, "-m", "http.server", "--bind", network.GATEWAY,
         "--directory", str(model.parent), str(MODEL_PORT)],
    )  # fmt: skip
    uri = f"http://{network.GATEWAY}:{MODEL_PORT}/{model.name}"
    manifest = {
        "apiVersion": "modeldeploy.io/v1alpha1",
        "kind": "ModelDeployment",
        "metadata": {"name": NAME, "namespace": NAMESPACE},
        "spec": {
            "model": {"uri": uri, "sha256": digest, "version": "1"},
            "quantization": "dynamic-int8",
            "runtime": {"maxBatchSize": 16, "maxBatchDelayMs": 2},
            "replicas": 2,
            "ingress": {"host": HOST, "path": f"/{NAME}"},
        },
    }
    step(f"applying ModelDeployment {NAMESPACE}/{NAME} (model sha256 {digest[:12]}...)")
    localcluster.kubectl("apply", "-f", "-", input=json.dumps(manifest))
    _wait_for("the ModelDeployment becoming Ready", _ready, 120)
    pods = json.loads(
        localcluster.kubectl(
            "get", "pods", "-n", NAMESPACE, "-l", f"app.kubernetes.io/instance={NAME}", "-o", "json"
        )
    )["items"]
    addresses = ", ".join(p["status"]["podIP"] for p in pods)
    step(f"Ready: the readiness probes of its pods ({addresses}; containers on {node.NAME}) pass")
    status_url = _md()["status"]["url"]
    base = status_url.removeprefix("http://").partition("/")[2].removesuffix(f"/v2/models/{NAME}")
    url = f"{ingress.url().removeprefix('http://')}/{base}"
    # Traefik routes the Ingress once its watch has delivered it: a moment after the pods are
    # Ready, or more on a busy machine.
    _wait_for("Traefik routing the Ingress", lambda: _routed(url), 60)
    step(
        f"sending traffic from 8 clients to {status_url} through the ingress controller "
        f"(Traefik at {ingress.url()}, Host: {HOST}; it picks a ready pod; at least "
        f"{traffic_seconds:.0f}s)"
    )
    stop = threading.Event()
    done: list[tuple[float, float]] = []
    clients = [threading.Thread(target=_traffic, args=(url, stop, done)) for _ in range(8)]
    for client in clients:
        client.start()
    started, traffic_since = time.perf_counter(), time.time()
    # Two collection intervals, so the summary covers steady traffic; the operator writes it
    # only when it moved by more than 10%, so it may have been written a little earlier.
    time.sleep(max(traffic_seconds, 2 * METRICS_INTERVAL_S + 1))
    try:
        _wait_for("live metrics in status", lambda: _fresh_metrics(traffic_since), 60)
        table = localcluster.kubectl("get", "md", "-n", NAMESPACE)
        metrics = _md()["status"]["metrics"]
    finally:
        stop.set()
        for client in clients:
            client.join()
    recent = [latency for at, latency in done if at >= started + 2]
    seconds = done[-1][0] - (started + 2)
    p50, p99 = np.percentile(recent, [50, 99]) * 1000
    step(f"the clients saw {len(recent) / seconds:.0f} req/s, p50 {p50:.1f} ms, p99 {p99:.1f} ms")
    step("and the operator summarised the pods' metrics into the ModelDeployment's status:")
    print(table, end="")
    print(json.dumps(metrics, indent=2))
    step("done; everything keeps running. `make demo-down` stops it and the local cluster")


def down() -> None:
    """Stops the demo's processes and deletes its namespace; the cluster keeps running."""
    localcluster.kubectl("delete", "namespace", NAMESPACE, "--ignore-not-found", "--timeout=120s")
    for name in ("model-server",):
        pid_file = demo_dir() / f"{name}.pid"
        if pid_file.exists():
            pid = int(pid_file.read_text())
            if _alive(pid):
                os.killpg(pid, signal.SIGTERM)
                _wait_for(f"{name} stopping", lambda pid=pid: not _alive(pid), 60)
            pid_file.unlink()
            step(f"stopped {name}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--down", action="store_true", help="stop the demo's processes, delete its namespace"
    )
    parser.add_argument("--traffic-seconds", type=float, default=20)
    args = parser.parse_args()
    down() if args.down else up(args.traffic_seconds)


if __name__ == "__main__":
    main()

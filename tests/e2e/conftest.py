"""End-to-end fixtures: a real Prometheus (Debian's package) that discovers the runtime pods
through the local API server; namespaces whose pods run as containers on the real node, from the
runtime image built from the Dockerfile; models served to them over HTTP."""

from __future__ import annotations

import functools
import http.server
import json
import shutil
import subprocess
import sys
import threading
import time
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import yaml

from modeldeploy_dev import cluster as localcluster
from modeldeploy_dev import network
from operator_helpers import free_port, place_on_node
from support import Cluster

ROOT = Path(__file__).resolve().parents[2]
RUNTIME_PODS = "app.kubernetes.io/managed-by=modeldeploy"


def prometheus_config(targets_file: Path) -> dict[str, object]:
    """Scrapes every runtime pod's http port, labelled with its namespace and pod.

    Debian builds Prometheus without Kubernetes service discovery, so the pods reach it through
    a file_sd file that `_discover` keeps current from the API server.
    """
    return {
        "global": {"scrape_interval": "1s", "evaluation_interval": "1s"},
        "scrape_configs": [
            {
                "job_name": "modeldeploy-runtime",
                "file_sd_configs": [{"files": [str(targets_file)], "refresh_interval": "1s"}],
            }
        ],
    }


def _discover(targets_file: Path, stop: threading.Event) -> None:
    while not stop.is_set():
        try:
            listed = localcluster.kubectl(
                "get", "pods", "--all-namespaces", "-l", RUNTIME_PODS, "-o", "json"
            )
        except RuntimeError:  # the cluster going down at the end of the session
            stop.wait(1)
            continue
        pods = json.loads(listed)["items"]
        groups = [
            {
                "targets": [f"{pod['status']['podIP']}:8080"],
                "labels": {
                    "namespace": pod["metadata"]["namespace"],
                    "pod": pod["metadata"]["name"],
                },
            }
            for pod in pods
            if pod["status"].get("podIP")
        ]
        staging = targets_file.with_suffix(".tmp")
        staging.write_text(json.dumps(groups))
        staging.replace(targets_file)
        stop.wait(1)


@pytest.fixture(scope="session")
def prometheus(cluster: Cluster, tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    binary = shutil.which("prometheus")
    assert binary, "Prometheus is needed: `make test` installs Debian's prometheus package"
    directory = tmp_path_factory.mktemp("prometheus")
    config = directory / "prometheus.yml"
    targets = directory / "targets.json"
    targets.write_text("[]")
    config.write_text(yaml.safe_dump(prometheus_config(targets)))
    stop = threading.Event()
    threading.Thread(target=_discover, args=(targets, stop), daemon=True).start()
    url = f"http://127.0.0.1:{free_port()}"
    process = subprocess.Popen(
        [binary, f"--config.file={config}", f"--storage.tsdb.path={directory / 'data'}",
         f"--web.listen-address={url.removeprefix('http://')}"],
        stdout=(directory / "prometheus.log").open("wb"), stderr=subprocess.STDOUT,
    )  # fmt: skip
    deadline = time.monotonic() + 60
    while True:
        try:
            with urllib.request.urlopen(f"{url}/-/ready", timeout=1) as response:
                if response.status == 200:
                    break
        except OSError:
            pass
        assert process.poll() is None, (directory / "prometheus.log").read_text()[-2000:]
        assert time.monotonic() < deadline, "Prometheus not ready after 60s"
        time.sleep(0.3)
    yield url
    stop.set()
    process.terminate()
    process.wait(timeout=30)


@pytest.fixture
def runtime_pods(
    cluster: Cluster,
    namespace: str,
    pushed_images: dict[str, str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The namespace's pods run as containers on the real node, and the operators the test
    starts give runtime pods the runtime image built from the Dockerfile (as the chart does)."""
    place_on_node(cluster, namespace)
    monkeypatch.setenv("MODELDEPLOY_RUNTIME_IMAGE", pushed_images["runtime"])


@pytest.fixture
def served(tmp_path: Path) -> Iterator[Callable[[Path], str]]:
    """Serves files over HTTP on the bridge's address, where pods can fetch them: the returned
    function gives a file's URL (the file is served as it is on disk at each request)."""
    directory = tmp_path / "served"
    directory.mkdir()
    handler = functools.partial(http.server.SimpleHTTPRequestHandler, directory=str(directory))
    server = http.server.ThreadingHTTPServer((network.GATEWAY, free_port()), handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()

    def url(path: Path) -> str:
        link = directory / path.name
        if not link.exists():
            link.symlink_to(path)
        return f"http://{network.GATEWAY}:{server.server_address[1]}/{path.name}"

    yield url
    server.shutdown()
    server.server_close()


@pytest.fixture(scope="session")
def demo_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The demo's classifier, trained and exported to ONNX by demo/train.py."""
    path = tmp_path_factory.mktemp("model") / "iris.onnx"
    subprocess.run(
        [sys.executable, str(ROOT / "demo" / "train.py"), "--out", str(path)], check=True
    )
    return path

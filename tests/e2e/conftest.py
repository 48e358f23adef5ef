"""End-to-end fixtures: a real Prometheus (Debian's package) that discovers the runtime pods
through the local API server, and real runtime processes behind the simulated pods."""

from __future__ import annotations

import shutil
import socket
import subprocess
import threading
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest
import yaml

from modeldeploy_operator.localcluster import cluster as localcluster
from modeldeploy_operator.localcluster import podrunner
from support import Cluster


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def prometheus_config(pki: Path) -> dict[str, object]:
    """Scrapes every runtime pod's http port, labelled with its namespace and pod."""
    return {
        "global": {"scrape_interval": "1s", "evaluation_interval": "1s"},
        "scrape_configs": [
            {
                "job_name": "modeldeploy-runtime",
                "kubernetes_sd_configs": [
                    {
                        "role": "pod",
                        "api_server": f"https://127.0.0.1:{localcluster.APISERVER_PORT}",
                        "tls_config": {
                            "ca_file": str(pki / "ca.crt"),
                            "cert_file": str(pki / "admin.crt"),
                            "key_file": str(pki / "admin.key"),
                        },
                    }
                ],
                "relabel_configs": [
                    {
                        "source_labels": [
                            "__meta_kubernetes_pod_label_app_kubernetes_io_managed_by"
                        ],
                        "regex": "modeldeploy",
                        "action": "keep",
                    },
                    {
                        "source_labels": ["__meta_kubernetes_pod_container_port_name"],
                        "regex": "http",
                        "action": "keep",
                    },
                    {"source_labels": ["__meta_kubernetes_namespace"], "target_label": "namespace"},
                    {"source_labels": ["__meta_kubernetes_pod_name"], "target_label": "pod"},
                ],
            }
        ],
    }


@pytest.fixture(scope="session")
def prometheus(cluster: Cluster, tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    binary = shutil.which("prometheus")
    assert binary, "Prometheus is needed: `make test` installs Debian's prometheus package"
    directory = tmp_path_factory.mktemp("prometheus")
    config = directory / "prometheus.yml"
    config.write_text(yaml.safe_dump(prometheus_config(localcluster.paths().pki)))
    url = f"http://127.0.0.1:{_free_port()}"
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
    process.terminate()
    process.wait(timeout=30)


@pytest.fixture
def runtime_pods(namespace: str) -> Iterator[None]:
    """Real runtime processes behind the namespace's runtime pods, for the test's duration."""
    stop = threading.Event()
    runner = threading.Thread(target=podrunner.run, args=(stop, namespace), daemon=True)
    runner.start()
    yield
    stop.set()
    runner.join(timeout=60)

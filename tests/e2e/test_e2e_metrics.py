"""status.metrics tells the truth: real runtime processes behind the pods, real traffic from an
unchanged Open Inference Protocol client, and the summary compared with what the client measured.
Once through a real Prometheus (PromQL), once by scraping the pods directly."""

from __future__ import annotations

import calendar
import hashlib
import json
import threading
import time
from collections.abc import Callable
from contextlib import AbstractContextManager
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import tritonclient.http as triton_http
from kopf.testing import KopfRunner

from operator_helpers import apply_md, get, operator_writes, ready_md, wait_for
from support import Cluster

INTERVAL_S = 2
WINDOW_S = 6

pytestmark = pytest.mark.e2e


class Traffic:
    """Closed-loop clients, each sending single-example requests back to back."""

    def __init__(self, urls: list[str], clients_per_url: int) -> None:
        self.done: list[tuple[float, float]] = []  # (finished at, latency)
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._threads = [
            threading.Thread(target=self._client, args=(url,), daemon=True)
            for url in urls
            for _ in range(clients_per_url)
        ]

    def _client(self, url: str) -> None:
        client = triton_http.InferenceServerClient(url)
        tensor = triton_http.InferInput("input", [1, 4], "FP32")
        tensor.set_data_from_numpy(np.array([[5.8, 3.0, 3.8, 1.2]], np.float32))
        while not self._stop.is_set():
            started = time.perf_counter()
            client.infer("iris", [tensor])
            finished = time.perf_counter()
            with self._lock:
                self.done.append((finished, finished - started))

    def __enter__(self) -> Traffic:
        self.started = time.perf_counter()
        for thread in self._threads:
            thread.start()
        return self

    def __exit__(self, *_: object) -> None:
        self._stop.set()
        for thread in self._threads:
            thread.join()

    def measured(self, seconds: float) -> tuple[float, float]:
        """Requests per second and p99 latency (ms) over the last `seconds`."""
        now = time.perf_counter()
        with self._lock:
            recent = [latency for at, latency in self.done if at >= now - seconds]
        return len(recent) / seconds, float(np.percentile(recent, 99) * 1000)


@pytest.mark.parametrize("source", ["prometheus", "direct"])
def test_status_metrics_agree_with_what_the_client_measured(
    source: str,
    cluster: Cluster,
    namespace: str,
    demo_model: Path,
    served: Callable[[Path], str],
    prometheus: str,
    runtime_pods: None,
    start_operator: Callable[[], AbstractContextManager[KopfRunner]],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("MODELDEPLOY_METRICS_INTERVAL", str(INTERVAL_S))
    monkeypatch.setenv("MODELDEPLOY_METRICS_WINDOW", str(WINDOW_S))
    if source == "prometheus":
        monkeypatch.setenv("MODELDEPLOY_PROMETHEUS_URL", prometheus)
    else:
        monkeypatch.delenv("MODELDEPLOY_PROMETHEUS_URL", raising=False)
    digest = hashlib.sha256(demo_model.read_bytes()).hexdigest()
    spec = {
        "model": {"uri": served(demo_model), "sha256": digest, "version": "1"},
        "runtime": {"maxBatchSize": 8, "maxBatchDelayMs": 1},
        "replicas": 2,
    }
    with start_operator():
        apply_md(cluster, namespace, "iris", spec)
        wait_for("iris Ready", lambda: ready_md(cluster, namespace, "iris"))
        pods = json.loads(cluster.kubectl("get", "pods", "-n", namespace, "-o", "json").stdout)[
            "items"
        ]
        urls = [f"{pod['status']['podIP']}:8080" for pod in pods]
        assert len(urls) == 2

        def serving() -> bool:
            try:
                return all(
                    triton_http.InferenceServerClient(u).is_model_ready("iris") for u in urls
                )
            except Exception:
                return False

        wait_for("both runtime processes serving", serving, timeout=90)
        time.sleep(2)  # the audit log is written in batches of up to 1s
        audit_offset = cluster.audit_log.stat().st_size
        with Traffic(urls, clients_per_url=3) as traffic:
            since = time.time()
            # Long enough for the summary to cover steady traffic only. It is written only when
            # it moved by more than 10%, so what status shows may have been written earlier.
            settle = (WINDOW_S + 2 if source == "prometheus" else 0) + 2 * INTERVAL_S + 1
            time.sleep(settle)

            def fresh_metrics() -> dict[str, Any] | None:
                md = get(cluster, namespace, "md", "iris") or {}
                metrics: dict[str, Any] | None = md.get("status", {}).get("metrics")
                if metrics and _epoch(metrics["updatedAt"]) >= since:
                    return metrics
                return None

            metrics = wait_for("status.metrics of steady traffic", fresh_metrics, timeout=30)
            client_rps, client_p99 = traffic.measured(WINDOW_S if source == "prometheus" else 4)

    time.sleep(2)
    writes = operator_writes(cluster.audit_log, audit_offset, namespace)
    # Metrics writes touch the status only: nothing about the children was reconciled.
    assert writes and all(w.startswith("patch /apis/modeldeploy.io/v1alpha1/") for w in writes)
    assert all(w.split("?")[0].endswith("/iris/status") for w in writes), writes
    assert metrics["requestsPerSecond"] == pytest.approx(client_rps, rel=0.2)
    # The server's latency is part of what the client waited; histogram buckets blur it a bit.
    assert 0 < metrics["latencyP99Ms"] <= client_p99 * 1.5
    assert metrics["latencyP50Ms"] <= metrics["latencyP99Ms"]
    assert metrics["meanBatchSize"] >= 1
    assert metrics["errorRate"] == 0
    header, row = cluster.kubectl("get", "md", "iris", "-n", namespace).stdout.splitlines()
    columns = dict(zip(header.split(), row.split(), strict=True))
    assert float(columns["RPS"]) > 0 and float(columns["P99"]) > 0


def _epoch(timestamp: str) -> float:
    return calendar.timegm(time.strptime(timestamp, "%Y-%m-%dT%H:%M:%SZ"))

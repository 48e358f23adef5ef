"""Metrics collection at scale: PromQL queries and time per interval against a real Prometheus.

N synthetic runtime pods (one per ModelDeployment; the runtime's own metrics code, serving
traffic at 20 requests/s each) are scraped by a real Prometheus (`prometheus` on $PATH, e.g.
Debian's package), which labels their series with `namespace` and `pod` as the Prometheus
Operator's PodMonitor does. Then one collection round of status.metrics for all N, side by side:

- grouped: the operator's PrometheusSource (four queries grouped by namespace, pod and model,
  split per ModelDeployment in the operator);
- per object: the previous way, five queries per ModelDeployment (the baseline, kept here).

Both must give the same summaries. Not a test; run it on a quiet machine:

    .venv/bin/python benchmarks/operator/bench_metrics.py --count 1000
"""

from __future__ import annotations

import argparse
import asyncio
import http.server
import json
import shutil
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.parse
import urllib.request
from pathlib import Path

import aiohttp
import yaml

from modeldeploy_operator import collect, telemetry
from modeldeploy_runtime import metrics as runtime_metrics

NAMESPACE = "bench"
WINDOW_S = 60
SCRAPE_S = 5


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port: int = probe.getsockname()[1]
        return port


def _address(i: int) -> str:
    return f"127.1.{i // 250}.{i % 250 + 1}"


def _pod(i: int) -> str:
    return f"m{i}-5d8f7c9b4-{i:05d}"


class _LoopbackOnlyServer(http.server.ThreadingHTTPServer):
    """Every 127.x.y.z address on one port, on the loopback interface only."""

    daemon_threads = True

    def server_bind(self) -> None:
        self.socket.setsockopt(socket.SOL_SOCKET, socket.SO_BINDTODEVICE, b"lo")
        super().server_bind()


class _Pods:
    """N runtime pods' /metrics: the runtime's metrics code, 20 requests/s each."""

    def __init__(self, count: int, port: int) -> None:
        self._models = {_address(i): runtime_metrics.ModelMetrics(f"m{i}") for i in range(count)}
        self._last = dict.fromkeys(self._models, time.monotonic())
        self._lock = threading.Lock()
        pods = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                body = pods.page(self.connection.getsockname()[0])
                self.send_response(200)
                self.send_header("Content-Type", "text/plain; version=0.0.4")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, *_: object) -> None:
                pass

        self._server = _LoopbackOnlyServer(("0.0.0.0", port), Handler)
        threading.Thread(target=self._server.serve_forever, daemon=True).start()

    def page(self, address: str) -> bytes:
        with self._lock:
            metrics = self._models[address]
            now = time.monotonic()
            served = int(20 * (now - self._last[address]))
            for n in range(served):
                outcome = (
                    runtime_metrics.Outcome.SUCCESS
                    if n % 50
                    else runtime_metrics.Outcome.SERVER_ERROR
                )
                metrics.observe_request(
                    runtime_metrics.Protocol.HTTP, outcome, 0.002 + n % 7 / 1000
                )
            if served:
                metrics.batch_size.observe(4)
                self._last[address] = now
            return metrics.exposition()

    def close(self) -> None:
        self._server.shutdown()
        self._server.server_close()


def _prometheus(count: int, pods_port: int, folder: Path) -> tuple[subprocess.Popen[bytes], str]:
    binary = shutil.which("prometheus")
    if binary is None:
        raise SystemExit("needs `prometheus` on $PATH (Debian: apt-get install prometheus)")
    config = {
        "global": {"scrape_interval": f"{SCRAPE_S}s", "scrape_timeout": f"{SCRAPE_S - 1}s"},
        "scrape_configs": [
            {
                "job_name": "runtime",
                "static_configs": [
                    {
                        "targets": [f"{_address(i)}:{pods_port}"],
                        "labels": {"namespace": NAMESPACE, "pod": _pod(i)},
                    }
                    for i in range(count)
                ],
            }
        ],
    }
    (folder / "prometheus.yml").write_text(yaml.safe_dump(config))
    port = _free_port()
    process = subprocess.Popen(
        [
            binary,
            f"--config.file={folder / 'prometheus.yml'}",
            f"--storage.tsdb.path={folder / 'data'}",
            f"--web.listen-address=127.0.0.1:{port}",
        ],
        stdout=(folder / "prometheus.log").open("wb"),
        stderr=subprocess.STDOUT,
    )
    return process, f"http://127.0.0.1:{port}"


def _scraped_all(url: str, count: int) -> bool:
    query = urllib.parse.urlencode({"query": "count(up == 1)"})
    try:
        with urllib.request.urlopen(f"{url}/api/v1/query?{query}", timeout=10) as answer:
            result = json.loads(answer.read())["data"]["result"]
    except OSError:
        return False  # not listening yet
    return bool(result) and int(float(result[0]["value"][1])) >= count


def _old_queries(target: collect.Target, window: str) -> dict[str, str]:
    """The per-object queries the operator sent before (the baseline)."""
    selector = (
        f'namespace="{target.namespace}",pod=~"{target.name}-[a-z0-9]+-[a-z0-9]+",'
        f'model="{target.model}"'
    )
    requests = f"sum(rate({telemetry.REQUESTS}_total{{{selector}}}[{window}]))"
    failed = f'sum(rate({telemetry.REQUESTS}_total{{{selector},outcome!="success"}}[{window}]))'
    latency = f"sum by (le) (rate({telemetry.LATENCY}_bucket{{{selector}}}[{window}]))"
    return {
        "rps": requests,
        "failed": failed,
        "p50": f"histogram_quantile(0.5, {latency})",
        "p99": f"histogram_quantile(0.99, {latency})",
        "batch": f"sum(rate({telemetry.BATCH_SIZE}_sum{{{selector}}}[{window}])) / "
        f"sum(rate({telemetry.BATCH_SIZE}_count{{{selector}}}[{window}]))",
    }


async def _per_object_round(
    url: str, targets: list[collect.Target], at: float | None = None
) -> tuple[dict[str, telemetry.Summary | None], int, float]:
    """One round the old way: 5 queries per target, 32 targets at a time (MetricsLoop's limit);
    `at`: evaluated at that instant instead of now."""
    limit = asyncio.Semaphore(32)
    sent = 0
    summaries: dict[str, telemetry.Summary | None] = {}
    async with aiohttp.ClientSession() as session:

        async def one(target: collect.Target) -> None:
            nonlocal sent
            async with limit:
                values: dict[str, float | None] = {}
                for name, promql in _old_queries(target, f"{WINDOW_S}s").items():
                    sent += 1
                    params = {"query": promql} | ({"time": str(at)} if at else {})
                    async with session.get(f"{url}/api/v1/query", params=params) as r:
                        result = (await r.json())["data"]["result"]
                    value = float(result[0]["value"][1]) if result else None
                    values[name] = None if value != value else value  # NaN: no traffic
                rps = values["rps"]
                summaries[target.name] = (
                    None
                    if rps is None
                    else telemetry.Summary(
                        requests_per_second=rps,
                        latency_p50_ms=None if values["p50"] is None else values["p50"] * 1000,
                        latency_p99_ms=None if values["p99"] is None else values["p99"] * 1000,
                        mean_batch_size=values["batch"],
                        error_rate=(values["failed"] or 0.0) / rps if rps else 0.0,
                    )
                )

        started = time.monotonic()
        await asyncio.gather(*(one(t) for t in targets))
        return summaries, sent, time.monotonic() - started


async def _grouped_round(url: str, targets: list[collect.Target]) -> tuple[int, float]:
    """One round as the operator does it: PrometheusSource, refreshed once, then per target."""
    source = collect.PrometheusSource(url, WINDOW_S)
    try:
        started = time.monotonic()
        await source.refresh(targets)
        for target in targets:
            await source.summary(target)
        return source.queries_sent, time.monotonic() - started
    finally:
        await source.close()


async def _grouped_at(
    url: str, targets: list[collect.Target], at: float
) -> dict[str, telemetry.Summary | None]:
    """The operator's grouped queries and split, evaluated at the instant `at`."""
    queries = collect.PrometheusSource(url, WINDOW_S).queries(t.namespace for t in targets)
    answers = {}
    async with aiohttp.ClientSession() as session:
        for name, promql in queries.items():
            params = {"query": promql, "time": str(at)}
            async with session.get(f"{url}/api/v1/query", params=params) as r:
                answers[name] = (await r.json())["data"]["result"]
    split = collect.split(answers)
    return {
        t.name: telemetry.summarise(split[key], 1.0)
        if (key := (t.namespace, t.name, t.model)) in split
        else None
        for t in targets
    }


def _same(a: telemetry.Summary | None, b: telemetry.Summary | None) -> bool:
    if a is None or b is None:
        return a is b
    for x, y in zip(
        (
            a.requests_per_second,
            a.latency_p50_ms,
            a.latency_p99_ms,
            a.mean_batch_size,
            a.error_rate,
        ),
        (
            b.requests_per_second,
            b.latency_p50_ms,
            b.latency_p99_ms,
            b.mean_batch_size,
            b.error_rate,
        ),
        strict=True,
    ):
        if (x is None) != (y is None) or (
            x is not None and y is not None and abs(x - y) > 1e-6 * max(1.0, abs(x))
        ):
            return False
    return True


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--count", type=int, default=1000)
    args = parser.parse_args()
    count = args.count
    pods_port = _free_port()
    pods = _Pods(count, pods_port)
    with tempfile.TemporaryDirectory(prefix="bench-metrics-") as folder:
        prometheus, url = _prometheus(count, pods_port, Path(folder))
        try:
            # Every pod scraped, then a full window of scrapes: steady rates.
            deadline = time.monotonic() + 300
            while not _scraped_all(url, count):
                if time.monotonic() > deadline:
                    raise SystemExit("Prometheus did not scrape every pod in time")
                time.sleep(1)
            time.sleep(WINDOW_S + 2 * SCRAPE_S)
            targets = [collect.Target(NAMESPACE, f"m{i}", f"m{i}", {}) for i in range(count)]
            grouped_sent, grouped_s = asyncio.run(_grouped_round(url, targets))
            _, old_sent, old_s = asyncio.run(_per_object_round(url, targets))
            # The same figures both ways, evaluated at one instant.
            at = time.time() - 2 * SCRAPE_S  # an instant whose scrapes are all stored
            old = asyncio.run(_per_object_round(url, targets, at))[0]
            grouped = asyncio.run(_grouped_at(url, targets, at))
        finally:
            prometheus.terminate()
            prometheus.wait(timeout=30)
            pods.close()
    same = sum(_same(old[t.name], grouped[t.name]) for t in targets)
    print(f"{count} ModelDeployments, one collection round against Prometheus ({url}):")
    print(f"{'':14} {'queries':>8} {'seconds':>8}")
    print(f"{'per object':14} {old_sent:>8} {old_s:>8.2f}")
    print(f"{'grouped':14} {grouped_sent:>8} {grouped_s:>8.2f}")
    print(f"same summaries at one instant (rate, p50, p99, batch, errors): {same}/{count}")
    for t in [t for t in targets if not _same(old[t.name], grouped[t.name])][:3]:
        print(f"  {t.name}: per object {old[t.name]}")
        print(f"  {t.name}: grouped    {grouped[t.name]}")
    return 0 if same == count else 1


if __name__ == "__main__":
    sys.exit(main())

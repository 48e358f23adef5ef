"""The direct source scrapes real runtime exposition; the writer writes only material changes and
survives a failed write."""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import Any

import prometheus_client
import pytest
from aiohttp import web

from modeldeploy_operator import collect
from modeldeploy_runtime import metrics as runtime_metrics
from operator_helpers import free_port


@pytest.fixture
def pod() -> runtime_metrics.ModelMetrics:
    return runtime_metrics.ModelMetrics("iris")


async def _serve(pod: runtime_metrics.ModelMetrics) -> tuple[web.AppRunner, str]:
    return await _serve_page(pod.exposition)


async def _serve_page(body: Callable[[], bytes]) -> tuple[web.AppRunner, str]:
    async def page(_: web.Request) -> web.Response:
        return web.Response(body=body(), content_type="text/plain")

    app = web.Application()
    app.router.add_get("/metrics", page)
    runner = web.AppRunner(app)
    await runner.setup()
    port = free_port()
    await web.TCPSite(runner, "127.0.0.1", port).start()
    return runner, f"http://127.0.0.1:{port}/metrics"


def _serve_requests(pod: runtime_metrics.ModelMetrics, count: int) -> None:
    for _ in range(count):
        pod.observe_request(runtime_metrics.Protocol.HTTP, runtime_metrics.Outcome.SUCCESS, 0.003)
    pod.batch_size.observe(count)


def _errors() -> float:
    labels = {"source": "direct", "result": "error"}
    name = "modeldeploy_operator_metrics_collections_total"
    return prometheus_client.REGISTRY.get_sample_value(name, labels) or 0.0


def test_direct_source_reports_growth_since_the_previous_scrape(
    pod: runtime_metrics.ModelMetrics,
) -> None:
    async def scenario() -> None:
        runner, url = await _serve(pod)
        source = collect.DirectSource()
        target = collect.Target("ml", "iris", "iris", {"iris-abc-1": url})
        try:
            assert await source.summary(target) is None  # the first scrape is the baseline
            _serve_requests(pod, 40)
            summary = await source.summary(target)
            assert summary is not None and summary.requests_per_second > 0
            assert summary.mean_batch_size == 40
            errors = _errors()
            unreachable = {"iris-abc-2": "http://127.0.0.1:9/metrics"}
            assert await source.summary(collect.Target("ml", "iris", "iris", unreachable)) is None
            assert _errors() == errors + 1
        finally:
            await source.close()
            await runner.cleanup()

    asyncio.run(scenario())


def test_writer_writes_a_new_summary_and_survives_a_failed_write(
    pod: runtime_metrics.ModelMetrics,
) -> None:
    writes: list[dict[str, Any]] = []

    async def write(namespace: str, name: str, metrics: dict[str, Any]) -> None:
        writes.append(metrics)

    async def fail(namespace: str, name: str, metrics: dict[str, Any]) -> None:
        raise RuntimeError('modeldeployments.modeldeploy.io "iris" not found')

    async def scenario() -> None:
        runner, url = await _serve(pod)
        source = collect.DirectSource()
        target = collect.Target("ml", "iris", "iris", {"iris-abc-1": url})
        try:
            await collect.MetricsWriter(source, write, interval=1).collect(target, None)
            assert writes == []  # a baseline only
            _serve_requests(pod, 10)
            await collect.MetricsWriter(source, write, interval=1).collect(target, None)
            assert len(writes) == 1 and writes[0]["requestsPerSecond"] > 0
            errors = _errors()
            _serve_requests(pod, 10)
            await collect.MetricsWriter(source, fail, interval=1).collect(target, None)
            assert _errors() == errors + 1
        finally:
            await source.close()
            await runner.cleanup()

    asyncio.run(scenario())


def test_pod_addresses_of_both_families_make_urls() -> None:
    def pod(name: str, ip: str) -> dict[str, Any]:
        return {
            "metadata": {"name": name},
            "status": {"podIP": ip, "conditions": [{"type": "Ready", "status": "True"}]},
        }

    urls = collect.ready_pod_urls([pod("a", "10.1.2.3"), pod("b", "fd00::1:2")], 8080)
    assert urls == {"a": "http://10.1.2.3:8080/metrics", "b": "http://[fd00::1:2]:8080/metrics"}


@pytest.mark.parametrize(
    "page",
    [
        b"x" * (collect.MAX_EXPOSITION_BYTES + 10),  # a flood: refused, not read
        bytes(range(256)) * 64,  # not text at all
        b"modeldeploy_requests_total{model=iris",  # not exposition
    ],
    ids=["too-large", "binary", "garbage"],
)
def test_a_hostile_metrics_page_is_left_out_and_counted(page: bytes) -> None:
    async def scenario() -> None:
        runner, url = await _serve_page(lambda: page)
        source = collect.DirectSource()
        try:
            errors = _errors()
            target = collect.Target("ml", "iris", "iris", {"iris-abc-1": url})
            assert await source.summary(target) is None
            assert _errors() == errors + 1
        finally:
            await source.close()
            await runner.cleanup()

    asyncio.run(scenario())

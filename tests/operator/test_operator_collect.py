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


def _series(labels: dict[str, str], value: float) -> dict[str, Any]:
    return {"metric": labels, "value": [1700000000.0, repr(value)]}


def test_grouped_prometheus_answers_are_split_per_model_deployment() -> None:
    """Four grouped queries carry every ModelDeployment's rates; split here, they give what
    per-object PromQL gave: the pods of "iris" only (not "iris-v2"'s), quantiles over the
    summed buckets, errors over requests."""
    source = collect.PrometheusSource("http://127.0.0.1:9", 60)
    # A namespace with a "-": PromQL strings have no "\\-" escape, so it goes in as it is.
    queries = source.queries(["ml", "ops-team"])
    assert len(queries) == 4
    assert all(
        'namespace=~"ml|ops-team"' in q and "sum by (namespace, pod, model" in q
        for q in queries.values()
    )

    def pod(name: str, outcome: str = "success") -> dict[str, str]:
        return {"namespace": "ml", "pod": name, "model": "iris", "outcome": outcome}

    answers = {
        "requests": [
            _series(pod("iris-7d9f-abcde"), 8.0),
            _series(pod("iris-7d9f-fghij"), 10.0),
            _series(pod("iris-7d9f-fghij", "error"), 2.0),
            _series(pod("iris-v2-5c4b-klmno"), 100.0),  # another ModelDeployment
            _series(pod("iris-7d9f-pqrst"), float("nan")),  # no samples in the window
        ],
        "latency": [
            _series(pod("iris-7d9f-abcde") | {"le": "0.005"}, 4.0),
            _series(pod("iris-7d9f-abcde") | {"le": "0.01"}, 8.0),
            _series(pod("iris-7d9f-abcde") | {"le": "+Inf"}, 8.0),
            _series(pod("iris-7d9f-fghij") | {"le": "0.005"}, 0.0),
            _series(pod("iris-7d9f-fghij") | {"le": "0.01"}, 12.0),
            _series(pod("iris-7d9f-fghij") | {"le": "+Inf"}, 12.0),
        ],
        "batch_sum": [_series(pod("iris-7d9f-abcde"), 16.0), _series(pod("iris-7d9f-fghij"), 24.0)],
        "batch_count": [_series(pod("iris-7d9f-abcde"), 4.0), _series(pod("iris-7d9f-fghij"), 6.0)],
    }
    split = collect.split(answers)
    assert set(split) == {("ml", "iris", "iris"), ("ml", "iris-v2", "iris")}

    source._rates = split
    summary = asyncio.run(source.summary(collect.Target("ml", "iris", "iris", {})))
    assert summary is not None
    assert summary.requests_per_second == pytest.approx(20.0)
    assert summary.error_rate == pytest.approx(0.1)
    assert summary.mean_batch_size == pytest.approx(4.0)
    # Summed buckets: 4 of 20 under 5 ms, all under 10 ms; the median interpolates in (5, 10].
    assert summary.latency_p50_ms == pytest.approx(5 + 5 * (10 - 4) / 16)
    other = asyncio.run(source.summary(collect.Target("ml", "iris-v2", "iris", {})))
    assert other is not None and other.requests_per_second == pytest.approx(100.0)
    assert asyncio.run(source.summary(collect.Target("ml", "bert", "bert", {}))) is None


def test_a_hung_pod_delays_only_its_own_model_deployment(
    pod: runtime_metrics.ModelMetrics,
) -> None:
    """A pod that accepts the connection and never answers: the other ModelDeployments are
    written at once, the round ends at its deadline, and the next one starts on time."""
    writes: dict[str, float] = {}

    async def scenario() -> None:
        started = asyncio.get_running_loop().time()

        async def write(namespace: str, name: str, metrics: dict[str, Any]) -> None:
            writes[name] = asyncio.get_running_loop().time() - started

        async def hang(_: web.Request) -> web.Response:
            await asyncio.sleep(3600)
            raise AssertionError("unreachable")

        async def page(_: web.Request) -> web.Response:
            return web.Response(body=pod.exposition(), content_type="text/plain")

        # Two "pods" on one port: 127.0.0.1 answers, 127.0.0.2 hangs.
        port = free_port()
        runners = []
        for address, handler in (("127.0.0.1", page), ("127.0.0.2", hang)):
            app = web.Application()
            app.router.add_get("/metrics", handler)
            runner = web.AppRunner(app, shutdown_timeout=0.1)  # the hung request is dropped
            await runner.setup()
            await web.TCPSite(runner, address, port).start()
            runners.append(runner)

        def ready(address: str) -> list[dict[str, Any]]:
            condition = {"type": "Ready", "status": "True"}
            return [
                {"metadata": {"name": "p"}, "status": {"podIP": address, "conditions": [condition]}}
            ]

        interval = 1.0
        # A timeout longer than the interval: the round's deadline is what bounds it.
        source = collect.DirectSource(timeout=30)
        writer = collect.MetricsWriter(source, write, interval)
        pods = {("ml", f"m{i}"): ready("127.0.0.1") for i in range(20)}
        pods[("ml", "stuck")] = ready("127.0.0.2")
        loop = collect.MetricsLoop(writer, lambda key: pods.get(key, []), http_port=port)
        for key in pods:
            loop.track(key, "iris", None)
        late = _late()
        try:
            await loop.round()  # baselines
            first_round = asyncio.get_running_loop().time() - started
            _serve_requests(pod, 30)
            await loop.round()
            second_round = asyncio.get_running_loop().time() - started - first_round
        finally:
            await source.close()
            for runner in runners:
                await runner.cleanup()
        assert first_round == pytest.approx(interval, abs=0.3)  # cut at the deadline
        assert second_round == pytest.approx(interval, abs=0.3)
        assert sorted(writes) == sorted(f"m{i}" for i in range(20))  # all but the stuck one
        assert max(writes.values()) < first_round + 0.5  # written at once, not at the deadline
        assert _late() == late + 2

    asyncio.run(scenario())


def _late() -> float:
    labels = {"source": "direct", "result": "late"}
    name = "modeldeploy_operator_metrics_collections_total"
    return prometheus_client.REGISTRY.get_sample_value(name, labels) or 0.0

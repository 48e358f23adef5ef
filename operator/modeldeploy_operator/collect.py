"""Where status.metrics comes from: Prometheus's HTTP API, or a direct scrape of the ready pods.

The two sources give the same `telemetry.Summary`. The direct source keeps the previous scrape of
each pod in memory and reports the growth since then; the first scrape of a pod only sets its
baseline. Scrapes are bounded by a timeout and a process-wide limit on concurrent requests.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import Any

import aiohttp

from modeldeploy_operator import opmetrics, telemetry
from modeldeploy_operator import spec as api

logger = logging.getLogger(__name__)

_TIMEOUT = aiohttp.ClientTimeout(total=5)
# A runtime pod's exposition is a few KiB; the image is the tenant's choice, so a page past
# this is refused rather than read (the operator's memory is every tenant's).
MAX_EXPOSITION_BYTES = 1 << 20


@dataclass(frozen=True)
class Target:
    """One ModelDeployment's metrics: its pods and the model name their series carry."""

    namespace: str
    name: str
    model: str
    pod_urls: Mapping[str, str]  # pod name -> metrics URL, ready pods only


def ready_pod_urls(pods: Iterable[Mapping[str, Any]], port: int) -> dict[str, str]:
    urls = {}
    for pod in pods:
        status = pod.get("status", {})
        ready = any(
            c.get("type") == "Ready" and c.get("status") == "True"
            for c in status.get("conditions", [])
        )
        address = status.get("podIP")
        if ready and address and not pod["metadata"].get("deletionTimestamp"):
            host = f"[{address}]" if ":" in address else address  # IPv6 goes in brackets
            urls[pod["metadata"]["name"]] = f"http://{host}:{port}/metrics"
    return urls


class DirectSource:
    def __init__(self, concurrency: int = 32) -> None:
        self._limit = asyncio.Semaphore(concurrency)
        self._last: dict[tuple[str, str], tuple[float, telemetry.Counters]] = {}
        self._pods_of: dict[tuple[str, str], set[str]] = {}
        self._session: aiohttp.ClientSession | None = None

    async def _scrape(self, url: str, model: str) -> telemetry.Counters | None:
        if self._session is None:
            self._session = aiohttp.ClientSession(timeout=_TIMEOUT)
        async with self._limit:
            try:
                async with self._session.get(url) as response:
                    response.raise_for_status()
                    body = await response.content.read(MAX_EXPOSITION_BYTES + 1)
                    while len(body) <= MAX_EXPOSITION_BYTES and not response.content.at_eof():
                        body += await response.content.read(MAX_EXPOSITION_BYTES + 1 - len(body))
                    if len(body) > MAX_EXPOSITION_BYTES:
                        raise ValueError(f"exposition larger than {MAX_EXPOSITION_BYTES} bytes")
                    return telemetry.parse(body.decode(errors="replace"), model)
            except Exception as error:
                # A pod that just became unready, is shutting down, or serves something that
                # is not our exposition: it is left out, and the others still count.
                opmetrics.METRICS_COLLECTIONS.labels("direct", "error").inc()
                logger.debug("scraping %s: %s", url, error)
                return None

    async def summary(self, target: Target) -> telemetry.Summary | None:
        """Growth since the previous call for the same pods; None until there is a baseline."""
        names = list(target.pod_urls)
        scraped = await asyncio.gather(
            *(self._scrape(target.pod_urls[n], target.model) for n in names)
        )
        now = time.monotonic()
        self._forget_gone(target)
        windows, seconds = [], []
        for name, counters in zip(names, scraped, strict=True):
            if counters is None:
                continue
            key = (target.namespace, name)
            previous = self._last.get(key)
            self._last[key] = (now, counters)
            if previous is not None:
                windows.append(counters.minus(previous[1]))
                seconds.append(now - previous[0])
        if not windows:
            return None
        return telemetry.summarise(windows, max(seconds))

    def _forget_gone(self, target: Target) -> None:
        """Drops the baselines of this ModelDeployment's pods that are no longer ready."""
        previous = self._pods_of.get((target.namespace, target.name), set())
        for pod in previous - set(target.pod_urls):
            self._last.pop((target.namespace, pod), None)
        self._pods_of[(target.namespace, target.name)] = set(target.pod_urls)

    def forget(self, namespace: str, name: str) -> None:
        for pod in self._pods_of.pop((namespace, name), set()):
            self._last.pop((namespace, pod), None)

    async def close(self) -> None:
        if self._session is not None:
            await self._session.close()


class PrometheusSource:
    """PromQL over the runtime series that Prometheus labels with `namespace` and `pod`."""

    def __init__(self, url: str, window_seconds: int) -> None:
        self._url = url.rstrip("/") + "/api/v1/query"
        self._window = f"{window_seconds}s"
        self._session: aiohttp.ClientSession | None = None

    def queries(self, target: Target) -> dict[str, str]:
        # A Deployment's pods are <name>-<template hash>-<suffix>; the exact shape keeps
        # "iris" from matching the pods of "iris-v2".
        selector = (
            f'namespace="{target.namespace}",pod=~"{target.name}-[a-z0-9]+-[a-z0-9]+",'
            f'model="{target.model}"'
        )
        w = self._window
        requests = f"sum(rate({telemetry.REQUESTS}_total{{{selector}}}[{w}]))"
        failed = f'sum(rate({telemetry.REQUESTS}_total{{{selector},outcome!="success"}}[{w}]))'
        latency = f"sum by (le) (rate({telemetry.LATENCY}_bucket{{{selector}}}[{w}]))"
        return {
            "rps": requests,
            "failed": failed,
            "p50": f"histogram_quantile(0.5, {latency})",
            "p99": f"histogram_quantile(0.99, {latency})",
            "batch": (
                f"sum(rate({telemetry.BATCH_SIZE}_sum{{{selector}}}[{w}])) / "
                f"sum(rate({telemetry.BATCH_SIZE}_count{{{selector}}}[{w}]))"
            ),
        }

    async def _query(self, promql: str) -> float | None:
        if self._session is None:
            self._session = aiohttp.ClientSession(timeout=_TIMEOUT)
        async with self._session.get(self._url, params={"query": promql}) as response:
            response.raise_for_status()
            body = await response.json()
        result = body["data"]["result"]
        if not result:
            return None
        value = float(result[0]["value"][1])
        return None if value != value else value  # NaN: no traffic in the window

    async def summary(self, target: Target) -> telemetry.Summary | None:
        queries = self.queries(target)
        values = dict(
            zip(
                queries,
                await asyncio.gather(*(self._query(q) for q in queries.values())),
                strict=True,
            )
        )
        rps = values["rps"]
        if rps is None:
            return None
        return telemetry.Summary(
            requests_per_second=rps,
            latency_p50_ms=None if values["p50"] is None else values["p50"] * 1000,
            latency_p99_ms=None if values["p99"] is None else values["p99"] * 1000,
            mean_batch_size=values["batch"],
            error_rate=(values["failed"] or 0.0) / rps if rps else 0.0,
        )

    async def close(self) -> None:
        if self._session is not None:
            await self._session.close()


Source = DirectSource | PrometheusSource
WriteMetrics = Callable[[str, str, dict[str, Any]], Awaitable[object]]


class MetricsWriter:
    """One collection for one ModelDeployment: summarise, and write only what changed materially."""

    def __init__(self, source: Source, write: WriteMetrics, interval: float) -> None:
        self.source = source
        self.interval = interval
        self._write = write
        self._source_name = "prometheus" if isinstance(source, PrometheusSource) else "direct"

    async def collect(self, target: Target, written: Mapping[str, Any] | None) -> None:
        source = self._source_name
        with opmetrics.METRICS_COLLECTION_DURATION.labels(source).time():
            try:
                summary = await self.source.summary(target)
            except (aiohttp.ClientError, TimeoutError, KeyError, ValueError) as error:
                opmetrics.METRICS_COLLECTIONS.labels(source, "error").inc()
                logger.warning("metrics of %s/%s: %s", target.namespace, target.name, error)
                return
        if summary is None:
            opmetrics.METRICS_COLLECTIONS.labels(source, "no_data").inc()
            return
        new = summary.as_status(api.now())
        if not telemetry.changed_materially(written, new):
            opmetrics.METRICS_COLLECTIONS.labels(source, "unchanged").inc()
            return
        try:
            await self._write(target.namespace, target.name, new)
        except Exception as error:  # one object's failed write (say, just deleted) stops nothing
            opmetrics.METRICS_COLLECTIONS.labels(source, "error").inc()
            logger.warning("writing metrics of %s/%s: %s", target.namespace, target.name, error)
            return
        opmetrics.METRICS_COLLECTIONS.labels(source, "written").inc()

    def forget(self, namespace: str, name: str) -> None:
        if isinstance(self.source, DirectSource):
            self.source.forget(namespace, name)


Key = tuple[str, str]


class MetricsLoop:
    """Every interval, status.metrics of every ModelDeployment, from one loop.

    One loop rather than a kopf timer per object: kopf puts a finalizer on objects with
    timers, which is a write per object and something for GitOps tools to trip over.
    """

    def __init__(
        self,
        writer: MetricsWriter,
        pods: Mapping[Key, Iterable[Mapping[str, Any]]],
        http_port: int,
        concurrency: int = 32,
    ) -> None:
        self.writer = writer
        self._pods = pods
        self._http_port = http_port
        self._limit = asyncio.Semaphore(concurrency)
        # ModelDeployment -> (model name, its status.metrics as last seen)
        self._targets: dict[Key, tuple[str, Mapping[str, Any] | None]] = {}

    def track(self, key: Key, model: str, written: Mapping[str, Any] | None) -> None:
        self._targets[key] = (model, written)

    def forget(self, key: Key) -> None:
        self._targets.pop(key, None)
        self.writer.forget(*key)

    async def _one(self, key: Key, model: str, written: Mapping[str, Any] | None) -> None:
        urls = ready_pod_urls(list(self._pods.get(key, [])), self._http_port)
        async with self._limit:
            await self.writer.collect(Target(key[0], key[1], model, urls), written)

    async def run(self) -> None:
        while True:
            started = time.monotonic()
            targets = list(self._targets.items())
            await asyncio.gather(*(self._one(key, *value) for key, value in targets))
            elapsed = time.monotonic() - started
            await asyncio.sleep(max(0.0, self.writer.interval - elapsed))

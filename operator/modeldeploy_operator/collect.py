"""Where status.metrics comes from: Prometheus's HTTP API, or a direct scrape of the ready pods.

The two sources give the same `telemetry.Summary`. The direct source keeps the previous scrape of
each pod in memory and reports the growth since then; the first scrape of a pod only sets its
baseline. Scrapes are bounded by a timeout and a process-wide limit on concurrent requests.
"""

from __future__ import annotations

import asyncio
import logging
import re
import time
from collections.abc import Awaitable, Callable, Iterable, Iterator, Mapping
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
    def __init__(self, concurrency: int = 32, timeout: float = 5.0) -> None:
        self._limit = asyncio.Semaphore(concurrency)
        self._timeout = aiohttp.ClientTimeout(total=timeout)
        self._last: dict[tuple[str, str], tuple[float, telemetry.Counters]] = {}
        self._pods_of: dict[tuple[str, str], set[str]] = {}
        self._session: aiohttp.ClientSession | None = None

    async def _scrape(self, url: str, model: str) -> telemetry.Counters | None:
        if self._session is None:
            self._session = aiohttp.ClientSession(timeout=self._timeout)
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

    async def refresh(self, targets: Iterable[Target]) -> None:
        """Nothing to do once per round: every ModelDeployment's pods are scraped on its own."""

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


class NoAnswerError(Exception):
    """The source had nothing this round (logged once for the round, not per object)."""


class PrometheusSource:
    """PromQL over the runtime series that Prometheus labels with `namespace` and `pod`.

    A handful of queries per interval, whatever the number of ModelDeployments: each asks for
    the rates of every pod of the served namespaces, grouped by namespace, pod and model, and
    the answer is split among the ModelDeployments here. Summed per ModelDeployment, the rates
    give what per-object PromQL gave (histogram_quantile over the summed buckets included).
    """

    def __init__(self, url: str, window_seconds: int) -> None:
        self._url = url.rstrip("/") + "/api/v1/query"
        self._window = f"{window_seconds}s"
        self._session: aiohttp.ClientSession | None = None
        # (namespace, ModelDeployment, model) -> one Counters of rates per pod; None: no answer
        self._rates: dict[tuple[str, str, str], list[telemetry.Counters]] | None = None
        self.queries_sent = 0

    def queries(self, namespaces: Iterable[str]) -> dict[str, str]:
        """The round's queries, over the series of these namespaces only."""
        # Namespaces are DNS labels (a-z, 0-9, "-"): nothing in them is special to the regex,
        # and PromQL strings have no "\-" escape (re.escape's), which Prometheus refuses.
        names = "|".join(sorted(set(namespaces)))
        selector = f'namespace=~"{names}",model!=""'
        w = self._window
        by = "namespace, pod, model"
        return {
            "requests": f"sum by ({by}, outcome) "
            f"(rate({telemetry.REQUESTS}_total{{{selector}}}[{w}]))",
            "latency": f"sum by ({by}, le) (rate({telemetry.LATENCY}_bucket{{{selector}}}[{w}]))",
            "batch_sum": f"sum by ({by}) (rate({telemetry.BATCH_SIZE}_sum{{{selector}}}[{w}]))",
            "batch_count": f"sum by ({by}) (rate({telemetry.BATCH_SIZE}_count{{{selector}}}[{w}]))",
        }

    async def _query(self, promql: str) -> list[dict[str, Any]]:
        if self._session is None:
            self._session = aiohttp.ClientSession(timeout=_TIMEOUT)
        self.queries_sent += 1
        opmetrics.PROMQL_QUERIES.inc()
        async with self._session.get(self._url, params={"query": promql}) as response:
            response.raise_for_status()
            body = await response.json()
        result: list[dict[str, Any]] = body["data"]["result"]
        return result

    async def refresh(self, targets: Iterable[Target]) -> None:
        """Asks Prometheus once for this round; `summary` then answers from memory."""
        self._rates = None
        namespaces = {t.namespace for t in targets}
        if not namespaces:
            return
        queries = self.queries(namespaces)
        answers = await asyncio.gather(*(self._query(q) for q in queries.values()))
        self._rates = split(dict(zip(queries, answers, strict=True)))

    async def summary(self, target: Target) -> telemetry.Summary | None:
        if self._rates is None:
            raise NoAnswerError("Prometheus did not answer this round")
        pods = self._rates.get((target.namespace, target.name, target.model))
        if not pods:
            return None
        # Rates per second: a one-second window of the summed rates is the summary.
        return telemetry.summarise(pods, 1.0)

    async def close(self) -> None:
        if self._session is not None:
            await self._session.close()


# A Deployment's pod is <ModelDeployment>-<template hash>-<suffix>: the exact shape keeps "iris"
# from taking the pods of "iris-v2".
_POD_OF_DEPLOYMENT = re.compile(r"^(?P<owner>.+)-[a-z0-9]+-[a-z0-9]+$")


def split(
    answers: Mapping[str, list[dict[str, Any]]],
) -> dict[tuple[str, str, str], list[telemetry.Counters]]:
    """The grouped answers (see PrometheusSource.queries) as rates per pod, filed under
    (namespace, ModelDeployment, model). NaN rates (no samples in the window) are left out."""
    per_pod: dict[tuple[str, str, str], dict[str, Any]] = {}

    def values(name: str) -> Iterator[tuple[dict[str, Any], dict[str, str], float]]:
        for series in answers.get(name, []):
            labels = series["metric"]
            value = float(series["value"][1])
            key = (labels.get("namespace", ""), labels.get("pod", ""), labels.get("model", ""))
            if value == value and all(key):  # not NaN, fully labelled
                fields = per_pod.setdefault(
                    key, {"requests": {}, "buckets": {}, "batch_sum": 0.0, "batch_count": 0.0}
                )
                yield fields, labels, value

    for fields, labels, value in values("requests"):
        outcome = labels.get("outcome", "")
        fields["requests"][outcome] = fields["requests"].get(outcome, 0.0) + value
    for fields, labels, value in values("latency"):
        le = float(labels["le"])
        fields["buckets"][le] = fields["buckets"].get(le, 0.0) + value
    for fields, _, value in values("batch_sum"):
        fields["batch_sum"] += value
    for fields, _, value in values("batch_count"):
        fields["batch_count"] += value

    grouped: dict[tuple[str, str, str], list[telemetry.Counters]] = {}
    for (namespace, pod, model), fields in per_pod.items():
        match = _POD_OF_DEPLOYMENT.match(pod)
        if match is None:
            continue
        counters = telemetry.Counters(
            fields["requests"], fields["buckets"], fields["batch_sum"], fields["batch_count"]
        )
        grouped.setdefault((namespace, match["owner"], model), []).append(counters)
    return grouped


Source = DirectSource | PrometheusSource
WriteMetrics = Callable[[str, str, dict[str, Any]], Awaitable[object]]


class MetricsWriter:
    """One collection for one ModelDeployment: summarise, and write only what changed materially."""

    def __init__(self, source: Source, write: WriteMetrics, interval: float) -> None:
        self.source = source
        self.interval = interval
        self._write = write
        self.source_name = "prometheus" if isinstance(source, PrometheusSource) else "direct"

    async def collect(self, target: Target, written: Mapping[str, Any] | None) -> None:
        source = self.source_name
        with opmetrics.METRICS_COLLECTION_DURATION.labels(source).time():
            try:
                summary = await self.source.summary(target)
            except NoAnswerError:
                opmetrics.METRICS_COLLECTIONS.labels(source, "error").inc()
                return
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
        pods: Callable[[Key], Iterable[Mapping[str, Any]]],
        http_port: int,
        concurrency: int = 32,
    ) -> None:
        self.writer = writer
        self._pods = pods  # a ModelDeployment's pods, as the watch last saw them
        self._http_port = http_port
        self._limit = asyncio.Semaphore(concurrency)
        # ModelDeployment -> (model name, its status.metrics as last seen)
        self._targets: dict[Key, tuple[str, Mapping[str, Any] | None]] = {}

    def track(self, key: Key, model: str, written: Mapping[str, Any] | None) -> None:
        self._targets[key] = (model, written)

    def forget(self, key: Key) -> None:
        self._targets.pop(key, None)
        self.writer.forget(*key)

    async def _one(self, target: Target, written: Mapping[str, Any] | None) -> None:
        async with self._limit:
            await self.writer.collect(target, written)

    async def round(self) -> None:
        """One collection of every ModelDeployment, within one interval: what is not done by
        then (a hung pod's ModelDeployment) is cancelled, and the next round starts on time."""
        deadline = time.monotonic() + self.writer.interval
        targets = [
            (Target(*key, model, ready_pod_urls(self._pods(key), self._http_port)), w)
            for key, (model, w) in list(self._targets.items())
        ]
        source = self.writer.source_name
        try:
            await asyncio.wait_for(
                self.writer.source.refresh(t for t, _ in targets), self.writer.interval / 2
            )
        except (aiohttp.ClientError, TimeoutError, KeyError, ValueError) as error:
            # Every ModelDeployment's summary then counts an error; logged once, here.
            logger.warning("metrics: %s", error or type(error).__name__)
        tasks = [asyncio.create_task(self._one(t, w)) for t, w in targets]
        if not tasks:
            return
        _, late = await asyncio.wait(tasks, timeout=max(0.0, deadline - time.monotonic()))
        for task in late:
            task.cancel()
            opmetrics.METRICS_COLLECTIONS.labels(source, "late").inc()
        if late:
            await asyncio.wait(late)

    async def run(self) -> None:
        while True:
            started = time.monotonic()
            await self.round()
            elapsed = time.monotonic() - started
            await asyncio.sleep(max(0.0, self.writer.interval - elapsed))

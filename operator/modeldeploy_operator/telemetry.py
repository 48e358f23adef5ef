"""Summarising the runtime pods' Prometheus metrics into `status.metrics` (pure functions).

The runtime exports cumulative counters and histograms (names in modeldeploy_contract.metrics). From
two scrapes of the same pod the difference gives what happened in between; a counter that went
down means the pod restarted, and then its current value is what happened since. The windows of
all ready pods are added up, and quantiles are read off the summed latency histogram the way
Prometheus's histogram_quantile does.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import TypeVar

from prometheus_client.parser import text_string_to_metric_families

from modeldeploy_contract import metrics

REQUESTS = metrics.REQUESTS
LATENCY = metrics.REQUEST_DURATION
BATCH_SIZE = metrics.BATCH_SIZE
SUCCESS = metrics.OUTCOME_SUCCESS

# What "changed materially" means: a write for less is noise that would cost an API call.
_RELATIVE_CHANGE = 0.10
_ERROR_RATE_CHANGE = 0.01
_K = TypeVar("_K")


@dataclass(frozen=True)
class Counters:
    """Cumulative counters of one model on one pod, or their growth over a window."""

    requests: Mapping[str, float] = field(default_factory=dict)  # by outcome
    latency_buckets: Mapping[float, float] = field(default_factory=dict)  # le -> cumulative
    batch_sum: float = 0.0
    batch_count: float = 0.0

    def minus(self, earlier: Counters) -> Counters:
        """Growth since `earlier`; everything since start when the pod restarted in between."""
        went_down = any(v < earlier.requests.get(k, 0.0) for k, v in self.requests.items()) or (
            self.batch_count < earlier.batch_count
        )
        if went_down:
            return self
        return Counters(
            requests={k: v - earlier.requests.get(k, 0.0) for k, v in self.requests.items()},
            latency_buckets={
                le: v - earlier.latency_buckets.get(le, 0.0)
                for le, v in self.latency_buckets.items()
            },
            batch_sum=self.batch_sum - earlier.batch_sum,
            batch_count=self.batch_count - earlier.batch_count,
        )

    def plus(self, other: Counters) -> Counters:
        return Counters(
            requests=_add(self.requests, other.requests),
            latency_buckets=_add(self.latency_buckets, other.latency_buckets),
            batch_sum=self.batch_sum + other.batch_sum,
            batch_count=self.batch_count + other.batch_count,
        )


def _add(a: Mapping[_K, float], b: Mapping[_K, float]) -> dict[_K, float]:
    return {k: a.get(k, 0.0) + b.get(k, 0.0) for k in a.keys() | b.keys()}


def parse(text: str, model: str) -> Counters:
    """Reads one pod's /metrics page, keeping the series of `model` (all protocols added)."""
    requests: dict[str, float] = {}
    buckets: dict[float, float] = {}
    batch_sum = batch_count = 0.0
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.labels.get("model") != model:
                continue
            if sample.name == f"{REQUESTS}_total":
                outcome = sample.labels.get("outcome", "")
                requests[outcome] = requests.get(outcome, 0.0) + sample.value
            elif sample.name == f"{LATENCY}_bucket":
                le = float(sample.labels["le"])
                buckets[le] = buckets.get(le, 0.0) + sample.value
            elif sample.name == f"{BATCH_SIZE}_sum":
                batch_sum += sample.value
            elif sample.name == f"{BATCH_SIZE}_count":
                batch_count += sample.value
    return Counters(requests, buckets, batch_sum, batch_count)


def quantile(q: float, buckets: Mapping[float, float]) -> float | None:
    """The q-quantile of a cumulative histogram, interpolated linearly within its bucket."""
    ordered = sorted(buckets.items())
    if not ordered or ordered[-1][1] <= 0:
        return None
    rank = q * ordered[-1][1]
    lower_bound, lower_count = 0.0, 0.0
    for upper_bound, count in ordered:
        if count >= rank:
            if math.isinf(upper_bound):
                return lower_bound  # as Prometheus: the highest finite bucket bound
            if count == lower_count:
                return upper_bound
            return lower_bound + (upper_bound - lower_bound) * (rank - lower_count) / (
                count - lower_count
            )
        lower_bound, lower_count = upper_bound, count
    return lower_bound


@dataclass(frozen=True)
class Summary:
    """What `status.metrics` shows; latencies in milliseconds, None when there was no traffic."""

    requests_per_second: float
    latency_p50_ms: float | None
    latency_p99_ms: float | None
    mean_batch_size: float | None
    error_rate: float

    def as_status(self, updated_at: str) -> dict[str, float | str | None]:
        return {
            "requestsPerSecond": round(self.requests_per_second, 2),
            "latencyP50Ms": _round(self.latency_p50_ms),
            "latencyP99Ms": _round(self.latency_p99_ms),
            "meanBatchSize": _round(self.mean_batch_size),
            "errorRate": round(self.error_rate, 4),
            "updatedAt": updated_at,
        }


def _round(value: float | None) -> float | None:
    return None if value is None else round(value, 2)


def summarise(windows: Iterable[Counters], seconds: float) -> Summary:
    """Adds up the pods' windows (each `seconds` long) into one summary."""
    total = Counters()
    for window in windows:
        total = total.plus(window)
    requests = sum(total.requests.values())
    failed = requests - total.requests.get(SUCCESS, 0.0)
    p50, p99 = (quantile(q, total.latency_buckets) for q in (0.5, 0.99))
    return Summary(
        requests_per_second=requests / seconds if seconds > 0 else 0.0,
        latency_p50_ms=None if p50 is None else p50 * 1000,
        latency_p99_ms=None if p99 is None else p99 * 1000,
        mean_batch_size=total.batch_sum / total.batch_count if total.batch_count else None,
        error_rate=failed / requests if requests else 0.0,
    )


def changed_materially(
    old: Mapping[str, object] | None, new: Mapping[str, float | str | None]
) -> bool:
    """Whether `new` says something `old` (the status.metrics now written) does not."""
    if not old:
        return True
    for key in ("requestsPerSecond", "latencyP50Ms", "latencyP99Ms", "meanBatchSize"):
        before, after = old.get(key), new.get(key)
        if (before is None) != (after is None):
            return True
        if isinstance(before, int | float) and isinstance(after, int | float):
            scale = max(abs(before), abs(after))
            if scale > 0 and abs(after - before) / scale > _RELATIVE_CHANGE:
                return True
    before_errors, after_errors = old.get("errorRate"), new.get("errorRate")
    if isinstance(before_errors, int | float) and isinstance(after_errors, int | float):
        return abs(after_errors - before_errors) > _ERROR_RATE_CHANGE
    return before_errors != after_errors

"""status.metrics is summarised correctly from what the runtime really exports."""

from __future__ import annotations

import pytest

from modeldeploy_operator import telemetry
from modeldeploy_runtime import metrics as runtime_metrics

HTTP, GRPC = runtime_metrics.Protocol.HTTP, runtime_metrics.Protocol.GRPC
OK, BAD = runtime_metrics.Outcome.SUCCESS, runtime_metrics.Outcome.SERVER_ERROR


def _serve(
    pod: runtime_metrics.ModelMetrics, latencies: list[float], outcome: runtime_metrics.Outcome = OK
) -> None:
    for index, seconds in enumerate(latencies):
        pod.observe_request(HTTP if index % 2 else GRPC, outcome, seconds)


def _read(pod: runtime_metrics.ModelMetrics, model: str = "iris") -> telemetry.Counters:
    return telemetry.parse(pod.exposition().decode(), model)


def test_rates_latency_and_batching_over_a_window_across_pods() -> None:
    a, b = runtime_metrics.ModelMetrics("iris"), runtime_metrics.ModelMetrics("iris")
    _serve(a, [0.002] * 50)
    before_a, before_b = _read(a), _read(b)
    _serve(a, [0.003] * 90)  # 90 fast requests on one pod ...
    _serve(b, [0.3] * 10)  # ... 10 slow ones on the other
    _serve(b, [0.003] * 2, outcome=BAD)
    for size in (4, 8):
        a.batch_size.observe(size)
    windows = [_read(a).minus(before_a), _read(b).minus(before_b)]

    summary = telemetry.summarise(windows, seconds=10.0)

    assert summary.requests_per_second == pytest.approx(10.2)
    assert summary.error_rate == pytest.approx(2 / 102)
    assert summary.mean_batch_size == pytest.approx(6.0)
    assert summary.latency_p50_ms is not None and 2.5 <= summary.latency_p50_ms <= 5.0
    assert summary.latency_p99_ms is not None and 250 <= summary.latency_p99_ms <= 500


def test_a_restarted_pod_counts_from_zero_instead_of_going_negative() -> None:
    old = runtime_metrics.ModelMetrics("iris")
    _serve(old, [0.001] * 100)
    before = _read(old)
    restarted = runtime_metrics.ModelMetrics("iris")
    _serve(restarted, [0.001] * 7)

    summary = telemetry.summarise([_read(restarted).minus(before)], seconds=1.0)

    assert summary.requests_per_second == pytest.approx(7)


def test_other_models_series_are_ignored_and_no_traffic_means_no_latency() -> None:
    other = runtime_metrics.ModelMetrics("resnet")
    _serve(other, [0.01] * 5)

    summary = telemetry.summarise([_read(other, model="iris")], seconds=1.0)

    assert summary.requests_per_second == 0
    assert summary.latency_p99_ms is None and summary.mean_batch_size is None
    assert summary.error_rate == 0


def test_quantile_interpolates_like_prometheus() -> None:
    buckets = {0.1: 50.0, 0.2: 100.0, float("inf"): 100.0}
    assert telemetry.quantile(0.5, buckets) == pytest.approx(0.1)
    assert telemetry.quantile(0.75, buckets) == pytest.approx(0.15)
    assert telemetry.quantile(0.99, {1.0: 0.0, float("inf"): 10.0}) == 1.0
    assert telemetry.quantile(0.5, {}) is None


@pytest.mark.parametrize(
    ("old", "new", "changed"),
    [
        (None, {"requestsPerSecond": 1.0}, True),
        (
            {"requestsPerSecond": 100.0, "errorRate": 0.0},
            {"requestsPerSecond": 105.0, "errorRate": 0.0},
            False,
        ),
        (
            {"requestsPerSecond": 100.0, "errorRate": 0.0},
            {"requestsPerSecond": 120.0, "errorRate": 0.0},
            True,
        ),
        ({"latencyP99Ms": None, "errorRate": 0.0}, {"latencyP99Ms": 3.0, "errorRate": 0.0}, True),
        (
            {"requestsPerSecond": 0.0, "errorRate": 0.0},
            {"requestsPerSecond": 0.0, "errorRate": 0.05},
            True,
        ),
    ],
)
def test_only_material_changes_are_written(
    old: dict[str, float] | None, new: dict[str, float], changed: bool
) -> None:
    assert telemetry.changed_materially(old, new) is changed

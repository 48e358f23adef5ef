"""Prometheus metrics, served on ``GET /metrics`` of the HTTP port.

These names and labels are a contract: the operator summarises them into
``status.metrics`` and the Grafana dashboard queries them.  Every series carries
``model`` (the served model name).

``modeldeploy_requests_total{model, protocol, outcome}`` (counter)
    Inference requests; ``protocol`` is ``http`` or ``grpc``; ``outcome`` is
    ``success``, ``client_error`` (bad input, 4xx / INVALID_ARGUMENT / NOT_FOUND),
    ``rejected`` (queue full, 429 / RESOURCE_EXHAUSTED) or ``server_error``.
``modeldeploy_request_duration_seconds{model, protocol}`` (histogram)
    End-to-end server-side latency of an inference request, decoding included.
``modeldeploy_batch_size{model}`` (histogram, buckets 1..256 in powers of two)
    Examples per executed batch.
``modeldeploy_queue_duration_seconds{model}`` (histogram)
    Time a request waited in the batch queue before its batch started.
``modeldeploy_inference_duration_seconds{model}`` (histogram)
    Time of one ONNX Runtime run of a whole batch.
``modeldeploy_inflight_requests{model}`` (gauge)
    Inference requests received and not yet answered.
``modeldeploy_model_info{model, version, quantization, device}`` (gauge, always 1)
    What is served: ``quantization`` is ``none``, ``dynamic-int8``, ``static-int8`` or ``fp16``;
    ``device`` is ``cpu`` or ``cuda``.
``modeldeploy_quantization_top1_agreement{model}`` (gauge, 0..1; quantized models only)
    Share of sample inputs whose first output agrees with FP32: the same arg-max for scores,
    values within the tolerance otherwise.
``modeldeploy_quantization_max_abs_error{model}`` (gauge; quantized models only)
    Largest absolute difference of the first output against FP32 on those samples.
``modeldeploy_validation{model, figure}`` (gauge, 0..1; with ``spec.validation`` only)
    The accuracy gate's figures on its samples: ``figure`` is ``agreement`` (with the
    unquantized model) or ``accuracy`` (against the expected outputs).

With several front-end processes (``--workers``), every process records into
prometheus-client's multiprocess files (``PROMETHEUS_MULTIPROC_DIR``, set by the server
before any process imports this module) and ``/metrics`` on any of them shows the sum
over the live processes: one view of the pod.
"""

from __future__ import annotations

import enum
import os

import prometheus_client as prom
from prometheus_client import multiprocess

from modeldeploy_contract import metrics as names
from modeldeploy_runtime import settings

# The per-series `_created` samples would double the exposition and nothing reads them.
prom.disable_created_metrics()  # type: ignore[no-untyped-call]

_LATENCY_BUCKETS = (
    0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0,
)  # fmt: skip
_BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256)


class Protocol(enum.StrEnum):
    HTTP = "http"
    GRPC = "grpc"


class Outcome(enum.StrEnum):
    SUCCESS = names.OUTCOME_SUCCESS
    CLIENT_ERROR = names.OUTCOME_CLIENT_ERROR
    REJECTED = names.OUTCOME_REJECTED
    SERVER_ERROR = names.OUTCOME_SERVER_ERROR


class ModelMetrics:
    """The series of one served model, in a registry of its own (one per server)."""

    def __init__(self, model_name: str) -> None:
        self.registry = prom.CollectorRegistry()
        r = self.registry
        self._requests = prom.Counter(
            names.REQUESTS,
            "Inference requests by protocol and outcome.",
            ["model", "protocol", "outcome"],
            registry=r,
        )
        self._request_duration = prom.Histogram(
            names.REQUEST_DURATION,
            "Server-side latency of inference requests.",
            ["model", "protocol"],
            buckets=_LATENCY_BUCKETS,
            registry=r,
        )
        self.batch_size = prom.Histogram(
            names.BATCH_SIZE,
            "Examples per executed batch.",
            ["model"],
            buckets=_BATCH_BUCKETS,
            registry=r,
        ).labels(model_name)
        self.queue_duration = prom.Histogram(
            names.QUEUE_DURATION,
            "Time requests waited in the batch queue.",
            ["model"],
            buckets=_LATENCY_BUCKETS,
            registry=r,
        ).labels(model_name)
        self.inference_duration = prom.Histogram(
            names.INFERENCE_DURATION,
            "Time of one ONNX Runtime run of a batch.",
            ["model"],
            buckets=_LATENCY_BUCKETS,
            registry=r,
        ).labels(model_name)
        self.inflight = prom.Gauge(
            names.INFLIGHT,
            "Inference requests being handled.",
            ["model"],
            registry=r,
            multiprocess_mode="livesum",
        ).labels(model_name)
        self._info = prom.Gauge(
            names.MODEL_INFO,
            "The served model; always 1.",
            ["model", "version", "quantization", "device"],
            registry=r,
            multiprocess_mode="livemax",
        )
        self._top1 = prom.Gauge(
            names.QUANTIZATION_TOP1_AGREEMENT,
            "Top-1 agreement of the quantized model with FP32 on sample inputs.",
            ["model"],
            registry=r,
            multiprocess_mode="livemax",
        )
        self._max_abs_error = prom.Gauge(
            names.QUANTIZATION_MAX_ABS_ERROR,
            "Largest absolute output difference of the quantized model against FP32.",
            ["model"],
            registry=r,
            multiprocess_mode="livemax",
        )
        self._validation = prom.Gauge(
            names.VALIDATION,
            "The accuracy gate's figures (spec.validation) on its samples: agreement with the "
            "unquantized model, accuracy against the expected outputs.",
            ["model", "figure"],
            registry=r,
            multiprocess_mode="livemax",
        )
        self._model = model_name
        # Children resolved once: label lookups are measurable on the hot path.
        self._request_counters = {
            (p, o): self._requests.labels(model_name, p.value, o.value)
            for p in Protocol
            for o in Outcome
        }
        self._durations = {p: self._request_duration.labels(model_name, p.value) for p in Protocol}

    def observe_request(self, protocol: Protocol, outcome: Outcome, seconds: float) -> None:
        self._request_counters[protocol, outcome].inc()
        self._durations[protocol].observe(seconds)

    def set_model_info(self, version: str, quantization: str, device: str) -> None:
        self._info.labels(self._model, version, quantization, device).set(1)

    def set_quantization_accuracy(self, top1_agreement: float, max_abs_error: float) -> None:
        self._top1.labels(self._model).set(top1_agreement)
        self._max_abs_error.labels(self._model).set(max_abs_error)

    def set_validation(self, figure: str, value: float) -> None:
        self._validation.labels(self._model, figure).set(value)

    def exposition(self) -> bytes:
        if settings.METRICS_DIR_ENV in os.environ:
            registry = prom.CollectorRegistry()
            multiprocess.MultiProcessCollector(registry)  # type: ignore[no-untyped-call]
            return prom.generate_latest(registry)
        return prom.generate_latest(self.registry)


def process_exited(pid: int) -> None:
    """Drop the live-only gauges of a process that exited (multiprocess mode)."""
    if settings.METRICS_DIR_ENV in os.environ:
        multiprocess.mark_process_dead(pid)  # type: ignore[no-untyped-call]

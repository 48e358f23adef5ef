"""The operator's own Prometheus metrics, served on `modeldeploy run --metrics-port`.

``modeldeploy_operator_reconciles_total{result}`` (counter)
    Reconciles by result: ``success``, ``invalid`` (a spec the operator cannot act on) or
    ``error`` (an API failure, retried with backoff by the work queue).
``modeldeploy_operator_reconcile_duration_seconds`` (histogram)
    Time of one reconcile.
``modeldeploy_operator_children_total{kind, action}`` (counter)
    Child objects ``created``, ``updated``, ``deleted`` (no longer wanted) or ``repaired``
    (put back after someone edited or deleted them).
``modeldeploy_operator_api_requests_total{verb, resource}`` (counter)
    Every request the reconciler and the metrics writer send to the API server (kopf's watches
    not included); every verb but GET is a write.
``modeldeploy_operator_metrics_collections_total{source, result}`` (counter)
    Runs of the metrics summary per ModelDeployment: ``source`` is ``prometheus`` or
    ``direct``; ``result`` is ``written``, ``unchanged`` (not material: no write), ``no_data``,
    ``error`` or ``late`` (not done within the interval, e.g. a hung pod: cancelled).
``modeldeploy_operator_promql_queries_total`` (counter)
    PromQL queries sent to ``--prometheus-url``: four per interval, whatever the number of
    ModelDeployments.
``modeldeploy_operator_metrics_collection_duration_seconds{source}`` (histogram)
    Time to collect one ModelDeployment's metrics.
"""

from __future__ import annotations

import prometheus_client as prom

RECONCILES = prom.Counter(
    "modeldeploy_operator_reconciles", "Reconciles of ModelDeployments by result.", ["result"]
)
RECONCILE_DURATION = prom.Histogram(
    "modeldeploy_operator_reconcile_duration_seconds", "Time of one reconcile."
)
CHILDREN = prom.Counter(
    "modeldeploy_operator_children",
    "Child objects created, updated, deleted or repaired.",
    ["kind", "action"],
)
API_REQUESTS = prom.Counter(
    "modeldeploy_operator_api_requests",
    "Requests the operator sent to the API server (kopf's watches not included).",
    ["verb", "resource"],
)
METRICS_COLLECTIONS = prom.Counter(
    "modeldeploy_operator_metrics_collections",
    "Metric summaries of ModelDeployments by source and result.",
    ["source", "result"],
)
METRICS_COLLECTION_DURATION = prom.Histogram(
    "modeldeploy_operator_metrics_collection_duration_seconds",
    "Time to collect the metrics of one ModelDeployment.",
    ["source"],
)
PROMQL_QUERIES = prom.Counter(
    "modeldeploy_operator_promql_queries", "PromQL queries sent to the configured Prometheus."
)

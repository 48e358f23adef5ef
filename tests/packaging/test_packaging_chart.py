"""The chart agrees with the rest of the repository: CRD, versions, runtime image, metrics."""

from __future__ import annotations

import json
import re
import tomllib
from pathlib import Path

import prometheus_client
import yaml

from chart_helm import CHART
from modeldeploy_operator import (
    opmetrics,  # noqa: F401 (registers the operator metrics)
    settings,
)
from modeldeploy_runtime import metrics

REPOSITORY = Path(__file__).resolve().parents[2]
DASHBOARD = CHART / "dashboards" / "modeldeploy.json"


def test_the_chart_ships_the_crds_of_the_repository() -> None:
    ours = {p.name: p.read_text() for p in (REPOSITORY / "crds").glob("*.yaml")}
    shipped = {p.name: p.read_text() for p in (CHART / "crds").glob("*.yaml")}
    assert ours, "no CRDs in crds/"
    assert shipped == ours, (
        "charts/modeldeploy/crds is stale: cp crds/*.yaml charts/modeldeploy/crds/"
    )


def test_the_chart_version_follows_the_package() -> None:
    chart = yaml.safe_load((CHART / "Chart.yaml").read_text())
    project = tomllib.loads((REPOSITORY / "pyproject.toml").read_text())["project"]
    assert chart["appVersion"] == project["version"]


def test_the_default_runtime_image_is_the_operators() -> None:
    chart = yaml.safe_load((CHART / "Chart.yaml").read_text())
    values = yaml.safe_load((CHART / "values.yaml").read_text())
    image = values["runtimeImage"]
    default = f"{image['repository']}:{image['tag'] or chart['appVersion']}"
    assert default == settings.default_runtime_image()


_SAMPLE_SUFFIXES = {
    "counter": ("_total",),
    "histogram": ("_bucket", "_sum", "_count"),
    "gauge": ("",),
}


def _exported_series() -> set[str]:
    """The series names the runtime and the operator export."""
    model = metrics.ModelMetrics("iris")
    model.set_model_info("1", "none", "cpu")
    model.set_quantization_accuracy(1.0, 0.0)
    runtime = {s.name for family in model.registry.collect() for s in family.samples}
    # The operator's labelled series appear once used; their names follow from the type.
    operator = {
        family.name + suffix
        for family in prometheus_client.REGISTRY.collect()
        if family.name.startswith("modeldeploy_operator_")
        for suffix in _SAMPLE_SUFFIXES[family.type]
    }
    return runtime | operator


def test_the_dashboard_queries_only_metrics_the_runtime_and_operator_export() -> None:
    dashboard = json.loads(DASHBOARD.read_text())
    panels = [p for p in dashboard["panels"] if p["type"] != "row"]
    expressions = [t["expr"] for p in panels for t in p["targets"]]
    variables = [v["definition"] for v in dashboard["templating"]["list"] if "definition" in v]
    used = {
        name for text in expressions + variables for name in re.findall(r"modeldeploy_\w+", text)
    }
    assert used - _exported_series() == set()
    # Every metric of the runtime contract is on the dashboard.
    for contract in (
        "modeldeploy_requests_total",
        "modeldeploy_request_duration_seconds_bucket",
        "modeldeploy_batch_size_sum",
        "modeldeploy_queue_duration_seconds_bucket",
        "modeldeploy_inference_duration_seconds_bucket",
        "modeldeploy_inflight_requests",
        "modeldeploy_model_info",
        "modeldeploy_operator_reconciles_total",
        "modeldeploy_operator_reconcile_duration_seconds_bucket",
        "modeldeploy_operator_children_total",
        "modeldeploy_operator_api_requests_total",
        "modeldeploy_operator_metrics_collections_total",
        "modeldeploy_operator_metrics_collection_duration_seconds_bucket",
    ):
        assert contract in used
    assert len({p["id"] for p in dashboard["panels"]}) == len(dashboard["panels"])

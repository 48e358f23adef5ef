"""The CRD in crds/ is generated from the models and must never go stale."""

from __future__ import annotations

from typing import Any

import yaml

from modeldeploy_dev import crd


def _schema() -> dict[str, Any]:
    version = crd.build()["spec"]["versions"][0]
    schema: dict[str, Any] = version["schema"]["openAPIV3Schema"]
    return schema


def _walk(node: dict[str, Any], path: str = "") -> list[tuple[str, dict[str, Any]]]:
    found = [(path, node)]
    for name, child in node.get("properties", {}).items():
        found += _walk(child, f"{path}.{name}")
    if "items" in node:
        found += _walk(node["items"], f"{path}[]")
    if isinstance(node.get("additionalProperties"), dict):
        found += _walk(node["additionalProperties"], f"{path}{{}}")
    return found


def test_committed_crd_is_up_to_date() -> None:
    assert crd.crd_paths()[0].read_text() == crd.render(), (
        "crds/ is stale: run `modeldeploy-dev generate`"
    )


def test_every_spec_and_status_field_has_a_description() -> None:
    schema = _schema()["properties"]
    for root in ("spec", "status"):
        for path, node in _walk(schema[root], root):
            if not path.endswith(("{}", "[]")):
                assert node.get("description"), f"{path} has no description"


def test_schema_is_structural() -> None:
    for path, node in _walk(_schema()):
        if node.get("x-kubernetes-int-or-string"):
            assert "type" not in node, path
        else:
            assert "type" in node, f"{path} has no type"
        assert not {"anyOf", "$ref", "title", "allOf"} & node.keys(), path


def test_defaults_live_in_the_schema() -> None:
    spec = _schema()["properties"]["spec"]["properties"]
    assert spec["quantization"]["default"] == "none"
    assert spec["runtime"]["default"] == {}
    assert spec["runtime"]["properties"]["maxBatchSize"]["default"] == 32
    assert "default" not in spec["replicas"]  # absent means 1, and must stay absent under an HPA


def test_cross_field_rules_are_cel() -> None:
    rules = [
        rule["rule"]
        for _, node in _walk(_schema())
        for rule in node.get("x-kubernetes-validations", [])
    ]
    assert "self.minReplicas <= self.maxReplicas" in rules
    assert "!(has(self.replicas) && has(self.autoscaling))" in rules
    assert any("static-int8" in rule for rule in rules)
    assert "!has(self.accelerator) || self.quantization != 'dynamic-int8'" in rules
    assert "!has(self.accelerator) || self.quantization != 'static-int8'" in rules
    assert any("self.batchSizes.exists" in rule for rule in rules)
    assert any("{64}" in rule for rule in rules)
    assert any("s3|gs|pvc|file" in rule for rule in rules)


def test_subresources_and_printer_columns() -> None:
    version = crd.build()["spec"]["versions"][0]
    assert version["subresources"]["scale"]["specReplicasPath"] == ".spec.replicas"
    assert "status" in version["subresources"]
    columns = [c["name"] for c in version["additionalPrinterColumns"]]
    assert columns == ["Ready", "Replicas", "Version", "URL", "RPS", "P99", "Age"]


def test_kopf_bookkeeping_fits_in_status() -> None:
    kopf = _schema()["properties"]["status"]["properties"]["kopf"]
    assert kopf["x-kubernetes-preserve-unknown-fields"] is True


def test_small_enough_for_client_side_apply() -> None:
    # kubectl apply keeps the whole object in an annotation, limited to 256 KiB.
    assert len(yaml.safe_dump(crd.build())) < 64 * 1024


def test_chart_copy_and_readme_reference_are_up_to_date() -> None:
    stale = "stale: run `modeldeploy-dev generate`"
    assert crd.crd_paths()[1].read_text() == crd.render(), f"the chart's CRD is {stale}"
    readme = crd.readme_path().read_text()
    assert crd.readme_with_reference(readme) == readme, f"the README's API reference is {stale}"

"""The API server itself rejects bad ModelDeployments, naming the field (CEL and schema)."""

from __future__ import annotations

import json
from typing import Any

import pytest

from support import Cluster

pytestmark = pytest.mark.integration

MODEL = {"uri": "s3://models/iris/3/model.onnx"}


@pytest.mark.parametrize(
    ("spec", "field", "words"),
    [
        ({"model": {"uri": "ftp://host/m.onnx"}}, "spec.model.uri", "must start with one of"),
        ({"model": MODEL | {"sha256": "abc"}}, "spec.model.sha256", "64 hexadecimal digits"),
        ({"model": MODEL, "replicas": 2, "autoscaling": {}}, "spec.replicas", "mutually exclusive"),
        ({"model": MODEL, "quantization": "static-int8"}, "spec.calibrationUri", "required"),
        (
            {"model": MODEL, "autoscaling": {"minReplicas": 5, "maxReplicas": 2}},
            "spec.autoscaling.minReplicas",
            "must not exceed maxReplicas",
        ),
        ({"model": MODEL, "quantization": "int4"}, "spec.quantization", "Unsupported value"),
        ({"model": MODEL, "replicas": -1}, "spec.replicas", "greater than or equal to 0"),
        ({}, "spec.model", "Required value"),
        (
            {"model": MODEL, "quantization": "dynamic-int8", "accelerator": {"count": 1}},
            "spec.quantization",
            "use quantization fp16 on a GPU",
        ),
        (
            {
                "model": MODEL,
                "quantization": "static-int8",
                "calibrationUri": "s3://m/c.npz",
                "accelerator": {"count": 1},
            },
            "spec.quantization",
            "TensorRT",
        ),
        ({"model": MODEL, "quantization": "fp16"}, "spec.quantization", "fp16 is for GPUs"),
        (
            {"model": MODEL, "runtime": {"maxBatchSize": 16, "batchSizes": [1, 8]}},
            "spec.runtime.batchSizes",
            "largest of batchSizes must equal maxBatchSize",
        ),
        (
            {
                "model": MODEL,
                "ingress": {"host": "iris.example.com"},
                "gateway": {"parentRefs": [{"name": "public"}], "hostnames": ["iris.example.com"]},
            },
            "spec.gateway",
            "gateway and ingress are mutually exclusive",
        ),
        (
            {"model": MODEL, "gateway": {"parentRefs": [], "hostnames": ["iris.example.com"]}},
            "spec.gateway.parentRefs",
            "at least 1 items",
        ),
        (
            {"model": MODEL, "ingress": {"host": "iris.example.com", "path": "/ml/{name}"}},
            "spec.ingress.path",
            "should match",
        ),
        (
            {"model": MODEL, "validation": {"uri": "s3://m/v.npz"}},
            "spec.validation",
            "validation needs a floor",
        ),
        (
            {"model": MODEL, "validation": {"uri": "s3://m/v.npz", "minAgreement": 2}},
            "spec.validation.minAgreement",
            "less than or equal to 1",
        ),
    ],
)
def test_invalid_spec_is_rejected_naming_the_field(
    cluster: Cluster,
    modeldeploy_crd: None,
    namespace: str,
    spec: dict[str, Any],
    field: str,
    words: str,
) -> None:
    body = {
        "apiVersion": "modeldeploy.io/v1alpha1",
        "kind": "ModelDeployment",
        "metadata": {"name": "bad", "namespace": namespace},
        "spec": spec,
    }
    result = cluster.kubectl("apply", "-f", "-", input=json.dumps(body), check=False)
    assert result.returncode != 0
    assert field in result.stderr and words in result.stderr, result.stderr


def test_name_that_cannot_name_a_service_is_rejected(
    cluster: Cluster, modeldeploy_crd: None, namespace: str
) -> None:
    body = {
        "apiVersion": "modeldeploy.io/v1alpha1",
        "kind": "ModelDeployment",
        "metadata": {"name": "9-lives", "namespace": namespace},
        "spec": {"model": MODEL},
    }
    result = cluster.kubectl("apply", "-f", "-", input=json.dumps(body), check=False)
    assert result.returncode != 0
    assert "metadata.name must be a DNS-1035 label" in result.stderr


def test_kubectl_explain_describes_the_fields(cluster: Cluster, modeldeploy_crd: None) -> None:
    explained = cluster.kubectl("explain", "modeldeployments.spec.runtime").stdout
    assert "maxBatchSize" in explained and "Largest batch" in explained

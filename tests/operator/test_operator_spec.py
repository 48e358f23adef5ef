"""The ModelDeployment models: defaults and the rules the API server also enforces (CEL)."""

from __future__ import annotations

from typing import Any

import pydantic
import pytest

from modeldeploy_operator import spec as api

SHA = "a" * 64


def _spec(**fields: Any) -> api.ModelDeploymentSpec:
    return api.ModelDeploymentSpec.model_validate(
        {"model": {"uri": "s3://models/iris/3/model.onnx"}, **fields}
    )


def test_defaults_follow_the_design() -> None:
    spec = _spec()
    assert spec.quantization == "none"
    assert spec.replicas is None
    assert spec.runtime.max_batch_size == 32
    assert spec.runtime.max_batch_delay_ms == 5
    assert spec.runtime.max_queue_size == 1024
    assert spec.runtime.threads == 0
    assert spec.service.type == "ClusterIP"


def test_camel_case_names_round_trip() -> None:
    spec = _spec(calibrationUri="gs://b/c.npz", quantization="static-int8")
    dumped = spec.model_dump(by_alias=True, exclude_none=True)
    assert dumped["calibrationUri"] == "gs://b/c.npz"
    assert "maxBatchSize" in dumped["runtime"]


@pytest.mark.parametrize(
    ("fields", "needle"),
    [
        ({"model": {"uri": "ftp://x/model.onnx"}}, "must start with one of"),
        ({"model": {"uri": "s3://b/m.onnx", "sha256": "abc"}}, "64 hexadecimal digits"),
        ({"replicas": 2, "autoscaling": {}}, "mutually exclusive"),
        ({"quantization": "static-int8"}, "calibrationUri is required"),
        ({"autoscaling": {"minReplicas": 5, "maxReplicas": 2}}, "minReplicas must not exceed"),
        ({"disruptionBudget": {}}, "exactly one of minAvailable"),
        ({"quantization": "int4"}, "quantization"),
        ({"unknownField": 1}, "unknownField"),
        ({"quantization": "dynamic-int8", "accelerator": {}}, "6-8x slower.*use quantization fp16"),
        (
            {"quantization": "static-int8", "calibrationUri": "gs://b/c.npz", "accelerator": {}},
            "TensorRT",
        ),
        ({"quantization": "fp16"}, "fp16 is for GPUs"),
        ({"runtime": {"maxBatchSize": 16, "batchSizes": [1, 8]}}, "largest of batchSizes"),
        ({"runtime": {"maxBatchSize": 8, "batchSizes": [1, 16]}}, "largest of batchSizes"),
        ({"runtime": {"batchSizes": [0, 32]}}, "greater than or equal to 1"),
        ({"runtime": {"maxBatchSize": -1}}, "greater than or equal to 0"),
        ({"runtime": {"maxBatchSize": 0, "batchSizes": [1]}}, "largest of batchSizes"),
        ({"runtime": {"warmup": {}}}, "shapes or uri"),
        ({"runtime": {"warmup": {"shapes": {"x": [1]}, "uri": "s3://b/w.npz"}}}, "shapes or uri"),
        ({"runtime": {"warmup": {"shapes": {"x": [1]}, "sha256": SHA}}}, "warmup.uri"),
        ({"runtime": {"warmup": {"shapes": {"x": [-1, 3]}}}}, "greater than or equal to 0"),
        ({"runtime": {"warmup": {"uri": "ftp://b/w.npz"}}}, "must start with one of"),
        ({"runtime": {"workers": -1}}, "workers"),
        ({"runtime": {"padding": {"inputs": {}}}}, r"padding\.inputs\n.*at least 1 item"),
        (
            {"runtime": {"padding": {"inputs": {"ids": {"axis": 0}}}}},
            r"padding\.inputs\.ids\.axis\n.*greater than or equal to 1",
        ),
        (
            {"runtime": {"padding": {"inputs": {"ids": {"axis": 1, "value": "nan"}}}}},
            r"padding\.inputs\.ids\.value\n.*finite number",
        ),
        (
            {"runtime": {"padding": {"inputs": {"ids": {"axis": 1}}, "buckets": [0]}}},
            r"padding\.buckets\.0\n.*greater than or equal to 1",
        ),
        ({"runtime": {"padding": {"ids": {"axis": 1}}}}, r"padding\.ids\n.*Extra inputs"),
        (
            {
                "ingress": {"host": "h"},
                "gateway": {"parentRefs": [{"name": "g"}], "hostnames": ["h"]},
            },
            "gateway and ingress are mutually exclusive",
        ),
        ({"gateway": {"parentRefs": [], "hostnames": ["h"]}}, "parentRefs"),
        ({"gateway": {"parentRefs": [{"name": "g"}], "hostnames": []}}, "hostnames"),
        ({"ingress": {"host": "h", "path": "/ml//v"}}, "ingress.path"),
        ({"ingress": {"host": "h", "path": "/{name}"}}, "ingress.path"),
        ({"gateway": {"parentRefs": [{"name": "g"}], "hostnames": ["h"], "path": "ml"}}, "path"),
    ],
)
def test_invalid_specs_are_rejected_with_the_field(fields: dict[str, Any], needle: str) -> None:
    body = {"model": {"uri": "s3://models/iris/3/model.onnx"}} | fields
    with pytest.raises(pydantic.ValidationError, match=needle):
        api.ModelDeploymentSpec.model_validate(body)


@pytest.mark.parametrize(
    "uri", ["https://h/m.onnx", "http://h/m.onnx", "s3://b/m", "gs://b/m", "pvc://c/p", "file:///m"]
)
def test_every_supported_scheme_is_accepted(uri: str) -> None:
    assert _spec(model={"uri": uri, "sha256": SHA.upper()}).model.uri == uri


def test_padding_is_accepted_with_its_defaults() -> None:
    spec = _spec(runtime={"padding": {"inputs": {"input_ids": {"axis": 1}}}})
    assert spec.runtime.padding is not None
    assert spec.runtime.padding.inputs["input_ids"].value == 0
    assert spec.runtime.padding.outputs is None and spec.runtime.padding.buckets is None
    assert _spec().runtime.padding is None


def test_fp16_on_a_gpu_and_batch_sizes_ending_at_the_max_are_accepted() -> None:
    spec = _spec(
        quantization="fp16",
        accelerator={"count": 1},
        runtime={"maxBatchSize": 64, "batchSizes": [1, 8, 64], "workers": 4},
    )
    assert spec.quantization == "fp16"
    assert spec.runtime.batch_sizes == [1, 8, 64]
    assert spec.runtime.cudnn_conv_algo_search == "EXHAUSTIVE"


def test_an_accuracy_gate_needs_a_floor_between_0_and_1() -> None:
    gate = _spec(validation={"uri": "s3://b/v.npz", "sha256": SHA, "minAgreement": 0.95})
    assert gate.validation is not None
    assert (gate.validation.min_agreement, gate.validation.min_accuracy) == (0.95, None)
    assert gate.validation.tolerance == 0.01
    with pytest.raises(ValueError, match="validation needs a floor"):
        _spec(validation={"uri": "s3://b/v.npz"})
    with pytest.raises(ValueError, match="less than or equal to 1"):
        _spec(validation={"uri": "s3://b/v.npz", "minAccuracy": 1.5})
    with pytest.raises(ValueError, match="uri"):
        _spec(validation={"uri": "ftp://b/v.npz", "minAccuracy": 0.5})


def test_warmup_takes_shapes_or_sample_inputs_and_max_batch_size_0_is_allowed() -> None:
    shapes = _spec(runtime={"maxBatchSize": 0, "warmup": {"shapes": {"x": [1, 3, 8, 8]}}})
    assert shapes.runtime.max_batch_size == 0
    assert shapes.runtime.warmup is not None
    assert shapes.runtime.warmup.shapes == {"x": [1, 3, 8, 8]}
    samples = _spec(runtime={"warmup": {"uri": "s3://b/w.npz", "sha256": SHA}})
    assert samples.runtime.warmup is not None
    assert samples.runtime.warmup.sha256 == SHA

"""INT8 and FP16 at load: close outputs, measured accuracy, and a reused cache."""

from __future__ import annotations

import logging
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np
import onnx
import pytest
import tritonclient.http as httpclient
from runtime_fixtures import (
    HEAVY_FEATURES,
    examples,
    metric_value,
    running_server,
)

from modeldeploy_runtime import model, quantization, settings


@pytest.fixture
def heavy_copy(heavy_model: Path, tmp_path: Path) -> Path:
    """A private copy: the quantized file is cached beside it."""
    return Path(shutil.copy(heavy_model, tmp_path / "heavy.onnx"))


@pytest.fixture
def calibration(tmp_path: Path) -> Path:
    path = tmp_path / "calibration.npz"
    np.savez(path, x=examples(64, features=HEAVY_FEATURES, seed=42))
    return path


def load(path: Path) -> model.OnnxModel:
    loaded = model.OnnxModel(path, model.SessionConfig(threads=1, device=settings.Device.CPU))
    loaded.load()
    return loaded


@pytest.mark.parametrize(
    "mode",
    [
        settings.Quantization.DYNAMIC_INT8,
        settings.Quantization.STATIC_INT8,
        settings.Quantization.FP16,
    ],
)
def test_quantized_model_stays_close_to_fp32(
    heavy_copy: Path, calibration: Path, tmp_path: Path, mode: settings.Quantization
) -> None:
    reference = load(heavy_copy)
    samples = quantization.load_samples(calibration, reference.inputs)
    quantized_path = quantization.quantize(
        heavy_copy,
        mode,
        samples if mode is settings.Quantization.STATIC_INT8 else None,
        tmp_path / "cache",
    )
    assert quantized_path.parent == heavy_copy.parent
    assert mode.value in quantized_path.name
    ops = {node.op_type for node in onnx.load(quantized_path).graph.node}
    if mode is settings.Quantization.STATIC_INT8:
        assert {"QuantizeLinear", "DequantizeLinear"} <= ops
    elif mode is settings.Quantization.FP16:
        converted = onnx.load(quantized_path)
        weights = {t.data_type for t in converted.graph.initializer}
        assert weights == {onnx.TensorProto.FLOAT16}
        # Clients see no change: the graph still takes and returns FP32.
        assert converted.graph.input[0].type.tensor_type.elem_type == onnx.TensorProto.FLOAT
        assert converted.graph.output[0].type.tensor_type.elem_type == onnx.TensorProto.FLOAT
    else:
        assert ops & {"DynamicQuantizeLinear", "MatMulInteger", "DynamicQuantizeMatMul"}
    held_out = {"x": examples(32, features=HEAVY_FEATURES, seed=7)}
    accuracy = quantization.compare(reference, load(quantized_path), held_out)
    assert accuracy.samples == 32
    assert accuracy.top1_agreement >= 0.9
    assert accuracy.max_abs_error < 0.1


def test_cache_is_reused(heavy_copy: Path, tmp_path: Path) -> None:
    mode = settings.Quantization.DYNAMIC_INT8
    first = quantization.quantize(heavy_copy, mode, None, tmp_path / "cache")
    written = first.stat().st_mtime_ns
    assert quantization.quantize(heavy_copy, mode, None, tmp_path / "cache") == first
    assert first.stat().st_mtime_ns == written


def test_cache_goes_to_the_cache_dir_when_the_model_dir_is_read_only(heavy_copy: Path) -> None:
    # Root ignores directory permissions: as root, the quantizer runs without the capabilities
    # that let it (setpriv, from util-linux).
    base = Path(tempfile.mkdtemp())
    try:
        base.chmod(0o755)
        read_only, cache = base / "read-only", base / "cache"
        read_only.mkdir()
        cache.mkdir()
        source = Path(shutil.copy(heavy_copy, read_only / "other.onnx"))
        source.chmod(0o444)
        read_only.chmod(0o555)
        script = (
            "import sys; from pathlib import Path; "
            "from modeldeploy_runtime import quantization, settings; "
            "print(quantization.quantize(Path(sys.argv[1]), "
            "settings.Quantization.DYNAMIC_INT8, None, Path(sys.argv[2])))"
        )
        unprivileged = ["setpriv", "--bounding-set=-dac_override,-dac_read_search", "--"]
        result = subprocess.run(
            [
                *(unprivileged if os.geteuid() == 0 else []),
                sys.executable,
                "-c",
                script,
                str(source),
                str(cache),
            ],
            cwd=base,
            capture_output=True,
            text=True,
            check=True,
        )
        assert Path(result.stdout.strip()).parent == cache
        assert list(read_only.iterdir()) == [source]
    finally:
        read_only.chmod(0o755)
        shutil.rmtree(base)


def test_served_quantized_model_exports_accuracy_and_reuses_its_cache(
    heavy_copy: Path, calibration: Path, caplog: pytest.LogCaptureFixture
) -> None:
    options = {
        "model_path": heavy_copy,
        "model_name": "heavy",
        "quantization": settings.Quantization.STATIC_INT8,
        "calibration_path": calibration,
    }
    caplog.set_level(logging.INFO, logger="modeldeploy_runtime")
    with running_server(**options) as runtime:
        client = httpclient.InferenceServerClient(f"127.0.0.1:{runtime.http_port}")
        tensor = httpclient.InferInput("x", [2, HEAVY_FEATURES], "FP32")
        tensor.set_data_from_numpy(examples(2, features=HEAVY_FEATURES))
        assert client.infer("heavy", [tensor]).as_numpy("probabilities").shape == (2, 10)
        text = runtime.stats.exposition().decode()
    assert metric_value(text, "modeldeploy_quantization_top1_agreement", model="heavy") >= 0.9
    assert metric_value(text, "modeldeploy_quantization_max_abs_error", model="heavy") < 0.1
    assert metric_value(text, "modeldeploy_model_info", quantization="static-int8") == 1
    assert "quantizing" in caplog.text
    assert "static-int8 vs FP32 on" in caplog.text and "agreement" in caplog.text

    caplog.clear()
    with running_server(**options):
        pass
    assert "reusing quantized model" in caplog.text
    assert "quantizing" not in caplog.text


def test_served_fp16_model_exports_its_accuracy(heavy_copy: Path) -> None:
    with running_server(
        model_path=heavy_copy, model_name="heavy", quantization=settings.Quantization.FP16
    ) as runtime:
        client = httpclient.InferenceServerClient(f"127.0.0.1:{runtime.http_port}")
        tensor = httpclient.InferInput("x", [3, HEAVY_FEATURES], "FP32")
        tensor.set_data_from_numpy(examples(3, features=HEAVY_FEATURES))
        result = client.infer("heavy", [tensor]).as_numpy("probabilities")
        assert result.dtype == np.float32 and result.shape == (3, 10)
        text = runtime.stats.exposition().decode()
    assert metric_value(text, "modeldeploy_quantization_top1_agreement", model="heavy") >= 0.95
    assert metric_value(text, "modeldeploy_quantization_max_abs_error", model="heavy") < 0.01
    assert metric_value(text, "modeldeploy_model_info", quantization="fp16") == 1


def _conv_any_size(path: Path) -> Path:
    """An image classifier whose height and width are unknown (dims H and W), like YOLO's."""
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(3)
    weights = [
        numpy_helper.from_array(rng.standard_normal((8, 3, 3, 3)).astype(np.float32), "w"),
        numpy_helper.from_array(rng.standard_normal((8, 10)).astype(np.float32), "fc"),
    ]
    graph = helper.make_graph(
        [
            helper.make_node("Conv", ["x", "w"], ["c"], pads=[1, 1, 1, 1]),
            helper.make_node("Relu", ["c"], ["r"]),
            helper.make_node("GlobalAveragePool", ["r"], ["p"]),
            helper.make_node("Flatten", ["p"], ["f"]),
            helper.make_node("MatMul", ["f", "fc"], ["scores"]),
        ],
        "conv",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", 3, "H", "W"])],
        [helper.make_tensor_value_info("scores", TensorProto.FLOAT, ["batch", 10])],
        weights,
    )
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), path)
    return path


@pytest.mark.parametrize("shapes", [None, {"x": (1, 3, 12, 12)}])
def test_quantized_model_with_unknown_dims_serves_without_invented_samples(
    tmp_path: Path, caplog: pytest.LogCaptureFixture, shapes: dict[str, tuple[int, ...]] | None
) -> None:
    """Without calibration data, the agreement is measured on samples of the warm-up shapes,
    or not at all when a dim is unknown: a 1x1 image is never invented (it may be impossible)."""
    path = _conv_any_size(tmp_path / "conv.onnx")
    caplog.set_level(logging.INFO, logger="modeldeploy_runtime")
    with running_server(
        model_path=path,
        model_name="conv",
        quantization=settings.Quantization.DYNAMIC_INT8,
        warmup_shapes=shapes,
    ) as runtime:
        client = httpclient.InferenceServerClient(f"127.0.0.1:{runtime.http_port}")
        for size in (16, 24):
            tensor = httpclient.InferInput("x", [1, 3, size, size], "FP32")
            tensor.set_data_from_numpy(np.ones((1, 3, size, size), np.float32))
            assert client.infer("conv", [tensor]).as_numpy("scores").shape == (1, 10)
        text = runtime.stats.exposition().decode()
    if shapes is None:
        assert "agreement with FP32 not measured" in caplog.text
        assert "input x [-1, 3, -1, -1] has unknown dims" in caplog.text
    else:
        assert "vs FP32 on 64 samples: agreement" in caplog.text
        assert metric_value(text, "modeldeploy_quantization_top1_agreement", model="conv") > 0

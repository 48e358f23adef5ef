"""Small real ONNX models built with onnx.helper, shared by the runtime and end-to-end tests."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper


def linear(path: Path, weight: np.ndarray[Any, Any], output: str) -> Path:
    """x [batch, features] @ weight: a classifier's scores, or a regressor's values."""
    graph = helper.make_graph(
        [helper.make_node("MatMul", ["x", "w"], [output])],
        "linear",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", weight.shape[0]])],
        [helper.make_tensor_value_info(output, TensorProto.FLOAT, ["batch", weight.shape[1]])],
        [numpy_helper.from_array(weight.astype(np.float32), "w")],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.checker.check_model(model)
    onnx.save(model, path)
    return path


def near_ties(path: Path, features: int) -> Path:
    """A two-class classifier whose classes' weights differ by far less than an INT8 step:
    FP32 picks either class about half the time, its INT8 quantization cannot tell them
    apart (it agrees with FP32 on about half of random inputs)."""
    rng = np.random.default_rng(7)
    first = rng.normal(0, 1, features)
    weight = np.stack([first, first + rng.normal(0, 1e-4, features)], axis=1)
    return linear(path, weight, "scores")

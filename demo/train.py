"""Trains the demo's model and exports it to ONNX: a small MLP classifier on generated data.

The data set is generated from a fixed seed (three classes of four measurements, like the
classic iris data), so the model is the same on every machine and nothing is downloaded.

    python demo/train.py --out model.onnx
"""

from __future__ import annotations

import argparse
import hashlib
from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

CLASSES = 3
FEATURES = 4
HIDDEN = 16


def dataset(examples_per_class: int = 400, seed: int = 7) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    centres = np.array([[5.0, 3.4, 1.5, 0.2], [5.9, 2.8, 4.3, 1.3], [6.6, 3.0, 5.6, 2.0]])
    spread = np.array([0.35, 0.35, 0.45, 0.25])
    x = np.concatenate([rng.normal(c, spread, (examples_per_class, FEATURES)) for c in centres])
    y = np.repeat(np.arange(CLASSES), examples_per_class)
    order = rng.permutation(len(y))
    return x[order].astype(np.float32), y[order]


def train(
    x: np.ndarray, y: np.ndarray, epochs: int = 2000, rate: float = 0.3
) -> dict[str, np.ndarray]:
    """Full-batch gradient descent on softmax cross-entropy; returns the weights.

    Training sees standardised features; the scaling is folded into the first layer afterwards,
    so the exported model takes raw measurements.
    """
    rng = np.random.default_rng(0)
    mean, std = x.mean(axis=0), x.std(axis=0)
    x = (x - mean) / std
    w1, b1 = rng.normal(0, 0.5, (FEATURES, HIDDEN)), np.zeros(HIDDEN)
    w2, b2 = rng.normal(0, 0.5, (HIDDEN, CLASSES)), np.zeros(CLASSES)
    onehot = np.eye(CLASSES)[y]
    for _ in range(epochs):
        hidden = np.maximum(x @ w1 + b1, 0)
        logits = hidden @ w2 + b2
        p = np.exp(logits - logits.max(axis=1, keepdims=True))
        p /= p.sum(axis=1, keepdims=True)
        grad_logits = (p - onehot) / len(y)
        grad_hidden = (grad_logits @ w2.T) * (hidden > 0)
        w2 -= rate * hidden.T @ grad_logits
        b2 -= rate * grad_logits.sum(axis=0)
        w1 -= rate * x.T @ grad_hidden
        b1 -= rate * grad_hidden.sum(axis=0)
    return {"w1": w1 / std[:, None], "b1": b1 - (mean / std) @ w1, "w2": w2, "b2": b2}


def predict(weights: dict[str, np.ndarray], x: np.ndarray) -> np.ndarray:
    hidden = np.maximum(x @ weights["w1"] + weights["b1"], 0)
    return np.argmax(hidden @ weights["w2"] + weights["b2"], axis=1)


def export(weights: dict[str, np.ndarray], path: Path) -> None:
    initializers = [numpy_helper.from_array(v.astype(np.float32), k) for k, v in weights.items()]
    graph = helper.make_graph(
        [
            helper.make_node("Gemm", ["input", "w1", "b1"], ["h"]),
            helper.make_node("Relu", ["h"], ["h_relu"]),
            helper.make_node("Gemm", ["h_relu", "w2", "b2"], ["logits"]),
            helper.make_node("Softmax", ["logits"], ["probabilities"], axis=1),
        ],
        "iris_mlp",
        [helper.make_tensor_value_info("input", TensorProto.FLOAT, ["batch", FEATURES])],
        [helper.make_tensor_value_info("probabilities", TensorProto.FLOAT, ["batch", CLASSES])],
        initializers,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.checker.check_model(model)
    path.write_bytes(model.SerializeToString())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args()
    x, y = dataset()
    split = len(y) * 4 // 5
    weights = train(x[:split], y[:split])
    accuracy = float((predict(weights, x[split:]) == y[split:]).mean())
    args.out.parent.mkdir(parents=True, exist_ok=True)
    export(weights, args.out)
    digest = hashlib.sha256(args.out.read_bytes()).hexdigest()
    print(
        f"trained on {split} examples, held-out accuracy {accuracy:.3f}; {args.out} sha256 {digest}"
    )


if __name__ == "__main__":
    main()

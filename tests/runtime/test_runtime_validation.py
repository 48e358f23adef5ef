"""The accuracy gate (spec.validation): a model below its floors never serves; one above them
serves and exports its figures. Real models built with onnx.helper, real ONNX Runtime and its
real INT8 quantization."""

from __future__ import annotations

import subprocess
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from runtime_fixtures import (
    MLP_CLASSES,
    MLP_FEATURES,
    examples,
    metric_value,
    running_server,
    runtime_command,
)

import onnx_models
from modeldeploy_contract import values
from modeldeploy_runtime import model, settings, validation

ROWS = 200


@pytest.fixture
def near_ties(tmp_path: Path) -> Path:
    return onnx_models.near_ties(tmp_path / "ties.onnx", MLP_FEATURES)


def _load(path: Path) -> model.OnnxModel:
    loaded = model.OnnxModel(path, model.SessionConfig(threads=1, device=settings.Device.CPU))
    loaded.load()
    return loaded


def _labels(path: Path, inputs: np.ndarray[Any, Any]) -> np.ndarray[Any, Any]:
    return np.asarray(np.argmax(_load(path).predict({"x": inputs})[0], axis=-1))


def _serve(path: Path, samples: Path, **options: Any) -> Any:
    return running_server(model_path=path, model_name="m", validation_path=samples, **options)


def _refusal(path: Path, samples: Path, **options: Any) -> str:
    """Why the server refused to start: it must."""
    with pytest.raises(validation.ValidationError) as refused, _serve(path, samples, **options):
        pass
    return str(refused.value)


def test_a_quantized_model_below_min_agreement_never_serves_and_says_by_how_much(
    near_ties: Path, tmp_path: Path
) -> None:
    samples = tmp_path / "validation.npz"
    np.savez(samples, x=examples(ROWS))
    quantized = {"quantization": settings.Quantization.DYNAMIC_INT8}
    message = _refusal(near_ties, samples, min_agreement=0.9, **quantized)
    assert message.startswith(f"validation failed on {ROWS} samples: agreement with the ")
    assert message.endswith("is below minAgreement 0.9")
    agreement = float(message.split("unquantized model ")[1].split()[0])
    assert 0.2 < agreement < 0.8, message

    # Under a floor it reaches, the same model serves, and exports the figure it measured.
    with _serve(near_ties, samples, min_agreement=0.1, **quantized) as runtime:
        text = runtime.stats.exposition().decode()
    assert metric_value(text, "modeldeploy_validation", figure="agreement") == pytest.approx(
        agreement, abs=1e-4
    )


def test_accuracy_against_expected_classes_gates_the_start(mlp_model: Path, tmp_path: Path) -> None:
    inputs = examples(ROWS, seed=3)
    right, wrong = tmp_path / "right.npz", tmp_path / "wrong.npz"
    labels = _labels(mlp_model, inputs)
    np.savez(right, x=inputs, **{"expected.probabilities": labels})
    np.savez(wrong, x=inputs, **{"expected.probabilities": (labels + 1) % MLP_CLASSES})

    # Unquantized, agreement is not measured: its floor cannot fail it.
    with _serve(mlp_model, right, min_accuracy=0.99, min_agreement=0.99) as runtime:
        text = runtime.stats.exposition().decode()
    assert metric_value(text, "modeldeploy_validation", figure="accuracy") == 1.0
    assert 'figure="agreement"' not in text

    assert _refusal(mlp_model, wrong, min_accuracy=0.5).endswith(
        "accuracy 0.0000 is below minAccuracy 0.5"
    )


def test_a_regressor_is_judged_within_the_tolerance(tmp_path: Path) -> None:
    rng = np.random.default_rng(5)
    path = onnx_models.linear(tmp_path / "reg.onnx", rng.normal(0, 1, (MLP_FEATURES, 1)), "value")
    inputs = examples(ROWS, seed=4)
    truth = _load(path).predict({"x": inputs})[0]
    close, far = tmp_path / "close.npz", tmp_path / "far.npz"
    np.savez(close, x=inputs, **{"expected.value": truth * 1.001})
    np.savez(far, x=inputs, **{"expected.value": truth + 1.0})
    with _serve(path, close, min_accuracy=1.0):
        pass
    assert "accuracy 0.0000 is below" in _refusal(path, far, min_accuracy=0.5)
    # A looser tolerance admits the far one.
    with _serve(path, far, min_accuracy=1.0, validation_tolerance=2.0):
        pass


@pytest.mark.parametrize(
    ("arrays", "options", "needle"),
    [
        ({"x": "inputs"}, {"min_accuracy": 0.5}, "needs expected outputs in samples.npz"),
        ({"x": "inputs", "expected.nothing": "labels"}, {"min_accuracy": 0.5},
         "expect outputs ['nothing'] that the model does not have"),
        ({"y": "inputs", "z": "inputs"}, {"min_agreement": 0.5}, "lacks inputs ['x']"),
        ({"x": "inputs", "expected.probabilities": "few"}, {"min_accuracy": 0.5},
         "have fewer rows than the 200 samples"),
    ],
)  # fmt: skip
def test_samples_that_cannot_judge_the_model_stop_the_start_naming_why(
    mlp_model: Path, tmp_path: Path, arrays: dict[str, str], options: dict[str, Any], needle: str
) -> None:
    inputs = examples(ROWS)
    made = {"inputs": inputs, "labels": _labels(mlp_model, inputs), "few": np.zeros(3, np.int64)}
    samples = tmp_path / "samples.npz"
    np.savez(samples, **{key: made[value] for key, value in arrays.items()})
    assert needle in _refusal(mlp_model, samples, **options)


def test_the_runtime_exits_with_its_own_status_and_one_line(
    near_ties: Path, tmp_path: Path
) -> None:
    samples = tmp_path / "validation.npz"
    np.savez(samples, x=examples(ROWS))
    result = subprocess.run(
        runtime_command(
            "serve", f"--model-path={near_ties}", "--model-name=ties", "--http-port=0",
            "--grpc-port=0", "--quantization=dynamic-int8", f"--validation-path={samples}",
            "--min-agreement=0.95",
        ),
        capture_output=True, text=True, timeout=120,
        env={"MODELDEPLOY_HOST": "127.0.0.1", "MODELDEPLOY_CACHE_DIR": str(tmp_path / "cache"),
             "PATH": "/usr/bin:/bin"},
    )  # fmt: skip
    assert result.returncode == values.EXIT_VALIDATION_FAILED, result.stderr[-2000:]
    assert "is below minAgreement 0.95" in result.stderr

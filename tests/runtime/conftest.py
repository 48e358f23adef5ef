"""Fixtures of the runtime tests: small real ONNX models written once per session."""

from __future__ import annotations

from pathlib import Path

import pytest
import runtime_fixtures
from runtime_fixtures import HEAVY_FEATURES, MLP_CLASSES, MLP_FEATURES, busy_mlp, mlp_layers


@pytest.fixture(scope="session")
def models_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("models")


@pytest.fixture(scope="session")
def mlp_model(models_dir: Path) -> Path:
    """The small classifier, with a dynamic batch dimension."""
    return mlp_layers(models_dir / "mlp.onnx", [MLP_FEATURES, 32, MLP_CLASSES], seed=1)


@pytest.fixture(scope="session")
def busy_model(models_dir: Path) -> Path:
    """``mlp_model``'s classifier (the same answers), busy for tens of ms a run: longer than
    a Python client takes to send a burst of requests, so they queue and share batches."""
    return busy_mlp(
        models_dir / "busy.onnx", [MLP_FEATURES, 32, MLP_CLASSES], seed=1, size=512, rounds=6
    )


@pytest.fixture(scope="session")
def slow_model(models_dir: Path) -> Path:
    """The same classifier again, busy for a good fraction of a second a run: requests that
    arrive meanwhile stay queued (the queue's limits, cancelling queued work)."""
    return busy_mlp(
        models_dir / "slow.onnx", [MLP_FEATURES, 32, MLP_CLASSES], seed=1, size=1024, rounds=12
    )


@pytest.fixture(scope="session")
def fixed_model(models_dir: Path) -> Path:
    """The same shape of classifier with a fixed batch of 1: it cannot be batched."""
    return mlp_layers(models_dir / "fixed.onnx", [MLP_FEATURES, 16, MLP_CLASSES], 2, batch=1)


@pytest.fixture(scope="session")
def heavy_model(models_dir: Path) -> Path:
    """A wider MatMul stack: enough work per example for quantization to matter."""
    return mlp_layers(models_dir / "heavy.onnx", [HEAVY_FEATURES, 512, 512, 10], seed=3)


@pytest.fixture(scope="session")
def string_model(models_dir: Path) -> Path:
    """String tensors in and out (LabelEncoder strings -> ints -> strings, and an echo)."""
    return runtime_fixtures.string_model(models_dir / "strings.onnx")


@pytest.fixture(scope="session")
def bert_model(models_dir: Path) -> Path:
    """A BERT-shaped encoder with a per-token, a pooled and an attention-map output."""
    return runtime_fixtures.bert_like(models_dir / "bert.onnx", attention_output=True)

"""The accuracy gate (``spec.validation``): the model a pod is about to serve, checked on sample
inputs before it is ever Ready.

The samples are an ``.npz``: one array per input, samples on axis 0, and optionally the outputs
expected for them as arrays named ``expected.<output>``. Two figures, each with its floor:

- **agreement**, of the served (quantized) model with the unquantized one: the same top-1 class
  for an output of scores, the same values within the tolerance otherwise
  (``quantization.agrees``); it is not measured for a model served unquantized;
- **accuracy**, of the served model against the expected outputs: class indices (integers, one
  per sample) are compared with the top-1 of an output of scores, values as ``agrees`` says.

Below a floor the start stops with ``ValidationError``: the runtime exits with
``values.EXIT_VALIDATION_FAILED`` and its one line, which the operator puts in the
ModelDeployment's status.
"""

from __future__ import annotations

import dataclasses
import logging
from pathlib import Path

import numpy as np

from modeldeploy_runtime import model, quantization

logger = logging.getLogger(__name__)

EXPECTED_PREFIX = "expected."


class ValidationError(Exception):
    """The model failed its accuracy gate, or the gate's samples cannot be used."""


@dataclasses.dataclass(frozen=True)
class Samples:
    inputs: dict[str, model.Array]
    # Output name -> the outputs expected for the samples (axis 0), when the file gives them.
    expected: dict[str, model.Array]

    @property
    def rows(self) -> int:
        return min(len(array) for array in self.inputs.values())


@dataclasses.dataclass(frozen=True)
class Report:
    samples: int
    agreement: float | None  # None: the model is served unquantized
    accuracy: float | None  # None: the file gives no expected outputs


def load_samples(path: Path, served: model.OnnxModel) -> Samples:
    try:
        with np.load(path) as archive:
            arrays = {key: archive[key] for key in archive.files}
    except (OSError, ValueError) as error:
        raise ValidationError(f"validation samples {path} cannot be read: {error}") from None
    expected = {
        key.removeprefix(EXPECTED_PREFIX): array
        for key, array in arrays.items()
        if key.startswith(EXPECTED_PREFIX)
    }
    unknown = sorted(set(expected) - {spec.name for spec in served.outputs})
    if unknown:
        raise ValidationError(
            f"validation samples {path} expect outputs {unknown} that the model does not have; "
            f"its outputs are {[spec.name for spec in served.outputs]}"
        )
    inputs = {key: array for key, array in arrays.items() if not key.startswith(EXPECTED_PREFIX)}
    try:
        samples = Samples(
            quantization.select_inputs(inputs, served.inputs, f"validation samples {path}"),
            expected,
        )
    except ValueError as error:
        raise ValidationError(str(error)) from None
    short = sorted(name for name, array in expected.items() if len(array) < samples.rows)
    if short:
        raise ValidationError(
            f"validation samples {path}: expected outputs {short} have fewer rows than the "
            f"{samples.rows} samples"
        )
    return samples


def accuracy(served: model.OnnxModel, samples: Samples, tolerance: float) -> float:
    """The share of samples for which every expected output is met, one sample at a time."""
    names = [spec.name for spec in served.outputs]
    met = 0
    for i in range(samples.rows):
        row = {name: array[i : i + 1] for name, array in samples.inputs.items()}
        outputs = dict(zip(names, served.predict(row), strict=True))
        met += all(
            _meets(outputs[name][0], expected[i], tolerance)
            for name, expected in samples.expected.items()
        )
    return met / samples.rows


def _meets(actual: model.Array, expected: model.Array, tolerance: float) -> bool:
    """One sample's output against what was expected of it: a class index against the top-1 of
    scores, else as `quantization.agrees` compares."""
    classes = np.issubdtype(expected.dtype, np.integer) and np.issubdtype(actual.dtype, np.floating)
    if classes and expected.ndim == actual.ndim - 1 and actual.shape[-1] >= 2:
        return bool(np.array_equal(np.argmax(actual, axis=-1), expected))
    if np.issubdtype(actual.dtype, np.number) and np.issubdtype(expected.dtype, np.number):
        expected = expected.astype(actual.dtype)
    return quantization.agrees(expected[None], actual[None], tolerance)


def check(
    path: Path,
    served: model.OnnxModel,
    reference: model.OnnxModel | None,
    *,
    min_agreement: float | None,
    min_accuracy: float | None,
    tolerance: float,
) -> Report:
    """Measures the served model on the samples at `path`; raises ValidationError naming each
    figure below its floor (and the floor)."""
    samples = load_samples(path, served)
    agreement = (
        None
        if reference is None
        else quantization.compare(
            reference, served, samples.inputs, tolerance, limit=None
        ).top1_agreement
    )
    measured = accuracy(served, samples, tolerance) if samples.expected else None
    report = Report(samples.rows, agreement, measured)
    logger.info(
        "validation on %d samples from %s: agreement with the unquantized model %s, accuracy %s",
        report.samples,
        path.name,
        "not measured (served unquantized)" if agreement is None else f"{agreement:.4f}",
        "not measured (no expected outputs)" if measured is None else f"{measured:.4f}",
    )
    failed = []
    if min_agreement is not None and agreement is not None and agreement < min_agreement:
        failed.append(
            f"agreement with the unquantized model {agreement:.4f} is below minAgreement "
            f"{min_agreement}"
        )
    if min_accuracy is not None:
        if measured is None:
            raise ValidationError(
                f"minAccuracy {min_accuracy} needs expected outputs in {path.name}: arrays "
                f"named {EXPECTED_PREFIX}<output>, one row per sample"
            )
        if measured < min_accuracy:
            failed.append(f"accuracy {measured:.4f} is below minAccuracy {min_accuracy}")
    if failed:
        raise ValidationError(f"validation failed on {report.samples} samples: {'; '.join(failed)}")
    return report

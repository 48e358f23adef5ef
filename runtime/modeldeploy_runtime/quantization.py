"""INT8 quantization and FP16 conversion at load time, cached by content hash, measured.

The cached model is written beside the original (``<stem>.<mode>.<hash>.onnx``) when
that directory is writable, otherwise into the cache directory (the pod's root
filesystem is read-only; the model lives on a shared volume).  The hash covers the
model, the calibration samples, the mode and the ONNX Runtime version, so a changed
input never reuses a stale result.
"""

from __future__ import annotations

import dataclasses
import hashlib
import logging
import os
import tempfile
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
from onnxruntime import quantization as ortq
from onnxruntime.transformers import float16

from modeldeploy_contract import values
from modeldeploy_runtime import model, settings, tensors

logger = logging.getLogger(__name__)


# Enough for a stable percentage without delaying readiness by much.
_MAX_COMPARED = 256


@dataclasses.dataclass(frozen=True)
class Accuracy:
    # The share of samples whose first output agrees (`agrees`): top-1 for a classifier.
    top1_agreement: float
    max_abs_error: float
    samples: int


def quantize(
    source: Path,
    mode: settings.Quantization,
    calibration: dict[str, model.Array] | None,
    cache_dir: Path,
) -> Path:
    """The quantized model's path; quantizes only when no cached result exists."""
    digest = _cache_key(source, mode, calibration)
    name = f"{source.stem}.{mode.value}.{digest[:16]}.onnx"
    candidates = [source.parent / name, cache_dir / name]
    for candidate in candidates:
        if candidate.exists():
            logger.info("reusing quantized model %s", candidate)
            return candidate
    target_dir = source.parent if os.access(source.parent, os.W_OK) else cache_dir
    target_dir.mkdir(parents=True, exist_ok=True)
    target = target_dir / name
    logger.info("quantizing %s (%s) into %s", source, mode.value, target)
    # ONNX Runtime's quantizer writes scratch files (<stem>-inferred.onnx) beside its input,
    # and the model's own folder may be read-only: give it a linked copy in a scratch folder.
    with tempfile.TemporaryDirectory(dir=target_dir, prefix=".quantize-") as scratch:
        linked = Path(scratch) / source.name
        linked.symlink_to(source.resolve())
        tmp = Path(scratch) / name
        if mode is settings.Quantization.FP16:
            # FP16 weights and compute; inputs and outputs stay FP32, so clients see no change.
            converted = float16.convert_float_to_float16(onnx.load(linked), keep_io_types=True)
            onnx.save(converted, tmp)
        elif mode is settings.Quantization.DYNAMIC_INT8:
            # Per-channel scales: same speed, and top-1 agreement went from 95% to 99%
            # on the benchmark's heavy model.
            ortq.quantize_dynamic(linked, tmp, weight_type=ortq.QuantType.QInt8, per_channel=True)
        else:
            if calibration is None:
                raise ValueError("static-int8 quantization needs calibration samples")
            # U8 activations with S8 weights is what the x86 INT8 kernels are fastest at.
            ortq.quantize_static(
                linked,
                tmp,
                _SampleReader(calibration),
                quant_format=ortq.QuantFormat.QDQ,
                activation_type=ortq.QuantType.QUInt8,
                weight_type=ortq.QuantType.QInt8,
                per_channel=True,
            )
        os.replace(tmp, target)
    return target


def _cache_key(
    source: Path, mode: settings.Quantization, calibration: dict[str, model.Array] | None
) -> str:
    digest = hashlib.sha256()
    digest.update(f"{mode.value}\0{ort.__version__}\0".encode())
    with source.open("rb") as stream:
        for chunk in iter(lambda: stream.read(1 << 20), b""):
            digest.update(chunk)
    if mode is settings.Quantization.STATIC_INT8 and calibration:
        for name in sorted(calibration):
            array = np.ascontiguousarray(calibration[name])
            digest.update(f"\0{name}\0{array.dtype.str}\0{array.shape}\0".encode())
            digest.update(array.tobytes())
    return digest.hexdigest()


class _SampleReader(ortq.CalibrationDataReader):  # type: ignore[misc]
    """Feeds the calibration samples one example at a time."""

    def __init__(self, samples: dict[str, model.Array]) -> None:
        self._rows: Iterator[dict[str, model.Array]] = (
            {name: array[i : i + 1] for name, array in samples.items()}
            for i in range(_rows(samples))
        )

    def get_next(self) -> dict[str, model.Array] | None:
        return next(self._rows, None)


def _rows(samples: dict[str, model.Array]) -> int:
    return min(len(array) for array in samples.values())


def load_samples(path: Path, inputs: tuple[model.TensorSpec, ...]) -> dict[str, model.Array]:
    """Sample inputs from an ``.npz`` keyed by input name (or one array for one input)."""
    with np.load(path) as archive:
        arrays = {key: archive[key] for key in archive.files}
    return select_inputs(arrays, inputs, f"calibration file {path}")


def select_inputs(
    arrays: dict[str, model.Array], inputs: tuple[model.TensorSpec, ...], source: str
) -> dict[str, model.Array]:
    """The model's inputs among `arrays` (one array serves a one-input model whatever its
    name), in the inputs' types, with at least one sample."""
    names = [spec.name for spec in inputs]
    if len(names) == 1 and len(arrays) == 1 and names[0] not in arrays:
        arrays = {names[0]: next(iter(arrays.values()))}
    missing = sorted(set(names) - arrays.keys())
    if missing:
        raise ValueError(f"{source} lacks inputs {missing}; it has arrays {sorted(arrays)}")
    samples = {
        spec.name: arrays[spec.name].astype(model.DATATYPES[spec.datatype]) for spec in inputs
    }
    if _rows(samples) == 0:
        raise ValueError(f"{source} holds no samples")
    return samples


def random_samples(
    reference: model.OnnxModel,
    shapes: Mapping[str, Sequence[int]] | None = None,
    rows: int = 64,
) -> tuple[dict[str, model.Array] | None, str]:
    """Stand-in samples when none are given (a fixed seed keeps the measurement repeatable),
    shaped as the warm-up shapes say or as the model's own dims; None, and why, when a dim is
    unknown or the model does not batch: a size is never invented."""
    if not reference.sizes:
        return None, "the model does not batch on axis 0, and no calibration data is given"
    rng = np.random.default_rng(0)
    samples: dict[str, model.Array] = {}
    for spec in reference.inputs:
        dims = tuple(shapes[spec.name][1:]) if shapes and spec.name in shapes else spec.shape[1:]
        if any(d < 0 for d in dims):
            return None, (
                f"input {spec.name} {list(spec.shape)} has unknown dims (-1) and no calibration "
                "data (calibrationUri) or warm-up shapes (spec.runtime.warmup) give them"
            )
        dtype = model.DATATYPES[spec.datatype]
        samples[spec.name] = (
            rng.standard_normal((rows, *dims)).astype(dtype)
            if np.issubdtype(dtype, np.floating)
            else tensors.filled((rows, *dims), dtype)
        )
    return samples, ""


def compare(
    reference: model.OnnxModel,
    quantized: model.OnnxModel,
    samples: dict[str, model.Array],
    tolerance: float = values.VALIDATION_TOLERANCE,
    limit: int | None = _MAX_COMPARED,
) -> Accuracy:
    """Agreement (`agrees`) and largest absolute error of the first output, one example at a
    time, on the first `limit` samples (all of them for None)."""
    rows = _rows(samples) if limit is None else min(_rows(samples), limit)
    agree = 0
    max_error = 0.0
    for i in range(rows):
        row = {name: array[i : i + 1] for name, array in samples.items()}
        expected = reference.predict(row)[0]
        actual = quantized.predict(row)[0]
        if np.issubdtype(actual.dtype, np.number) and expected.shape == actual.shape:
            difference = np.abs(expected.astype(np.float64) - actual.astype(np.float64))
            max_error = max(max_error, float(np.max(difference, initial=0.0)))
        agree += agrees(expected, actual, tolerance)
    return Accuracy(agree / rows, max_error, rows)


def agrees(reference: model.Array, actual: model.Array, tolerance: float) -> bool:
    """Whether one example's output agrees with the reference: the same top-1 class when it
    holds scores (floats along a last axis of two or more), else the same values, floats
    within `tolerance` (relative and absolute)."""
    if reference.shape != actual.shape:
        return False
    if not np.issubdtype(actual.dtype, np.floating):
        return bool(np.array_equal(reference, actual))
    if actual.ndim >= 2 and actual.shape[-1] >= 2:
        return bool(np.array_equal(np.argmax(reference, axis=-1), np.argmax(actual, axis=-1)))
    return bool(np.allclose(actual, reference, rtol=tolerance, atol=tolerance))

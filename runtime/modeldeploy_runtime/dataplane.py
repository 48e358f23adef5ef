"""The transport-agnostic data plane of the Open Inference Protocol.

The HTTP and gRPC adapters turn their wire formats into ``InferenceRequest`` with
``decode_tensor`` and delegate here; errors are ``InferenceError`` subclasses whose
messages name the input and the problem, and which the adapters map to status codes.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping, Sequence
from importlib import metadata
from typing import Any, Protocol

import numpy as np

from modeldeploy_runtime import batching, metrics, tensors


class InferenceError(Exception):
    outcome = metrics.Outcome.SERVER_ERROR


class InvalidInputError(InferenceError):
    outcome = metrics.Outcome.CLIENT_ERROR


class ModelNotFoundError(InferenceError):
    outcome = metrics.Outcome.CLIENT_ERROR


class UnavailableError(InferenceError):
    """The model is not loaded yet; retry later."""

    outcome = metrics.Outcome.REJECTED


class RejectedError(InferenceError):
    """The queue is full; retry later."""

    outcome = metrics.Outcome.REJECTED


@dataclasses.dataclass(frozen=True, slots=True)
class RequestInput:
    name: str
    data: tensors.Array


@dataclasses.dataclass(frozen=True, slots=True)
class InferenceRequest:
    inputs: Sequence[RequestInput]
    # None: every output of the model.
    outputs: Sequence[str] | None = None
    id: str | None = None


@dataclasses.dataclass(frozen=True, slots=True)
class ResponseOutput:
    name: str
    datatype: str
    data: tensors.Array


@dataclasses.dataclass(frozen=True, slots=True)
class InferenceResponse:
    model_name: str
    model_version: str
    outputs: Sequence[ResponseOutput]
    id: str | None = None


def decode_tensor(name: str, datatype: Any, shape: Any, data: Any) -> RequestInput:
    """An input from its wire form: raw little-endian bytes or a (nested) list."""
    dtype = tensors.DATATYPES.get(datatype) if isinstance(datatype, str) else None
    if dtype is None:
        raise InvalidInputError(
            f"input {name!r}: datatype {datatype!r} is not supported; "
            f"use one of {', '.join(tensors.DATATYPES)}"
        )
    if not isinstance(shape, list | tuple) or not all(
        isinstance(d, int) and not isinstance(d, bool) and d >= 0 for d in shape
    ):
        raise InvalidInputError(f"input {name!r}: shape must be a list of non-negative integers")
    count = math.prod(shape)
    if isinstance(data, bytes | bytearray | memoryview):
        if len(data) != count * dtype.itemsize:
            raise InvalidInputError(
                f"input {name!r}: {len(data)} bytes of data, but shape {list(shape)} of "
                f"{datatype} needs {count * dtype.itemsize}"
            )
        array = np.frombuffer(data, dtype=dtype)
    else:
        try:
            array = np.asarray(data, dtype=dtype)
        except (ValueError, TypeError, OverflowError):
            message = f"input {name!r}: data is not a list of {datatype} values"
            raise InvalidInputError(message) from None
        if array.size != count:
            raise InvalidInputError(
                f"input {name!r}: {array.size} values of data, but shape {list(shape)} "
                f"needs {count}"
            )
    return RequestInput(name, array.reshape(shape))


class Backend(Protocol):
    """Runs validated requests: the batcher in this process, or the engine's through IPC."""

    async def submit(self, inputs: Mapping[str, tensors.Array], size: int) -> list[tensors.Array]:
        """The outputs for these inputs; raises ``batching.QueueFullError`` when full."""


class DataPlane:
    def __init__(self, *, name: str, version: str) -> None:
        self.name = name
        self.version = version
        self._model: tensors.Signature | None = None
        self._backend: Backend | None = None
        # Set by the server once the model loaded and a warm-up inference ran,
        # cleared again when it starts shutting down.
        self.ready = False

    def attach(self, served: tensors.Signature, backend: Backend) -> None:
        """Start answering for a loaded model (before that, requests get UnavailableError)."""
        self._model = served
        self._backend = backend

    def _loaded(self) -> tuple[tensors.Signature, Backend]:
        if self._model is None or self._backend is None:
            raise UnavailableError(f"model {self.name!r} is not loaded yet")
        return self._model, self._backend

    def server_metadata(self) -> dict[str, Any]:
        return {
            "name": "modeldeploy",
            "version": _package_version(),
            "extensions": ["binary_tensor_data"],
        }

    def model_ready(self, name: str, version: str | None = None) -> bool:
        self._check_model(name, version)
        return self.ready

    def model_metadata(self, name: str, version: str | None = None) -> dict[str, Any]:
        self._check_model(name, version)
        served, _ = self._loaded()

        def describe(specs: Sequence[tensors.TensorSpec]) -> list[dict[str, Any]]:
            return [{"name": s.name, "datatype": s.datatype, "shape": list(s.shape)} for s in specs]

        return {
            "name": self.name,
            "versions": [self.version],
            "platform": "onnxruntime_onnx",
            "inputs": describe(served.inputs),
            "outputs": describe(served.outputs),
        }

    async def infer(
        self, name: str, version: str | None, request: InferenceRequest
    ) -> InferenceResponse:
        self._check_model(name, version)
        served, backend = self._loaded()
        inputs, size = _validate_inputs(served, request.inputs)
        wanted = _validate_outputs(served, request.outputs)
        try:
            results = await backend.submit(inputs, size)
        except batching.QueueFullError as error:
            raise RejectedError(str(error)) from None
        except Exception as error:
            raise InferenceError(f"inference failed: {error}") from error
        outputs = [
            ResponseOutput(spec.name, spec.datatype, result)
            for spec, result in zip(served.outputs, results, strict=True)
            if wanted is None or spec.name in wanted
        ]
        return InferenceResponse(self.name, self.version, outputs, request.id)

    def _check_model(self, name: str, version: str | None) -> None:
        if name != self.name:
            raise ModelNotFoundError(
                f"model {name!r} is not served here; this server serves {self.name!r}"
            )
        if version and version != self.version:
            raise ModelNotFoundError(
                f"model {name!r} has no version {version!r}; the served version is {self.version!r}"
            )


def _validate_inputs(
    served: tensors.Signature, given: Sequence[RequestInput]
) -> tuple[dict[str, tensors.Array], int]:
    specs = {spec.name: spec for spec in served.inputs}
    inputs: dict[str, tensors.Array] = {}
    for tensor in given:
        spec = specs.get(tensor.name)
        if spec is None:
            raise InvalidInputError(
                f"unknown input {tensor.name!r}; the model's inputs are {sorted(specs)}"
            )
        if tensor.name in inputs:
            raise InvalidInputError(f"input {tensor.name!r} is given more than once")
        if tensor.data.dtype != tensors.DATATYPES[spec.datatype]:
            got = _datatype_name(tensor.data.dtype)
            raise InvalidInputError(
                f"input {spec.name!r}: datatype {got}, but the model expects {spec.datatype}"
            )
        shape = tensor.data.shape
        if len(shape) != len(spec.shape) or any(
            want >= 0 and got != want for got, want in zip(shape, spec.shape, strict=True)
        ):
            raise InvalidInputError(
                f"input {spec.name!r}: shape {list(shape)} does not match the model's "
                f"{list(spec.shape)} (-1 is any size)"
            )
        inputs[tensor.name] = tensor.data
    missing = sorted(specs.keys() - inputs.keys())
    if missing:
        raise InvalidInputError(f"missing input(s) {missing}; the model needs {sorted(specs)}")
    if not served.batchable:
        return inputs, 1
    sizes = {array.shape[0] for array in inputs.values()}
    if len(sizes) > 1:
        raise InvalidInputError(f"inputs disagree on the batch size (first dim): {sorted(sizes)}")
    (size,) = sizes
    if size == 0:
        raise InvalidInputError("inputs have an empty batch (first dim is 0)")
    if size > served.max_batch_size:
        raise InvalidInputError(
            f"a batch of {size} examples is larger than the model's maxBatchSize "
            f"{served.max_batch_size}; split the request"
        )
    return inputs, size


def _validate_outputs(
    served: tensors.Signature, requested: Sequence[str] | None
) -> set[str] | None:
    if requested is None:
        return None
    known = {spec.name for spec in served.outputs}
    unknown = sorted(set(requested) - known)
    if unknown:
        raise InvalidInputError(
            f"unknown output(s) {unknown} requested; the model's outputs are {sorted(known)}"
        )
    return set(requested)


def _datatype_name(dtype: np.dtype[Any]) -> str:
    for name, known in tensors.DATATYPES.items():
        if known == dtype:
            return name
    return str(dtype)


def _package_version() -> str:
    try:
        return metadata.version("modeldeploy")
    except metadata.PackageNotFoundError:
        return "0"

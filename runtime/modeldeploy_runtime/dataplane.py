"""The transport-agnostic data plane of the Open Inference Protocol.

The HTTP and gRPC adapters turn their wire formats into ``WireTensor`` descriptions and
call ``DataPlane.decode``, which checks everything it can without touching tensor data
(model name and version, input names, count, datatypes, ranks, static dims, batch size,
declared data sizes) against the model's signature, and only then decodes the data.  So a
hostile body costs its parse and nothing more.  Errors are ``InferenceError`` subclasses
whose messages name the input and the problem; the adapters map them to status codes.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import dataclasses
import logging
import math
import multiprocessing
import time
from collections.abc import Callable, Mapping, Sequence
from importlib import metadata
from typing import Any, Protocol, TypeVar

import numpy as np

from modeldeploy_runtime import batching, metrics, tensors

logger = logging.getLogger(__name__)

# Larger dims are refused before any arithmetic: no shape can overflow a count.
MAX_DIM = 2**31 - 1
# Bodies above this are parsed and decoded in the decoder process, so the event loop (and
# with it the liveness and readiness probes) keeps answering while they are.
OFFLOAD_BYTES = 1 << 20

Decoded = TypeVar("Decoded")
# Triton's names of the datatypes, in its model configuration.
_TRITON_TYPES = {name: f"TYPE_{name}" for name in tensors.DATATYPES} | {"BYTES": "TYPE_STRING"}


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
class WireTensor:
    """An input as it arrived: ``data`` is raw little-endian bytes, a (nested) list, or a
    sized iterable of numbers (gRPC's typed contents); nothing is checked yet."""

    name: Any
    datatype: Any
    shape: Any
    data: Any


@dataclasses.dataclass(frozen=True, slots=True)
class InferenceRequest:
    """A decoded request, checked against the model: one batch of ``size`` examples."""

    inputs: Mapping[str, tensors.Array]
    size: int
    # None: every output of the model.
    outputs: frozenset[str] | None = None
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


class Backend(Protocol):
    """Runs validated requests: the batcher in this process, or the engine's through IPC."""

    async def submit(self, inputs: Mapping[str, tensors.Array], size: int) -> list[tensors.Array]:
        """The outputs for these inputs; raises ``batching.QueueFullError`` when full."""


@dataclasses.dataclass(frozen=True)
class Decoder:
    """Checks and decodes requests for one model: plain data, so it also works in the
    decoder process that large bodies are sent to."""

    name: str
    version: str
    signature: tensors.Signature

    def check_model(self, name: str, version: str | None) -> None:
        _check_model(self.name, self.version, name, version)

    def check_input_count(self, name: str, version: str | None, count: int) -> None:
        """Refuse more inputs than the model has before any of them is looked at."""
        self.check_model(name, version)
        inputs = self.signature.inputs
        if count > len(inputs):
            raise InvalidInputError(
                f"{count} inputs given, but the model has {len(inputs)}: "
                f"{[spec.name for spec in inputs]}"
            )

    def decode(
        self,
        name: str,
        version: str | None,
        given: Sequence[WireTensor],
        outputs: Sequence[Any] | None = None,
        request_id: str | None = None,
    ) -> InferenceRequest:
        """Check the request against the model, then decode its data."""
        self.check_input_count(name, version, len(given))
        served = self.signature
        wanted = _check_outputs(served, outputs)
        checked = _check_headers(served, given)
        inputs = {spec.name: _decode(tensor, spec, shape) for tensor, spec, shape in checked}
        return InferenceRequest(inputs, _batch_size(served, inputs), wanted, request_id)


class DataPlane:
    def __init__(self, *, name: str, version: str, stats: metrics.ModelMetrics) -> None:
        self.name = name
        self.version = version
        self.stats = stats
        self._model: tensors.Signature | None = None
        self._backend: Backend | None = None
        self._decoder: Decoder | None = None
        # Large bodies are decoded in a process of their own: JSON parsing holds the GIL
        # throughout (0.7 s for 200,000 tiny inputs), which a thread would not escape.
        self._decoding: concurrent.futures.ProcessPoolExecutor | None = None
        # Set by the server once the model loaded and a warm-up inference ran,
        # cleared again when it starts shutting down.
        self.ready = False

    def attach(self, served: tensors.Signature, backend: Backend) -> None:
        """Start answering for a loaded model (before that, requests get UnavailableError)."""
        self._model = served
        self._backend = backend
        self._decoder = Decoder(self.name, self.version, served)

    @property
    def decoder(self) -> Decoder:
        if self._decoder is None:
            raise UnavailableError(f"model {self.name!r} is not loaded yet")
        return self._decoder

    def close(self) -> None:
        if self._decoding is not None:
            self._decoding.shutdown(cancel_futures=True)

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
        self.check_model(name, version)
        return self.ready

    def model_metadata(self, name: str, version: str | None = None) -> dict[str, Any]:
        self.check_model(name, version)
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

    def model_config(self, name: str, version: str | None = None) -> dict[str, Any]:
        """Triton's model configuration (``GET /v2/models/<name>/config``): ``max_batch_size``
        is 0 when requests are never merged, and then the dims are the whole shapes."""
        self.check_model(name, version)
        served, _ = self._loaded()
        first = 1 if served.batchable else 0

        def describe(specs: Sequence[tensors.TensorSpec]) -> list[dict[str, Any]]:
            return [
                {"name": s.name, "data_type": _TRITON_TYPES[s.datatype], "dims": s.shape[first:]}
                for s in specs
            ]

        return {
            "name": self.name,
            "platform": "onnxruntime_onnx",
            "max_batch_size": served.max_batch_size,
            "input": describe(served.inputs),
            "output": describe(served.outputs),
        }

    async def handle(
        self,
        protocol: metrics.Protocol,
        decode: Callable[..., tuple[InferenceRequest, Decoded]],
        *args: Any,
        offload: bool = False,
    ) -> tuple[InferenceResponse, Decoded]:
        """One inference call of either transport: decode, run, and count it.

        ``decode(decoder, *args)`` (a module-level function) turns the wire request into a
        checked request and whatever else the transport needs back; with ``offload`` it
        runs in the decoder process, so the event loop, and with it the probes, never
        waits for it.  Errors come out as ``InferenceError`` for the transport to map.
        """
        started = time.perf_counter()
        outcome = metrics.Outcome.SUCCESS
        try:
            decoder = self.decoder
            if offload:
                loop = asyncio.get_running_loop()
                request, extra = await loop.run_in_executor(
                    self._decoder_process(), decode, decoder, *args
                )
            else:
                request, extra = decode(decoder, *args)
            self.stats.inflight.inc()
            try:
                return await self.infer(request), extra
            finally:
                self.stats.inflight.dec()
        except InferenceError as error:
            outcome = error.outcome
            if outcome is metrics.Outcome.SERVER_ERROR:
                logger.error("%s", error)
            raise
        except asyncio.CancelledError:
            # The client went away: its queued work is dropped with it.
            outcome = metrics.Outcome.CLIENT_ERROR
            raise
        except Exception as error:
            outcome = metrics.Outcome.SERVER_ERROR
            logger.exception("inference request failed")
            raise InferenceError("internal error; see the server log") from error
        finally:
            self.stats.observe_request(protocol, outcome, time.perf_counter() - started)

    def _decoder_process(self) -> concurrent.futures.ProcessPoolExecutor:
        if self._decoding is None:
            self._decoding = concurrent.futures.ProcessPoolExecutor(
                1, multiprocessing.get_context("spawn")
            )
        return self._decoding

    async def infer(self, request: InferenceRequest) -> InferenceResponse:
        served, backend = self._loaded()
        try:
            results = await backend.submit(request.inputs, request.size)
        except batching.QueueFullError as error:
            raise RejectedError(str(error)) from None
        except batching.InvalidRequestError as error:
            raise InvalidInputError(str(error)) from None
        except Exception as error:
            raise InferenceError(f"inference failed: {error}") from error
        outputs = [
            ResponseOutput(spec.name, spec.datatype, result)
            for spec, result in zip(served.outputs, results, strict=True)
            if request.outputs is None or spec.name in request.outputs
        ]
        return InferenceResponse(self.name, self.version, outputs, request.id)

    def check_model(self, name: str, version: str | None) -> None:
        _check_model(self.name, self.version, name, version)


def _check_model(served: str, served_version: str, name: str, version: str | None) -> None:
    if name != served:
        raise ModelNotFoundError(
            f"model {name!r} is not served here; this server serves {served!r}"
        )
    if version and version != served_version:
        raise ModelNotFoundError(
            f"model {name!r} has no version {version!r}; the served version is {served_version!r}"
        )


def _check_headers(
    served: tensors.Signature, given: Sequence[WireTensor]
) -> list[tuple[WireTensor, tensors.TensorSpec, tuple[int, ...]]]:
    """Names, datatypes and shapes against the model's inputs; no data is read."""
    specs = {spec.name: spec for spec in served.inputs}
    seen: set[str] = set()
    checked = []
    for tensor in given:
        spec = specs.get(tensor.name) if isinstance(tensor.name, str) else None
        if spec is None:
            raise InvalidInputError(
                f"unknown input {str(tensor.name)[:100]!r}; the model's inputs are {sorted(specs)}"
            )
        if spec.name in seen:
            raise InvalidInputError(f"input {spec.name!r} is given more than once")
        seen.add(spec.name)
        if tensor.datatype != spec.datatype:
            shown = tensor.datatype if isinstance(tensor.datatype, str) else repr(tensor.datatype)
            raise InvalidInputError(
                f"input {spec.name!r}: datatype {str(shown)[:32]}, but the model expects "
                f"{spec.datatype}"
            )
        shape = _checked_shape(spec, tensor.shape)
        checked.append((tensor, spec, shape))
    missing = sorted(specs.keys() - seen)
    if missing:
        raise InvalidInputError(f"missing input(s) {missing}; the model needs {sorted(specs)}")
    if served.batchable:
        sizes = {shape[0] for _, _, shape in checked}
        if len(sizes) > 1:
            raise InvalidInputError(
                f"inputs disagree on the batch size (first dim): {sorted(sizes)}"
            )
        (size,) = sizes
        if size == 0:
            raise InvalidInputError("inputs have an empty batch (first dim is 0)")
        if size > served.max_batch_size:
            raise InvalidInputError(
                f"a batch of {size} examples is larger than the model's maxBatchSize "
                f"{served.max_batch_size}; split the request"
            )
    return checked


def _checked_shape(spec: tensors.TensorSpec, shape: Any) -> tuple[int, ...]:
    if not isinstance(shape, list | tuple) or len(shape) != len(spec.shape):
        raise InvalidInputError(
            f"input {spec.name!r}: shape must be a list of {len(spec.shape)} integers "
            f"(the model's is {list(spec.shape)}, -1 is any size)"
        )
    for got, want in zip(shape, spec.shape, strict=True):
        if type(got) is not int:  # bool is an int subclass, and no dimension
            raise InvalidInputError(
                f"input {spec.name!r}: shape must be a list of {len(spec.shape)} integers "
                f"(the model's is {list(spec.shape)}, -1 is any size)"
            )
        if got < 0 or got > MAX_DIM or (want >= 0 and got != want):
            raise InvalidInputError(
                f"input {spec.name!r}: shape {list(shape)} does not match the model's "
                f"{list(spec.shape)} (-1 is any size)"
            )
    return tuple(shape)


def _decode(tensor: WireTensor, spec: tensors.TensorSpec, shape: tuple[int, ...]) -> tensors.Array:
    if spec.datatype == tensors.BYTES:
        return _decode_bytes(tensor.data, spec, shape)
    dtype = tensors.DATATYPES[spec.datatype]
    count = math.prod(shape)
    data = tensor.data
    if isinstance(data, bytes | bytearray | memoryview):
        if len(data) != count * dtype.itemsize:
            raise InvalidInputError(
                f"input {spec.name!r}: {len(data)} bytes of data, but shape {list(shape)} of "
                f"{spec.datatype} needs {count * dtype.itemsize}"
            )
        return np.frombuffer(data, dtype=dtype).reshape(shape)
    if isinstance(data, list):
        if data and not isinstance(data[0], list) and len(data) != count:
            raise InvalidInputError(
                f"input {spec.name!r}: {len(data)} values of data, but shape {list(shape)} "
                f"needs {count}"
            )
        try:
            array = np.asarray(data, dtype=dtype)
        except (ValueError, TypeError, OverflowError):
            raise InvalidInputError(
                f"input {spec.name!r}: data is not a list of {spec.datatype} values"
            ) from None
    elif not isinstance(data, dict | str) and hasattr(data, "__len__"):
        if len(data) != count:
            raise InvalidInputError(
                f"input {spec.name!r}: {len(data)} values of data, but shape {list(shape)} "
                f"needs {count}"
            )
        try:
            array = np.fromiter(data, dtype=dtype, count=count)
        except (ValueError, TypeError, OverflowError):
            raise InvalidInputError(
                f"input {spec.name!r}: data is not a list of {spec.datatype} values"
            ) from None
    else:
        raise InvalidInputError(f"input {spec.name!r}: data must be a list of numbers")
    if array.size != count:
        raise InvalidInputError(
            f"input {spec.name!r}: {array.size} values of data, but shape {list(shape)} "
            f"needs {count}"
        )
    return array.reshape(shape)


def _decode_bytes(data: Any, spec: tensors.TensorSpec, shape: tuple[int, ...]) -> tensors.Array:
    """A string tensor: length-prefixed binary, a (nested) JSON list of strings, or gRPC's
    ``bytes_contents``; every element must be UTF-8 text (what ONNX string tensors hold)."""
    count = math.prod(shape)
    if isinstance(data, bytes | bytearray | memoryview):
        try:
            return tensors.deserialize_bytes(data, count).reshape(shape)
        except ValueError as error:
            raise InvalidInputError(f"input {spec.name!r}: BYTES data: {error}") from None
    if isinstance(data, dict | str) or not hasattr(data, "__len__"):
        raise InvalidInputError(f"input {spec.name!r}: data must be a list of strings")
    if isinstance(data, list):
        # Nested lists are flattened by numpy; a ragged nesting leaves lists as elements.
        try:
            items = np.asarray(data, dtype=tensors.OBJECT).ravel()
        except (ValueError, TypeError):
            raise InvalidInputError(
                f"input {spec.name!r}: data is not a list of strings shaped {list(shape)}"
            ) from None
    else:
        items = np.empty(len(data), tensors.OBJECT)
        items[:] = list(data)
    if items.size != count:
        raise InvalidInputError(
            f"input {spec.name!r}: {items.size} values of data, but shape {list(shape)} "
            f"needs {count}"
        )
    for i, item in enumerate(items):
        if isinstance(item, bytes):
            try:
                items[i] = item.decode()
            except UnicodeDecodeError:
                raise InvalidInputError(
                    f"input {spec.name!r}: element {i} is not UTF-8; string tensors hold text"
                ) from None
        elif not isinstance(item, str):
            raise InvalidInputError(f"input {spec.name!r}: data is not a list of strings")
    return items.reshape(shape)


def _batch_size(served: tensors.Signature, inputs: Mapping[str, tensors.Array]) -> int:
    if not served.batchable:
        return 1
    size: int = next(iter(inputs.values())).shape[0]
    return size


def _check_outputs(
    served: tensors.Signature, requested: Sequence[Any] | None
) -> frozenset[str] | None:
    if requested is None:
        return None
    known = {spec.name for spec in served.outputs}
    if len(requested) > len(known) or not all(isinstance(n, str) for n in requested):
        raise InvalidInputError(f"outputs must name some of the model's outputs {sorted(known)}")
    unknown = sorted(set(requested) - known)
    if unknown:
        raise InvalidInputError(
            f"unknown output(s) {unknown} requested; the model's outputs are {sorted(known)}"
        )
    return frozenset(requested)


def _package_version() -> str:
    try:
        return metadata.version("modeldeploy")
    except metadata.PackageNotFoundError:
        return "0"

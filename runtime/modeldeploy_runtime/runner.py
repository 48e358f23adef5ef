"""Runs merged batches on a model's sessions, with the batch buffers reused across batches.

On CPU, ``prepare`` (run by the inference thread just before ``run``) merges the requests
into a numpy buffer kept per batch shape.  On a GPU each batch shape and pipeline slot has
input buffers in device memory, bound to its size's session (IO binding): ``prepare`` (the
merge thread) copies each request's tensors straight into its own rows there, from
wherever the request lies (a front-end worker's shared-memory arena, or the body this
process decoded), with no merge on the host, so the transfer overlaps the previous batch's
compute.  Arenas are page-locked (``pin``) so those copies are direct DMA at full bus
speed; a copy from pageable memory is staged by the driver, and the merge thread waits
for every copy of its batch before handing it on, as ONNX Runtime does for its own.
``run`` (the inference thread) only runs.  Two slots per shape suffice: the batcher lets
at most one batch wait while another runs, so a slot is reused only after its batch
finished.  ``SessionRunner(..., bind="cpu")`` runs the GPU path on host memory (tests).  Models with
string inputs always take the CPU path: ONNX Runtime keeps string tensors on the host.

Rows past a batch's own examples keep whatever an earlier batch left in the buffer (zeros
at first): valid inputs whose outputs are cut off before they reach any client.
"""

from __future__ import annotations

import collections
import ctypes
import dataclasses
import functools
import logging
import math
import mmap
from collections.abc import Hashable, Sequence
from typing import Any

import numpy as np
import onnxruntime as ort

from modeldeploy_runtime import batching, model, tensors

logger = logging.getLogger(__name__)

# Shapes whose buffers are kept; models with variable non-batch dims reuse the recent ones.
_KEPT_SHAPES = 16
_CUDART_NAMES = ("libcudart.so.13", "libcudart.so.12", "libcudart.so")
_HOST_TO_DEVICE = 1  # cudaMemcpyHostToDevice
# Page-locked arenas, never unmapped while registered.
_PINNED: list[mmap.mmap] = []


@functools.cache
def _cudart() -> ctypes.CDLL | None:
    """The CUDA runtime ONNX Runtime's CUDA provider already loaded, if it can be found."""
    for name in _CUDART_NAMES:
        try:
            return ctypes.CDLL(name)
        except OSError:
            continue
    logger.warning("libcudart not found: shared memory stays pageable (slower copies)")
    return None


def _cuda_call(name: str, *args: Any) -> None:
    cudart = _cudart()
    if cudart is None:
        raise RuntimeError(f"{name}: libcudart not found")
    status = getattr(cudart, name)(*args)
    if status != 0:
        raise RuntimeError(f"{name} failed with CUDA error {status}")


def pin(memory: mmap.mmap) -> bool:
    """Page-lock a shared-memory arena for direct copies to the GPU; False if it stays pageable.

    It stays pinned and mapped for the life of the process, even when a restarted worker
    gets a fresh arena: a copy in flight may still read the old one.
    """
    cudart = _cudart()
    if cudart is None:
        return False
    address = ctypes.addressof(ctypes.c_char.from_buffer(memory))
    status = cudart.cudaHostRegister(
        ctypes.c_void_p(address), ctypes.c_size_t(len(memory)), ctypes.c_uint(0)
    )
    if status != 0:
        logger.warning("cudaHostRegister failed (%d): this arena stays pageable", status)
        return False
    _PINNED.append(memory)
    return True


def _copy_rows(value: ort.OrtValue, row: int, array: model.Array, device: str) -> None:
    """Copy ``array`` into ``value`` (same trailing shape and dtype) from its row ``row`` on."""
    source = np.ascontiguousarray(array)
    row_bytes = source.dtype.itemsize * math.prod(source.shape[1:])
    destination = ctypes.c_void_p(value.data_ptr() + row * row_bytes)
    if device == "cuda":
        _cuda_call(
            "cudaMemcpy",
            destination,
            ctypes.c_void_p(source.ctypes.data),
            ctypes.c_size_t(source.nbytes),
            ctypes.c_int(_HOST_TO_DEVICE),
        )
    else:
        ctypes.memmove(destination, source.ctypes.data, source.nbytes)


@dataclasses.dataclass(slots=True)
class _Buffers:
    host: dict[str, model.Array]  # the merge buffers, or the bound buffers' host memory
    bound: dict[str, ort.OrtValue]
    binding: Any = None


@dataclasses.dataclass(slots=True)
class Prepared:
    padded: int
    host: batching.Inputs | None
    buffers: _Buffers | None


class SessionRunner:
    def __init__(
        self, served: model.OnnxModel, device_id: int = 0, bind: str | None = None
    ) -> None:
        """``bind``: where batches are copied to and bound; default the device on a GPU."""
        self._model = served
        self._device_id = device_id
        # String tensors live on the host (ONNX Runtime keeps them there): no bound buffers.
        strings = any(spec.datatype == "BYTES" for spec in served.inputs)
        default = "cuda" if served.device_used == "cuda" else None
        self._bind = None if strings else bind if bind is not None else default
        self._buffers: collections.OrderedDict[Hashable, _Buffers] = collections.OrderedDict()
        self._slot = 0

    def prepare(self, requests: Sequence[batching.Inputs], rows: int, padded: int) -> Prepared:
        if self._bind is not None:
            return self._prepare_bound(requests, padded)
        if len(requests) == 1 and rows == padded:
            return Prepared(padded, requests[0], None)
        buffers = self._buffers_for(requests[0], padded, 0)
        offset = 0
        for request in requests:
            count = len(next(iter(request.values())))
            for name, array in request.items():
                buffers.host[name][offset : offset + count] = array
            offset += count
        return Prepared(padded, buffers.host, None)

    def _prepare_bound(self, requests: Sequence[batching.Inputs], padded: int) -> Prepared:
        """Each request's tensors straight into its rows of the bound buffers, no merge."""
        assert self._bind is not None
        self._slot ^= 1
        buffers = self._buffers_for(requests[0], padded, self._slot)
        offset = 0
        for request in requests:
            for name, array in request.items():
                _copy_rows(buffers.bound[name], offset, array, self._bind)
            offset += len(next(iter(request.values())))
        if self._bind == "cuda":
            # A copy from pageable memory may return before its DMA lands (the legacy
            # stream's work); pinned arenas' copies are complete already.
            _cuda_call("cudaStreamSynchronize", ctypes.c_void_p(0))
        return Prepared(padded, None, buffers)

    def run(self, prepared: Prepared) -> Sequence[model.Array]:
        session = self._model.session_for(prepared.padded)
        if prepared.buffers is None:
            assert prepared.host is not None
            return session.run(None, dict(prepared.host))  # type: ignore[no-any-return]
        binding = prepared.buffers.binding
        session.run_with_iobinding(binding)
        return binding.copy_outputs_to_cpu()  # type: ignore[no-any-return]

    def run_once(self, inputs: batching.Inputs) -> Sequence[model.Array]:
        return self._model.predict(inputs)

    def _buffers_for(self, example: batching.Inputs, padded: int, slot: int) -> _Buffers:
        key = (batching.signature(example), padded, slot)
        buffers = self._buffers.get(key)
        if buffers is not None:
            self._buffers.move_to_end(key)
            return buffers
        host = {
            name: tensors.filled((padded, *array.shape[1:]), array.dtype)
            for name, array in example.items()
        }
        buffers = _Buffers(host, {})
        if self._bind is not None:
            session = self._model.session_for(padded)
            buffers.binding = session.io_binding()
            for name, array in host.items():
                # On the CPU the OrtValue shares ``host``'s memory, kept alive by ``buffers``.
                value = ort.OrtValue.ortvalue_from_numpy(array, self._bind, self._device_id)
                buffers.bound[name] = value
                buffers.binding.bind_ortvalue_input(name, value)
            for spec in self._model.outputs:
                buffers.binding.bind_output(spec.name, "cpu")
            if self._bind != "cpu":
                buffers.host = {}  # the zeros are on the device now
        self._buffers[key] = buffers
        if len(self._buffers) > _KEPT_SHAPES * 2:
            # Two slots per shape: the oldest shape's buffers finished two batches ago.
            self._buffers.popitem(last=False)
        return buffers

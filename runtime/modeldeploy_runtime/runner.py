"""Runs merged batches on a model's sessions, with the merge buffers reused across batches.

``prepare`` (the merge thread) copies the requests into a buffer kept per batch shape and
pipeline slot; on a GPU that buffer is pinned (page-locked, so the copy runs at full bus
speed) and then copied into device memory bound to the size's session (IO binding), so the
transfer overlaps the previous batch's compute.  ``run`` (the
inference thread) only runs.  Two slots per shape suffice: the batcher lets at most one
batch wait while another runs, so a slot is reused only after its batch finished.

Rows past a batch's own examples keep whatever an earlier batch left in the buffer (zeros
at first): valid inputs whose outputs are cut off before they reach any client.
"""

from __future__ import annotations

import collections
import ctypes
import dataclasses
import functools
import logging
from collections.abc import Hashable, Sequence
from typing import Any

import onnxruntime as ort

from modeldeploy_runtime import batching, model, tensors

logger = logging.getLogger(__name__)

# Shapes whose buffers are kept; models with variable non-batch dims reuse the recent ones.
_KEPT_SHAPES = 16
_CUDART_NAMES = ("libcudart.so.13", "libcudart.so.12", "libcudart.so")


@functools.cache
def _cudart() -> ctypes.CDLL | None:
    """The CUDA runtime ONNX Runtime's CUDA provider already loaded, if it can be found."""
    for name in _CUDART_NAMES:
        try:
            return ctypes.CDLL(name)
        except OSError:
            continue
    logger.warning("libcudart not found: batch buffers stay pageable (slower copies)")
    return None


def _pin(arrays: Sequence[model.Array]) -> bool:
    """Page-lock host buffers for fast copies to the GPU; False (and pageable) on failure."""
    cudart = _cudart()
    if cudart is None:
        return False
    for i, array in enumerate(arrays):
        status = cudart.cudaHostRegister(
            ctypes.c_void_p(array.ctypes.data), ctypes.c_size_t(array.nbytes), ctypes.c_uint(0)
        )
        if status != 0:
            logger.warning("cudaHostRegister failed (%d): this buffer stays pageable", status)
            _unpin(arrays[:i])
            return False
    return True


def _unpin(arrays: Sequence[model.Array]) -> None:
    cudart = _cudart()
    if cudart is not None:
        for array in arrays:
            cudart.cudaHostUnregister(ctypes.c_void_p(array.ctypes.data))


@dataclasses.dataclass(slots=True)
class _Buffers:
    host: dict[str, model.Array]
    device: dict[str, ort.OrtValue]
    binding: Any = None
    pinned: bool = False


@dataclasses.dataclass(slots=True)
class Prepared:
    padded: int
    host: batching.Inputs
    buffers: _Buffers | None


class SessionRunner:
    def __init__(self, served: model.OnnxModel, device_id: int = 0) -> None:
        self._model = served
        self._cuda = served.device_used == "cuda"
        self._device_id = device_id
        self._buffers: collections.OrderedDict[Hashable, _Buffers] = collections.OrderedDict()
        self._slot = 0

    def prepare(self, requests: Sequence[batching.Inputs], rows: int, padded: int) -> Prepared:
        if len(requests) == 1 and rows == padded and not self._cuda:
            return Prepared(padded, requests[0], None)
        self._slot ^= 1
        buffers = self._buffers_for(requests[0], padded, self._slot)
        offset = 0
        for request in requests:
            count = len(next(iter(request.values())))
            for name, array in request.items():
                buffers.host[name][offset : offset + count] = array
            offset += count
        for name, value in buffers.device.items():
            value.update_inplace(buffers.host[name])
        return Prepared(padded, buffers.host, buffers)

    def run(self, prepared: Prepared) -> Sequence[model.Array]:
        session = self._model.session_for(prepared.padded)
        if prepared.buffers is None or prepared.buffers.binding is None:
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
        if self._cuda:
            buffers.pinned = _pin(list(host.values()))
            session = self._model.session_for(padded)
            buffers.binding = session.io_binding()
            for name, array in host.items():
                value = ort.OrtValue.ortvalue_from_numpy(array, "cuda", self._device_id)
                buffers.device[name] = value
                buffers.binding.bind_ortvalue_input(name, value)
            for spec in self._model.outputs:
                buffers.binding.bind_output(spec.name, "cpu")
        self._buffers[key] = buffers
        if len(self._buffers) > _KEPT_SHAPES * 2:
            # Two slots per shape: the oldest shape's buffers finished two batches ago.
            _, evicted = self._buffers.popitem(last=False)
            if evicted.pinned:
                _unpin(list(evicted.host.values()))
        return buffers

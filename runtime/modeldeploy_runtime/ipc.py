"""How front-end workers hand tensors to the engine: shared memory, small messages.

Each worker owns an arena: a memfd shared with the engine (anonymous, so nothing to clean
up and no /dev/shm size limit; it counts against the pod's memory like any page).  A
worker writes a request's inputs into an extent of its arena, with room after them for
the outputs, and sends the engine a descriptor (offsets, shapes, dtypes) over a socket
pair; the engine batches views of that memory, writes the outputs back into the extent
and replies with descriptors.  Tensors never cross the socket; only descriptors do,
coalesced so that one write carries every message of an event-loop turn.

String (BYTES) tensors are numpy object arrays, which no raw buffer can hold: they cross
serialised, their elements length-prefixed as on the wire (``tensors.serialize_bytes``),
inputs in the arena and outputs inline in the reply.

The arena bounds the bytes a worker can have queued: when it is full the request gets
``QueueFullError`` (429 / RESOURCE_EXHAUSTED), never more memory.
"""

from __future__ import annotations

import asyncio
import bisect
import itertools
import logging
import marshal
import math
import mmap
import os
import struct
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import numpy as np

from modeldeploy_runtime import batching, tensors

logger = logging.getLogger(__name__)

_ALIGN = 64
_OBJECT = tensors.OBJECT
_LENGTH = struct.Struct("<I")

# Message kinds.
INFER = "infer"
CANCEL = "cancel"
RESULTS = "results"
READY = "ready"
STOP = "stop"

# Error kinds in a result.
QUEUE_FULL = "queue_full"
INVALID = "invalid"
FAILED = "failed"


class Arena:
    """A first-fit allocator of extents in one shared mapping; frees coalesce."""

    def __init__(self, memory: mmap.mmap) -> None:
        self.memory = memory
        self.size = len(memory)
        # Free extents as parallel sorted lists of offsets and lengths.
        self._starts = [0]
        self._lengths = [self.size]

    @staticmethod
    def create(size: int) -> tuple[int, Arena]:
        fd = os.memfd_create("modeldeploy-arena")
        os.ftruncate(fd, size)
        return fd, Arena(mmap.mmap(fd, size))

    @staticmethod
    def attach(fd: int) -> Arena:
        return Arena(mmap.mmap(fd, os.fstat(fd).st_size))

    def alloc(self, nbytes: int) -> int | None:
        nbytes = _aligned(max(nbytes, 1))
        for i, length in enumerate(self._lengths):
            if length >= nbytes:
                start = self._starts[i]
                if length == nbytes:
                    del self._starts[i], self._lengths[i]
                else:
                    self._starts[i] += nbytes
                    self._lengths[i] -= nbytes
                return start
        return None

    def free(self, start: int, nbytes: int) -> None:
        nbytes = _aligned(max(nbytes, 1))
        i = bisect.bisect_left(self._starts, start)
        self._starts.insert(i, start)
        self._lengths.insert(i, nbytes)
        if i + 1 < len(self._starts) and start + nbytes == self._starts[i + 1]:
            self._lengths[i] += self._lengths.pop(i + 1)
            self._starts.pop(i + 1)
        if i > 0 and self._starts[i - 1] + self._lengths[i - 1] == start:
            self._lengths[i - 1] += self._lengths.pop(i)
            self._starts.pop(i)

    @property
    def free_bytes(self) -> int:
        return sum(self._lengths)

    def view(self, offset: int, shape: Sequence[int], dtype: str) -> tensors.Array:
        return np.ndarray(tuple(shape), np.dtype(dtype), buffer=self.memory, offset=offset)


def _from_bytes(data: bytes, dtype: str, shape: Sequence[int]) -> tensors.Array:
    """A tensor sent inline (or a string tensor's serialised extent) back as an array."""
    if dtype == _OBJECT.str:
        return tensors.deserialize_bytes(data, math.prod(shape)).reshape(tuple(shape))
    return np.frombuffer(data, np.dtype(dtype)).reshape(tuple(shape))


def _aligned(nbytes: int) -> int:
    return (nbytes + _ALIGN - 1) // _ALIGN * _ALIGN


class Channel:
    """Length-prefixed marshal messages over a stream, writes coalesced per loop turn."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self._reader = reader
        self._writer = writer
        self._outbox: list[Any] = []

    def send(self, message: Any) -> None:
        if not self._outbox:
            asyncio.get_running_loop().call_soon(self._flush)
        self._outbox.append(message)

    def _flush(self) -> None:
        messages, self._outbox = self._outbox, []
        if self._writer.is_closing():
            return
        payload = marshal.dumps(messages)
        self._writer.write(_LENGTH.pack(len(payload)) + payload)

    async def receive(self) -> list[Any] | None:
        """The next group of messages, or None when the other side is gone."""
        try:
            header = await self._reader.readexactly(_LENGTH.size)
            (length,) = _LENGTH.unpack(header)
            messages: list[Any] = marshal.loads(await self._reader.readexactly(length))
        except (asyncio.IncompleteReadError, ConnectionError):
            return None
        return messages

    def close(self) -> None:
        self._writer.close()


def encode_signature(signature: tensors.Signature) -> Any:
    def specs(items: Sequence[tensors.TensorSpec]) -> list[Any]:
        return [(s.name, s.datatype, s.shape) for s in items]

    return (specs(signature.inputs), specs(signature.outputs), signature.sizes)


def decode_signature(value: Any) -> tensors.Signature:
    inputs, outputs, sizes = value
    return tensors.Signature(
        tuple(tensors.TensorSpec(n, d, tuple(s)) for n, d, s in inputs),
        tuple(tensors.TensorSpec(n, d, tuple(s)) for n, d, s in outputs),
        tuple(sizes),
    )


def _output_capacity(signature: tensors.Signature, size: int) -> int:
    """Bytes to reserve for a request's outputs; dynamic dims are sent inline instead."""
    total = 0
    for spec in signature.outputs:
        if any(d < 0 for d in spec.shape[1:]) or spec.datatype == tensors.BYTES:
            continue
        itemsize = tensors.DATATYPES[spec.datatype].itemsize
        total += _aligned(size * math.prod(spec.shape[1:]) * itemsize)
    return total


class EngineClient:
    """The worker's side: a ``dataplane.Backend`` that runs requests in the engine."""

    def __init__(self, channel: Channel, arena: Arena) -> None:
        self._channel = channel
        self._arena = arena
        self._ids = itertools.count()
        self._pending: dict[int, tuple[asyncio.Future[list[tensors.Array]], int, int]] = {}
        self.signature: tensors.Signature | None = None

    async def submit(self, inputs: Mapping[str, tensors.Array], size: int) -> list[tensors.Array]:
        if self.signature is None:
            raise RuntimeError("the engine has not sent the model's signature yet")
        capacity = _output_capacity(self.signature, size)
        # Strings go as their wire form, numbers as they are.
        strings = {
            name: tensors.serialize_bytes(array)
            for name, array in inputs.items()
            if array.dtype == _OBJECT
        }
        sizes = {
            name: len(strings[name]) if name in strings else a.nbytes for name, a in inputs.items()
        }
        need = sum(_aligned(nbytes) for nbytes in sizes.values()) + capacity
        if need > self._arena.size:
            raise ValueError(
                f"the request needs {need} bytes of queue, more than this worker's share "
                f"({self._arena.size} bytes) of maxQueueBytes"
            )
        start = self._arena.alloc(need)
        if start is None:
            raise batching.QueueFullError(
                f"the request queue is full ({self._arena.size} bytes of tensors per worker)"
            )
        offset = start
        described = []
        for name, array in inputs.items():
            nbytes = sizes[name]
            if name in strings:
                self._arena.memory[offset : offset + nbytes] = strings[name]
            else:
                self._arena.view(offset, array.shape, array.dtype.str)[...] = array
            described.append((name, array.dtype.str, array.shape, offset, nbytes))
            offset += _aligned(nbytes)
        request_id = next(self._ids)
        future: asyncio.Future[list[tensors.Array]] = asyncio.get_running_loop().create_future()
        # The extent is freed when the engine answers, even if this caller has gone.
        self._pending[request_id] = (future, start, need)
        self._channel.send((INFER, request_id, size, described, offset, capacity))
        try:
            return await future
        except asyncio.CancelledError:
            # The client went away: the engine drops the work if it has not run yet.
            self._channel.send((CANCEL, request_id))
            raise

    def deliver(self, request_id: int, ok: bool, payload: Any) -> None:
        future, start, need = self._pending.pop(request_id)
        try:
            result: list[tensors.Array] | Exception = (
                [
                    _from_bytes(inline, dtype, shape)
                    if inline is not None
                    else np.array(self._arena.view(offset, shape, dtype))
                    for dtype, shape, offset, inline in payload
                ]
                if ok
                else _error(*payload)
            )
        except Exception as error:
            result = RuntimeError(f"the engine's answer could not be read: {_describe(error)}")
        finally:
            self._arena.free(start, need)
        if future.done():
            return
        if isinstance(result, Exception):
            future.set_exception(result)
        else:
            future.set_result(result)

    def fail_all(self, message: str) -> None:
        for future, _, _ in self._pending.values():
            if not future.done():
                future.set_exception(RuntimeError(message))
        self._pending.clear()


Enqueue = Callable[[Mapping[str, tensors.Array], int], "asyncio.Future[list[tensors.Array]]"]


class WorkerLink:
    """The engine's side of one worker: queues its requests, writes back their outputs."""

    def __init__(self, channel: Channel, arena: Arena, enqueue: Enqueue) -> None:
        self._channel = channel
        self._arena = arena
        self._enqueue = enqueue
        self._queued: dict[int, asyncio.Future[list[tensors.Array]]] = {}

    def handle(self, message: Any) -> None:
        """Queue one message's request; any error fails that request alone, with its reason."""
        if message[0] == CANCEL:
            future = self._queued.get(message[1])
            if future is not None:
                future.cancel()
            return
        _, request_id, size, described, out_offset, capacity = message
        try:
            inputs = {
                name: _from_bytes(self._arena.memory[offset : offset + nbytes], dtype, shape)
                if dtype == _OBJECT.str
                else self._arena.view(offset, shape, dtype)
                for name, dtype, shape, offset, nbytes in described
            }
            future = self._enqueue(inputs, size)
        except batching.QueueFullError as error:
            self._channel.send((RESULTS, request_id, False, (QUEUE_FULL, str(error))))
            return
        except ValueError as error:
            self._channel.send((RESULTS, request_id, False, (INVALID, str(error))))
            return
        except Exception as error:
            logger.exception("request %d could not be queued", request_id)
            self._channel.send((RESULTS, request_id, False, (FAILED, _describe(error))))
            return
        self._queued[request_id] = future
        future.add_done_callback(lambda done: self._reply(request_id, out_offset, capacity, done))

    def _reply(
        self, request_id: int, offset: int, capacity: int, done: asyncio.Future[list[tensors.Array]]
    ) -> None:
        del self._queued[request_id]
        try:
            self._send_outputs(request_id, offset, capacity, done)
        except Exception as error:
            logger.exception("the outputs of request %d could not be sent", request_id)
            self._channel.send((RESULTS, request_id, False, (FAILED, _describe(error))))

    def _send_outputs(
        self, request_id: int, offset: int, capacity: int, done: asyncio.Future[list[tensors.Array]]
    ) -> None:
        if done.cancelled():
            self._channel.send((RESULTS, request_id, False, (FAILED, "cancelled")))
            return
        error = done.exception()
        if error is not None:
            self._channel.send((RESULTS, request_id, False, (FAILED, _describe(error))))
            return
        described: list[tuple[str, tuple[int, ...], int, bytes | None]] = []
        end = offset + capacity
        for output in done.result():
            nbytes = _aligned(output.nbytes)
            if output.dtype == _OBJECT:
                described.append((_OBJECT.str, output.shape, 0, tensors.serialize_bytes(output)))
            elif offset + nbytes <= end:
                self._arena.view(offset, output.shape, output.dtype.str)[...] = output
                described.append((output.dtype.str, output.shape, offset, None))
                offset += nbytes
            else:
                inline = np.ascontiguousarray(output).tobytes()
                described.append((output.dtype.str, output.shape, 0, inline))
        self._channel.send((RESULTS, request_id, True, described))


def _error(kind: str, message: str) -> Exception:
    if kind == QUEUE_FULL:
        return batching.QueueFullError(message)
    if kind == INVALID:
        return batching.InvalidRequestError(message)
    return RuntimeError(message)


def _describe(error: BaseException) -> str:
    """An error as a client reads it: its message, or its type when it has none."""
    return str(error) or type(error).__name__

"""Dynamic batching: concurrent requests merged along axis 0, padded to fixed sizes, pipelined.

``merge``/``split``/``padded_size`` are pure; ``Batcher`` owns the queue.  Each request
waits on its own future.  Batches are adaptive ("continuous"): a request that arrives while
the model is idle is dispatched at once, with whatever else is queued, and never waits for
partners that may not come.  While a batch runs, arrivals queue and form the next batch,
which is dispatched when the model is free again, when it holds the largest batch size's
worth of examples, or when its oldest request has waited ``max_delay``; so ``max_delay``
bounds the wait only while the model is busy, and under load batches grow with the load.
Each batch is padded up to the next of a small set of sizes, so the session only ever sees
those shapes.

On a GPU execution is a two-stage pipeline: one thread merges (copies the requests onto
the device) while another runs the previous batch; at most one batch waits between the
stages.  The model counts as busy from a batch's dispatch to its end, so the batch that
forms while another runs is not cut the moment the pipeline has room (it would hold only
the few requests that came during the merge) but grows as on CPU.  On CPU the model's
threads already use every core, so a batch is merged and run in one go by the inference
thread (one thread hop per batch, which measured faster there), and the next batch is
dispatched when it is done.

When a merged batch fails, its requests are re-run in halves, so only the requests that
fail on their own get an error, and only their own.

With ``Padding`` (opt-in, ``spec.runtime.padding``) requests whose variable-length inputs
differ in length share a batch too: each is padded along its axis with the pad value to
the batch's longest length, or to the length bucket the request falls in (then requests
of one bucket share batches), and the outputs having that axis are cut back to each
request's own length.  The model must ignore the padding (an attention mask), as
sequence models do.
"""

from __future__ import annotations

import asyncio
import bisect
import collections
import concurrent.futures
import dataclasses
import time
from collections.abc import Callable, Hashable, Mapping, Sequence
from typing import Any, Protocol

import numpy as np

from modeldeploy_runtime import metrics, tensors

Inputs = Mapping[str, tensors.Array]


class QueueFullError(Exception):
    """The queue holds its limit of requests or bytes; the caller should retry later."""


class InvalidRequestError(ValueError):
    """The request cannot be batched as it is (a client error, answered 400)."""


@dataclasses.dataclass(frozen=True)
class Padding:
    """Variable-length inputs: what is padded, with what, and what is cut back."""

    # Input name -> (axis, pad value); every padded input of a request has one length.
    inputs: Mapping[str, tuple[int, float]]
    # Output index -> its axes of that length, cut back to each request's own.
    outputs: Mapping[int, tuple[int, ...]]
    # Sorted lengths to pad up to; none: the batch's longest.
    buckets: tuple[int, ...] = ()

    @classmethod
    def for_model(
        cls,
        served: tensors.Signature,
        inputs: Mapping[str, tuple[int, float]],
        outputs: Mapping[str, int],
        buckets: Sequence[int] = (),
    ) -> Padding:
        """Checked against the model; raises ``ValueError`` naming what does not fit.

        Outputs not given are cut back along every axis the model names like a padded
        input's padded axis ("sequence"): both of an attention map's, for one.
        """
        if not served.batchable:
            raise ValueError("padding needs a model whose inputs and outputs batch on axis 0")
        specs = {spec.name: spec for spec in served.inputs}
        axis_names = set()
        for name, (axis, _) in inputs.items():
            spec = specs.get(name)
            if spec is None:
                raise ValueError(
                    f"padding names input {name!r}, which the model does not have; its "
                    f"inputs are {sorted(specs)}"
                )
            if not 1 <= axis < len(spec.shape) or spec.shape[axis] >= 0:
                raise ValueError(
                    f"padding input {name!r} on axis {axis}: the model's shape "
                    f"{list(spec.shape)} has no variable axis there (-1 is variable)"
                )
            if axis < len(spec.dim_names):
                axis_names.add(spec.dim_names[axis])
        axis_names.discard("")
        cut: dict[int, tuple[int, ...]] = {}
        for index, spec in enumerate(served.outputs):
            if spec.name in outputs:
                axis = outputs[spec.name]
                if not 1 <= axis < len(spec.shape) or spec.shape[axis] >= 0:
                    raise ValueError(
                        f"padding output {spec.name!r} on axis {axis}: the model's shape "
                        f"{list(spec.shape)} has no variable axis there (-1 is variable)"
                    )
                cut[index] = (axis,)
                continue
            named = tuple(i for i, dim in enumerate(spec.dim_names) if i and dim in axis_names)
            if named:
                cut[index] = named
        unknown = sorted(outputs.keys() - {spec.name for spec in served.outputs})
        if unknown:
            raise ValueError(f"padding names output(s) {unknown}, which the model does not have")
        return cls(dict(inputs), cut, tuple(sorted(set(buckets))))

    def length(self, inputs: Inputs) -> int:
        """The request's length along its padded axes; they must agree."""
        lengths = {
            name: inputs[name].shape[axis]
            for name, (axis, _) in self.inputs.items()
            if name in inputs and inputs[name].ndim > axis
        }
        if len(lengths) != len(self.inputs):
            missing = sorted(self.inputs.keys() - lengths.keys())
            raise InvalidRequestError(f"padded input(s) {missing} lack their padded axis")
        if len(set(lengths.values())) > 1:
            raise InvalidRequestError(
                f"padded inputs must have one length along their padded axes, not {lengths}"
            )
        length: int = next(iter(lengths.values()))
        if self.buckets and length > self.buckets[-1]:
            raise InvalidRequestError(
                f"a length of {length} is longer than the largest padding bucket {self.buckets[-1]}"
            )
        return length

    def target(self, length: int) -> int:
        """The length a request of ``length`` is padded to: its bucket, or itself."""
        if not self.buckets:
            return length
        return self.buckets[bisect.bisect_left(self.buckets, length)]


class Runner(Protocol):
    """Runs merged batches; ``prepare`` and ``run`` are called from two threads, in order."""

    def prepare(self, requests: Sequence[Inputs], rows: int, padded: int) -> Any:
        """Merge ``requests`` (``rows`` examples) into a batch of ``padded`` rows."""

    def run(self, prepared: Any) -> Sequence[tensors.Array]:
        """Run a prepared batch; every output has ``padded`` rows."""

    def run_once(self, inputs: Inputs) -> Sequence[tensors.Array]:
        """Run inputs that were merged and padded without the reused buffers."""


def signature(inputs: Inputs, padding: Padding | None = None) -> Hashable:
    """Requests can share a batch only when everything but the batch dim agrees; with
    padding, a padded axis agrees with any length (or any of the same bucket)."""
    if padding is None:
        return tuple((name, array.dtype.str, array.shape[1:]) for name, array in inputs.items())
    target = padding.target(padding.length(inputs)) if padding.buckets else -1
    key = []
    for name, array in inputs.items():
        shape = list(array.shape)
        if name in padding.inputs:
            shape[padding.inputs[name][0]] = target
        key.append((name, array.dtype.str, tuple(shape[1:])))
    return tuple(key)


def padded_size(sizes: Sequence[int], rows: int) -> int:
    """The smallest of the sorted ``sizes`` that holds ``rows`` examples."""
    index = bisect.bisect_left(sizes, rows)
    if index == len(sizes):
        raise ValueError(f"a batch of {rows} is larger than the largest batch size {sizes[-1]}")
    return sizes[index]


def merge(
    requests: Sequence[Inputs], padded: int | None = None, padding: Padding | None = None
) -> dict[str, tensors.Array]:
    """Concatenate along the batch axis; zero rows are added up to ``padded``.  With
    ``padding``, padded inputs are first filled out to the batch's length (or bucket)."""
    rows = sum(len(next(iter(r.values()))) for r in requests)
    if padding is not None:
        return _merge_padded(requests, rows if padded is None else padded, padding)
    if len(requests) == 1 and (padded is None or padded == rows):
        return dict(requests[0])
    merged = {}
    for name, first in requests[0].items():
        parts = [r[name] for r in requests]
        if padded is not None and padded > rows:
            parts.append(tensors.filled((padded - rows, *first.shape[1:]), first.dtype))
        merged[name] = np.concatenate(parts)
    return merged


def _merge_padded(
    requests: Sequence[Inputs], padded: int, padding: Padding
) -> dict[str, tensors.Array]:
    """Each input written once into an array of the pad value shaped for the whole batch."""
    length = padding.target(max(padding.length(r) for r in requests))
    merged = {}
    for name, first in requests[0].items():
        axis, value = padding.inputs.get(name, (0, 0))
        shape = [padded, *first.shape[1:]]
        if axis:
            shape[axis] = length
        batch = tensors.filled(tuple(shape), first.dtype, value)
        offset = 0
        for request in requests:
            array = request[name]
            rows = (slice(offset, offset + len(array)),)
            batch[rows + tuple(slice(0, d) for d in array.shape[1:])] = array
            offset += len(array)
        merged[name] = batch
    return merged


def split(
    outputs: Sequence[tensors.Array],
    sizes: Sequence[int],
    lengths: Sequence[int] = (),
    padding: Padding | None = None,
) -> list[list[tensors.Array]]:
    """Cut each output back into per-request slices (views, no copies); padding is dropped:
    rows past the requests', and with ``padding`` what lies past each request's ``lengths``
    along the padded outputs' axes."""
    total = sum(sizes)
    for output in outputs:
        if output.ndim == 0 or output.shape[0] < total:
            raise ValueError(
                f"model returned an output of shape {list(output.shape)} for a batch of {total}"
            )
    if len(sizes) == 1:
        parts = [[output[:total] for output in outputs]]
    else:
        offsets = np.cumsum(sizes[:-1])
        per_output = [np.split(output[:total], offsets) for output in outputs]
        parts = [list(request) for request in zip(*per_output, strict=True)]
    if padding is None:
        return parts
    longest = max(lengths)
    for index, axes in padding.outputs.items():
        shape = outputs[index].shape
        for axis in axes:
            if len(shape) <= axis or shape[axis] < longest:
                raise ValueError(
                    f"model returned an output of shape {list(shape)}, with no axis {axis} of "
                    f"length {longest} to cut back"
                )
        for request, length in zip(parts, lengths, strict=True):
            cut = [slice(None)] * len(shape)
            for axis in axes:
                cut[axis] = slice(0, length)
            request[index] = request[index][tuple(cut)]
    return parts


@dataclasses.dataclass(slots=True)
class _Request:
    inputs: Inputs
    size: int
    nbytes: int
    key: Hashable
    enqueued: float
    future: asyncio.Future[list[tensors.Array]]
    # Along the padded axes (0 without padding).
    length: int = 0


Result = list[tensors.Array] | Exception


class Batcher:
    def __init__(
        self,
        runner: Runner,
        *,
        sizes: Sequence[int],
        max_delay_s: float,
        max_queue_size: int,
        stats: metrics.ModelMetrics,
        max_queue_bytes: int | None = None,
        pipelined: bool = True,
        padding: Padding | None = None,
    ) -> None:
        self._runner = runner
        self._padding = padding
        self.sizes = tuple(sorted(set(sizes)))
        self.max_batch_size = self.sizes[-1]
        self._max_delay_s = max_delay_s
        self._max_queue_size = max_queue_size
        self._max_queue_bytes = max_queue_bytes
        self._stats = stats
        self._pending: collections.deque[_Request] = collections.deque()
        self._pending_examples = 0
        self._pending_bytes = 0
        self._pipelined = pipelined
        # Batches formed and not yet running (pipelined) or not yet done: at most one, so
        # the rest keep growing.
        self._waiting = 0
        # Batches dispatched and not yet done: the model is idle when there are none.
        self._busy = 0
        self._running: set[asyncio.Task[None]] = set()
        self._wake = asyncio.Event()
        self._closing = False
        self._prepare_pool = concurrent.futures.ThreadPoolExecutor(1, "merge")
        # One batch at a time: ONNX Runtime already spreads a batch over every core.
        self._run_pool = concurrent.futures.ThreadPoolExecutor(1, "inference")
        self._task: asyncio.Task[None] | None = None
        self._loop: asyncio.AbstractEventLoop | None = None

    def start(self) -> None:
        self._loop = asyncio.get_running_loop()
        self._task = self._loop.create_task(self._collect())

    async def stop(self) -> None:
        """Finish every queued request, then stop."""
        self._closing = True
        self._wake.set()
        if self._task is not None:
            await self._task
        if self._running:
            await asyncio.gather(*self._running)
        self._prepare_pool.shutdown()
        self._run_pool.shutdown()

    def enqueue(self, inputs: Inputs, size: int) -> asyncio.Future[list[tensors.Array]]:
        """Queue a request; its future gets the outputs (its own rows only) or the error."""
        loop = self._loop
        if loop is None:
            raise RuntimeError("the batcher is not started")
        if size > self.max_batch_size:
            raise ValueError(
                f"a batch of {size} is larger than the largest batch size {self.max_batch_size}"
            )
        if len(self._pending) >= self._max_queue_size:
            raise QueueFullError(f"the request queue is full ({self._max_queue_size} requests)")
        nbytes = sum(tensors.nbytes(array) for array in inputs.values())
        if (
            self._max_queue_bytes is not None
            and self._pending
            and self._pending_bytes + nbytes > self._max_queue_bytes
        ):
            raise QueueFullError(
                f"the request queue is full ({self._max_queue_bytes} bytes of tensors)"
            )
        padding = self._padding
        request = _Request(
            inputs,
            size,
            nbytes,
            signature(inputs, padding),
            time.monotonic(),
            loop.create_future(),
            padding.length(inputs) if padding is not None else 0,
        )
        self._pending.append(request)
        self._pending_examples += size
        self._pending_bytes += nbytes
        # Wake the collector only when it may be idle or its batch is full, not per request.
        if len(self._pending) == 1 or self._pending_examples >= self.max_batch_size:
            self._wake.set()
        return request.future

    async def submit(self, inputs: Inputs, size: int) -> list[tensors.Array]:
        return await self.enqueue(inputs, size)

    async def _collect(self) -> None:
        loop = asyncio.get_running_loop()
        while self._pending or not self._closing:
            if not self._pending or self._waiting:
                self._wake.clear()
                await self._wake.wait()
                continue
            if self._busy:
                await self._grow()
            elif self._pending_examples < self.max_batch_size:
                # One loop turn: requests whose bytes have already arrived reach the queue.
                await asyncio.sleep(0)
            batch = self._take()
            if batch:
                self._waiting += 1
                self._busy += 1
                task = loop.create_task(self._process(batch))
                self._running.add(task)
                task.add_done_callback(self._running.discard)

    async def _grow(self) -> None:
        """While the model is busy: wait until it is free, the batch full, or the oldest late."""
        deadline = self._pending[0].enqueued + self._max_delay_s
        while self._busy and self._pending_examples < self.max_batch_size and not self._closing:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                return
            self._wake.clear()
            try:
                async with asyncio.timeout(remaining):
                    await self._wake.wait()
            except TimeoutError:
                return

    def _take(self) -> list[_Request]:
        """The oldest request and the queued ones compatible with it, up to the max size."""
        key = self._pending[0].key
        batch: list[_Request] = []
        examples = 0
        rest: collections.deque[_Request] = collections.deque()
        for request in self._pending:
            if request.future.done():
                continue
            if request.key == key and examples + request.size <= self.max_batch_size:
                batch.append(request)
                examples += request.size
            else:
                rest.append(request)
        self._pending = rest
        self._pending_examples = sum(r.size for r in rest)
        self._pending_bytes = sum(r.nbytes for r in rest)
        return batch

    async def _process(self, batch: list[_Request]) -> None:
        try:
            await self._prepare_and_finish(batch)
        finally:
            self._busy -= 1
            self._wake.set()

    async def _prepare_and_finish(self, batch: list[_Request]) -> None:
        loop = asyncio.get_running_loop()
        rows = sum(r.size for r in batch)
        padded = padded_size(self.sizes, rows)
        inputs = [r.inputs for r in batch]
        if not self._pipelined:
            try:
                results = await loop.run_in_executor(
                    self._run_pool, self._prepare_and_run, batch, inputs, rows, padded
                )
            finally:
                self._started()
            self._finish(batch, results)
            return
        try:
            prepared = await loop.run_in_executor(
                self._prepare_pool, self._prepare, inputs, rows, padded
            )
        except Exception as error:
            self._started()
            self._finish(batch, [error] * len(batch))
            return
        results = await loop.run_in_executor(self._run_pool, self._run, batch, prepared)
        self._finish(batch, results)

    def _started(self) -> None:
        self._waiting -= 1
        self._wake.set()

    def _prepare(self, inputs: list[Inputs], rows: int, padded: int) -> Any:
        if self._padding is None:
            return self._runner.prepare(inputs, rows, padded)
        # Padded requests differ in shape: merged here, the runner sees one request.
        return self._runner.prepare([merge(inputs, padded, self._padding)], padded, padded)

    def _prepare_and_run(
        self, batch: list[_Request], inputs: list[Inputs], rows: int, padded: int
    ) -> list[Result]:
        try:
            prepared = self._prepare(inputs, rows, padded)
        except Exception as error:
            return [error] * len(batch)
        return self._run(batch, prepared)

    def _run(self, batch: list[_Request], prepared: Any) -> list[Result]:
        """In the inference thread: run the batch, or its halves if it fails."""
        assert self._loop is not None
        if self._pipelined:
            self._loop.call_soon_threadsafe(self._started)
        started = time.monotonic()
        for request in batch:
            self._stats.queue_duration.observe(started - request.enqueued)
        return self._bisecting(batch, lambda: self._runner.run(prepared))

    def _isolate(self, batch: list[_Request]) -> list[Result]:
        rows = sum(r.size for r in batch)
        inputs = merge([r.inputs for r in batch], padded_size(self.sizes, rows), self._padding)
        return self._bisecting(batch, lambda: self._runner.run_once(inputs))

    def _bisecting(
        self, batch: list[_Request], run: Callable[[], Sequence[tensors.Array]]
    ) -> list[Result]:
        """The batch's results; if it fails, its halves re-run on their own, down to one."""
        try:
            return self._timed(batch, run)
        except Exception as error:
            if len(batch) == 1:
                return [error]
        half = len(batch) // 2
        return self._isolate(batch[:half]) + self._isolate(batch[half:])

    def _timed(
        self, batch: list[_Request], run: Callable[[], Sequence[tensors.Array]]
    ) -> list[Result]:
        with self._stats.inference_duration.time():
            outputs = run()
        sizes = [r.size for r in batch]
        padded = padded_size(self.sizes, sum(sizes))
        for output in outputs:
            # An output whose axis 0 is not the batch is never cut along it: a wrong answer
            # is worse than an error (the model should have been served unbatched).
            if output.ndim == 0 or output.shape[0] != padded:
                raise ValueError(
                    f"the model returned an output of shape {list(output.shape)} for a batch "
                    f"of {padded}: its axis 0 is not the batch"
                )
        parts = split(outputs, sizes, [r.length for r in batch], self._padding)
        self._stats.batch_size.observe(sum(sizes))
        return list(parts)

    @staticmethod
    def _finish(batch: list[_Request], results: Sequence[Result]) -> None:
        for request, result in zip(batch, results, strict=True):
            if request.future.done():
                continue
            if isinstance(result, Exception):
                request.future.set_exception(result)
            else:
                request.future.set_result(result)


class Unbatched:
    """Requests that are never merged: each runs alone, as it came, up to ``concurrency`` at
    once (an ONNX Runtime session takes concurrent runs).  For models whose axis 0 is not a
    batch axis, as Triton serves a model with ``max_batch_size: 0``."""

    max_batch_size = 0

    def __init__(
        self,
        run: Callable[[Inputs], Sequence[tensors.Array]],
        *,
        concurrency: int,
        max_queue_size: int,
        stats: metrics.ModelMetrics,
        max_queue_bytes: int | None = None,
    ) -> None:
        self._run_one = run
        self._max_queue_size = max_queue_size
        self._max_queue_bytes = max_queue_bytes
        self._stats = stats
        self._pool = concurrent.futures.ThreadPoolExecutor(concurrency, "inference")
        self._queued: set[asyncio.Future[list[tensors.Array]]] = set()
        self._queued_bytes = 0
        self._loop: asyncio.AbstractEventLoop | None = None

    def start(self) -> None:
        self._loop = asyncio.get_running_loop()

    async def stop(self) -> None:
        """Finish every queued request, then stop."""
        if self._queued:
            await asyncio.gather(*self._queued, return_exceptions=True)
        self._pool.shutdown()

    def enqueue(self, inputs: Inputs, size: int) -> asyncio.Future[list[tensors.Array]]:
        if self._loop is None:
            raise RuntimeError("the batcher is not started")
        if len(self._queued) >= self._max_queue_size:
            raise QueueFullError(f"the request queue is full ({self._max_queue_size} requests)")
        nbytes = sum(array.nbytes for array in inputs.values())
        limit = self._max_queue_bytes
        if limit is not None and self._queued and self._queued_bytes + nbytes > limit:
            raise QueueFullError(f"the request queue is full ({limit} bytes of tensors)")
        future = self._loop.run_in_executor(self._pool, self._run, inputs, time.monotonic())
        self._queued.add(future)
        self._queued_bytes += nbytes

        def done(_: asyncio.Future[list[tensors.Array]]) -> None:
            self._queued.discard(future)
            self._queued_bytes -= nbytes

        future.add_done_callback(done)
        return future

    async def submit(self, inputs: Inputs, size: int) -> list[tensors.Array]:
        return await self.enqueue(inputs, size)

    def _run(self, inputs: Inputs, enqueued: float) -> list[tensors.Array]:
        self._stats.queue_duration.observe(time.monotonic() - enqueued)
        with self._stats.inference_duration.time():
            outputs = list(self._run_one(inputs))
        self._stats.batch_size.observe(1)
        return outputs

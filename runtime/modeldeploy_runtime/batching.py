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


class Runner(Protocol):
    """Runs merged batches; ``prepare`` and ``run`` are called from two threads, in order."""

    def prepare(self, requests: Sequence[Inputs], rows: int, padded: int) -> Any:
        """Merge ``requests`` (``rows`` examples) into a batch of ``padded`` rows."""

    def run(self, prepared: Any) -> Sequence[tensors.Array]:
        """Run a prepared batch; every output has ``padded`` rows."""

    def run_once(self, inputs: Inputs) -> Sequence[tensors.Array]:
        """Run inputs that were merged and padded without the reused buffers."""


def signature(inputs: Inputs) -> Hashable:
    """Requests can share a batch only when everything but the batch dim agrees."""
    return tuple((name, array.dtype.str, array.shape[1:]) for name, array in inputs.items())


def padded_size(sizes: Sequence[int], rows: int) -> int:
    """The smallest of the sorted ``sizes`` that holds ``rows`` examples."""
    index = bisect.bisect_left(sizes, rows)
    if index == len(sizes):
        raise ValueError(f"a batch of {rows} is larger than the largest batch size {sizes[-1]}")
    return sizes[index]


def merge(requests: Sequence[Inputs], padded: int | None = None) -> dict[str, tensors.Array]:
    """Concatenate along the batch axis; zero rows are added up to ``padded``."""
    rows = sum(len(next(iter(r.values()))) for r in requests)
    if len(requests) == 1 and (padded is None or padded == rows):
        return dict(requests[0])
    merged = {}
    for name, first in requests[0].items():
        parts = [r[name] for r in requests]
        if padded is not None and padded > rows:
            parts.append(np.zeros((padded - rows, *first.shape[1:]), first.dtype))
        merged[name] = np.concatenate(parts)
    return merged


def split(outputs: Sequence[tensors.Array], sizes: Sequence[int]) -> list[list[tensors.Array]]:
    """Cut each output back into per-request slices (views, no copies); padding is dropped."""
    total = sum(sizes)
    for output in outputs:
        if output.ndim == 0 or output.shape[0] < total:
            raise ValueError(
                f"model returned an output of shape {list(output.shape)} for a batch of {total}"
            )
    if len(sizes) == 1:
        return [[output[:total] for output in outputs]]
    offsets = np.cumsum(sizes[:-1])
    per_output = [np.split(output[:total], offsets) for output in outputs]
    return [list(parts) for parts in zip(*per_output, strict=True)]


@dataclasses.dataclass(slots=True)
class _Request:
    inputs: Inputs
    size: int
    nbytes: int
    key: Hashable
    enqueued: float
    future: asyncio.Future[list[tensors.Array]]


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
    ) -> None:
        self._runner = runner
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
        nbytes = sum(array.nbytes for array in inputs.values())
        if (
            self._max_queue_bytes is not None
            and self._pending
            and self._pending_bytes + nbytes > self._max_queue_bytes
        ):
            raise QueueFullError(
                f"the request queue is full ({self._max_queue_bytes} bytes of tensors)"
            )
        request = _Request(
            inputs, size, nbytes, signature(inputs), time.monotonic(), loop.create_future()
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
                self._prepare_pool, self._runner.prepare, inputs, rows, padded
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

    def _prepare_and_run(
        self, batch: list[_Request], inputs: list[Inputs], rows: int, padded: int
    ) -> list[Result]:
        try:
            prepared = self._runner.prepare(inputs, rows, padded)
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
        inputs = merge([r.inputs for r in batch], padded_size(self.sizes, rows))
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
        parts = split(outputs, sizes)
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

"""Dynamic batching: concurrent requests merged along axis 0, run off the event loop.

``merge``/``split`` are pure; ``Batcher`` owns the queue.  Each request waits on its
own future; a batch is dispatched when it holds ``max_batch_size`` examples or when
its oldest request has waited ``max_delay``.  While one batch runs in the inference
thread the next one fills up, so under load batches grow without any added delay.
"""

from __future__ import annotations

import asyncio
import collections
import concurrent.futures
import dataclasses
from collections.abc import Callable, Hashable, Mapping, Sequence

import numpy as np

from modeldeploy_runtime import metrics, model

Inputs = Mapping[str, model.Array]
Predict = Callable[[Inputs], list[model.Array]]


class QueueFullError(Exception):
    """The batch queue holds ``max_queue_size`` requests; the caller should retry later."""


def signature(inputs: Inputs) -> Hashable:
    """Requests can share a batch only when everything but the batch dim agrees."""
    return tuple((name, array.dtype.str, array.shape[1:]) for name, array in inputs.items())


def merge(requests: Sequence[Inputs]) -> dict[str, model.Array]:
    if len(requests) == 1:
        return dict(requests[0])
    return {name: np.concatenate([r[name] for r in requests]) for name in requests[0]}


def split(outputs: Sequence[model.Array], sizes: Sequence[int]) -> list[list[model.Array]]:
    """Cut each output back into per-request slices (views, no copies)."""
    if len(sizes) == 1:
        return [list(outputs)]
    total = sum(sizes)
    for output in outputs:
        if output.shape[:1] != (total,):
            raise ValueError(
                f"model returned an output of shape {list(output.shape)} for a batch of {total}"
            )
    offsets = np.cumsum(sizes[:-1])
    per_output = [np.split(output, offsets) for output in outputs]
    return [list(parts) for parts in zip(*per_output, strict=True)]


@dataclasses.dataclass(slots=True)
class _Request:
    inputs: Inputs
    size: int
    key: Hashable
    enqueued: float
    future: asyncio.Future[list[model.Array]]


class Batcher:
    def __init__(
        self,
        predict: Predict,
        *,
        max_batch_size: int,
        max_delay_s: float,
        max_queue_size: int,
        stats: metrics.ModelMetrics,
    ) -> None:
        self._predict = predict
        self._max_batch_size = max_batch_size
        self._max_delay_s = max_delay_s
        self._max_queue_size = max_queue_size
        self._stats = stats
        self._pending: collections.deque[_Request] = collections.deque()
        self._pending_examples = 0
        self._wake = asyncio.Event()
        self._closing = False
        # One batch at a time: ONNX Runtime already spreads a batch over every core.
        self._executor = concurrent.futures.ThreadPoolExecutor(1, "inference")
        self._task: asyncio.Task[None] | None = None
        # Kept from start(): asyncio.get_running_loop() costs a getpid() per call,
        # measurable on the per-request path.
        self._loop: asyncio.AbstractEventLoop | None = None

    def start(self) -> None:
        self._loop = asyncio.get_running_loop()
        self._task = self._loop.create_task(self._run())

    async def stop(self) -> None:
        """Finish every queued request, then stop."""
        self._closing = True
        self._wake.set()
        if self._task is not None:
            await self._task
        self._executor.shutdown()

    async def submit(self, inputs: Inputs, size: int) -> list[model.Array]:
        if len(self._pending) >= self._max_queue_size:
            raise QueueFullError(f"the request queue is full ({self._max_queue_size} requests)")
        loop = self._loop
        if loop is None:
            raise RuntimeError("the batcher is not started")
        request = _Request(inputs, size, signature(inputs), loop.time(), loop.create_future())
        self._pending.append(request)
        self._pending_examples += size
        # Wake the collector only when it may be idle or its batch is full, not per request.
        if len(self._pending) == 1 or self._pending_examples >= self._max_batch_size:
            self._wake.set()
        return await request.future

    async def _run(self) -> None:
        loop = asyncio.get_running_loop()
        while self._pending or not self._closing:
            if not self._pending:
                self._wake.clear()
                await self._wake.wait()
                continue
            deadline = self._pending[0].enqueued + self._max_delay_s
            while self._pending_examples < self._max_batch_size and not self._closing:
                remaining = deadline - loop.time()
                if remaining <= 0:
                    break
                self._wake.clear()
                try:
                    async with asyncio.timeout(remaining):
                        await self._wake.wait()
                except TimeoutError:
                    break
            await self._execute(self._take())

    def _take(self) -> list[_Request]:
        """The oldest request and the queued ones compatible with it, up to the max size."""
        key = self._pending[0].key
        batch: list[_Request] = []
        examples = 0
        rest: collections.deque[_Request] = collections.deque()
        for request in self._pending:
            fits = not batch or examples + request.size <= self._max_batch_size
            if request.key == key and fits and not request.future.done():
                batch.append(request)
                examples += request.size
            elif not request.future.done():
                rest.append(request)
        self._pending = rest
        self._pending_examples = sum(r.size for r in rest)
        return batch

    async def _execute(self, batch: list[_Request]) -> None:
        if not batch:
            return
        loop = asyncio.get_running_loop()
        started = loop.time()
        for request in batch:
            self._stats.queue_duration.observe(started - request.enqueued)
        sizes = [r.size for r in batch]
        try:
            results = await loop.run_in_executor(
                self._executor, self._run_batch, [r.inputs for r in batch], sizes
            )
        except Exception as error:  # every waiting request learns why its batch failed
            for request in batch:
                if not request.future.done():
                    request.future.set_exception(error)
            return
        for request, result in zip(batch, results, strict=True):
            if not request.future.done():
                request.future.set_result(result)

    def _run_batch(self, inputs: list[Inputs], sizes: list[int]) -> list[list[model.Array]]:
        merged = merge(inputs)
        with self._stats.inference_duration.time():
            outputs = self._predict(merged)
        self._stats.batch_size.observe(sum(sizes))
        return split(outputs, sizes)

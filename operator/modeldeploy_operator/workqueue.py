"""Which ModelDeployments need a reconcile: a queue of keys, as controller-runtime's workqueue.

The watch handlers only add the key of the ModelDeployment an event concerns and return at once,
so that no watched body waits in memory for a reconcile; a few workers take keys and reconcile
from the indexes. A key is queued at most once however many events arrive for it (they coalesce
into one reconcile), a key is never reconciled by two workers at once, and a failed reconcile is
retried later with a growing, jittered delay (keys that failed together, in an outage, do not
come back together); an error that retrying cannot fix (the server refused the request's
content) is retried a few times only, then left until the next event or resync. A periodic
resync queues every key again, so that what no event triggered (an event lost while the API
server was away) still converges.
"""

from __future__ import annotations

import asyncio
import random
from collections.abc import Awaitable, Callable, Hashable, Iterable
from typing import Generic, TypeVar

K = TypeVar("K", bound=Hashable)
N = TypeVar("N", bound=Hashable)

FIRST_RETRY_S = 0.5
MAX_RETRY_S = 60.0
# Each delay is drawn from [delay * (1 - JITTER), delay].
JITTER = 0.5
# Attempts at a key whose error is permanent, before it waits for the next event or resync.
MAX_PERMANENT_ATTEMPTS = 5


class WorkQueue(Generic[K, N]):
    """Keys waiting for a worker, each with the notes gathered since it was queued (for example
    the kinds of children seen deleted)."""

    def __init__(self, permanent: Callable[[BaseException], bool] = lambda _: False) -> None:
        self._permanent = permanent
        self._waiting: dict[K, set[N]] = {}  # insertion order: first queued, first served
        self._active: set[K] = set()
        self._ready = asyncio.Condition()
        self._failures: dict[K, int] = {}
        self._retries: set[asyncio.Task[None]] = set()
        self._closed = False

    def __len__(self) -> int:
        return len(self._waiting)

    async def add(self, key: K, note: N | None = None) -> None:
        async with self._ready:
            notes = self._waiting.setdefault(key, set())
            if note is not None:
                notes.add(note)
            self._ready.notify()

    async def _take(self) -> tuple[K, set[N]] | None:
        async with self._ready:
            while True:
                if self._closed:
                    return None
                key = next((k for k in self._waiting if k not in self._active), None)
                if key is not None:
                    self._active.add(key)
                    return key, self._waiting.pop(key)
                await self._ready.wait()

    async def _done(self, key: K) -> None:
        async with self._ready:
            self._active.discard(key)
            if key in self._waiting:
                self._ready.notify()

    def _retry_later(self, key: K, notes: set[N], error: BaseException) -> float | None:
        """Schedules the retry of a failed key; the delay, or None when it is given up."""
        failures = self._failures[key] = self._failures.get(key, 0) + 1
        if self._permanent(error) and failures >= MAX_PERMANENT_ATTEMPTS:
            self._failures.pop(key, None)
            return None
        delay = min(MAX_RETRY_S, FIRST_RETRY_S * 2.0 ** (failures - 1))
        delay *= random.uniform(1.0 - JITTER, 1.0)
        self.add_after(key, delay, notes)
        return delay

    def add_after(self, key: K, delay: float, notes: Iterable[N] = ()) -> None:
        """Queues `key` (with `notes`) in `delay` seconds."""

        async def again() -> None:
            await asyncio.sleep(delay)
            await self.add(key)
            for note in notes:
                await self.add(key, note)

        retry = asyncio.get_running_loop().create_task(again())
        self._retries.add(retry)  # the loop keeps only weak references to tasks
        retry.add_done_callback(self._retries.discard)

    def forget(self, key: K) -> None:
        """No more retries for a key whose object is gone."""
        self._failures.pop(key, None)
        self._waiting.pop(key, None)

    async def resync(self, interval: float, keys: Callable[[], Iterable[K]]) -> None:
        """Queues every key `keys()` gives every `interval` seconds, until cancelled. Cheap as
        long as a reconcile of an unchanged object reads and writes nothing."""
        while True:
            await asyncio.sleep(interval)
            for key in list(keys()):  # a snapshot: the source may change while we add
                await self.add(key)

    async def work(
        self,
        handle: Callable[[K, set[N]], Awaitable[None]],
        on_error: Callable[[K, BaseException, float | None], None],
    ) -> None:
        """One worker: handles keys until the queue is closed. `on_error` is told when the key
        is tried again, or None when its error is permanent and retrying it was given up."""
        while (taken := await self._take()) is not None:
            key, notes = taken
            try:
                await handle(key, notes)
            except Exception as error:
                on_error(key, error, self._retry_later(key, notes, error))
            else:
                self._failures.pop(key, None)
            finally:
                await self._done(key)

    async def close(self) -> None:
        for retry in self._retries:
            retry.cancel()
        async with self._ready:
            self._closed = True
            self._ready.notify_all()

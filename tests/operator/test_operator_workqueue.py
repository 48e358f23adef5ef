"""The work queue: events coalesce, one key is never worked on twice at once, failures retry."""

from __future__ import annotations

import asyncio

import pytest

from modeldeploy_operator import workqueue


def _run(coroutine: object) -> None:
    asyncio.run(asyncio.wait_for(coroutine, 10))  # type: ignore[arg-type]


def test_events_for_one_key_coalesce_into_one_call_with_all_notes() -> None:
    async def scenario() -> None:
        queue: workqueue.WorkQueue[str, str] = workqueue.WorkQueue()
        for note in ("deployment", None, "service"):
            await queue.add("iris", note)
        await queue.add("resnet")
        calls: list[tuple[str, set[str]]] = []

        async def handle(key: str, notes: set[str]) -> None:
            calls.append((key, notes))
            if len(calls) == 2:
                await queue.close()

        await queue.work(handle, lambda *_: None)
        assert calls == [("iris", {"deployment", "service"}), ("resnet", set())]

    _run(scenario())


def test_a_key_is_never_handled_by_two_workers_at_once() -> None:
    async def scenario() -> None:
        queue: workqueue.WorkQueue[str, str] = workqueue.WorkQueue()
        running: set[str] = set()
        overlaps = calls = 0

        async def handle(key: str, _: set[str]) -> None:
            nonlocal overlaps, calls
            overlaps += key in running
            running.add(key)
            await asyncio.sleep(0.01)
            await queue.add(key)  # an event arrives while this key is being reconciled
            running.discard(key)
            calls += 1
            if calls == 6:
                await queue.close()

        await queue.add("iris")
        await asyncio.gather(*(queue.work(handle, lambda *_: None) for _ in range(4)))
        assert overlaps == 0

    _run(scenario())


def test_a_failure_is_retried_later_with_its_notes(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(workqueue, "FIRST_RETRY_S", 0.01)
    monkeypatch.setattr(workqueue, "JITTER", 0.0)

    async def scenario() -> None:
        queue: workqueue.WorkQueue[str, str] = workqueue.WorkQueue()
        seen: list[set[str]] = []
        errors: list[float] = []

        async def handle(key: str, notes: set[str]) -> None:
            seen.append(notes)
            if len(seen) < 3:
                raise ConnectionError("API server gone")
            await queue.close()

        await queue.add("iris", "deployment")
        await queue.work(handle, lambda key, error, delay: errors.append(delay))
        assert seen == [{"deployment"}] * 3
        assert errors == [0.01, 0.02]

    _run(scenario())


def test_a_resync_queues_every_known_key_every_interval() -> None:
    async def scenario() -> None:
        queue: workqueue.WorkQueue[str, str] = workqueue.WorkQueue()
        known = ["iris", "resnet"]
        handled: list[str] = []

        async def handle(key: str, _: set[str]) -> None:
            handled.append(key)
            if len(handled) == 2:
                known.remove("resnet")  # deleted: the next round leaves it out
                known.append("bert")
            if len(handled) == 4:
                await queue.close()

        resync = asyncio.create_task(queue.resync(0.05, lambda: known))
        await queue.work(handle, lambda *_: None)
        resync.cancel()
        assert handled == ["iris", "resnet", "iris", "bert"]

    _run(scenario())


def test_retry_delays_are_jittered_and_grow() -> None:
    """Keys that failed together (an outage) come back spread out, not in one wave."""

    async def scenario() -> None:
        queue: workqueue.WorkQueue[str, str] = workqueue.WorkQueue()
        first = [queue._retry_later(f"k{i}", set(), ConnectionError()) for i in range(50)]
        second = [queue._retry_later(f"k{i}", set(), ConnectionError()) for i in range(50)]
        await queue.close()
        base = workqueue.FIRST_RETRY_S
        assert all(base * (1 - workqueue.JITTER) <= d <= base for d in first if d is not None)
        assert len(set(first)) > 40  # spread, not one value
        assert all(d is not None and d > base * (1 - workqueue.JITTER) for d in second)
        assert max(d for d in second if d) > base

    _run(scenario())


def test_a_permanent_error_is_retried_a_few_times_then_given_up(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(workqueue, "FIRST_RETRY_S", 0.001)

    async def scenario() -> None:
        queue: workqueue.WorkQueue[str, str] = workqueue.WorkQueue(
            permanent=lambda error: isinstance(error, PermissionError)
        )
        attempts = 0
        outcomes: list[float | None] = []

        async def handle(key: str, _: set[str]) -> None:
            nonlocal attempts
            attempts += 1
            raise PermissionError("403: forbidden")

        def failed(key: str, error: BaseException, retry_in: float | None) -> None:
            outcomes.append(retry_in)

        await queue.add("iris")
        worker = asyncio.create_task(queue.work(handle, failed))
        await asyncio.sleep(0.5)  # far longer than all retries take
        await queue.close()
        await worker
        assert attempts == workqueue.MAX_PERMANENT_ATTEMPTS
        assert outcomes[-1] is None and None not in outcomes[:-1]

    _run(scenario())

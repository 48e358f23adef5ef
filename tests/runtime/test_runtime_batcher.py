"""The batcher: pure merge/split, and the queue's behaviour with a real predict function."""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Mapping

import numpy as np
import pytest

from modeldeploy_runtime import batching, metrics


def test_merge_concatenates_along_the_batch_axis() -> None:
    a = {"x": np.ones((1, 3), np.float32), "m": np.zeros((1,), np.int64)}
    b = {"x": np.full((2, 3), 2, np.float32), "m": np.ones((2,), np.int64)}
    merged = batching.merge([a, b])
    assert merged["x"].shape == (3, 3)
    assert merged["m"].tolist() == [0, 1, 1]


def test_split_returns_each_request_its_rows() -> None:
    outputs = [np.arange(12).reshape(6, 2), np.arange(6)]
    parts = batching.split(outputs, [1, 3, 2])
    assert [p[1].tolist() for p in parts] == [[0], [1, 2, 3], [4, 5]]
    assert parts[1][0].tolist() == [[2, 3], [4, 5], [6, 7]]


def test_split_rejects_an_output_without_the_batch_dim() -> None:
    with pytest.raises(ValueError, match=r"shape \[1\] for a batch of 3"):
        batching.split([np.zeros(1)], [1, 2])


def test_signature_ignores_only_the_batch_dim() -> None:
    one = {"x": np.zeros((1, 4), np.float32)}
    assert batching.signature(one) == batching.signature({"x": np.zeros((5, 4), np.float32)})
    assert batching.signature(one) != batching.signature({"x": np.zeros((1, 5), np.float32)})
    assert batching.signature(one) != batching.signature({"x": np.zeros((1, 4), np.float64)})


def double(inputs: Mapping[str, np.ndarray]) -> list[np.ndarray]:
    return [inputs["x"] * 2]


def make_batcher(predict: batching.Predict, **options: float) -> batching.Batcher:
    values = {"max_batch_size": 8, "max_delay_s": 0.05, "max_queue_size": 64} | options
    return batching.Batcher(
        predict,
        max_batch_size=int(values["max_batch_size"]),
        max_delay_s=values["max_delay_s"],
        max_queue_size=int(values["max_queue_size"]),
        stats=metrics.ModelMetrics("test"),
    )


def test_concurrent_requests_share_batches_and_get_their_own_rows() -> None:
    sizes: list[int] = []

    def record(inputs: Mapping[str, np.ndarray]) -> list[np.ndarray]:
        sizes.append(len(inputs["x"]))
        return double(inputs)

    async def scenario() -> list[list[np.ndarray]]:
        batcher = make_batcher(record)
        batcher.start()
        requests = [np.full((1 + i % 2, 2), i, np.float32) for i in range(10)]
        results = await asyncio.gather(*(batcher.submit({"x": r}, len(r)) for r in requests))
        await batcher.stop()
        for request, result in zip(requests, results, strict=True):
            np.testing.assert_array_equal(result[0], request * 2)
        return results

    asyncio.run(scenario())
    assert max(sizes) > 1
    assert all(size <= 8 for size in sizes)
    assert sum(sizes) == 15


def test_incompatible_shapes_run_in_separate_batches() -> None:
    shapes: list[tuple[int, ...]] = []

    def record(inputs: Mapping[str, np.ndarray]) -> list[np.ndarray]:
        shapes.append(inputs["x"].shape)
        return double(inputs)

    async def scenario() -> None:
        batcher = make_batcher(record)
        batcher.start()
        await asyncio.gather(
            batcher.submit({"x": np.zeros((1, 2), np.float32)}, 1),
            batcher.submit({"x": np.zeros((1, 3), np.float32)}, 1),
            batcher.submit({"x": np.zeros((1, 2), np.float32)}, 1),
        )
        await batcher.stop()

    asyncio.run(scenario())
    assert sorted(shapes) == [(1, 3), (2, 2)]


def test_a_failed_batch_fails_every_request_in_it() -> None:
    def broken(inputs: Mapping[str, np.ndarray]) -> list[np.ndarray]:
        raise RuntimeError("the accelerator caught fire")

    async def scenario() -> list[BaseException | list[np.ndarray]]:
        batcher = make_batcher(broken)
        batcher.start()
        x = {"x": np.zeros((1, 2), np.float32)}
        results = await asyncio.gather(
            *(batcher.submit(x, 1) for _ in range(3)), return_exceptions=True
        )
        await batcher.stop()
        return results

    results = asyncio.run(scenario())
    assert all(isinstance(r, RuntimeError) and "caught fire" in str(r) for r in results)


def test_a_full_queue_rejects_and_the_event_loop_keeps_running() -> None:
    release = threading.Event()

    def slow(inputs: Mapping[str, np.ndarray]) -> list[np.ndarray]:
        release.wait(5)
        return double(inputs)

    async def scenario() -> None:
        batcher = make_batcher(slow, max_batch_size=1, max_queue_size=2, max_delay_s=0)
        batcher.start()
        x = {"x": np.zeros((1, 2), np.float32)}
        running = asyncio.ensure_future(batcher.submit(x, 1))
        await asyncio.sleep(0.05)  # the first request is now inside predict
        queued = [asyncio.ensure_future(batcher.submit(x, 1)) for _ in range(2)]
        await asyncio.sleep(0.01)  # the loop is free while inference blocks its thread
        with pytest.raises(batching.QueueFullError, match="queue is full"):
            await batcher.submit(x, 1)
        release.set()
        await asyncio.gather(running, *queued)
        await batcher.stop()

    asyncio.run(scenario())


def test_stop_finishes_queued_requests() -> None:
    async def scenario() -> None:
        batcher = make_batcher(double, max_delay_s=10)
        batcher.start()
        pending = asyncio.ensure_future(batcher.submit({"x": np.ones((1, 2), np.float32)}, 1))
        await asyncio.sleep(0.01)
        await batcher.stop()
        assert (await pending)[0].tolist() == [[2, 2]]

    asyncio.run(scenario())

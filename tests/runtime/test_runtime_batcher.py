"""The batcher: pure merge/split, and the queue's behaviour with a real predict function."""

from __future__ import annotations

import asyncio
import dataclasses
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

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


Predict = Callable[[batching.Inputs], Sequence[np.ndarray]]


class FunctionRunner:
    """A runner for a plain predict function, merging with fresh arrays."""

    def __init__(self, predict: Predict) -> None:
        self._predict = predict

    def prepare(
        self, requests: Sequence[batching.Inputs], rows: int, padded: int
    ) -> batching.Inputs:
        return batching.merge(requests, padded)

    def run(self, prepared: batching.Inputs) -> Sequence[np.ndarray]:
        return self._predict(prepared)

    def run_once(self, inputs: batching.Inputs) -> Sequence[np.ndarray]:
        return self._predict(inputs)


def make_batcher(
    predict: Predict,
    sizes: Sequence[int] | None = None,
    pipelined: bool = True,
    padding: batching.Padding | None = None,
    **options: float,
) -> batching.Batcher:
    values = {"max_batch_size": 8, "max_delay_s": 0.05, "max_queue_size": 64} | options
    return batching.Batcher(
        FunctionRunner(predict),
        sizes=sizes or range(1, int(values["max_batch_size"]) + 1),
        max_delay_s=values["max_delay_s"],
        max_queue_size=int(values["max_queue_size"]),
        max_queue_bytes=int(values["max_queue_bytes"]) if "max_queue_bytes" in values else None,
        stats=metrics.ModelMetrics("test"),
        pipelined=pipelined,
        padding=padding,
    )


@pytest.mark.parametrize("pipelined", [True, False])
def test_concurrent_requests_share_batches_and_get_their_own_rows(pipelined: bool) -> None:
    sizes: list[int] = []

    def record(inputs: Mapping[str, np.ndarray]) -> list[np.ndarray]:
        sizes.append(len(inputs["x"]))
        return double(inputs)

    async def scenario() -> list[list[np.ndarray]]:
        batcher = make_batcher(record, pipelined=pipelined)
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


def test_a_broken_model_fails_every_request_with_its_own_error() -> None:
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
        # One more batch waits, merged, for the inference thread; two stay queued.
        queued = [asyncio.ensure_future(batcher.submit(x, 1))]
        await asyncio.sleep(0.05)
        queued += [batcher.enqueue(x, 1) for _ in range(2)]
        await asyncio.sleep(0.01)  # the loop is free while inference blocks its thread
        with pytest.raises(batching.QueueFullError, match="queue is full"):
            batcher.enqueue(x, 1)
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


def test_the_queue_is_bounded_in_bytes() -> None:
    release = threading.Event()

    def slow(inputs: Mapping[str, np.ndarray]) -> list[np.ndarray]:
        release.wait(5)
        return double(inputs)

    async def scenario() -> None:
        batcher = make_batcher(slow, max_batch_size=1, max_delay_s=0, max_queue_bytes=4096)
        batcher.start()
        small = {"x": np.zeros((1, 256), np.float32)}  # 1 KiB
        running = [asyncio.ensure_future(batcher.submit(small, 1))]
        await asyncio.sleep(0.05)
        running.append(asyncio.ensure_future(batcher.submit(small, 1)))
        await asyncio.sleep(0.05)  # one runs, one waits merged: neither is queued
        queued = [batcher.enqueue(small, 1) for _ in range(4)]
        with pytest.raises(batching.QueueFullError, match="4096 bytes"):
            batcher.enqueue(small, 1)
        release.set()
        await asyncio.gather(*running, *queued)
        await batcher.stop()

    asyncio.run(scenario())


def test_batches_are_padded_to_the_given_sizes_and_padding_never_reaches_a_client() -> None:
    seen: list[int] = []

    def record(inputs: Mapping[str, np.ndarray]) -> list[np.ndarray]:
        seen.append(len(inputs["x"]))
        return double(inputs)

    async def scenario() -> None:
        batcher = make_batcher(record, sizes=[1, 4, 8], max_delay_s=0.02)
        batcher.start()
        requests = [np.full((1 + i % 3, 2), i + 1, np.float32) for i in range(13)]
        results = await asyncio.gather(*(batcher.submit({"x": r}, len(r)) for r in requests))
        for request, result in zip(requests, results, strict=True):
            assert result[0].shape == request.shape
            np.testing.assert_array_equal(result[0], request * 2)
        await batcher.stop()

    asyncio.run(scenario())
    assert set(seen) <= {1, 4, 8}
    assert len(seen) < 13


def test_a_request_larger_than_the_largest_size_is_refused() -> None:
    async def scenario() -> None:
        batcher = make_batcher(double, sizes=[1, 2, 4])
        batcher.start()
        with pytest.raises(ValueError, match="larger than the largest batch size 4"):
            await batcher.submit({"x": np.zeros((5, 2), np.float32)}, 5)
        await batcher.stop()

    asyncio.run(scenario())


@pytest.mark.parametrize("pipelined", [True, False])
def test_one_bad_request_fails_alone_and_the_others_get_their_answers(pipelined: bool) -> None:
    def picky(inputs: Mapping[str, np.ndarray]) -> list[np.ndarray]:
        if (inputs["x"] < 0).any():
            raise RuntimeError(f"negative input in rows {np.flatnonzero(inputs['x'][:, 0] < 0)}")
        return double(inputs)

    async def scenario() -> list[Any]:
        batcher = make_batcher(picky, pipelined=pipelined, max_delay_s=0.05)
        batcher.start()
        requests = [np.full((1, 2), -1.0 if i == 5 else i, np.float32) for i in range(8)]
        results = await asyncio.gather(
            *(batcher.submit({"x": r}, 1) for r in requests), return_exceptions=True
        )
        await batcher.stop()
        return results

    results = asyncio.run(scenario())
    assert isinstance(results[5], RuntimeError)
    # The error is the request's own: it ran alone, so its rows are [0].
    assert str(results[5]) == "negative input in rows [0]"
    for i, result in enumerate(results):
        if i != 5:
            np.testing.assert_array_equal(result[0], np.full((1, 2), 2 * i, np.float32))


class _TracingRunner:
    """Records when each stage starts and ends, and on which thread."""

    def __init__(self) -> None:
        self.events: list[tuple[str, int, float, str]] = []

    def prepare(self, requests: Sequence[batching.Inputs], rows: int, padded: int) -> Any:
        merged = batching.merge(requests, padded)
        first = int(merged["x"][0, 0])
        self.events.append(("prepare", first, time.monotonic(), threading.current_thread().name))
        return merged

    def run(self, prepared: batching.Inputs) -> list[np.ndarray]:
        first = int(prepared["x"][0, 0])
        self.events.append(("run-start", first, time.monotonic(), threading.current_thread().name))
        time.sleep(0.1)
        self.events.append(("run-end", first, time.monotonic(), threading.current_thread().name))
        return double(prepared)

    def run_once(self, inputs: batching.Inputs) -> list[np.ndarray]:
        return double(inputs)


def test_the_next_batch_is_merged_off_the_loop_while_the_current_one_runs() -> None:
    tracer = _TracingRunner()

    async def scenario() -> None:
        batcher = batching.Batcher(
            tracer,
            sizes=[1, 2, 4],
            max_delay_s=0,
            max_queue_size=64,
            stats=metrics.ModelMetrics("test"),
        )
        batcher.start()
        first = asyncio.ensure_future(batcher.submit({"x": np.full((1, 2), 1, np.float32)}, 1))
        await asyncio.sleep(0.02)  # batch 1 is running
        later = [
            asyncio.ensure_future(batcher.submit({"x": np.full((1, 2), i, np.float32)}, 1))
            for i in (2, 3)
        ]
        await asyncio.gather(first, *later)
        await batcher.stop()

    asyncio.run(scenario())
    times = {(kind, first): at for kind, first, at, _ in tracer.events}
    # Batch 2 (requests 2 and 3) was merged while batch 1 was still running ...
    assert times["run-start", 1] < times["prepare", 2] < times["run-end", 1]
    # ... and started as soon as batch 1 ended.
    assert times["run-start", 2] - times["run-end", 1] < 0.05
    threads = {kind: name for kind, _, _, name in tracer.events}
    assert threads["prepare"].startswith("merge")
    assert threads["run-start"].startswith("inference")


def test_string_tensors_count_their_text_against_the_queue_bytes() -> None:
    """An object array's own nbytes is its pointers; the queue counts the strings too."""
    release = threading.Event()

    def slow(inputs: Mapping[str, np.ndarray]) -> list[np.ndarray]:
        release.wait(5)
        return [np.zeros(len(inputs["text"]), np.int64)]

    async def scenario() -> None:
        batcher = make_batcher(slow, max_batch_size=1, max_delay_s=0, max_queue_bytes=8192)
        batcher.start()
        small = {"text": np.array(["x"], dtype=object)}
        large = {"text": np.array(["x" * 6000], dtype=object)}
        running = [asyncio.ensure_future(batcher.submit(small, 1)) for _ in range(2)]
        await asyncio.sleep(0.1)  # one runs, one waits merged: neither is queued
        queued = [batcher.enqueue(large, 1)]
        with pytest.raises(batching.QueueFullError, match="8192 bytes"):
            batcher.enqueue(large, 1)
        queued.append(batcher.enqueue(small, 1))
        release.set()
        await asyncio.gather(*running, *queued)
        await batcher.stop()

    asyncio.run(scenario())


def test_merged_strings_are_padded_with_empty_strings() -> None:
    one = {"text": np.array(["a"], dtype=object)}
    two = {"text": np.array(["b", "c"], dtype=object)}
    assert batching.merge([one, two], 4)["text"].tolist() == ["a", "b", "c", ""]


# Sequence inputs padded on axis 1: ids with 0, a float feature with -1; output 0 is per
# token (axis 1), output 1 pooled.
PADDING = batching.Padding({"ids": (1, 0), "feature": (1, -1)}, {0: (1,)})


def _sequence(rows: int, length: int, start: int) -> dict[str, np.ndarray]:
    ids = np.arange(start, start + rows * length, dtype=np.int64).reshape(rows, length) + 1
    return {"ids": ids, "feature": ids.astype(np.float32) / 2, "flag": np.ones(rows, np.int64)}


def test_padded_merge_fills_each_input_out_with_its_pad_value() -> None:
    merged = batching.merge([_sequence(1, 2, 0), _sequence(2, 3, 10)], 4, PADDING)
    assert merged["ids"].tolist() == [[1, 2, 0], [11, 12, 13], [14, 15, 16], [0, 0, 0]]
    assert merged["feature"][0].tolist() == [0.5, 1.0, -1.0]
    assert merged["flag"].tolist() == [1, 1, 1, 0]
    bucketed = dataclasses.replace(PADDING, buckets=(4, 8))
    assert batching.merge([_sequence(1, 2, 0)], 1, bucketed)["ids"].tolist() == [[1, 2, 0, 0]]


def test_padded_split_cuts_per_token_outputs_back_to_each_requests_length() -> None:
    per_token = np.arange(4 * 5 * 2).reshape(4, 5, 2)
    pooled = np.arange(4 * 3).reshape(4, 3)
    parts = batching.split([per_token, pooled], [1, 2], [3, 5], PADDING)
    assert parts[0][0].tolist() == per_token[:1, :3].tolist()
    assert parts[1][0].tolist() == per_token[1:3, :5].tolist()
    assert parts[0][1].tolist() == pooled[:1].tolist()
    assert parts[1][1].tolist() == pooled[1:3].tolist()
    with pytest.raises(ValueError, match="no axis 1 of length 6 to cut back"):
        batching.split([per_token, pooled], [1, 2], [3, 6], PADDING)
    # An attention map has the length on two axes: both are cut.
    attention = np.arange(3 * 5 * 5).reshape(3, 5, 5)
    both = dataclasses.replace(PADDING, outputs={0: (1, 2)})
    parts = batching.split([attention], [1, 2], [2, 5], both)
    assert parts[0][0].tolist() == attention[:1, :2, :2].tolist()
    assert parts[1][0].tolist() == attention[1:3].tolist()


def test_padded_signature_ignores_the_length_or_keeps_only_its_bucket() -> None:
    short, long = _sequence(1, 2, 0), _sequence(1, 7, 0)
    assert batching.signature(short, PADDING) == batching.signature(long, PADDING)
    assert batching.signature(short) != batching.signature(long)
    bucketed = dataclasses.replace(PADDING, buckets=(4, 8))
    assert batching.signature(short, bucketed) != batching.signature(long, bucketed)
    assert batching.signature(_sequence(1, 3, 0), bucketed) == batching.signature(short, bucketed)


def test_padded_inputs_must_agree_on_their_length_and_fit_a_bucket() -> None:
    bad = _sequence(1, 3, 0) | {"feature": np.zeros((1, 4), np.float32)}
    with pytest.raises(batching.InvalidRequestError, match="one length along their padded"):
        PADDING.length(bad)
    bucketed = dataclasses.replace(PADDING, buckets=(4, 8))
    with pytest.raises(batching.InvalidRequestError, match="longer than the largest padding"):
        bucketed.length(_sequence(1, 9, 0))


@pytest.mark.parametrize("pipelined", [True, False])
def test_requests_of_different_lengths_share_padded_batches(pipelined: bool) -> None:
    """Each gets its own answer, cut back; the pooled output as it is."""
    shapes: list[tuple[int, ...]] = []

    def model(inputs: Mapping[str, np.ndarray]) -> list[np.ndarray]:
        shapes.append(inputs["ids"].shape)
        # Per token: ids + 100; pooled: the sum of the real (non-zero) ids of each row.
        return [inputs["ids"] + 100, inputs["ids"].sum(axis=1)]

    async def scenario() -> None:
        batcher = make_batcher(model, pipelined=pipelined, padding=PADDING, sizes=[1, 4, 8])
        batcher.start()
        requests = [_sequence(1 + i % 2, 1 + i % 5, 10 * i) for i in range(12)]
        results = await asyncio.gather(*(batcher.submit(r, len(r["ids"])) for r in requests))
        await batcher.stop()
        for request, (per_token, pooled) in zip(requests, results, strict=True):
            assert per_token.tolist() == (request["ids"] + 100).tolist()
            assert pooled.tolist() == request["ids"].sum(axis=1).tolist()

    asyncio.run(scenario())
    assert len(shapes) < 12
    assert {shape[0] for shape in shapes} <= {1, 4, 8}


@settings(max_examples=200, derandomize=True, deadline=2000)
@given(
    shapes=st.lists(st.tuples(st.integers(1, 3), st.integers(1, 9)), min_size=1, max_size=6),
    buckets=st.sampled_from([(), (4, 9), (9,)]),
    extra_rows=st.integers(0, 3),
)
def test_padded_merge_then_split_gives_every_request_back_its_own(
    shapes: list[tuple[int, int]], buckets: tuple[int, ...], extra_rows: int
) -> None:
    """Whatever the lengths: the padded batch holds each request where split will look, pad
    values everywhere else, and split cuts every request's own rows and length back out."""
    padding = dataclasses.replace(PADDING, buckets=buckets)
    requests = [_sequence(rows, length, 100 * i) for i, (rows, length) in enumerate(shapes)]
    rows = sum(r for r, _ in shapes)
    merged = batching.merge(requests, rows + extra_rows, padding)
    longest = padding.target(max(length for _, length in shapes))
    assert merged["ids"].shape == (rows + extra_rows, longest)
    # Every id is positive: what is not a request's is padding.
    assert (merged["ids"] > 0).sum() == sum(r * length for r, length in shapes)
    assert (merged["feature"][merged["ids"] == 0] == -1).all()
    parts = batching.split(
        [merged["ids"], merged["feature"], merged["flag"]],
        [r for r, _ in shapes],
        [length for _, length in shapes],
        dataclasses.replace(padding, outputs={0: (1,), 1: (1,)}),
    )
    for request, (ids, feature, flag) in zip(requests, parts, strict=True):
        assert ids.tolist() == request["ids"].tolist()
        assert feature.tolist() == request["feature"].tolist()
        assert flag.tolist() == request["flag"].tolist()


class _SlowRunner:
    """Runs each batch in ``seconds`` and records its size and when it started and ended."""

    def __init__(self, seconds: float) -> None:
        self.seconds = seconds
        self.runs: list[tuple[int, float, float]] = []
        self.prepared: list[tuple[int, float]] = []

    def prepare(self, requests: Sequence[batching.Inputs], rows: int, padded: int) -> Any:
        self.prepared.append((rows, time.monotonic()))
        return batching.merge(requests, padded)

    def run(self, prepared: batching.Inputs) -> list[np.ndarray]:
        started = time.monotonic()
        time.sleep(self.seconds)
        self.runs.append((len(prepared["x"]), started, time.monotonic()))
        return double(prepared)

    def run_once(self, inputs: batching.Inputs) -> list[np.ndarray]:
        return double(inputs)


def _batcher(
    runner: _SlowRunner, pipelined: bool, max_delay_s: float, max_batch: int = 8
) -> batching.Batcher:
    return batching.Batcher(
        runner,
        sizes=range(1, max_batch + 1),
        max_delay_s=max_delay_s,
        max_queue_size=256,
        stats=metrics.ModelMetrics("test"),
        pipelined=pipelined,
    )


@pytest.mark.parametrize("pipelined", [True, False])
def test_a_request_to_an_idle_model_is_dispatched_at_once(pipelined: bool) -> None:
    runner = _SlowRunner(0)
    latencies: list[float] = []

    async def scenario() -> None:
        # A delay far longer than the test: any wait for partners would show.
        batcher = _batcher(runner, pipelined, max_delay_s=30)
        batcher.start()
        for i in range(5):
            sent = time.monotonic()
            await batcher.submit({"x": np.full((1, 2), i, np.float32)}, 1)
            latencies.append(time.monotonic() - sent)
            await asyncio.sleep(0.01)
        await batcher.stop()

    asyncio.run(scenario())
    assert [rows for rows, _, _ in runner.runs] == [1] * 5
    assert max(latencies) < 1


@pytest.mark.parametrize("pipelined", [True, False])
def test_requests_arriving_while_a_batch_runs_form_the_next_batch(pipelined: bool) -> None:
    # On a GPU the pipeline has room for the next batch as soon as one starts running; it
    # must still take every request that arrives during that run, not only the first ones.
    runner = _SlowRunner(0.3)

    async def scenario() -> None:
        batcher = _batcher(runner, pipelined, max_delay_s=30)
        batcher.start()
        first = asyncio.ensure_future(batcher.submit({"x": np.full((1, 2), 0, np.float32)}, 1))
        later = []
        for i in range(1, 6):
            await asyncio.sleep(0.03)
            later.append(
                asyncio.ensure_future(batcher.submit({"x": np.full((1, 2), i, np.float32)}, 1))
            )
        results = await asyncio.gather(first, *later)
        for i, result in enumerate(results):
            np.testing.assert_array_equal(result[0], np.full((1, 2), 2 * i, np.float32))
        await batcher.stop()

    asyncio.run(scenario())
    assert [rows for rows, _, _ in runner.runs] == [1, 5]
    (_, _, first_end), (_, second_start, _) = runner.runs
    # Dispatched when the model was free, not after the 30 s delay.
    assert second_start - first_end < 0.1


def test_while_the_model_is_busy_max_delay_bounds_the_wait_and_the_merge_overlaps_the_run() -> None:
    runner = _SlowRunner(0.5)

    async def scenario() -> None:
        batcher = _batcher(runner, pipelined=True, max_delay_s=0.1)
        batcher.start()
        first = asyncio.ensure_future(batcher.submit({"x": np.zeros((1, 2), np.float32)}, 1))
        await asyncio.sleep(0.05)
        sent = time.monotonic()
        second = asyncio.ensure_future(batcher.submit({"x": np.ones((1, 2), np.float32)}, 1))
        await asyncio.gather(first, second)
        await batcher.stop()
        (_, _), (_, merged) = runner.prepared
        # Cut after its max delay, well before the running batch ended ...
        assert 0.09 < merged - sent < 0.3
        assert merged < runner.runs[0][2]

    asyncio.run(scenario())


@pytest.mark.parametrize("pipelined", [True, False])
def test_under_closed_loop_load_batches_stay_full(pipelined: bool) -> None:
    # 32 clients, each sending its next request when its answer comes, max batch 8: the
    # model is never idle, so adaptive batching must form full batches as the delay did.
    runner = _SlowRunner(0.005)

    async def scenario() -> None:
        batcher = _batcher(runner, pipelined, max_delay_s=0.002)
        batcher.start()
        deadline = time.monotonic() + 1.0

        async def client(i: int) -> None:
            while time.monotonic() < deadline:
                await batcher.submit({"x": np.full((1, 2), i, np.float32)}, 1)

        await asyncio.gather(*(client(i) for i in range(32)))
        await batcher.stop()

    asyncio.run(scenario())
    sizes = [rows for rows, _, _ in runner.runs]
    assert sum(sizes) / len(sizes) > 7

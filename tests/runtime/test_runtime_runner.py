"""The session runner's GPU path, run on host memory: requests copied into bound buffers.

On a GPU each request's tensors go from wherever they lie (a worker's shared-memory arena)
straight into their rows of the device buffers bound to the session, with no merge on the
host.  ``bind="cpu"`` runs that same path with ONNX Runtime values in host memory, so the
row arithmetic, the pipeline slots, the padding and the IO binding are checked here on a
real model; only the final copy primitive (``cudaMemcpy`` instead of ``memmove``) differs.
"""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import onnx
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from onnx import TensorProto, helper
from runtime_fixtures import string_model

from modeldeploy_runtime import batching, ipc, metrics, model, runner
from modeldeploy_runtime import settings as runtime_settings


@pytest.fixture(scope="module")
def two_inputs(tmp_path_factory: pytest.TempPathFactory) -> model.OnnxModel:
    """Inputs of different dtypes and row sizes: ``y = 2x + 1`` and ``z = k + k``."""
    path = tmp_path_factory.mktemp("runner") / "two.onnx"
    graph = helper.make_graph(
        [
            helper.make_node("Mul", ["x", "two"], ["x2"]),
            helper.make_node("Add", ["x2", "one"], ["y"]),
            helper.make_node("Add", ["k", "k"], ["z"]),
        ],
        "two",
        [
            helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", 3]),
            helper.make_tensor_value_info("k", TensorProto.INT64, ["batch", 2, 2]),
        ],
        [
            helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", 3]),
            helper.make_tensor_value_info("z", TensorProto.INT64, ["batch", 2, 2]),
        ],
        [
            helper.make_tensor("two", TensorProto.FLOAT, [], [2.0]),
            helper.make_tensor("one", TensorProto.FLOAT, [], [1.0]),
        ],
    )
    onnx_model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    onnx_model.ir_version = 8
    onnx.save(onnx_model, path)
    served = model.OnnxModel(
        Path(path), model.SessionConfig(threads=1, device=runtime_settings.Device.CPU)
    )
    served.load((1, 2, 4, 8))
    return served


def _request(rows: int, seed: int) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    return {
        "x": rng.standard_normal((rows, 3)).astype(np.float32),
        "k": rng.integers(-1000, 1000, (rows, 2, 2)).astype(np.int64),
    }


def _in_arena(arena: ipc.Arena, request: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """The request as the engine sees a worker's: views of a shared-memory arena."""
    views = {}
    for name, array in request.items():
        start = arena.alloc(array.nbytes)
        assert start is not None
        views[name] = arena.view(start, array.shape, array.dtype.str)
        views[name][...] = array
    return views


def _expected(request: dict[str, np.ndarray]) -> list[np.ndarray]:
    return [request["x"] * 2 + 1, request["k"] * 2]


def _run_batch(
    session_runner: runner.SessionRunner, requests: Sequence[batching.Inputs], padded: int
) -> list[list[np.ndarray]]:
    rows = sum(len(r["x"]) for r in requests)
    prepared = session_runner.prepare(requests, rows, padded)
    outputs = session_runner.run(prepared)
    assert all(len(output) == padded for output in outputs)
    return batching.split(outputs, [len(r["x"]) for r in requests])


def test_each_request_is_copied_into_its_rows_of_the_bound_buffers(
    two_inputs: model.OnnxModel,
) -> None:
    session_runner = runner.SessionRunner(two_inputs, bind="cpu")
    _, arena = ipc.Arena.create(1 << 20)
    requests = [_request(rows, seed) for seed, rows in enumerate([1, 3, 2])]
    views = [_in_arena(arena, r) for r in requests]
    prepared = session_runner.prepare(views, 6, 8)
    # Nothing merged on the host: the bound buffers hold the rows, request after request.
    assert prepared.host is None and prepared.buffers is not None
    bound_x = prepared.buffers.bound["x"].numpy()
    np.testing.assert_array_equal(bound_x[:6], np.concatenate([r["x"] for r in requests]))
    np.testing.assert_array_equal(
        prepared.buffers.bound["k"].numpy()[:6], np.concatenate([r["k"] for r in requests])
    )
    outputs = session_runner.run(prepared)
    for request, got in zip(requests, batching.split(outputs, [1, 3, 2]), strict=True):
        for want, part in zip(_expected(request), got, strict=True):
            np.testing.assert_array_equal(part, want)


def test_a_smaller_batch_after_a_larger_one_gets_only_its_own_answers(
    two_inputs: model.OnnxModel,
) -> None:
    # The padding rows of the second batch still hold the first batch's inputs.
    session_runner = runner.SessionRunner(two_inputs, bind="cpu")
    for slot_round in range(3):
        large = [_request(4, 10 + slot_round), _request(4, 20 + slot_round)]
        small = [_request(1, 30 + slot_round)]
        for requests in (large, small):
            got = _run_batch(session_runner, requests, 8)
            for request, parts in zip(requests, got, strict=True):
                for want, part in zip(_expected(request), parts, strict=True):
                    np.testing.assert_array_equal(part, want)


@settings(max_examples=40, deadline=None, derandomize=True)
@given(
    st.lists(st.lists(st.integers(1, 4), min_size=1, max_size=4), min_size=1, max_size=6),
    st.integers(0, 2**16),
)
def test_generated_batches_answer_like_single_runs(
    two_inputs: model.OnnxModel, batches: list[list[int]], seed: int
) -> None:
    session_runner = runner.SessionRunner(two_inputs, bind="cpu")
    _, arena = ipc.Arena.create(1 << 20)
    for number, sizes in enumerate(batches):
        sizes = sizes[: next(i for i in range(len(sizes), 0, -1) if sum(sizes[:i]) <= 8)]
        requests = [_request(rows, seed + 7 * number + i) for i, rows in enumerate(sizes)]
        padded = batching.padded_size(two_inputs.sizes, sum(sizes))
        got = _run_batch(session_runner, [_in_arena(arena, r) for r in requests], padded)
        for request, parts in zip(requests, got, strict=True):
            single = two_inputs.predict(request)
            for want, part in zip(single, parts, strict=True):
                np.testing.assert_array_equal(part, want)


def test_the_pipelined_batcher_over_bound_buffers_answers_every_request_right(
    two_inputs: model.OnnxModel,
) -> None:
    """The GPU's schedule (merge thread, inference thread, two slots) on host memory."""
    _, arena = ipc.Arena.create(1 << 20)
    requests = [_request(1 + i % 3, i) for i in range(60)]

    async def scenario() -> list[list[np.ndarray]]:
        batcher = batching.Batcher(
            runner.SessionRunner(two_inputs, bind="cpu"),
            sizes=two_inputs.sizes,
            max_delay_s=0.002,
            max_queue_size=256,
            stats=metrics.ModelMetrics("runner-test"),
            pipelined=True,
        )
        batcher.start()
        results = []
        for start in range(0, len(requests), 12):
            wave = requests[start : start + 12]
            results += await asyncio.gather(
                *(batcher.submit(_in_arena(arena, r), len(r["x"])) for r in wave)
            )
        await batcher.stop()
        return results

    results = asyncio.run(scenario())
    for request, parts in zip(requests, results, strict=True):
        for want, part in zip(_expected(request), parts, strict=True):
            np.testing.assert_array_equal(part, want)


def test_string_inputs_take_the_host_path_and_answer_right(tmp_path: Path) -> None:
    """A string tensor cannot be copied byte-wise into a bound buffer (its elements are
    pointers): such models merge on the host, even where the GPU path was asked for."""
    served = model.OnnxModel(
        string_model(tmp_path / "strings.onnx"),
        model.SessionConfig(threads=1, device=runtime_settings.Device.CPU),
    )
    served.load((1, 2, 4))
    session_runner = runner.SessionRunner(served, bind="cpu")
    requests = [
        {"tokens": np.array([["cat", "dog", "fish"]], dtype=object)},
        {"tokens": np.array([["日本", "", "café"], ["dog", "dog", "x"]], dtype=object)},
    ]
    prepared = session_runner.prepare(requests, 3, 4)
    assert prepared.buffers is None
    outputs = session_runner.run(prepared)
    for request, got in zip(requests, batching.split(outputs, [1, 2]), strict=True):
        for want, part in zip(served.predict(request), got, strict=True):
            assert part.tolist() == want.tolist()

"""Whether axis 0 is a batch axis is read from the model, never assumed.

Each case is a small real model built with onnx.helper and loaded by ONNX Runtime: inputs
and outputs that are scalars, have a fixed first dim, or carry the batch on another axis.
A model that cannot be batched is served with every request run alone, and says so
(``max_batch_size`` 0 in its configuration, as Triton reports it).
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Sequence
from concurrent import futures
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import tritonclient.grpc as grpcclient
import tritonclient.http as httpclient
from hypothesis import given, settings
from hypothesis import strategies as st
from onnx import TensorProto, helper
from runtime_fixtures import running_engine, running_server

from modeldeploy_runtime import batching, metrics, model
from modeldeploy_runtime import settings as runtime_settings

Dim = int | str | None
FLOAT = TensorProto.FLOAT


def build(
    path: Path,
    nodes: list[onnx.NodeProto],
    inputs: Sequence[tuple[str, Sequence[Dim], int]],
    outputs: Sequence[tuple[str, Sequence[Dim]]],
) -> Path:
    graph = helper.make_graph(
        nodes,
        path.stem,
        [helper.make_tensor_value_info(name, kind, list(dims)) for name, dims, kind in inputs],
        [helper.make_tensor_value_info(name, FLOAT, list(dims)) for name, dims in outputs],
    )
    built = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    built.ir_version = 8
    onnx.checker.check_model(built)
    onnx.save(built, path)
    return path


def node(op: str, inputs: list[str], outputs: list[str], **attributes: Any) -> onnx.NodeProto:
    return helper.make_node(op, inputs, outputs, **attributes)


def loaded(path: Path, sizes: Sequence[int] = (1, 2, 4)) -> model.OnnxModel:
    served = model.OnnxModel(
        path, model.SessionConfig(threads=1, device=runtime_settings.Device.CPU)
    )
    served.load(sizes)
    return served


# name -> (nodes, inputs, outputs, the words each reason holds); () when batchable.
CASES: dict[str, tuple[Any, ...]] = {
    "batchable": (
        [node("Relu", ["x"], ["y"])],
        [("x", ["batch", 4], FLOAT)],
        [("y", ["batch", 4])],
        (),
    ),
    "scalar input": (
        [node("Mul", ["x", "scale"], ["y"])],
        [("x", ["batch", 4], FLOAT), ("scale", [], FLOAT)],
        [("y", ["batch", 4])],
        ("input 'scale' is a scalar",),
    ),
    "input with a fixed first dim": (
        [node("Add", ["x", "bias"], ["y"])],
        [("x", ["batch", 4], FLOAT), ("bias", [3, 1, 4], FLOAT)],
        [("y", [3, "batch", 4])],
        (
            "input 'bias' has a fixed first dim of 3",
            "output 'y' has a fixed first dim of 3",
            "output 'y' has the batch dim 'batch' on axis 1",
        ),
    ),
    "state carrying the batch on axis 1": (
        [
            node("Add", ["state", "x"], ["stateN"]),
            node("ReduceMean", ["stateN"], ["y"], axes=[0], keepdims=0),
        ],
        [("x", ["batch", 4], FLOAT), ("state", [2, "batch", 4], FLOAT)],
        [("y", ["batch", 4]), ("stateN", [2, "batch", 4])],
        (
            "input 'state' has a fixed first dim of 2",
            "input 'state' has the batch dim 'batch'",
            "output 'stateN' has a fixed first dim of 2",
            "output 'stateN' has the batch dim",
        ),
    ),
    "dynamic first dim, batch on axis 1": (
        [node("Add", ["h", "x"], ["y"])],
        [("x", ["batch", 4], FLOAT), ("h", ["layers", "batch", 4], FLOAT)],
        [("y", ["layers", "batch", 4])],
        (
            "input 'h' has the batch dim 'batch' on axis 1",
            "output 'y' has the batch dim 'batch' on axis 1",
        ),
    ),
    "fixed batch of 1": (
        [node("Relu", ["x"], ["y"])],
        [("x", [1, 4], FLOAT)],
        [("y", [1, 4])],
        ("input 'x' has a fixed batch of 1", "output 'y' has a fixed batch of 1"),
    ),
    "scalar output": (
        [node("ReduceSum", ["x"], ["y"], keepdims=0)],
        [("x", ["batch", 4], FLOAT)],
        [("y", [])],
        ("output 'y' is a scalar",),
    ),
    "output transposed": (
        [node("Transpose", ["x"], ["y"], perm=[1, 0])],
        [("x", ["batch", "n"], FLOAT)],
        [("y", ["n", "batch"])],
        ("output 'y' has the batch dim 'batch' on axis 1",),
    ),
}


@pytest.mark.parametrize("case", CASES)
def test_the_graph_says_whether_axis_0_is_the_batch(case: str, tmp_path: Path) -> None:
    nodes, inputs, outputs, reasons = CASES[case]
    served = loaded(build(tmp_path / "m.onnx", nodes, inputs, outputs))
    assert len(served.unbatched) == len(reasons), served.unbatched
    for reason, problem in zip(reasons, served.unbatched, strict=True):
        assert problem.startswith(reason), served.unbatched
    assert served.signature.batchable is not reasons
    assert served.signature.max_batch_size == (0 if reasons else 4)


def test_max_batch_size_0_turns_merging_off_for_any_model(tmp_path: Path) -> None:
    nodes, inputs, outputs, _ = CASES["batchable"]
    served = loaded(build(tmp_path / "m.onnx", nodes, inputs, outputs), sizes=())
    assert served.unbatched == ("maxBatchSize is 0",)
    assert served.signature.max_batch_size == 0


def test_an_unnamed_dim_is_no_shared_batch_symbol() -> None:
    # Exporters write "?" for a dim they did not name: it is not one dim seen twice.
    problems = model.batch_problems([("x", ["?", "?", 3])], [("y", ["?", 2])])
    assert problems == ()


def flattened(path: Path) -> Path:
    """Axis 0 of the output is not the batch, and the graph cannot say so (an unknown dim)."""
    flat = helper.make_tensor("flat", TensorProto.INT64, [1], [-1])
    nodes = [
        node("Constant", [], ["shape"], value=flat),
        node("Reshape", ["x", "shape"], ["y"]),
    ]
    return build(path, nodes, [("x", ["batch", 3], FLOAT)], [("y", [None])])


def test_an_output_whose_rows_do_not_follow_the_batch_is_found_at_warm_up(
    tmp_path: Path,
) -> None:
    path = flattened(tmp_path / "t.onnx")
    assert loaded(path).unbatched == ()
    with running_server(model_path=path, model_name="t", max_batch_size=4) as runtime:
        assert runtime.signature is not None
        assert runtime.signature.max_batch_size == 0
        client = httpclient.InferenceServerClient(f"127.0.0.1:{runtime.http_port}", concurrency=8)
        assert client.get_model_config("t")["max_batch_size"] == 0
        session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
        xs = [np.arange(3 * rows, dtype=np.float32).reshape(rows, 3) + rows for rows in (1, 2, 3)]
        pending = []
        for x in xs * 3:
            tensor = httpclient.InferInput("x", list(x.shape), "FP32")
            tensor.set_data_from_numpy(x)
            pending.append((x, client.async_infer("t", [tensor])))
        for x, request in pending:
            got = request.get_result().as_numpy("y")
            np.testing.assert_array_equal(got, session.run(None, {"x": x})[0])
            assert got.shape == (x.size,)


def test_a_batcher_never_cuts_an_output_whose_rows_are_not_the_batch() -> None:
    async def scenario() -> list[BaseException | list[Any]]:
        def run(inputs: batching.Inputs) -> list[np.ndarray]:
            return [inputs["x"].T.copy()]

        class Runner:
            def prepare(self, requests: Any, rows: int, padded: int) -> batching.Inputs:
                return batching.merge(requests, padded)

            def run(self, prepared: batching.Inputs) -> list[np.ndarray]:
                return run(prepared)

            def run_once(self, inputs: batching.Inputs) -> list[np.ndarray]:
                return run(inputs)

        batcher = batching.Batcher(
            Runner(), sizes=range(1, 5), max_delay_s=0.05, max_queue_size=8,
            stats=metrics.ModelMetrics("guard"),
        )  # fmt: skip
        batcher.start()
        requests = [batcher.submit({"x": np.ones((1, 3), np.float32)}, 1) for _ in range(2)]
        results = await asyncio.gather(*requests, return_exceptions=True)
        await batcher.stop()
        return results

    for result in asyncio.run(scenario()):
        assert isinstance(result, ValueError)
        assert "its axis 0 is not the batch" in str(result)


def state_model(path: Path) -> Path:
    """Silero-shaped: the state carries the batch on axis 1, and a scalar input."""
    nodes = [
        node("Add", ["state", "x"], ["summed"]),
        node("Mul", ["summed", "gain"], ["stateN"]),
        node("ReduceMean", ["stateN"], ["y"], axes=[0], keepdims=0),
    ]
    inputs = [("x", [None, 4], FLOAT), ("state", [2, None, 4], FLOAT), ("gain", [], FLOAT)]
    return build(path, nodes, inputs, [("y", [None, 4]), ("stateN", [2, None, 4])])


def state_inputs(rows: int, seed: int) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    return {
        "x": rng.standard_normal((rows, 4)).astype(np.float32),
        "state": rng.standard_normal((2, rows, 4)).astype(np.float32),
        "gain": np.float32(seed),
    }


@pytest.mark.parametrize("workers", [1, 2])
def test_a_model_that_cannot_be_batched_answers_each_request_alone(
    workers: int, tmp_path: Path
) -> None:
    path = state_model(tmp_path / "state.onnx")
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    samples = tmp_path / "warmup.npz"
    np.savez(samples, **state_inputs(1, 1))
    options: dict[str, Any] = {"model_path": path, "model_name": "state", "warmup_path": samples}
    serving = running_engine(workers, **options) if workers > 1 else running_server(**options)
    with serving as runtime:
        http = httpclient.InferenceServerClient(f"127.0.0.1:{runtime.http_port}")
        grpc = grpcclient.InferenceServerClient(f"127.0.0.1:{runtime.grpc_port}")
        assert http.get_model_config("state")["max_batch_size"] == 0
        assert grpc.get_model_config("state").config.max_batch_size == 0
        assert http.get_model_config("state")["input"][1]["dims"] == [2, -1, 4]

        def ask(i: int) -> dict[str, np.ndarray]:
            feeds = state_inputs(1 + i % 3, i)
            module = (httpclient, grpcclient)[i % 2]
            tensors = []
            for name, array in feeds.items():
                tensor = module.InferInput(name, list(array.shape), "FP32")
                tensor.set_data_from_numpy(np.asarray(array))
                tensors.append(tensor)
            url = f"127.0.0.1:{(runtime.http_port, runtime.grpc_port)[i % 2]}"
            result = module.InferenceServerClient(url).infer("state", tensors)
            return {name: result.as_numpy(name) for name in ("y", "stateN")}

        with futures.ThreadPoolExecutor(8) as pool:
            answers = list(pool.map(ask, range(24)))
        for i, answer in enumerate(answers):
            y, state = session.run(
                None, {k: np.asarray(v) for k, v in state_inputs(1 + i % 3, i).items()}
            )
            np.testing.assert_allclose(answer["y"], y, rtol=1e-6)
            np.testing.assert_allclose(answer["stateN"], state, rtol=1e-6)


def test_requests_that_are_not_merged_run_concurrently_up_to_the_limit() -> None:
    both_running = threading.Barrier(2, timeout=10)

    def run(inputs: batching.Inputs) -> list[np.ndarray]:
        both_running.wait()  # only returns once two runs are in flight at the same time
        return [inputs["x"] + 1]

    async def scenario() -> list[list[np.ndarray]]:
        unbatched = batching.Unbatched(
            run, concurrency=2, max_queue_size=4, stats=metrics.ModelMetrics("alone")
        )
        unbatched.start()
        feeds = [{"x": np.full((2, 3), i, np.float32)} for i in range(2)]
        results = await asyncio.gather(*(unbatched.submit(f, 1) for f in feeds))
        with pytest.raises(batching.QueueFullError):
            for _ in range(5):
                unbatched.enqueue({"x": np.zeros((1, 1), np.float32)}, 1)
        await unbatched.stop()
        return results

    results = asyncio.run(scenario())
    assert [r[0].tolist() for r in results] == [[[1.0] * 3] * 2, [[2.0] * 3] * 2]


DIMS = st.one_of(st.integers(0, 5), st.sampled_from(["batch", "n", "m", "?"]), st.none())
TENSOR = st.tuples(st.sampled_from(["a", "b", "c"]), st.lists(DIMS, max_size=4))


@settings(max_examples=300, derandomize=True, deadline=None)
@given(inputs=st.lists(TENSOR, min_size=1, max_size=4), outputs=st.lists(TENSOR, max_size=4))
def test_batchable_exactly_when_axis_0_is_a_batch_axis_everywhere(
    inputs: list[tuple[str, list[Dim]]], outputs: list[tuple[str, list[Dim]]]
) -> None:
    """Generated signatures against the rule stated plainly: every tensor has a first dim
    that is not fixed, and no input's named first dim shows up on another axis."""
    symbols = {dims[0] for _, dims in inputs if dims and dims[0] not in (None, "?")}
    symbols = {s for s in symbols if isinstance(s, str)}
    tensors = inputs + outputs
    batchable = all(dims and not isinstance(dims[0], int) for _, dims in tensors) and not any(
        dim in symbols for _, dims in tensors for dim in dims[1:]
    )
    problems = model.batch_problems(inputs, outputs)
    assert (problems == ()) == batchable, problems

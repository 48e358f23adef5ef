"""A front-end worker survives any error of one request, and a dead worker is replaced.

The engine runs in this process with real worker processes in front of it; errors are
injected into the engine's queue (the batcher), where a real fault would surface.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import time
from collections.abc import Iterator
from concurrent import futures
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from runtime_fixtures import examples, get, on_servers_loop, post, running_engine

from modeldeploy_runtime import batching, ipc, server

POISON = 999.0


def infer_body(x: np.ndarray[Any, Any]) -> bytes:
    tensor = {"name": "x", "datatype": "FP32", "shape": list(x.shape), "data": x.ravel().tolist()}
    return json.dumps({"inputs": [tensor]}).encode()


def infer(port: int, x: np.ndarray[Any, Any]) -> tuple[int, dict[str, Any]]:
    status, body = post(f"http://127.0.0.1:{port}/v2/models/mlp/infer", infer_body(x))
    return status, json.loads(body)


@pytest.fixture
def engine(mlp_model: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[server.Engine]:
    with running_engine(2, model_path=mlp_model, model_name="mlp", max_batch_size=8) as runtime:
        batcher = runtime._backend.batcher
        assert batcher is not None
        enqueue = batcher.enqueue

        def faulty(inputs: batching.Inputs, size: int) -> asyncio.Future[list[Any]]:
            if float(np.asarray(inputs["x"]).flat[0]) == POISON:
                raise RuntimeError("injected fault in the queue")
            return enqueue(inputs, size)

        monkeypatch.setattr(batcher, "enqueue", faulty)
        yield runtime


def test_an_error_while_queueing_fails_only_that_request_with_its_reason(
    engine: server.Engine,
) -> None:
    poisoned = examples(1)
    poisoned[0, 0] = POISON
    # Enough requests, on fresh connections, that both workers meet the poison and then serve.
    bodies = [poisoned if i % 3 == 0 else examples(1 + i % 2, seed=i) for i in range(30)]
    with futures.ThreadPoolExecutor(6) as pool:
        answers = list(pool.map(lambda x: infer(engine.http_port, x), bodies))
    for x, (status, body) in zip(bodies, answers, strict=True):
        if x is poisoned:
            assert status == 500
            assert "injected fault in the queue" in body["error"]
        else:
            assert status == 200, body
            assert np.asarray(body["outputs"][0]["data"]).size == len(x) * 4
    # Every worker still serves afterwards.
    later = [infer(engine.http_port, examples(1, seed=i)) for i in range(12)]
    assert all(status == 200 for status, _ in later)


def test_a_worker_that_dies_is_started_again_and_serving_goes_on(engine: server.Engine) -> None:
    victim = engine._workers[0].process
    os.kill(victim.pid, signal.SIGKILL)
    deadline = time.monotonic() + 30
    while engine._workers[0].process is victim:
        assert time.monotonic() < deadline, "the dead worker was not started again"
        time.sleep(0.1)
    replacement = engine._workers[0].process
    assert replacement.poll() is None
    while time.monotonic() < deadline:
        try:
            status, _ = get(f"http://127.0.0.1:{engine.http_port}/v2/health/ready")
            statuses = [infer(engine.http_port, examples(1, seed=i))[0] for i in range(12)]
        except OSError:
            # Until a worker listens again (the other may be restarting too, on a busy machine).
            statuses, status = [], 0
        if status == 200 and statuses and all(s == 200 for s in statuses):
            break
        time.sleep(0.2)
    else:
        raise AssertionError("serving did not recover after the worker died")


def test_a_worker_whose_link_to_the_engine_fails_exits_and_is_started_again(
    engine: server.Engine,
) -> None:
    child = engine._workers[1]
    victim = child.process
    # A result for a request the worker never sent: its link can no longer be trusted.
    on_servers_loop(lambda: child.channel.send((ipc.RESULTS, 10**9, True, [])))
    assert victim.wait(30) == 1
    deadline = time.monotonic() + 30
    while engine._workers[1].process is victim:
        assert time.monotonic() < deadline, "the worker was not started again"
        time.sleep(0.1)
    while time.monotonic() < deadline:
        statuses = [infer(engine.http_port, examples(1, seed=i))[0] for i in range(12)]
        if all(s == 200 for s in statuses):
            return
        time.sleep(0.2)
    raise AssertionError("serving did not recover after the worker's link failed")

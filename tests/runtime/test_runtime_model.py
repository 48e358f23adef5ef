"""The ONNX Runtime sessions: thread count from the CPUs the process may use; batch buffers."""

from __future__ import annotations

import logging
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from runtime_fixtures import examples

from modeldeploy_runtime import model, runner, settings


def test_threads_follow_the_affinity_mask(mlp_model: Path) -> None:
    """Pinned to one core (taskset, a cpuset), the session gets one intra-op thread."""
    code = (
        "import logging,os,pathlib,sys\n"
        "os.sched_setaffinity(0, {min(os.sched_getaffinity(0))})\n"
        "logging.basicConfig(level=logging.INFO, stream=sys.stdout)\n"
        "from modeldeploy_runtime import model, settings\n"
        "config = model.SessionConfig(device=settings.Device.CPU)\n"
        "model.OnnxModel(pathlib.Path(sys.argv[1]), config).load()\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", code, str(mlp_model)], capture_output=True, text=True, check=True
    ).stdout
    assert "with 1 intra-op threads" in out


def test_explicit_threads_win(mlp_model: Path, caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.INFO, logger=model.__name__):
        model.OnnxModel(
            mlp_model, model.SessionConfig(threads=3, device=settings.Device.CPU)
        ).load()
    assert "with 3 intra-op threads" in caplog.text


def test_cpu_limit_never_exceeds_the_affinity_mask() -> None:
    assert 1 <= model.cpu_limit() <= len(os.sched_getaffinity(0))


@pytest.mark.parametrize("bind", [None, "cpu"], ids=["merged", "bound"])
def test_batches_reuse_their_buffers_and_pad_without_leaking(
    mlp_model: Path, bind: str | None
) -> None:
    served = model.OnnxModel(mlp_model, model.SessionConfig(threads=1, device=settings.Device.CPU))
    served.load()
    session_runner = runner.SessionRunner(served, bind=bind)
    requests = [{"x": examples(1, seed=i)} for i in range(3)]
    reference = served.predict({"x": np.concatenate([r["x"] for r in requests])})[0]
    buffers = []
    for _ in range(4):
        prepared = session_runner.prepare(requests, 3, 4)
        buffers.append(id(prepared.host if bind is None else prepared.buffers))
        outputs = session_runner.run(prepared)
        assert outputs[0].shape == (4, 4)
        np.testing.assert_allclose(outputs[0][:3], reference, rtol=1e-6)
    if bind is None:
        # Merged and run in one go by one thread: one buffer per shape, no allocation per batch.
        assert len(set(buffers)) == 1
    else:
        # Pipelined (the GPU's path): two slots per shape, reused in turn.
        assert len(set(buffers)) == 2
        assert buffers[0] == buffers[2] and buffers[1] == buffers[3]

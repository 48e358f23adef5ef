"""The ONNX Runtime session's thread count follows the CPUs the process may use."""

from __future__ import annotations

import logging
import os
import subprocess
import sys
from pathlib import Path

import pytest

from modeldeploy_runtime import model, settings


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

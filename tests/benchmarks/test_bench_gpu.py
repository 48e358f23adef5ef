"""A smoke run of ``benchmarks/runtime/bench_gpu.py``: tiny models, a second per load cell.

Not a timed test: it only proves that the benchmark still builds its models, measures the
raw ceiling, starts the runtime and loads it without errors, so that it cannot rot.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

BENCH = Path(__file__).resolve().parents[2] / "benchmarks" / "runtime" / "bench_gpu.py"


def run_bench(tmp_path: Path, *extra: str) -> dict[str, Any]:
    results = tmp_path / "results.json"
    command = [
        sys.executable,
        str(BENCH),
        "--small",
        "--duration=1",
        "--connections=4",
        "--raw-duration=0.2",
        f"--workdir={tmp_path}",
        f"--json={results}",
        *extra,
    ]
    run = subprocess.run(command, capture_output=True, text=True, timeout=100)
    assert run.returncode == 0, run.stdout + run.stderr
    parsed: dict[str, Any] = json.loads(results.read_text())
    return parsed


def assert_measured(results: dict[str, Any], models: set[str]) -> None:
    assert {row["model"] for row in results["raw"]} == models
    assert all(row["examples_per_s"] > 0 for row in results["raw"])
    assert {row["model"] for row in results["ready"]} == models
    assert all(row["seconds"] > 0 for row in results["ready"])
    cells = {(row["model"], row["body"]) for row in results["served"]}
    assert cells == {(model, body) for model in models for body in ("binary", "json")}
    for row in results["served"]:
        assert row["rps"] > 0, row
        assert (row["non_2xx"], row["socket_errors"]) == (0, 0), row
        assert row["mean_batch"] >= 1, row
        assert row["served_over_raw"] > 0, row


@pytest.mark.timeout(120)
def test_smoke_run_with_the_builtin_load_generator(tmp_path: Path) -> None:
    results = run_bench(tmp_path, "--load=builtin", "--open-duration=0.3", "--open-ceiling=500")
    assert results["environment"]["wrk"] is None
    assert_measured(results, {"mlp", "resnet"})
    # The open loop's search ran for every model and body, from 250 requests/s up.
    cells = {(row["model"], row["body"]) for row in results["poisson"]}
    assert cells == {(model, body) for model in ("mlp", "resnet") for body in ("binary", "json")}
    for row in results["poisson"]:
        assert row["trials"][0][0] == 250, row
        assert 0 <= row["max_rate"] <= 500, row


@pytest.mark.timeout(120)
def test_smoke_run_with_wrk_and_front_end_workers(tmp_path: Path) -> None:
    assert shutil.which("wrk"), "wrk is missing: `make tools` installs it (Debian package wrk)"
    results = run_bench(
        tmp_path,
        "--load=wrk",
        "--no-open-loop",
        "--models=mlp",
        "--runtime-arg=--workers=2",
        "--runtime-arg=--batch-sizes=1,4,16,64",
    )
    assert results["environment"]["wrk"] == shutil.which("wrk")
    assert_measured(results, {"mlp"})

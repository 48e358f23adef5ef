"""A smoke run of ``benchmarks/runtime/bench_padding.py``: a tiny model, half a second per
cell.  Not a timed test: it proves the benchmark still builds its model, starts the runtime
in each mode and measures it, so that it cannot rot."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parents[2] / "benchmarks" / "runtime" / "bench_padding.py"


@pytest.mark.timeout(180)
def test_smoke_run_measures_every_mode(tmp_path: Path) -> None:
    results = tmp_path / "results.json"
    command = [
        sys.executable,
        str(BENCH),
        "--duration=0.5",
        "--warmup=0.2",
        "--connections=4",
        "--hidden=16",
        f"--json={results}",
    ]
    run = subprocess.run(command, capture_output=True, text=True, timeout=170)
    assert run.returncode == 0, run.stdout + run.stderr
    assert "| padded to the longest | 4 |" in run.stdout
    measured = json.loads(results.read_text())
    assert set(measured) == {"unpadded", "padded to the longest", "padded to buckets 32/64/96/128"}
    for cells in measured.values():
        assert cells["4"]["rps"] > 0 and cells["4"]["batch"] >= 1

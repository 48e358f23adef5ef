"""The command line and the process lifecycle: settings from env, readiness, SIGTERM drain."""

from __future__ import annotations

import json
import signal
import subprocess
import threading
from pathlib import Path

import numpy as np
from runtime_fixtures import (
    HEAVY_FEATURES,
    examples,
    free_port,
    post,
    runtime_command,
    start_process,
    wait_ready,
)


def test_help_lists_every_serve_flag() -> None:
    result = subprocess.run(
        runtime_command("serve", "--help"), capture_output=True, text=True, check=True
    )
    for flag in (
        "--model-path",
        "--model-name",
        "--model-version",
        "--quantization",
        "--calibration-path",
        "--max-batch-size",
        "--max-batch-delay-ms",
        "--max-queue-size",
        "--threads",
        "--device",
        "--http-port",
        "--grpc-port",
    ):
        assert flag in result.stdout
    fetch_help = subprocess.run(
        runtime_command("fetch", "--help"), capture_output=True, text=True, check=True
    )
    assert "--sha256" in fetch_help.stdout


def test_invalid_settings_exit_non_zero_naming_the_field(tmp_path: Path) -> None:
    result = subprocess.run(
        runtime_command("serve", "--model-path", str(tmp_path / "m.onnx"), "--model-name", "m"),
        capture_output=True,
        text=True,
        env={"MODELDEPLOY_MAX_BATCH_SIZE": "0", "PATH": "/usr/bin:/bin"},
    )
    assert result.returncode == 2
    assert "max_batch_size" in result.stderr


def test_sigterm_finishes_in_flight_requests_then_exits_zero(heavy_model: Path) -> None:
    http_port, grpc_port = free_port(), free_port()
    # Settings from the environment, as the Deployment sets them. The long batch delay
    # keeps the requests in flight when SIGTERM arrives.
    process = start_process(
        ["serve", "--model-path", str(heavy_model), "--http-port", str(http_port)],
        env={
            "MODELDEPLOY_MODEL_NAME": "heavy",
            "MODELDEPLOY_GRPC_PORT": str(grpc_port),
            "MODELDEPLOY_MAX_BATCH_SIZE": "64",
            "MODELDEPLOY_MAX_BATCH_DELAY_MS": "1500",
            "MODELDEPLOY_THREADS": "1",
        },
    )
    try:
        wait_ready(process, http_port)
        url = f"http://127.0.0.1:{http_port}/v2/models/heavy/infer"
        x = examples(1, features=HEAVY_FEATURES)
        body = json.dumps(
            {
                "inputs": [
                    {
                        "name": "x",
                        "shape": [1, HEAVY_FEATURES],
                        "datatype": "FP32",
                        "data": x.ravel().tolist(),
                    }
                ]
            }
        ).encode()
        results: list[tuple[int, bytes]] = []
        senders = [
            threading.Thread(target=lambda: results.append(post(url, body))) for _ in range(4)
        ]
        for sender in senders:
            sender.start()
        threading.Event().wait(0.5)
        process.send_signal(signal.SIGTERM)
        for sender in senders:
            sender.join(30)
        output, _ = process.communicate(timeout=30)
    finally:
        process.kill()
    assert process.returncode == 0, output
    assert [status for status, _ in results] == [200] * 4, results
    probabilities = json.loads(results[0][1])["outputs"][0]["data"]
    assert np.isclose(sum(probabilities), 1.0, atol=1e-4)
    assert "draining in-flight requests" in output

"""The command line and the process lifecycle: settings from env, readiness, SIGTERM drain."""

from __future__ import annotations

import contextlib
import http.client
import json
import signal
import subprocess
import threading
import time
import urllib.request
from pathlib import Path

import pytest
from runtime_fixtures import (
    HEAVY_FEATURES,
    MLP_FEATURES,
    examples,
    free_port,
    get,
    metric_value,
    post,
    running_server,
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
        "--max-queue-bytes",
        "--batch-sizes",
        "--workers",
        "--drain-seconds",
        "--cudnn-conv-algo-search",
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
        env={"MODELDEPLOY_MAX_BATCH_SIZE": "-1", "PATH": "/usr/bin:/bin"},
    )
    assert result.returncode == 2
    assert "max_batch_size" in result.stderr


def _infer_body(features: int) -> bytes:
    x = examples(1, features=features)
    tensor = {"name": "x", "shape": [1, features], "datatype": "FP32", "data": x.ravel().tolist()}
    return json.dumps({"inputs": [tensor]}).encode()


@pytest.mark.parametrize("workers", [1, 2])
def test_sigterm_under_load_loses_no_request(heavy_model: Path, workers: int) -> None:
    """Readiness turns 503 at once; serving goes on through the drain delay, while clients
    still arrive (the cluster takes a moment to drop the endpoint); nothing fails."""
    http_port, grpc_port = free_port(), free_port()
    process = start_process(
        [
            "serve",
            f"--model-path={heavy_model}",
            "--model-name=heavy",
            f"--workers={workers}",
            "--drain-seconds=2",
            f"--http-port={http_port}",
            f"--grpc-port={grpc_port}",
        ]
    )
    base = f"http://127.0.0.1:{http_port}"
    body = _infer_body(HEAVY_FEATURES)
    stop = threading.Event()
    outcomes: list[int | str] = []

    def client() -> None:
        while not stop.is_set():
            try:
                outcomes.append(post(f"{base}/v2/models/heavy/infer", body)[0])
            except OSError as error:
                outcomes.append(repr(error))

    try:
        wait_ready(process, http_port)
        clients = [threading.Thread(target=client) for _ in range(8)]
        for thread in clients:
            thread.start()
        time.sleep(1.0)
        process.send_signal(signal.SIGTERM)
        signalled = time.monotonic()
        while get(f"{base}/v2/health/ready")[0] != 503:
            time.sleep(0.01)
        not_ready_after = time.monotonic() - signalled
        # The endpoint's removal reaches the clients a moment later; until then they send.
        time.sleep(0.5)
        stop.set()
        for thread in clients:
            thread.join(30)
        output, _ = process.communicate(timeout=60)
    finally:
        process.kill()
    assert process.returncode == 0, output
    assert not_ready_after < 0.5
    assert len(outcomes) > 20
    failed = [outcome for outcome in outcomes if outcome != 200]
    assert failed == [], f"{len(failed)} of {len(outcomes)} requests failed: {failed[:5]}"
    assert "draining for 2.0 s" in output


def test_a_client_that_hangs_up_cancels_its_queued_work(slow_model: Path) -> None:
    with running_server(model_path=slow_model, model_name="mlp", max_batch_size=4) as runtime:
        url = f"http://127.0.0.1:{runtime.http_port}/v2/models/mlp/infer"
        body = _infer_body(MLP_FEATURES)

        def busy() -> None:
            urllib.request.urlopen(urllib.request.Request(url, data=body), timeout=60).read()

        # The first request keeps the model busy; the second queues behind it and hangs up.
        first = threading.Thread(target=busy)
        first.start()
        time.sleep(0.1)
        with contextlib.suppress(OSError):
            urllib.request.urlopen(urllib.request.Request(url, data=body), timeout=0.1)
        first.join(60)
        time.sleep(0.5)  # the model is free: the queued request would have run by now
        text = get(f"http://127.0.0.1:{runtime.http_port}/metrics")[1].decode()
    # Only the first request's batch ran (warm-up stays out of the metrics).
    assert metric_value(text, "modeldeploy_batch_size_count", model="mlp") == 1
    assert metric_value(text, "modeldeploy_batch_size_sum", model="mlp") == 1
    assert metric_value(text, "modeldeploy_requests_total", outcome="client_error") == 1
    assert metric_value(text, "modeldeploy_inflight_requests", model="mlp") == 0


def test_responses_during_the_drain_close_their_connections(mlp_model: Path) -> None:
    """A keep-alive client reconnects (to a pod still in the endpoints) instead of finding its
    connection closed under it when the drain ends."""
    http_port, grpc_port = free_port(), free_port()
    process = start_process(
        [
            "serve",
            f"--model-path={mlp_model}",
            "--model-name=m",
            "--drain-seconds=2",
            f"--http-port={http_port}",
            f"--grpc-port={grpc_port}",
        ]
    )
    try:
        wait_ready(process, http_port)
        connection = http.client.HTTPConnection("127.0.0.1", http_port, timeout=5)
        connection.request("GET", "/v2/health/live")
        before = connection.getresponse()
        before.read()
        process.send_signal(signal.SIGTERM)
        while get(f"http://127.0.0.1:{http_port}/v2/health/ready")[0] != 503:
            time.sleep(0.01)
        connection.request("GET", "/v2/health/live")
        during = connection.getresponse()
        during.read()
    finally:
        process.kill()
        process.communicate(timeout=60)
    assert before.status == 200 and before.getheader("Connection") != "close"
    assert during.status == 200 and during.getheader("Connection") == "close"

"""`modeldeploy serve -f md.yaml`: a ModelDeployment's model served on one machine, no cluster."""

from __future__ import annotations

import hashlib
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import tritonclient.http as triton_http
import yaml

from operator_helpers import free_port

MODELDEPLOY = str(Path(sys.executable).parent / "modeldeploy")

pytestmark = pytest.mark.e2e


def _manifest(directory: Path, demo_model: Path, **model_fields: str) -> Path:
    md = {
        "apiVersion": "modeldeploy.io/v1alpha1",
        "kind": "ModelDeployment",
        "metadata": {"name": "iris"},
        "spec": {
            "model": {"uri": f"file://{demo_model}", "version": "3", **model_fields},
            "quantization": "dynamic-int8",
            "runtime": {"maxBatchSize": 8, "maxBatchDelayMs": 2},
        },
    }
    path = directory / "md.yaml"
    path.write_text(yaml.safe_dump(md))
    return path


@pytest.fixture
def served(tmp_path: Path, demo_model: Path) -> Iterator[tuple[str, subprocess.Popen[str]]]:
    digest = hashlib.sha256(demo_model.read_bytes()).hexdigest()
    http_port, grpc_port = free_port(), free_port()
    process = subprocess.Popen(
        [MODELDEPLOY, "serve", "-f", str(_manifest(tmp_path, demo_model, sha256=digest)),
         "--http-port", str(http_port), "--grpc-port", str(grpc_port),
         "--workdir", str(tmp_path / "work")],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
    )  # fmt: skip
    url = f"127.0.0.1:{http_port}"
    client = triton_http.InferenceServerClient(url)
    deadline = time.monotonic() + 60
    while True:
        try:
            if client.is_model_ready("iris"):
                break
        except Exception:
            pass
        assert process.poll() is None, process.stdout.read() if process.stdout else ""
        assert time.monotonic() < deadline, "not ready after 60s"
        time.sleep(0.2)
    yield url, process
    process.terminate()
    process.wait(timeout=30)


def test_serves_the_verified_quantized_model_to_an_unchanged_client(
    served: tuple[str, subprocess.Popen[str]],
) -> None:
    url, process = served
    client = triton_http.InferenceServerClient(url)
    metadata = client.get_model_metadata("iris")
    assert metadata["versions"] == ["3"]
    tensor = triton_http.InferInput("input", [2, 4], "FP32")
    tensor.set_data_from_numpy(np.array([[5.0, 3.4, 1.5, 0.2], [6.6, 3.0, 5.6, 2.0]], np.float32))
    result = client.infer("iris", [tensor]).as_numpy("probabilities")
    assert result is not None and list(result.argmax(axis=1)) == [0, 2]
    process.terminate()
    assert process.wait(timeout=30) == 0


def test_a_checksum_mismatch_means_the_model_is_never_served(
    tmp_path: Path, demo_model: Path
) -> None:
    manifest = _manifest(tmp_path, demo_model, sha256="0" * 64)
    result = subprocess.run(
        [MODELDEPLOY, "serve", "-f", str(manifest), "--workdir", str(tmp_path / "w"),
         "--http-port", str(free_port()), "--grpc-port", str(free_port())],
        capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert result.returncode != 0
    assert (
        "0" * 64 in result.stderr
        and hashlib.sha256(demo_model.read_bytes()).hexdigest() in result.stderr
    )
    assert "not served" in result.stderr


def test_an_invalid_spec_is_refused_naming_the_field(tmp_path: Path, demo_model: Path) -> None:
    manifest = _manifest(tmp_path, demo_model)
    manifest.write_text(manifest.read_text().replace("dynamic-int8", "int4"))
    result = subprocess.run(
        [MODELDEPLOY, "serve", "-f", str(manifest)], capture_output=True, text=True, timeout=30
    )
    assert result.returncode == 2
    assert "spec.quantization" in result.stderr

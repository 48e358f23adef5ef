"""The five real models of issue 19, from their public wheels, served and answering right.

YOLOv8n (nudenet's 320n.onnx), PP-OCRv4 det, rec and cls (rapidocr-onnxruntime) and
silero VAD: concurrent requests of mixed shapes over HTTP binary, HTTP JSON and gRPC, each
answer compared with ONNX Runtime's own for that request alone.  YOLOv8n and silero used
to never become ready (the warm-up invented a 1x1 image and a one-sample clip).
"""

from __future__ import annotations

import logging
import subprocess
from collections.abc import Callable
from concurrent import futures
from pathlib import Path
from typing import Any

import numpy as np
import onnxruntime as ort
import pytest
import tritonclient.grpc as grpcclient
import tritonclient.http as httpclient
from runtime_fixtures import running_server, runtime_command
from wheel_models import OCR_CLS, OCR_DET, OCR_REC, SILERO_VAD, YOLOV8N, WheelModel, model_file

from modeldeploy_contract import values

Feeds = dict[str, np.ndarray[Any, Any]]
DATATYPES = {np.dtype(np.float32): "FP32", np.dtype(np.int64): "INT64"}


@pytest.fixture(scope="module")
def fetched(tmp_path_factory: pytest.TempPathFactory) -> Callable[[WheelModel], Path]:
    folder = tmp_path_factory.mktemp("wheel-models")
    return lambda model: model_file(model, folder)


def images(seed: int, *shape: int) -> np.ndarray[Any, Any]:
    return np.random.default_rng(seed).random(shape, dtype=np.float32)


def ask(protocol: str, ports: tuple[int, int], name: str, feeds: Feeds) -> list[np.ndarray]:
    """One request over ``http-binary``, ``http-json`` or ``grpc``; every output, in order."""
    module: Any = grpcclient if protocol == "grpc" else httpclient
    client = module.InferenceServerClient(f"127.0.0.1:{ports[protocol == 'grpc']}")
    tensors = []
    for key, array in feeds.items():
        tensor = module.InferInput(key, list(array.shape), DATATYPES[array.dtype])
        if protocol == "grpc":
            tensor.set_data_from_numpy(array)
        else:
            tensor.set_data_from_numpy(array, binary_data=protocol == "http-binary")
        tensors.append(tensor)
    if protocol == "grpc":
        names = [output.name for output in client.get_model_metadata(name).outputs]
        result = client.infer(name, tensors)
    else:
        names = [output["name"] for output in client.get_model_metadata(name)["outputs"]]
        binary = protocol == "http-binary"
        wanted = [httpclient.InferRequestedOutput(n, binary_data=binary) for n in names]
        result = client.infer(name, tensors, outputs=wanted)
    return [result.as_numpy(n) for n in names]


def served_right(
    path: Path, name: str, requests: list[Feeds], rtol: float = 1e-4, **options: Any
) -> int:
    """Serve the model, send every request at once over the three protocols, compare each
    answer with ONNX Runtime's for that request alone; the number of answers checked."""
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    protocols = ["http-binary", "http-json", "grpc"]
    with running_server(model_path=path, model_name=name, **options) as runtime:
        ports = (runtime.http_port, runtime.grpc_port)
        with futures.ThreadPoolExecutor(len(requests)) as pool:
            answers = list(
                pool.map(
                    lambda item: ask(protocols[item[0] % 3], ports, name, item[1]),
                    enumerate(requests),
                )
            )
    for feeds, answer in zip(requests, answers, strict=True):
        for got, want in zip(answer, session.run(None, feeds), strict=True):
            assert got.shape == want.shape
            scale = max(1.0, float(np.abs(want).max()))
            np.testing.assert_allclose(got, want, rtol=rtol, atol=rtol * scale)
    return len(answers)


def test_yolov8n_is_ready_without_inventing_an_image_and_answers_right(
    fetched: Callable[[WheelModel], Path], caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO)
    shapes = [(1, 3, 320, 320), (2, 3, 256, 320), (1, 3, 160, 224)]
    requests = [{"images": images(i, *shapes[i % 3])} for i in range(9)]
    path = fetched(YOLOV8N)
    assert served_right(path, "yolo", requests, max_batch_size=4) == 9
    assert "no warm-up: input dims unknown (images [-1, 3, -1, -1]" in caplog.text


def test_yolov8n_warms_up_at_the_shapes_given(
    fetched: Callable[[WheelModel], Path], caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO)
    warmup = {"warmup_shapes": '{"images": [1, 3, 320, 320]}', "max_batch_size": 2}
    requests = [{"images": images(i, 1, 3, 320, 320)} for i in range(3)]
    assert served_right(fetched(YOLOV8N), "yolo", requests, **warmup) == 3
    assert "warmed up with the warm-up shapes at batch sizes [1, 2]" in caplog.text


def test_an_impossible_warm_up_asked_for_stops_the_start_with_the_models_error(
    fetched: Callable[[WheelModel], Path],
) -> None:
    result = subprocess.run(
        runtime_command(
            "serve", f"--model-path={fetched(YOLOV8N)}", "--model-name=yolo", "--http-port=0",
            "--grpc-port=0", "--warmup-shapes", '{"images": [1, 3, 1, 1]}',
        ),
        capture_output=True,
        text=True,
        env={"MODELDEPLOY_HOST": "127.0.0.1", "PATH": "/usr/bin:/bin"},
        timeout=120,
    )  # fmt: skip
    assert result.returncode == values.EXIT_WARMUP_FAILED
    assert "the warm-up with the warm-up shapes failed" in result.stderr
    assert "Concat" in result.stderr


def test_pp_ocrv4_det_rec_and_cls_answer_right(fetched: Callable[[WheelModel], Path]) -> None:
    det = [{"x": images(i, *s)} for i, s in enumerate([(1, 3, 96, 160), (2, 3, 128, 128)] * 3)]
    rec = [{"x": images(i, *s)} for i, s in enumerate([(1, 3, 48, 160), (3, 3, 48, 80)] * 3)]
    cls = [{"x": images(i, 1 + i % 3, 3, 48, 192)} for i in range(6)]
    checked = served_right(fetched(OCR_DET), "det", det, max_batch_size=4)
    checked += served_right(fetched(OCR_REC), "rec", rec, max_batch_size=4)
    checked += served_right(fetched(OCR_CLS), "cls", cls, max_batch_size=4)
    assert checked == 18


def vad(seed: int, clips: int) -> Feeds:
    audio = np.random.default_rng(seed).standard_normal((clips, 512)).astype(np.float32)
    state = np.random.default_rng(seed + 1).standard_normal((2, clips, 128)).astype(np.float32)
    return {"input": audio * 0.1, "state": state * 0.1, "sr": np.array(16000, np.int64)}


def test_silero_vad_is_served_unbatched_and_answers_right(
    fetched: Callable[[WheelModel], Path], tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO)
    samples = tmp_path / "vad.npz"
    np.savez(samples, **vad(0, 1))
    path = fetched(SILERO_VAD)
    requests = [vad(i, 1 + i % 3) for i in range(9)]
    assert served_right(path, "vad", requests, warmup_path=samples) == 9
    assert "requests are not merged: input 'state' has a fixed first dim of 2" in caplog.text
    assert "input 'sr' is a scalar (rank 0)" in caplog.text
    assert "warmed up with the warm-up samples vad.npz" in caplog.text
    with running_server(model_path=path, model_name="vad") as runtime:
        client = httpclient.InferenceServerClient(f"127.0.0.1:{runtime.http_port}")
        assert client.get_model_config("vad")["max_batch_size"] == 0
    assert "no warm-up: input dims unknown" in caplog.text

"""The peer servers of the benchmark; runs in the benchmark's own virtualenv.

    python peers.py triton|mlserver|naive MODEL.onnx NAME HTTP_PORT

Each serves POST /v2/models/NAME/infer with v2 JSON, ONNX Runtime on one intra-op
thread (the server is pinned to one core), batching like ours where the server has
it: at most 32 examples, at most 5 ms of waiting.
"""

# No `from __future__ import annotations`: FastAPI resolves the handler's annotations.
import json
import sys
import tempfile
from pathlib import Path
from typing import Any

import numpy as np
import onnxruntime as ort

MAX_BATCH = 32
MAX_DELAY_S = 0.005


def session(path: str) -> ort.InferenceSession:
    options = ort.SessionOptions()
    options.intra_op_num_threads = 1
    options.inter_op_num_threads = 1
    options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    return ort.InferenceSession(path, options, providers=["CPUExecutionProvider"])


def triton(path: str, name: str, port: int) -> None:
    from pytriton.decorators import batch
    from pytriton.model_config import DynamicBatcher, ModelConfig, Tensor
    from pytriton.triton import Triton, TritonConfig

    model = session(path)
    features = model.get_inputs()[0].shape[1]

    @batch
    def infer(x: np.ndarray) -> dict[str, np.ndarray]:
        return {"probabilities": model.run(None, {"x": x})[0]}

    config = TritonConfig(
        http_address="127.0.0.1", http_port=port,
        grpc_address="127.0.0.1", grpc_port=port + 1,
        metrics_address="127.0.0.1", metrics_port=port + 2,
    )  # fmt: skip
    with Triton(config=config) as server:
        server.bind(
            model_name=name,
            infer_func=infer,
            inputs=[Tensor(name="x", dtype=np.float32, shape=(features,))],
            outputs=[Tensor(name="probabilities", dtype=np.float32, shape=(-1,))],
            config=ModelConfig(
                max_batch_size=MAX_BATCH,
                batcher=DynamicBatcher(max_queue_delay_microseconds=int(MAX_DELAY_S * 1e6)),
            ),
        )
        server.serve()


def mlserver(path: str, name: str, port: int) -> None:
    import subprocess

    root = Path(tempfile.mkdtemp(prefix="mlserver-"))
    (root / "settings.json").write_text(
        json.dumps(
            {
                "host": "127.0.0.1",
                "http_port": port,
                "grpc_port": port + 1,
                "metrics_port": port + 2,
                # One core: a separate inference worker process would only add hops.
                "parallel_workers": 0,
            }
        )
    )
    model_dir = root / name
    model_dir.mkdir()
    (model_dir / "model-settings.json").write_text(
        json.dumps(
            {
                "name": name,
                "implementation": "peer_mlserver.MLServerOnnx",
                "max_batch_size": MAX_BATCH,
                "max_batch_time": MAX_DELAY_S,
                "parameters": {"uri": path},
            }
        )
    )
    env = {**__import__("os").environ, "PYTHONPATH": str(Path(__file__).parent)}
    subprocess.run([str(Path(sys.executable).parent / "mlserver"), "start", str(root)], env=env)


def naive(path: str, name: str, port: int) -> None:
    import uvicorn
    from fastapi import FastAPI, Request

    model = session(path)
    app = FastAPI()

    @app.get("/v2/models/{model_name}/ready")
    async def ready() -> dict[str, bool]:
        return {"ready": True}

    @app.post("/v2/models/{model_name}/infer")
    async def infer(model_name: str, request: Request) -> dict[str, Any]:
        body = await request.json()
        tensor = body["inputs"][0]
        x = np.asarray(tensor["data"], dtype=np.float32).reshape(tensor["shape"])
        y = model.run(None, {"x": x})[0]
        return {
            "model_name": model_name,
            "outputs": [
                {
                    "name": "probabilities",
                    "datatype": "FP32",
                    "shape": list(y.shape),
                    "data": y.ravel().tolist(),
                }
            ],
        }

    uvicorn.run(app, host="127.0.0.1", port=port, log_level="warning", access_log=False)


if __name__ == "__main__":
    kind, model_path, model_name, http_port = sys.argv[1:5]
    {"triton": triton, "mlserver": mlserver, "naive": naive}[kind](
        model_path, model_name, int(http_port)
    )

"""Ports, probe paths, the pod's volume paths, and where a fetched artifact lands."""

from __future__ import annotations

from pathlib import PurePosixPath
from urllib.parse import unquote, urlsplit

HTTP_PORT = 8080
GRPC_PORT = 8081

LIVE_PATH = "/v2/health/live"
READY_PATH = "/v2/health/ready"
METRICS_PATH = "/metrics"

# The shared volume the init containers fetch into and the server reads from.
MODELS_DIR = "/models"
MODEL_DIR = f"{MODELS_DIR}/model"
CALIBRATION_DIR = f"{MODELS_DIR}/calibration"
WARMUP_DIR = f"{MODELS_DIR}/warmup"
VALIDATION_DIR = f"{MODELS_DIR}/validation"
TMP_DIR = "/tmp"
# Where a quantized model is cached when the model's own folder is read-only.
CACHE_DIR = f"{TMP_DIR}/modeldeploy-cache"
# pvc://<claim>/<path> is read from <PVC_ROOT>/<claim>/<path>: each claim is mounted there.
PVC_ROOT = "/mnt/pvc"


def artifact_name(uri: str) -> str:
    """The file name `fetch` writes the artifact at `uri` under: the last segment of its path,
    %-escapes decoded, query and fragment ignored (`.../my%20model?sig=x` -> `my model`).

    Raises ValueError when the path names no file (`s3://bucket`, `https://host/dir/`).
    """
    path = unquote(urlsplit(uri).path)
    name = PurePosixPath(path).name
    if not name or name in (".", "..") or path.endswith("/"):
        raise ValueError("does not name a file")
    return name


def artifact_path(directory: str, uri: str) -> str:
    """Where `fetch --dest directory` puts the artifact at `uri`."""
    return str(PurePosixPath(directory) / artifact_name(uri))

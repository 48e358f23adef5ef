"""The runtime's command line: commands, flag and environment names.

Every runtime setting is a field name (`max_batch_size`); its flag is `--max-batch-size` and its
environment variable `MODELDEPLOY_MAX_BATCH_SIZE`. A flag given on the command line wins.
"""

from __future__ import annotations

from collections.abc import Mapping

COMMAND = "modeldeploy-runtime"
FETCH = "fetch"
SERVE = "serve"
ENV_PREFIX = "MODELDEPLOY_"

# fetch
URI = "uri"
SHA256 = "sha256"
DEST = "dest"
MAX_BYTES = "max_bytes"
PVC_ROOT = "pvc_root"  # environment only

# serve
MODEL_PATH = "model_path"
MODEL_NAME = "model_name"
MODEL_VERSION = "model_version"
QUANTIZATION = "quantization"
CALIBRATION_PATH = "calibration_path"
WARMUP_PATH = "warmup_path"
WARMUP_SHAPES = "warmup_shapes"
VALIDATION_PATH = "validation_path"
MIN_AGREEMENT = "min_agreement"
MIN_ACCURACY = "min_accuracy"
VALIDATION_TOLERANCE = "validation_tolerance"
MAX_BATCH_SIZE = "max_batch_size"
MAX_BATCH_DELAY_MS = "max_batch_delay_ms"
MAX_QUEUE_SIZE = "max_queue_size"
MAX_QUEUE_BYTES = "max_queue_bytes"
BATCH_SIZES = "batch_sizes"
WORKERS = "workers"
THREADS = "threads"
DEVICE = "device"
CUDNN_CONV_ALGO_SEARCH = "cudnn_conv_algo_search"
DRAIN_SECONDS = "drain_seconds"
HTTP_PORT = "http_port"
GRPC_PORT = "grpc_port"
# The HTTP routes are also served under this prefix (the Ingress or HTTPRoute path).
PATH_PREFIX = "path_prefix"
# Variable-length batching: a JSON object {"inputs": {name: {"axis": 1, "value": 0}},
# "outputs": {name: axis}, "buckets": [lengths]}, as spec.runtime.padding.
PADDING = "padding"
# Environment only: local choices of the machine, not of the ModelDeployment.
HOST = "host"
CACHE_DIR = "cache_dir"
MAX_REQUEST_BYTES = "max_request_bytes"

FETCH_FLAGS = (URI, SHA256, DEST, MAX_BYTES)
SERVE_FLAGS = (
    MODEL_PATH,
    MODEL_NAME,
    MODEL_VERSION,
    QUANTIZATION,
    CALIBRATION_PATH,
    WARMUP_PATH,
    WARMUP_SHAPES,
    VALIDATION_PATH,
    MIN_AGREEMENT,
    MIN_ACCURACY,
    VALIDATION_TOLERANCE,
    MAX_BATCH_SIZE,
    MAX_BATCH_DELAY_MS,
    MAX_QUEUE_SIZE,
    MAX_QUEUE_BYTES,
    BATCH_SIZES,
    WORKERS,
    THREADS,
    DEVICE,
    CUDNN_CONV_ALGO_SEARCH,
    DRAIN_SECONDS,
    HTTP_PORT,
    GRPC_PORT,
    PATH_PREFIX,
    PADDING,
)


def flag(field: str) -> str:
    """`max_batch_size` -> `--max-batch-size`."""
    return "--" + field.replace("_", "-")


def env(field: str) -> str:
    """`max_batch_size` -> `MODELDEPLOY_MAX_BATCH_SIZE`."""
    return ENV_PREFIX + field.upper()


def argv(command: str, settings: Mapping[str, str]) -> list[str]:
    """`[command, --flag, value, ...]` for the settings that have flags, in the mapping's order.

    A setting without a flag (`host`, `cache_dir`, ...) is an error here: it goes into the
    environment (`env`), never onto the command line.
    """
    known = FETCH_FLAGS if command == FETCH else SERVE_FLAGS
    unknown = sorted(set(settings) - set(known))
    if unknown:
        raise ValueError(f"{COMMAND} {command} has no flag for {', '.join(unknown)}")
    args = [command]
    for field, value in settings.items():
        args += [flag(field), value]
    return args

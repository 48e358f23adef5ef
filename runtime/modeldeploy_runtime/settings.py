"""Runtime settings: every field is an environment variable ``MODELDEPLOY_<FIELD>``.

The ``serve`` and ``fetch`` command-line flags map one to one onto these fields
(``--max-batch-size`` -> ``max_batch_size`` -> ``MODELDEPLOY_MAX_BATCH_SIZE``); a flag
given on the command line wins over the environment.  A few tuning knobs have no
flag on purpose (the flag set is part of the operator contract) and are read from
the environment only: ``MODELDEPLOY_HOST``, ``MODELDEPLOY_MAX_REQUEST_BYTES``,
``MODELDEPLOY_CACHE_DIR``, ``MODELDEPLOY_PVC_ROOT``.
"""

from __future__ import annotations

import enum
from pathlib import Path

import pydantic
from pydantic_settings import BaseSettings, SettingsConfigDict

from modeldeploy_contract import flags, paths, values


class Quantization(enum.StrEnum):
    NONE = "none"
    DYNAMIC_INT8 = "dynamic-int8"
    STATIC_INT8 = "static-int8"


class Device(enum.StrEnum):
    AUTO = "auto"
    CPU = "cpu"
    CUDA = "cuda"


_CONFIG = SettingsConfigDict(env_prefix=flags.ENV_PREFIX, frozen=True, extra="forbid")


class ServeSettings(BaseSettings):
    model_config = _CONFIG

    model_path: Path
    model_name: str = pydantic.Field(
        min_length=1, max_length=values.MODEL_NAME_MAX_LENGTH, pattern=values.MODEL_NAME_PATTERN
    )
    model_version: str = pydantic.Field(default=values.DEFAULT_MODEL_VERSION, min_length=1)
    quantization: Quantization = Quantization.NONE
    calibration_path: Path | None = None
    max_batch_size: int = pydantic.Field(default=values.MAX_BATCH_SIZE, ge=1)
    max_batch_delay_ms: float = pydantic.Field(default=values.MAX_BATCH_DELAY_MS, ge=0)
    max_queue_size: int = pydantic.Field(default=values.MAX_QUEUE_SIZE, ge=1)
    threads: int = pydantic.Field(default=values.THREADS, ge=0)
    device: Device = Device.AUTO
    http_port: int = pydantic.Field(default=paths.HTTP_PORT, ge=0, le=65535)
    grpc_port: int = pydantic.Field(default=paths.GRPC_PORT, ge=0, le=65535)

    host: str = "0.0.0.0"
    # Bodies above this get 413; it bounds the memory one request can take.
    max_request_bytes: int = pydantic.Field(default=64 * 1024 * 1024, ge=1024)
    # Used for quantized models when the model's own directory is read-only
    # (the pod's root filesystem is read-only; the model volume may be too).
    cache_dir: Path = Path(paths.CACHE_DIR)

    @pydantic.model_validator(mode="after")
    def _static_needs_calibration(self) -> ServeSettings:
        if self.quantization is Quantization.STATIC_INT8 and self.calibration_path is None:
            raise ValueError("quantization static-int8 needs calibration_path (.npz of inputs)")
        return self


class FetchSettings(BaseSettings):
    model_config = _CONFIG

    uri: str = pydantic.Field(min_length=1)
    sha256: str | None = pydantic.Field(default=None, pattern=values.SHA256_PATTERN)
    dest: Path
    # pvc://<claim>/<path> is read from <pvc_root>/<claim>/<path>: the Deployment
    # mounts each claim there read-only.
    pvc_root: Path = Path(paths.PVC_ROOT)

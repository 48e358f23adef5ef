"""Runtime settings: every field is an environment variable ``MODELDEPLOY_<FIELD>``.

The ``serve`` and ``fetch`` command-line flags map one to one onto these fields
(``--max-batch-size`` -> ``max_batch_size`` -> ``MODELDEPLOY_MAX_BATCH_SIZE``); a flag
given on the command line wins over the environment.  A few tuning knobs have no
flag on purpose (the flag set is part of the operator contract) and are read from
the environment only: ``MODELDEPLOY_HOST``, ``MODELDEPLOY_MAX_REQUEST_BYTES``,
``MODELDEPLOY_CACHE_DIR``, ``MODELDEPLOY_PVC_ROOT``, ``MODELDEPLOY_CUDA_DEVICE_ID``,
``MODELDEPLOY_CUDA_MEM_LIMIT_BYTES``, ``MODELDEPLOY_PROFILE_DIR``.
"""

from __future__ import annotations

import enum
import json
from pathlib import Path
from typing import Annotated, Any

import pydantic
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict

from modeldeploy_contract import flags, paths, values

# Flags given as JSON, and what each looks like (for the error).
_JSON_EXAMPLES = {
    "padding": '{"inputs": {"ids": {"axis": 1}}}',
    "warmup_shapes": '{"x": [1, 3, 224, 224]}',
}


class Quantization(enum.StrEnum):
    NONE = "none"
    DYNAMIC_INT8 = "dynamic-int8"
    STATIC_INT8 = "static-int8"
    FP16 = "fp16"


class Device(enum.StrEnum):
    AUTO = "auto"
    CPU = "cpu"
    CUDA = "cuda"


class ConvAlgoSearch(enum.StrEnum):
    """cuDNN's convolution algorithm search (ONNX Runtime's ``cudnn_conv_algo_search``)."""

    EXHAUSTIVE = "EXHAUSTIVE"
    HEURISTIC = "HEURISTIC"
    DEFAULT = "DEFAULT"


# Where prometheus-client keeps every process's series when there are front-end workers; it
# must be set before prometheus-client is imported (it picks its storage at import time).
METRICS_DIR_ENV = "PROMETHEUS_MULTIPROC_DIR"

_CONFIG = SettingsConfigDict(env_prefix=flags.ENV_PREFIX, frozen=True, extra="forbid")


class PaddedInput(pydantic.BaseModel):
    model_config = pydantic.ConfigDict(frozen=True, extra="forbid")

    # Axis 0 is the batch.
    axis: int = pydantic.Field(ge=1)
    value: float = 0


class Padding(pydantic.BaseModel):
    """Variable-length batching (``flags.PADDING``, a JSON object of these fields)."""

    model_config = pydantic.ConfigDict(frozen=True, extra="forbid")

    inputs: dict[str, PaddedInput] = pydantic.Field(min_length=1)
    # Output name -> the axis cut back; by default outputs whose axis the model names like
    # a padded input's axis.
    outputs: dict[str, Annotated[int, pydantic.Field(ge=1)]] = {}
    buckets: tuple[Annotated[int, pydantic.Field(ge=1)], ...] = ()

    @pydantic.field_validator("buckets")
    @classmethod
    def _sorted(cls, value: tuple[int, ...]) -> tuple[int, ...]:
        return tuple(sorted(set(value)))


class ServeSettings(BaseSettings):
    model_config = _CONFIG

    model_path: Path
    model_name: str = pydantic.Field(
        min_length=1, max_length=values.MODEL_NAME_MAX_LENGTH, pattern=values.MODEL_NAME_PATTERN
    )
    model_version: str = pydantic.Field(default=values.DEFAULT_MODEL_VERSION, min_length=1)
    quantization: Quantization = Quantization.NONE
    calibration_path: Path | None = None
    # 0: requests are never merged; each runs alone (also chosen when the graph says so).
    max_batch_size: int = pydantic.Field(default=values.MAX_BATCH_SIZE, ge=0)
    # Every batch is padded up to one of these sizes, so the session only ever sees them.
    # None: powers of two up to max_batch_size on a GPU, every size (no padding) on CPU.
    batch_sizes: Annotated[tuple[int, ...] | None, NoDecode] = None
    # What to warm up with: one request's inputs (.npz), or their shapes (zeros); without
    # them the model's own dims, when all are known.  Never invented (README: warm-up).
    warmup_path: Path | None = None
    warmup_shapes: Annotated[dict[str, tuple[int, ...]] | None, NoDecode] = None
    # The accuracy gate (validation.py): samples (.npz), and the floors the served model must
    # reach on them before the pod is ever Ready.
    validation_path: Path | None = None
    min_agreement: float | None = pydantic.Field(default=None, ge=0, le=1)
    min_accuracy: float | None = pydantic.Field(default=None, ge=0, le=1)
    validation_tolerance: float = pydantic.Field(default=values.VALIDATION_TOLERANCE, gt=0)
    max_batch_delay_ms: float = pydantic.Field(default=values.MAX_BATCH_DELAY_MS, ge=0)
    max_queue_size: int = pydantic.Field(default=values.MAX_QUEUE_SIZE, ge=1)
    # Bytes of queued request tensors; beyond it requests get 429 / RESOURCE_EXHAUSTED.
    max_queue_bytes: int = pydantic.Field(default=256 * 1024 * 1024, ge=1024 * 1024)
    threads: int = pydantic.Field(default=values.THREADS, ge=0)
    # Front-end processes that accept and decode requests; 0 derives them (worker_count).
    workers: int = pydantic.Field(default=0, ge=0, le=64)
    device: Device = Device.AUTO
    cudnn_conv_algo_search: ConvAlgoSearch = ConvAlgoSearch.EXHAUSTIVE
    # After SIGTERM: readiness 503 at once, serving on for this long (endpoint removal takes
    # time), then the listeners close and in-flight requests get frontend.FINISH_SECONDS.
    drain_seconds: float = pydantic.Field(default=values.DRAIN_SECONDS, ge=0, le=300)
    http_port: int = pydantic.Field(default=paths.HTTP_PORT, ge=0, le=65535)
    grpc_port: int = pydantic.Field(default=paths.GRPC_PORT, ge=0, le=65535)
    # The HTTP routes are served under this prefix as well as at the root (where the probes and
    # the Service's clients find them), so that an Ingress or HTTPRoute needs no rewrite.
    path_prefix: str = pydantic.Field(default="", pattern=values.PATH_PREFIX_PATTERN)
    # Opt-in: requests of different lengths share batches, padded (batching.Padding).
    padding: Annotated[Padding | None, NoDecode] = None

    host: str = "0.0.0.0"
    # Bodies above this get 413; it bounds the memory one request can take.
    max_request_bytes: int = pydantic.Field(default=64 * 1024 * 1024, ge=1024)
    # Used for quantized models when the model's own directory is read-only
    # (the pod's root filesystem is read-only; the model volume may be too).
    cache_dir: Path = Path(paths.CACHE_DIR)
    # The GPU to use among those visible (the device plugin makes the pod's GPUs 0..n-1).
    cuda_device_id: int = pydantic.Field(default=0, ge=0)
    # Upper bound of ONNX Runtime's CUDA memory arena; 0 = no bound.
    cuda_mem_limit_bytes: int = pydantic.Field(default=0, ge=0)
    # When set, ONNX Runtime writes a profile of every run here (for tuning, and the tests).
    profile_dir: Path | None = None

    @pydantic.field_validator("batch_sizes", mode="before")
    @classmethod
    def _parse_sizes(cls, value: Any) -> Any:
        if isinstance(value, str):
            try:
                return tuple(int(part) for part in value.replace(" ", "").split(",") if part)
            except ValueError:
                raise ValueError(
                    f"batch_sizes must be a comma-separated list of integers, not {value!r}"
                ) from None
        return value

    @pydantic.field_validator("padding", "warmup_shapes", mode="before")
    @classmethod
    def _parse_json(cls, value: Any, info: pydantic.ValidationInfo) -> Any:
        if isinstance(value, str):
            example = _JSON_EXAMPLES[info.field_name or ""]
            try:
                return json.loads(value)
            except ValueError:
                raise ValueError(
                    f"{info.field_name} must be a JSON object, e.g. {example}, not {value!r}"
                ) from None
        return value

    @pydantic.field_validator("warmup_shapes")
    @classmethod
    def _check_shapes(cls, value: dict[str, tuple[int, ...]] | None) -> Any:
        if value is not None and any(d < 0 for shape in value.values() for d in shape):
            raise ValueError("warmup_shapes: every dim must be a size, at least 0")
        return value

    @pydantic.field_validator("batch_sizes")
    @classmethod
    def _check_sizes(cls, value: tuple[int, ...] | None) -> tuple[int, ...] | None:
        if value is None:
            return None
        if not value or any(size < 1 for size in value):
            raise ValueError("batch_sizes must hold at least one size, every size at least 1")
        return tuple(sorted(set(value)))

    @pydantic.model_validator(mode="after")
    def _consistent(self) -> ServeSettings:
        if self.quantization is Quantization.STATIC_INT8 and self.calibration_path is None:
            raise ValueError("quantization static-int8 needs calibration_path (.npz of inputs)")
        if self.warmup_path is not None and self.warmup_shapes is not None:
            raise ValueError("give warmup_path or warmup_shapes, not both")
        floors = self.min_agreement is not None or self.min_accuracy is not None
        if floors and self.validation_path is None:
            raise ValueError("min_agreement and min_accuracy need validation_path (.npz samples)")
        if self.batch_sizes is not None and self.batch_sizes[-1] != self.max_batch_size:
            raise ValueError(
                f"the largest of batch_sizes {list(self.batch_sizes)} must equal "
                f"max_batch_size {self.max_batch_size}"
            )
        return self

    def sizes_for(self, device: str) -> tuple[int, ...]:
        """The batch sizes the session runs at: given, or the default for the device."""
        if self.batch_sizes is not None:
            return self.batch_sizes
        if self.max_batch_size == 0:
            return ()
        if device != Device.CUDA:
            # On CPU a padded row costs as much as a real one: run every size as it comes.
            return tuple(range(1, self.max_batch_size + 1))
        sizes = {self.max_batch_size}
        size = 1
        while size < self.max_batch_size:
            sizes.add(size)
            size *= 2
        return tuple(sorted(sizes))

    def worker_count(self, device: str, cpus: int) -> int:
        """Front-end processes: given, else one per two CPUs beside the engine on a GPU.

        On CPU the model's own threads need every core, and one process serving in-process
        measured fastest (see the README's benchmark section), so CPU pods keep one.
        """
        if self.workers:
            return self.workers
        if device != Device.CUDA:
            return 1
        return max(1, min(8, (cpus - 1) // 2))


class FetchSettings(BaseSettings):
    model_config = _CONFIG

    uri: str = pydantic.Field(min_length=1)
    sha256: str | None = pydantic.Field(default=None, pattern=values.SHA256_PATTERN)
    dest: Path
    # The download stops (and fails) past this many bytes.
    max_bytes: int | None = pydantic.Field(default=None, ge=1)
    # pvc://<claim>/<path> is read from <pvc_root>/<claim>/<path>: the Deployment
    # mounts each claim there read-only.
    pvc_root: Path = Path(paths.PVC_ROOT)

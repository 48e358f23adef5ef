"""The model abstraction: an ONNX Runtime session with ``load``/``predict``/``unload``."""

from __future__ import annotations

import dataclasses
import logging
import math
import os
from collections.abc import Mapping
from pathlib import Path

import numpy as np
import numpy.typing as npt
import onnxruntime as ort

from modeldeploy_runtime import settings

logger = logging.getLogger(__name__)

Array = npt.NDArray[np.generic]

# Open Inference Protocol datatype <-> numpy; BF16 and BYTES have no numpy twin we serve.
DATATYPES: dict[str, np.dtype[np.generic]] = {
    "BOOL": np.dtype(np.bool_),
    "UINT8": np.dtype(np.uint8),
    "UINT16": np.dtype(np.uint16),
    "UINT32": np.dtype(np.uint32),
    "UINT64": np.dtype(np.uint64),
    "INT8": np.dtype(np.int8),
    "INT16": np.dtype(np.int16),
    "INT32": np.dtype(np.int32),
    "INT64": np.dtype(np.int64),
    "FP16": np.dtype(np.float16),
    "FP32": np.dtype(np.float32),
    "FP64": np.dtype(np.float64),
}
_ORT_TYPES = {
    "tensor(bool)": "BOOL",
    "tensor(uint8)": "UINT8",
    "tensor(uint16)": "UINT16",
    "tensor(uint32)": "UINT32",
    "tensor(uint64)": "UINT64",
    "tensor(int8)": "INT8",
    "tensor(int16)": "INT16",
    "tensor(int32)": "INT32",
    "tensor(int64)": "INT64",
    "tensor(float16)": "FP16",
    "tensor(float)": "FP32",
    "tensor(double)": "FP64",
}


@dataclasses.dataclass(frozen=True)
class TensorSpec:
    """A model input or output; ``-1`` marks a dynamic dimension."""

    name: str
    datatype: str
    shape: tuple[int, ...]


class OnnxModel:
    def __init__(self, path: Path, *, threads: int, device: settings.Device) -> None:
        self.path = path
        self._threads = threads
        self._device = device
        self._session: ort.InferenceSession | None = None
        self.inputs: tuple[TensorSpec, ...] = ()
        self.outputs: tuple[TensorSpec, ...] = ()
        self.device_used = "cpu"

    def load(self) -> None:
        options = ort.SessionOptions()
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        options.intra_op_num_threads = self._threads or cpu_limit()
        # One batch runs at a time; a second pool would only compete for the same cores.
        options.inter_op_num_threads = 1
        options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
        # Spinning threads burn the CPU quota between requests and starve the event loop.
        options.add_session_config_entry("session.intra_op.allow_spinning", "0")
        providers = self._providers()
        self._session = ort.InferenceSession(str(self.path), options, providers=providers)
        self.device_used = (
            "cuda" if "CUDAExecutionProvider" in self._session.get_providers() else "cpu"
        )
        self.inputs = tuple(_spec(node) for node in self._session.get_inputs())
        self.outputs = tuple(_spec(node) for node in self._session.get_outputs())
        logger.info(
            "loaded %s on %s with %d intra-op threads",
            self.path,
            self.device_used,
            options.intra_op_num_threads,
        )

    def _providers(self) -> list[str]:
        available = ort.get_available_providers()
        if self._device is settings.Device.CPU:
            return ["CPUExecutionProvider"]
        if "CUDAExecutionProvider" in available:
            return ["CUDAExecutionProvider", "CPUExecutionProvider"]
        if self._device is settings.Device.CUDA:
            raise RuntimeError(f"device cuda asked for, but ONNX Runtime only has {available}")
        return ["CPUExecutionProvider"]

    @property
    def batchable(self) -> bool:
        """Requests can be merged when every input and output has a dynamic first dim."""
        return all(spec.shape[:1] == (-1,) for spec in (*self.inputs, *self.outputs))

    def predict(self, inputs: Mapping[str, Array]) -> list[Array]:
        if self._session is None:
            raise RuntimeError("model is not loaded")
        return list(self._session.run(None, dict(inputs)))

    def unload(self) -> None:
        self._session = None

    def example_inputs(self, batch: int = 1) -> dict[str, Array]:
        """Zeros shaped like the inputs, dynamic dims set to ``batch`` (first) or 1."""
        return {
            spec.name: np.zeros(
                [batch if i == 0 and d < 0 else max(d, 1) for i, d in enumerate(spec.shape)],
                dtype=DATATYPES[spec.datatype],
            )
            for spec in self.inputs
        }


def _spec(node: ort.NodeArg) -> TensorSpec:
    datatype = _ORT_TYPES.get(node.type)
    if datatype is None:
        raise ValueError(f"tensor {node.name!r} has type {node.type}, which is not served")
    shape = tuple(d if isinstance(d, int) and d >= 0 else -1 for d in node.shape)
    return TensorSpec(node.name, datatype, shape)


def cpu_limit() -> int:
    """CPUs this process may use: the cgroup quota when set, else the affinity mask."""
    available = len(os.sched_getaffinity(0))
    quota = _cgroup_quota()
    return max(1, min(available, math.ceil(quota))) if quota else available


def _cgroup_quota() -> float | None:
    try:
        quota, period = Path("/sys/fs/cgroup/cpu.max").read_text().split()
        return None if quota == "max" else int(quota) / int(period)
    except (OSError, ValueError):
        pass
    try:
        quota_us = int(Path("/sys/fs/cgroup/cpu/cpu.cfs_quota_us").read_text())
        period_us = int(Path("/sys/fs/cgroup/cpu/cpu.cfs_period_us").read_text())
        return quota_us / period_us if quota_us > 0 else None
    except (OSError, ValueError):
        return None

"""The model abstraction: an ONNX Runtime session with ``load``/``predict``/``unload``."""

from __future__ import annotations

import dataclasses
import logging
import math
import os
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import onnxruntime as ort

from modeldeploy_runtime import settings, tensors

logger = logging.getLogger(__name__)

Array = tensors.Array
DATATYPES = tensors.DATATYPES
TensorSpec = tensors.TensorSpec
Signature = tensors.Signature

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
    "tensor(string)": "BYTES",
}


@dataclasses.dataclass(frozen=True)
class SessionConfig:
    threads: int = 0
    device: settings.Device = settings.Device.AUTO
    cudnn_conv_algo_search: settings.ConvAlgoSearch = settings.ConvAlgoSearch.EXHAUSTIVE
    cuda_device_id: int = 0
    cuda_mem_limit_bytes: int = 0
    profile_dir: Path | None = None

    @classmethod
    def of(cls, config: settings.ServeSettings) -> SessionConfig:
        return cls(
            threads=config.threads,
            device=config.device,
            cudnn_conv_algo_search=config.cudnn_conv_algo_search,
            cuda_device_id=config.cuda_device_id,
            cuda_mem_limit_bytes=config.cuda_mem_limit_bytes,
            profile_dir=config.profile_dir,
        )

    def cuda_options(self) -> dict[str, str]:
        """The CUDA execution provider's options, each set on purpose (README: GPU serving)."""
        options = {
            "device_id": str(self.cuda_device_id),
            # Sizes are fixed after warm-up, so the arena stops growing; allocating exactly
            # what is asked keeps a session per batch size from doubling its footprint.
            "arena_extend_strategy": "kSameAsRequested",
            # Batches run one at a time; copies on the compute stream keep them ordered
            # with the kernels that read them, with no extra synchronisation.
            "do_copy_in_default_stream": "1",
            # The search runs once per batch size during warm-up (each size has its own
            # session), so the thorough search costs nothing at serving time.
            "cudnn_conv_algo_search": self.cudnn_conv_algo_search.value,
            # Let cuDNN use as much workspace as its fastest algorithm wants.
            "cudnn_conv_use_max_workspace": "1",
        }
        if self.cuda_mem_limit_bytes:
            options["gpu_mem_limit"] = str(self.cuda_mem_limit_bytes)
        return options


class OnnxModel:
    """A model file and its ONNX Runtime sessions: one per batch size on a GPU.

    ONNX Runtime's CUDA provider redoes cuDNN's algorithm search whenever an input shape
    differs from the previous run's (about 0.5 s for a ResNet-50), so each batch size gets
    a session of its own, which only ever sees that size.  On CPU there is no such cost and
    one session serves every size.
    """

    def __init__(self, path: Path, config: SessionConfig) -> None:
        self.path = path
        self._config = config
        self._sessions: dict[int, ort.InferenceSession] = {}
        self._session: ort.InferenceSession | None = None
        self.inputs: tuple[TensorSpec, ...] = ()
        self.outputs: tuple[TensorSpec, ...] = ()
        self.device_used = "cpu"
        # The batch sizes the sessions run at: those loaded with; () when requests are never
        # merged, for the reasons in ``unbatched``.
        self.sizes: tuple[int, ...] = (1,)
        self.unbatched: tuple[str, ...] = ()

    def load(self, sizes: Sequence[int] = (1,)) -> None:
        """Create the sessions; ``sizes`` are the batch sizes that get one each on a GPU.

        No sizes, or a model whose axis 0 is not a batch axis (``batch_problems``), means no
        merging: each request runs alone, as it came.
        """
        self._session = self._new_session()
        self.device_used = (
            "cuda" if "CUDAExecutionProvider" in self._session.get_providers() else "cpu"
        )
        inputs, outputs = self._session.get_inputs(), self._session.get_outputs()
        self.inputs = tuple(_spec(node) for node in inputs)
        self.outputs = tuple(_spec(node) for node in outputs)
        self.unbatched = batch_problems(
            [(node.name, _dims(node)) for node in inputs],
            [(node.name, _dims(node)) for node in outputs],
        )
        if not sizes:
            self.unbatched = ("maxBatchSize is 0", *self.unbatched)
        self.sizes = () if self.unbatched else tuple(sizes)
        if self.unbatched:
            logger.info("requests are not merged: %s", "; ".join(self.unbatched))
        if self.device_used == "cuda" and self.sizes:
            self._sessions = {size: self._new_session() for size in self.sizes[1:]}
            self._sessions[self.sizes[0]] = self._session
        logger.info(
            "loaded %s on %s with %d intra-op threads, %d session(s)",
            self.path,
            self.device_used,
            self._config.threads or cpu_limit(),
            len(self._sessions) or 1,
        )

    def unbatch(self, reason: str) -> None:
        """Stop merging requests, for a reason found after loading (an output's rows)."""
        self.unbatched = (*self.unbatched, reason)
        self.sizes = ()
        self._sessions = {}
        logger.warning("requests are not merged: %s", reason)

    def _new_session(self) -> ort.InferenceSession:
        config = self._config
        options = ort.SessionOptions()
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        options.intra_op_num_threads = config.threads or cpu_limit()
        # One batch runs at a time; a second pool would only compete for the same cores.
        options.inter_op_num_threads = 1
        options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
        # Spinning threads burn the CPU quota between requests and starve the front end.
        options.add_session_config_entry("session.intra_op.allow_spinning", "0")
        if config.profile_dir is not None:
            config.profile_dir.mkdir(parents=True, exist_ok=True)
            options.enable_profiling = True
            options.profile_file_prefix = str(config.profile_dir / self.path.stem)
        return ort.InferenceSession(str(self.path), options, providers=self._providers())

    def _providers(self) -> list[Any]:
        available = ort.get_available_providers()
        device = self._config.device
        if device is settings.Device.CPU:
            return ["CPUExecutionProvider"]
        if "CUDAExecutionProvider" in available:
            return [("CUDAExecutionProvider", self._config.cuda_options()), "CPUExecutionProvider"]
        if device is settings.Device.CUDA:
            raise RuntimeError(f"device cuda asked for, but ONNX Runtime only has {available}")
        return ["CPUExecutionProvider"]

    @property
    def signature(self) -> Signature:
        return Signature(self.inputs, self.outputs, self.sizes)

    def session_for(self, size: int) -> ort.InferenceSession:
        if self._session is None:
            raise RuntimeError("model is not loaded")
        if not self._sessions:
            return self._session
        session = self._sessions.get(size)
        if session is None:
            raise ValueError(f"no session for batch size {size}; sizes {sorted(self._sessions)}")
        return session

    def predict(self, inputs: Mapping[str, Array]) -> list[Array]:
        size = next(iter(inputs.values())).shape[0] if self._sessions else 0
        return list(self.session_for(size).run(None, dict(inputs)))

    def unload(self) -> None:
        for session in {id(s): s for s in (self._session, *self._sessions.values())}.values():
            if session is not None and self._config.profile_dir is not None:
                session.end_profiling()
        self._session = None
        self._sessions = {}

    def example_inputs(self, batch: int = 1) -> dict[str, Array] | None:
        """Zeros shaped like the inputs with ``batch`` rows, or None when a dimension other
        than the batch is unknown: an invented size can be impossible for the model."""
        shapes = {}
        for spec in self.inputs:
            dims = list(spec.shape)
            if self.sizes and dims:
                dims[0] = batch
            if any(d < 0 for d in dims):
                return None
            shapes[spec.name] = dims
        return {
            spec.name: tensors.filled(tuple(shapes[spec.name]), DATATYPES[spec.datatype])
            for spec in self.inputs
        }


class WarmupError(Exception):
    """The warm-up the user asked for cannot run, or failed: the model is not served."""


def warmup_example(
    served: OnnxModel,
    shapes: Mapping[str, Sequence[int]] | None = None,
    samples: Path | None = None,
) -> tuple[dict[str, Array] | None, str]:
    """One request's inputs to warm up with, and where they come from (for the log).

    The user's samples (.npz) or shapes (zeros) come first; else zeros when the model's dims
    are all known; else None, and the reason: a size is never invented.  Raises WarmupError
    when what the user gave does not fit the model.
    """
    if samples is not None:
        try:
            with np.load(samples, allow_pickle=False) as archive:
                given = {name: archive[name] for name in archive.files}
        except (OSError, ValueError) as error:
            raise WarmupError(f"warm-up samples {samples} cannot be read: {error}") from None
        return _fitted(served, given, "samples"), f"the warm-up samples {samples.name}"
    if shapes is not None:
        _same_names(served, shapes, "shapes")
        zeros = {
            spec.name: tensors.filled(tuple(shapes[spec.name]), DATATYPES[spec.datatype])
            for spec in served.inputs
        }
        return _fitted(served, zeros, "shapes"), "the warm-up shapes"
    example = served.example_inputs()
    if example is None:
        unknown = [
            f"{spec.name} {list(spec.shape)}"
            for spec in served.inputs
            if -1 in (spec.shape[1:] if served.sizes else spec.shape)
        ]
        return None, (
            f"input dims unknown ({', '.join(unknown)}, -1 is unknown) and no warm-up given "
            "(spec.runtime.warmup)"
        )
    return example, "zeros of the model's own shapes"


def _same_names(served: OnnxModel, given: Mapping[str, Any], what: str) -> None:
    names = {spec.name for spec in served.inputs}
    if given.keys() != names:
        raise WarmupError(
            f"the warm-up {what} name {sorted(given)}, but the model's inputs are {sorted(names)}"
        )


def _fitted(served: OnnxModel, given: Mapping[str, Array], what: str) -> dict[str, Array]:
    """The user's warm-up inputs, checked against the model's inputs: names, dtypes, dims."""
    _same_names(served, given, what)
    for spec in served.inputs:
        array = given[spec.name]
        if array.dtype != DATATYPES[spec.datatype]:
            raise WarmupError(
                f"warm-up input {spec.name!r} is {array.dtype}, the model takes {spec.datatype}"
            )
        fits = array.ndim == len(spec.shape) and all(
            want < 0 or got == want for got, want in zip(array.shape, spec.shape, strict=True)
        )
        if not fits or (served.sizes and array.shape[0] < 1):
            raise WarmupError(
                f"warm-up input {spec.name!r} has shape {list(array.shape)}, the model's is "
                f"{list(spec.shape)} (-1 is any size)"
            )
    return dict(given)


def batch_of(example: Mapping[str, Array], rows: int) -> dict[str, Array]:
    """The example's rows repeated (or cut) to ``rows``: a batch of that size."""
    return {
        name: np.take(array, np.arange(rows) % array.shape[0], axis=0)
        for name, array in example.items()
    }


# The dims ONNX Runtime reports: a size, a symbol's name, or None when unknown.
Dims = Sequence[int | str | None]


def batch_problems(
    inputs: Iterable[tuple[str, Dims]], outputs: Iterable[tuple[str, Dims]]
) -> tuple[str, ...]:
    """Why axis 0 is not one batch axis shared by every input and output; () when it is.

    Read from the graph: a scalar has no batch axis, a fixed first dim above 1 is not a batch,
    and the symbol of an input's first dim (``batch``, ``N``) found on another axis anywhere
    means the batch is carried there too (a recurrent ``state [2, N, 128]``).  An output whose
    first dim is unknown is checked on its rows at warm-up (``row_problem``).
    """
    tensors_ = [("input", name, dims) for name, dims in inputs]
    tensors_ += [("output", name, dims) for name, dims in outputs]
    symbols = {dims[0] for kind, _, dims in tensors_ if kind == "input" and dims}
    # "?" is how some exporters write an unnamed dim: it names nothing shared.
    symbols = {s for s in symbols if isinstance(s, str) and s not in ("", "?")}
    problems = []
    for kind, name, dims in tensors_:
        if not dims:
            problems.append(f"{kind} {name!r} is a scalar (rank 0)")
            continue
        if isinstance(dims[0], int) and dims[0] != 1:
            problems.append(f"{kind} {name!r} has a fixed first dim of {dims[0]}")
        elif isinstance(dims[0], int):
            problems.append(f"{kind} {name!r} has a fixed batch of 1")
        for axis, dim in enumerate(dims[1:], start=1):
            if dim in symbols:
                problems.append(f"{kind} {name!r} has the batch dim {dim!r} on axis {axis}")
    return tuple(problems)


def row_problem(outputs: Sequence[TensorSpec], results: Sequence[Array], rows: int) -> str | None:
    """Why an output run on ``rows`` examples shows its axis 0 is not a batch axis."""
    for spec, result in zip(outputs, results, strict=True):
        if result.ndim == 0 or result.shape[0] != rows:
            return (
                f"output {spec.name!r} has shape {list(result.shape)} for a batch of {rows}, "
                "so its axis 0 is not the batch"
            )
    return None


def _dims(node: ort.NodeArg) -> Dims:
    return [d if isinstance(d, int | str) else None for d in node.shape]


def _spec(node: ort.NodeArg) -> TensorSpec:
    datatype = _ORT_TYPES.get(node.type)
    if datatype is None:
        raise ValueError(f"tensor {node.name!r} has type {node.type}, which is not served")
    shape = tuple(d if isinstance(d, int) and d >= 0 else -1 for d in node.shape)
    names = tuple(d if isinstance(d, str) else "" for d in node.shape)
    return TensorSpec(node.name, datatype, shape, names)


def resolve_device(device: settings.Device) -> str:
    """The device the sessions will use, known before loading (it decides batch sizes)."""
    if device is not settings.Device.AUTO:
        return device.value
    cuda = "CUDAExecutionProvider" in ort.get_available_providers()
    return settings.Device.CUDA.value if cuda else settings.Device.CPU.value


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

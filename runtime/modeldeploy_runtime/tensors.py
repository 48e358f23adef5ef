"""Tensors as the server sees them: datatypes, specs and a model's signature.

Plain data without ONNX Runtime, so front-end worker processes can validate requests
without loading it.
"""

from __future__ import annotations

import dataclasses

import numpy as np
import numpy.typing as npt

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


@dataclasses.dataclass(frozen=True)
class TensorSpec:
    """A model input or output; ``-1`` marks a dynamic dimension."""

    name: str
    datatype: str
    shape: tuple[int, ...]


@dataclasses.dataclass(frozen=True)
class Signature:
    """What the front end needs to validate requests: plain data, sent to worker processes."""

    inputs: tuple[TensorSpec, ...]
    outputs: tuple[TensorSpec, ...]
    # The batch sizes the session runs at; the largest bounds a request's first dim.  Empty
    # when axis 0 is not a batch axis of the model: each request then runs alone, as it came.
    sizes: tuple[int, ...]

    @property
    def batchable(self) -> bool:
        return bool(self.sizes)

    @property
    def max_batch_size(self) -> int:
        """The largest batch; 0 when requests are never merged (as Triton reports it)."""
        return self.sizes[-1] if self.sizes else 0

"""Tensors as the server sees them: datatypes, specs and a model's signature.

Plain data without ONNX Runtime, so front-end worker processes can validate requests
without loading it.

``BYTES`` tensors (ONNX string tensors) are numpy object arrays of ``str``: ONNX Runtime
reads and returns text (it would turn a ``bytes`` element into its ``repr``), so elements
must be UTF-8.  On the wire, and through the front-end workers' shared memory, they travel
serialised in the Open Inference Protocol's binary form: each element a 4-byte
little-endian length, then its UTF-8 bytes.
"""

from __future__ import annotations

import dataclasses
import struct
import sys

import numpy as np
import numpy.typing as npt

Array = npt.NDArray[np.generic]

BYTES = "BYTES"
OBJECT = np.dtype(np.object_)
_LENGTH = struct.Struct("<I")

# Open Inference Protocol datatype <-> numpy; BF16 has no numpy twin we serve.
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
    BYTES: OBJECT,
}


@dataclasses.dataclass(frozen=True)
class TensorSpec:
    """A model input or output; ``-1`` marks a dynamic dimension."""

    name: str
    datatype: str
    shape: tuple[int, ...]
    # The model's names of its dynamic dims ("sequence"), "" where unnamed or static: an
    # output's axis named like a padded input's axis is cut back with it.
    dim_names: tuple[str, ...] = dataclasses.field(default=(), compare=False)


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


def nbytes(array: Array) -> int:
    """The memory a tensor holds: for BYTES its pointers and every element's string object
    (a Python str takes 1-4 bytes a character plus about 50), what the queue bound counts."""
    if array.dtype != OBJECT:
        return array.nbytes
    items: list[str] = array.ravel().tolist()
    return array.nbytes + sum(map(sys.getsizeof, items))


def filled(shape: tuple[int, ...], dtype: np.dtype[np.generic], value: object = 0) -> Array:
    """An array of ``value``; for BYTES, of empty strings (what pads a string tensor)."""
    if dtype == OBJECT:
        return np.full(shape, "", OBJECT)
    return np.full(shape, value, dtype)


def to_bytes(array: Array) -> bytes:
    """A tensor's data as the wire's binary form: raw little-endian, or length-prefixed."""
    if array.dtype == OBJECT:
        return serialize_bytes(array)
    return np.ascontiguousarray(array).tobytes()


def serialize_bytes(array: Array) -> bytes:
    """A BYTES tensor in the wire's binary form: each element length-prefixed, row-major."""
    parts: list[bytes] = []
    for item in array.flat:
        data = str(item).encode()
        parts += (_LENGTH.pack(len(data)), data)
    return b"".join(parts)


def deserialize_bytes(data: bytes | bytearray | memoryview, count: int) -> Array:
    """``count`` length-prefixed UTF-8 elements that fill ``data`` exactly, as a 1-D array.

    Raises ``ValueError`` naming what does not fit or is not text; nothing is read past the
    data.
    """
    view = memoryview(data).cast("B")
    if count * _LENGTH.size > len(view):
        # Checked before the array is made: a shape cannot ask for more than the data holds.
        raise ValueError(f"{len(view)} bytes cannot hold {count} length-prefixed elements")
    items = np.empty(count, OBJECT)
    offset = 0
    for i in range(count):
        if offset + _LENGTH.size > len(view):
            raise ValueError(
                f"{len(view)} bytes hold only {i} of the {count} length-prefixed elements"
            )
        (length,) = _LENGTH.unpack_from(view, offset)
        offset += _LENGTH.size
        if offset + length > len(view):
            raise ValueError(
                f"element {i} is {length} bytes long, past the end of the {len(view)} bytes"
            )
        try:
            items[i] = str(view[offset : offset + length], "utf-8")
        except UnicodeDecodeError as error:
            raise ValueError(
                f"element {i} is not UTF-8 ({error.reason}); string tensors hold text"
            ) from None
        offset += length
    if offset != len(view):
        raise ValueError(f"{len(view) - offset} bytes follow the {count} length-prefixed elements")
    return items

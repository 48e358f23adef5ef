"""Decoding requests: checked against the model before any data is read, 4xx for anything bad.

Hand-picked hostile cases, then generated ones (hypothesis, derandomized so a failure
reproduces exactly) for both wire formats: every input either decodes to a request the
model accepts or is refused with ``InvalidInputError``; nothing else escapes.
"""

from __future__ import annotations

import asyncio
import json
import re
import time
from collections.abc import Mapping
from typing import Any

import numpy as np
import orjson
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from tritonclient.grpc import service_pb2 as pb

from modeldeploy_runtime import dataplane, metrics, rest, tensors
from modeldeploy_runtime import grpc as grpc_adapter

SIGNATURE = tensors.Signature(
    inputs=(
        tensors.TensorSpec("x", "FP32", (-1, 4)),
        tensors.TensorSpec("ids", "INT64", (-1, 3)),
    ),
    outputs=(tensors.TensorSpec("y", "FP32", (-1, 2)),),
    sizes=(1, 2, 4, 8),
)
FUZZ = settings(
    max_examples=300,
    derandomize=True,
    deadline=2000,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)


class _Unused:
    async def submit(self, inputs: Mapping[str, Any], size: int) -> list[Any]:
        raise AssertionError("decoding must not run anything")


class _Zeros:
    async def submit(self, inputs: Mapping[str, Any], size: int) -> list[Any]:
        return [np.zeros((size, 1), np.float32)]


PLANE = dataplane.Decoder("m", "1", SIGNATURE)


def _http(document: Any, binary: bytes = b"", header_length: int | None = None) -> Any:
    header = orjson.dumps(document)
    length = len(header) if header_length is None else header_length
    given_length = str(length) if binary or header_length is not None else None
    return rest.parse_infer(PLANE, "m", None, header + binary, given_length)[0]


def _good() -> dict[str, Any]:
    return {
        "inputs": [
            {"name": "x", "datatype": "FP32", "shape": [2, 4], "data": list(range(8))},
            {"name": "ids", "datatype": "INT64", "shape": [2, 3], "data": [[1, 2, 3], [4, 5, 6]]},
        ]
    }


def test_not_ready_and_unavailable_until_a_model_is_attached() -> None:
    plane = dataplane.DataPlane(name="iris", version="3", stats=metrics.ModelMetrics("iris"))
    assert not plane.model_ready("iris")
    with pytest.raises(dataplane.UnavailableError, match="not loaded yet"):
        plane.model_metadata("iris")
    with pytest.raises(dataplane.UnavailableError):
        asyncio.run(
            plane.handle(metrics.Protocol.HTTP, rest.parse_infer, "iris", None, b"{}", None)
        )


def test_a_good_request_decodes_to_arrays_of_the_models_types() -> None:
    request = _http(_good())
    assert request.size == 2
    assert request.inputs["x"].dtype == np.float32 and request.inputs["x"].shape == (2, 4)
    assert request.inputs["ids"].tolist() == [[1, 2, 3], [4, 5, 6]]


def _with_x(**fields: Any) -> dict[str, Any]:
    document = _good()
    document["inputs"][0] |= fields
    return document


@pytest.mark.parametrize(
    ("document", "binary", "message"),
    [
        (_with_x(shape=[0] * 65, data=[]), b"", "shape must be a list of 2 integers"),
        (_with_x(shape=[0, 2**63], data=[]), b"", "does not match the model's [-1, 4]"),
        (_with_x(shape=[2**40, 4], data=[]), b"", "does not match"),
        (_with_x(shape=[2, True], data=[]), b"", "shape must be a list of 2 integers"),
        (_with_x(datatype="FP64"), b"", "datatype FP64, but the model expects FP32"),
        (
            {
                "inputs": [
                    {"name": "x", "datatype": "FP32", "shape": [9, 4], "data": [0.0] * 36},
                    {"name": "ids", "datatype": "INT64", "shape": [9, 3], "data": [0] * 27},
                ]
            },
            b"",
            "larger than the model's maxBatchSize 8",
        ),
        (_with_x(data=[1.0] * 7), b"", "7 values of data, but shape [2, 4] needs 8"),
        (_with_x(data=[[1.0, 2.0], [3.0]]), b"", "data is not a list of FP32 values"),
        (_with_x(data=["a"] * 8), b"", "data is not a list of FP32 values"),
        (_with_x(data={"a": 1}), b"", "data must be a list of numbers"),
        (_with_x(name="z"), b"", "unknown input 'z'"),
        (_with_x(shape=[3, 4], data=[0.0] * 12), b"", "disagree on the batch size"),
        (
            {
                "inputs": [
                    {"name": "x", "datatype": "FP32", "shape": [0, 4], "data": []},
                    {"name": "ids", "datatype": "INT64", "shape": [0, 3], "data": []},
                ]
            },
            b"",
            "empty batch",
        ),
        (
            _with_x(data=None, parameters={"binary_data_size": True}),
            b"\0",
            "binary_data_size True does not fit",
        ),
        (
            _with_x(data=None, parameters={"binary_data_size": 32}),
            b"\0" * 40,
            "8 bytes of binary data follow the last input's",
        ),
        (
            _with_x(data=None, parameters={"binary_data_size": 28}),
            b"\0" * 28,
            "28 bytes of data, but shape [2, 4] of FP32 needs 32",
        ),
        ({"inputs": _good()["inputs"][:1]}, b"", "missing input(s) ['ids']"),
        ({"inputs": _good()["inputs"] * 2}, b"", "4 inputs given, but the model has 2"),
        ({"inputs": []}, b"", "non-empty 'inputs' list"),
        ([1, 2], b"", "must be a JSON object"),
        (_good() | {"outputs": [{"name": "q"}]}, b"", "unknown output(s) ['q']"),
        (_good() | {"outputs": [{"name": "y"}] * 3}, b"", "outputs must name some of"),
    ],
)
def test_malformed_requests_are_refused_naming_the_problem(
    document: Any, binary: bytes, message: str
) -> None:
    with pytest.raises(dataplane.InvalidInputError) as caught:
        _http(document, binary)
    assert message in str(caught.value)


def test_a_million_inputs_are_refused_by_count_before_any_is_looked_at() -> None:
    # Not one of them is an input the model has: the count alone refuses them (what it costs
    # is measured by benchmarks/runtime/bench_hostile.py, not here).
    body = orjson.dumps({"inputs": [{"name": "nonsense"}] * 200_000})
    with pytest.raises(dataplane.InvalidInputError, match="200000 inputs given"):
        rest.parse_infer(PLANE, "m", None, body, None)


def test_a_header_length_past_the_body_is_refused() -> None:
    with pytest.raises(dataplane.InvalidInputError, match="Inference-Header-Content-Length"):
        _http(_good(), b"", header_length=10_000)


def test_an_unknown_model_is_refused_before_its_body_is_parsed() -> None:
    with pytest.raises(dataplane.ModelNotFoundError, match="serves 'm'"):
        rest.parse_infer(PLANE, "other", None, b"not even json", None)


def _grpc_request(**fields: Any) -> Any:
    request = pb.ModelInferRequest(model_name="m")
    x = request.inputs.add(name="x", datatype="FP32", shape=[1, 4])
    x.contents.fp32_contents.extend([1.0, 2.0, 3.0, 4.0])
    ids = request.inputs.add(name="ids", datatype="INT64", shape=[1, 3])
    ids.contents.int64_contents.extend([1, 2, 3])
    for key, value in fields.items():
        setattr(request, key, value)
    return request


def test_grpc_typed_contents_decode_to_arrays() -> None:
    request, _ = grpc_adapter.decode(PLANE, _grpc_request())
    assert request.inputs["x"].tolist() == [[1.0, 2.0, 3.0, 4.0]]
    assert request.inputs["ids"].dtype == np.int64


def test_grpc_typed_contents_are_counted_against_the_shape_first() -> None:
    request = _grpc_request()
    request.inputs[0].shape[:] = [2, 4]
    request.inputs[1].shape[:] = [2, 3]
    with pytest.raises(dataplane.InvalidInputError, match="4 values of data, but shape"):
        grpc_adapter.decode(PLANE, request)


def test_grpc_raw_contents_must_match_the_inputs() -> None:
    request = _grpc_request()
    request.raw_input_contents.append(b"\0" * 16)
    with pytest.raises(dataplane.InvalidInputError, match="2 inputs but 1 raw_input_contents"):
        grpc_adapter.decode(PLANE, request)


# Generators of hostile wire input, kept here so that a failure reproduces.
_json_leaf = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(min_value=-(2**70), max_value=2**70),
    st.floats(allow_nan=False),
    st.text(max_size=8),
)
_json = st.recursive(
    _json_leaf,
    lambda inner: (
        st.lists(inner, max_size=6) | st.dictionaries(st.text(max_size=8), inner, max_size=6)
    ),
    max_leaves=40,
)
_names = st.sampled_from(["x", "ids", "z", ""]) | st.text(max_size=4)
_datatypes = st.sampled_from([*tensors.DATATYPES, "BYTES", "fp32", ""]) | _json_leaf
_dims = st.integers(min_value=-2, max_value=10) | st.sampled_from([2**31, 2**63, True])
_shapes = st.lists(_dims, max_size=4) | _json_leaf
_tensor = st.fixed_dictionaries(
    {"name": _names, "datatype": _datatypes, "shape": _shapes},
    optional={
        "data": st.lists(st.floats(allow_nan=False) | st.integers(-5, 5), max_size=40) | _json,
        "parameters": st.fixed_dictionaries({"binary_data_size": st.integers(-1, 64) | _json_leaf}),
    },
)
_documents = st.fixed_dictionaries(
    {"inputs": st.lists(_tensor, max_size=4) | _json},
    optional={
        "outputs": st.lists(st.fixed_dictionaries({"name": _names}), max_size=3) | _json,
        "id": _json_leaf,
        "parameters": st.fixed_dictionaries({"binary_data_output": _json_leaf}),
    },
)


def _decodes_or_refuses(decode: Any) -> None:
    try:
        request, _ = decode()
    except dataplane.InvalidInputError:
        return
    assert 1 <= request.size <= SIGNATURE.max_batch_size
    for spec in SIGNATURE.inputs:
        array = request.inputs[spec.name]
        assert array.dtype == tensors.DATATYPES[spec.datatype]
        assert array.shape[1:] == spec.shape[1:] and array.shape[0] == request.size


@FUZZ
@given(document=_documents, binary=st.binary(max_size=64), split=st.integers(-3, 300))
def test_generated_http_bodies_decode_or_get_a_4xx(
    document: Any, binary: bytes, split: int
) -> None:
    # The standard library writes what orjson will not (integers past 64 bits).
    header = json.dumps(document).encode()
    _decodes_or_refuses(lambda: rest.parse_infer(PLANE, "m", None, header, None))
    _decodes_or_refuses(
        lambda: rest.parse_infer(PLANE, "m", None, header + binary, str(len(header)))
    )
    # Arbitrary bytes with an arbitrary header length: never anything but a 4xx.
    _decodes_or_refuses(lambda: rest.parse_infer(PLANE, "m", None, binary, str(split)))


_contents_fields = sorted(grpc_adapter._CONTENTS_FIELD.values())


@st.composite
def _grpc_requests(draw: st.DrawFn) -> Any:
    request = pb.ModelInferRequest(model_name="m")
    for _ in range(draw(st.integers(0, 3))):
        tensor = request.inputs.add(
            name=draw(_names),
            datatype=draw(st.sampled_from([*tensors.DATATYPES, "BYTES", ""])),
            shape=draw(st.lists(st.integers(-3, 2**62), max_size=4)),
        )
        field = draw(st.sampled_from(_contents_fields))
        if field in ("fp32_contents", "fp64_contents"):
            values: Any = draw(st.lists(st.floats(width=32), max_size=20))
        elif field == "bytes_contents":
            values = draw(st.lists(st.binary(max_size=8), max_size=20))
        elif field == "bool_contents":
            values = draw(st.lists(st.booleans(), max_size=20))
        elif field.startswith("uint"):
            values = draw(st.lists(st.integers(0, 2**32 - 1), max_size=20))
        else:
            values = draw(st.lists(st.integers(-(2**31), 2**31 - 1), max_size=20))
        getattr(tensor.contents, field).extend(values)
    if draw(st.booleans()):
        request.raw_input_contents.extend(draw(st.lists(st.binary(max_size=64), max_size=3)))
    for name in draw(st.lists(_names, max_size=3)):
        request.outputs.add(name=name)
    return request


@FUZZ
@given(request=_grpc_requests())
def test_generated_grpc_requests_decode_or_get_invalid_argument(request: Any) -> None:
    _decodes_or_refuses(lambda: grpc_adapter.decode(PLANE, request))


def test_decoding_a_large_body_leaves_the_event_loop_free() -> None:
    """A 40 MB JSON body is decoded in the decoder process: the loop (and the probes) keep
    answering; here the loop's 5 ms ticks stay on time while it is."""
    data = np.random.default_rng(0).standard_normal(8 * 4 * 150_000).round(3).tolist()
    body = orjson.dumps(
        {
            "inputs": [
                {"name": "x", "datatype": "FP32", "shape": [8, 4 * 150_000], "data": data},
            ]
        }
    )
    assert len(body) > dataplane.OFFLOAD_BYTES

    async def scenario() -> float:
        gaps: list[float] = []
        done = asyncio.Event()

        async def ticker() -> None:
            last = time.perf_counter()
            while not done.is_set():
                await asyncio.sleep(0.005)
                now = time.perf_counter()
                gaps.append(now - last)
                last = now

        tick = asyncio.ensure_future(ticker())
        wide = dataplane.DataPlane(name="w", version="1", stats=metrics.ModelMetrics("w"))
        wide.attach(
            tensors.Signature(
                (tensors.TensorSpec("x", "FP32", (-1, 4 * 150_000)),),
                (tensors.TensorSpec("y", "FP32", (-1, 1)),),
                (8,),
            ),
            _Zeros(),
        )
        response, _ = await wide.handle(
            metrics.Protocol.HTTP, rest.parse_infer, "w", None, body, None, offload=True
        )
        assert response.outputs[0].data.shape == (8, 1)
        wide.close()
        done.set()
        await tick
        return max(gaps)

    worst = asyncio.run(scenario())
    # Well under the probes' 1 s timeout: nothing but scheduling holds the loop.
    assert worst < 0.75, f"the event loop stalled for {worst:.3f} s"


# String tensors: a model with one BYTES input, fed JSON lists, length-prefixed binary and
# gRPC's bytes_contents, well-formed or not.
STRINGS = dataplane.Decoder(
    "m",
    "1",
    tensors.Signature(
        inputs=(tensors.TensorSpec("text", "BYTES", (-1, 2)),),
        outputs=(tensors.TensorSpec("ids", "INT64", (-1, 2)),),
        sizes=(1, 2, 4),
    ),
)


def _decodes_strings_or_refuses(decode: Any) -> None:
    try:
        request, _ = decode()
    except dataplane.InvalidInputError:
        return
    array = request.inputs["text"]
    assert array.dtype == object and array.shape == (request.size, 2)
    assert 1 <= request.size <= 4
    assert all(isinstance(item, str) for item in array.flat)


_elements = st.lists(st.text(max_size=6).map(str.encode), min_size=2, max_size=6) | st.lists(
    st.text(max_size=6).map(str.encode) | st.binary(max_size=6), max_size=10
)
# Often well-formed (shapes [n, 2] and as many elements), so that decoding is reached.
_string_shapes = (
    st.sampled_from([[1, 2], [2, 2], [3, 2]])
    | st.lists(st.integers(-1, 5), max_size=3)
    | _json_leaf
)
_string_data = (
    st.lists(st.text(max_size=6), min_size=2, max_size=6)
    | st.lists(st.text(max_size=6) | st.integers() | st.none(), max_size=10)
    | _json
)


@st.composite
def _well_formed(draw: st.DrawFn) -> tuple[list[int], list[str], list[bytes]]:
    rows = draw(st.integers(1, 4))
    texts = draw(st.lists(st.text(max_size=6), min_size=2 * rows, max_size=2 * rows))
    return [rows, 2], texts, [text.encode() for text in texts]


@FUZZ
@given(
    shape=_string_shapes,
    data=_string_data,
    elements=_elements,
    lengths=st.lists(st.integers(-1, 12), max_size=10),
    good=st.none() | _well_formed(),
)
def test_generated_string_requests_decode_or_get_a_4xx(
    shape: Any,
    data: Any,
    elements: list[bytes],
    lengths: list[int],
    good: tuple[list[int], list[str], list[bytes]] | None,
) -> None:
    if good is not None:
        shape, data, elements = good
    as_json = {"inputs": [{"name": "text", "datatype": "BYTES", "shape": shape, "data": data}]}
    header = json.dumps(as_json).encode()
    _decodes_strings_or_refuses(lambda: rest.parse_infer(STRINGS, "m", None, header, None))
    wire = b"".join(len(e).to_bytes(4, "little") + e for e in elements)
    garbled = b"".join(
        (n if n >= 0 else len(e)).to_bytes(4, "little") + e
        for e, n in zip(elements, lengths + [-1] * len(elements), strict=False)
    )
    for binary in (wire, garbled):
        document = {
            "inputs": [
                {
                    "name": "text",
                    "datatype": "BYTES",
                    "shape": shape,
                    "parameters": {"binary_data_size": len(binary)},
                }
            ]
        }
        header = json.dumps(document).encode()
        body, length = header + binary, str(len(header))
        _decodes_strings_or_refuses(
            lambda body=body, length=length: rest.parse_infer(STRINGS, "m", None, body, length)
        )
        request = pb.ModelInferRequest(model_name="m")
        tensor = request.inputs.add(name="text", datatype="BYTES")
        if isinstance(shape, list):
            tensor.shape.extend(shape)
        request.raw_input_contents.append(binary)
        _decodes_strings_or_refuses(lambda request=request: grpc_adapter.decode(STRINGS, request))
    request = pb.ModelInferRequest(model_name="m")
    tensor = request.inputs.add(name="text", datatype="BYTES")
    if isinstance(shape, list):
        tensor.shape.extend(shape)
    tensor.contents.bytes_contents.extend(elements)
    _decodes_strings_or_refuses(lambda: grpc_adapter.decode(STRINGS, request))


@FUZZ
@given(texts=st.lists(st.text(max_size=20), max_size=30))
def test_strings_survive_their_serialised_form(texts: list[str]) -> None:
    array = np.array(texts, dtype=object)
    serialised = tensors.serialize_bytes(array)
    assert tensors.deserialize_bytes(serialised, len(texts)).tolist() == texts
    assert tensors.nbytes(array) >= len(serialised) - 4 * len(texts)


@FUZZ
@given(data=st.binary(max_size=64), count=st.integers(0, 2**40))
def test_arbitrary_bytes_deserialise_or_raise_value_error(data: bytes, count: int) -> None:
    try:
        items = tensors.deserialize_bytes(data, count)
    except ValueError:
        return
    assert len(items) == count and all(isinstance(item, str) for item in items)


def test_bad_strings_are_refused_naming_the_problem() -> None:
    def decode(data: Any, shape: list[int]) -> Any:
        tensor = dataplane.WireTensor("text", "BYTES", shape, data)
        return STRINGS.decode("m", None, [tensor])

    assert decode(["a", "é"], [1, 2]).inputs["text"].tolist() == [["a", "é"]]
    assert decode([["a", "b"], ["c", ""]], [2, 2]).inputs["text"].tolist() == [
        ["a", "b"],
        ["c", ""],
    ]
    cases = [
        (["a", 1], [1, 2], "data is not a list of strings"),
        ([["a"], ["b", "c"]], [1, 2], "data is not a list of strings"),
        (["a"], [1, 2], "1 values of data, but shape [1, 2] needs 2"),
        ("ab", [1, 2], "data must be a list of strings"),
        (b"\x01\x00\x00\x00a", [1, 2], "5 bytes cannot hold 2 length-prefixed elements"),
        (b"\x00" * 8 + b"z", [1, 2], "1 bytes follow the 2 length-prefixed elements"),
        (b"\x00" * 4 + b"\x01\x00\x00\x00\xc3", [1, 2], "element 1 is not UTF-8"),
        (b"\x00" * 4 + b"\xff\xff\xff\xff", [1, 2], "element 1 is 4294967295 bytes long"),
    ]
    for data, shape, message in cases:
        with pytest.raises(dataplane.InvalidInputError, match=re.escape(message)):
            decode(data, shape)
    # Counted before anything is allocated: a shape cannot ask for more than the data holds.
    with pytest.raises(ValueError, match="12 bytes cannot hold 1099511627776"):
        tensors.deserialize_bytes(b"\0" * 12, 2**40)


def test_bodies_carrying_strings_count_whole_toward_offloading() -> None:
    """Binary numbers decode for free, binary strings cost an object per element: a large
    body of strings goes to the decoder process like a large JSON body."""
    binary = b"\0" * (2 << 20)
    for datatype, costly in (("FP32", 48), ("BYTES", 48 + len(binary))):
        header = b'{"inputs":[{"name":"x","datatype":"' + datatype.encode() + b'"}]}'
        header = header.ljust(48)
        assert rest._costly_bytes(header + binary, str(len(header))) == costly
    request = pb.ModelInferRequest(model_name="m")
    request.inputs.add(name="x", datatype="FP32")
    request.raw_input_contents.append(binary)
    assert grpc_adapter._costly_bytes(request) < dataplane.OFFLOAD_BYTES
    request.inputs[0].datatype = "BYTES"
    assert grpc_adapter._costly_bytes(request) > dataplane.OFFLOAD_BYTES

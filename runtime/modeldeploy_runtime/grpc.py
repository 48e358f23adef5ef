"""The gRPC adapter: ``inference.GRPCInferenceService`` on a ``grpc.aio`` server.

The messages and service stubs are the ones generated and shipped by the maintained
``tritonclient`` package (``tritonclient.grpc.service_pb2``/``service_pb2_grpc``), so
the wire contract is the one its clients speak.  Inputs are read from
``raw_input_contents`` (as bytes) or typed ``contents`` (straight into numpy, counted
against the shape first; strings from ``bytes_contents``); outputs are always sent raw,
BYTES ones length-prefixed as ``tritonclient`` reads them.
"""

from __future__ import annotations

from typing import Any

import grpc
from google.protobuf import json_format
from tritonclient.grpc import service_pb2 as pb
from tritonclient.grpc import service_pb2_grpc as pb_grpc

from modeldeploy_runtime import dataplane, metrics, tensors

_CODES: dict[type[dataplane.InferenceError], grpc.StatusCode] = {
    dataplane.InvalidInputError: grpc.StatusCode.INVALID_ARGUMENT,
    dataplane.ModelNotFoundError: grpc.StatusCode.NOT_FOUND,
    dataplane.RejectedError: grpc.StatusCode.RESOURCE_EXHAUSTED,
    dataplane.UnavailableError: grpc.StatusCode.UNAVAILABLE,
    dataplane.InferenceError: grpc.StatusCode.INTERNAL,
}
# Which typed field of InferTensorContents carries each datatype (FP16 has none).
_CONTENTS_FIELD = {
    "BOOL": "bool_contents",
    "INT8": "int_contents",
    "INT16": "int_contents",
    "INT32": "int_contents",
    "INT64": "int64_contents",
    "UINT8": "uint_contents",
    "UINT16": "uint_contents",
    "UINT32": "uint_contents",
    "UINT64": "uint64_contents",
    "FP32": "fp32_contents",
    "FP64": "fp64_contents",
    "BYTES": "bytes_contents",
}


class InferenceServicer(pb_grpc.GRPCInferenceServiceServicer):  # type: ignore[misc]
    def __init__(self, plane: dataplane.DataPlane) -> None:
        self._plane = plane

    async def ServerLive(self, request: Any, context: grpc.aio.ServicerContext[Any, Any]) -> Any:  # noqa: N802
        return pb.ServerLiveResponse(live=True)

    async def ServerReady(self, request: Any, context: grpc.aio.ServicerContext[Any, Any]) -> Any:  # noqa: N802
        return pb.ServerReadyResponse(ready=self._plane.ready)

    async def ServerMetadata(  # noqa: N802
        self, request: Any, context: grpc.aio.ServicerContext[Any, Any]
    ) -> Any:
        return pb.ServerMetadataResponse(**self._plane.server_metadata())

    async def ModelReady(self, request: Any, context: grpc.aio.ServicerContext[Any, Any]) -> Any:  # noqa: N802
        try:
            is_ready = self._plane.model_ready(request.name, request.version)
        except dataplane.InferenceError as error:
            await context.abort(_CODES[type(error)], str(error))
        return pb.ModelReadyResponse(ready=is_ready)

    async def ModelMetadata(  # noqa: N802
        self, request: Any, context: grpc.aio.ServicerContext[Any, Any]
    ) -> Any:
        try:
            described = self._plane.model_metadata(request.name, request.version)
        except dataplane.InferenceError as error:
            await context.abort(_CODES[type(error)], str(error))
        return pb.ModelMetadataResponse(
            name=described["name"],
            versions=described["versions"],
            platform=described["platform"],
            inputs=[pb.ModelMetadataResponse.TensorMetadata(**t) for t in described["inputs"]],
            outputs=[pb.ModelMetadataResponse.TensorMetadata(**t) for t in described["outputs"]],
        )

    async def ModelConfig(self, request: Any, context: grpc.aio.ServicerContext[Any, Any]) -> Any:  # noqa: N802
        try:
            config = self._plane.model_config(request.name, request.version)
        except dataplane.InferenceError as error:
            await context.abort(_CODES[type(error)], str(error))
        return json_format.ParseDict({"config": config}, pb.ModelConfigResponse())

    async def ModelInfer(self, request: Any, context: grpc.aio.ServicerContext[Any, Any]) -> Any:  # noqa: N802
        plane = self._plane
        try:
            response, _ = await plane.handle(
                metrics.Protocol.GRPC,
                decode,
                request,
                # Raw contents decode in place, for free; only typed contents cost.
                offload=_costly_bytes(request) > dataplane.OFFLOAD_BYTES,
            )
        except dataplane.InferenceError as error:
            await context.abort(_CODES[type(error)], str(error))
        return _encode(response)


def _costly_bytes(request: Any) -> int:
    """The bytes that cost Python work to decode: all of them when strings are sent (each
    element is an object of its own), else the typed contents (raw ones are free)."""
    if any(tensor.datatype == "BYTES" for tensor in request.inputs):
        return int(request.ByteSize())
    return int(request.ByteSize() - sum(map(len, request.raw_input_contents)))


def decode(plane: dataplane.Decoder, request: Any) -> tuple[dataplane.InferenceRequest, None]:
    """The checked request: raw contents as bytes, typed contents without Python lists."""
    plane.check_input_count(request.model_name, request.model_version, len(request.inputs))
    raw = request.raw_input_contents
    if raw and len(raw) != len(request.inputs):
        raise dataplane.InvalidInputError(
            f"{len(request.inputs)} inputs but {len(raw)} raw_input_contents; give one per input"
        )
    given = []
    for i, tensor in enumerate(request.inputs):
        data: Any
        if raw:
            data = raw[i]
        else:
            field = _CONTENTS_FIELD.get(tensor.datatype)
            if field is None:
                raise dataplane.InvalidInputError(
                    f"input {tensor.name!r}: send {tensor.datatype[:32]} data in raw_input_contents"
                )
            data = getattr(tensor.contents, field)
        given.append(dataplane.WireTensor(tensor.name, tensor.datatype, list(tensor.shape), data))
    outputs = [o.name for o in request.outputs] or None
    checked = plane.decode(
        request.model_name, request.model_version, given, outputs, request.id or None
    )
    return checked, None


def _encode(response: dataplane.InferenceResponse) -> Any:
    return pb.ModelInferResponse(
        model_name=response.model_name,
        model_version=response.model_version,
        id=response.id or "",
        outputs=[
            pb.ModelInferResponse.InferOutputTensor(
                name=o.name, datatype=o.datatype, shape=list(o.data.shape)
            )
            for o in response.outputs
        ],
        raw_output_contents=[tensors.to_bytes(o.data) for o in response.outputs],
    )


def create_server(
    plane: dataplane.DataPlane, max_message_bytes: int, max_concurrent_rpcs: int
) -> grpc.aio.Server:
    server = grpc.aio.server(
        options=[
            ("grpc.max_receive_message_length", max_message_bytes),
            ("grpc.max_send_message_length", max_message_bytes),
        ],
        # Beyond it gRPC itself answers RESOURCE_EXHAUSTED: memory stays bounded.
        maximum_concurrent_rpcs=max_concurrent_rpcs,
    )
    pb_grpc.add_GRPCInferenceServiceServicer_to_server(InferenceServicer(plane), server)
    return server

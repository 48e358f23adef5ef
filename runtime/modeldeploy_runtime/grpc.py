"""The gRPC adapter: ``inference.GRPCInferenceService`` on a ``grpc.aio`` server.

The messages and service stubs are the ones generated and shipped by the maintained
``tritonclient`` package (``tritonclient.grpc.service_pb2``/``service_pb2_grpc``), so
the wire contract is the one its clients speak.  Inputs are read from
``raw_input_contents`` or typed ``contents``; outputs are always sent raw.
"""

from __future__ import annotations

import logging
import time
from typing import Any

import grpc
import numpy as np
from tritonclient.grpc import service_pb2 as pb
from tritonclient.grpc import service_pb2_grpc as pb_grpc

from modeldeploy_runtime import dataplane, metrics

logger = logging.getLogger(__name__)

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
}


class InferenceServicer(pb_grpc.GRPCInferenceServiceServicer):  # type: ignore[misc]
    def __init__(self, plane: dataplane.DataPlane, stats: metrics.ModelMetrics) -> None:
        self._plane = plane
        self._stats = stats

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

    async def ModelInfer(self, request: Any, context: grpc.aio.ServicerContext[Any, Any]) -> Any:  # noqa: N802
        started = time.perf_counter()
        self._stats.inflight.inc()
        outcome = metrics.Outcome.SUCCESS
        try:
            response = await self._plane.infer(
                request.model_name, request.model_version, _decode(request)
            )
            return _encode(response)
        except dataplane.InferenceError as error:
            outcome = error.outcome
            if outcome is metrics.Outcome.SERVER_ERROR:
                logger.error("%s", error)
            await context.abort(_CODES[type(error)], str(error))
        except Exception:
            outcome = metrics.Outcome.SERVER_ERROR
            logger.exception("inference request failed")
            await context.abort(grpc.StatusCode.INTERNAL, "internal error; see the server log")
        finally:
            self._stats.inflight.dec()
            self._stats.observe_request(
                metrics.Protocol.GRPC, outcome, time.perf_counter() - started
            )


def _decode(request: Any) -> dataplane.InferenceRequest:
    raw = request.raw_input_contents
    if raw and len(raw) != len(request.inputs):
        raise dataplane.InvalidInputError(
            f"{len(request.inputs)} inputs but {len(raw)} raw_input_contents; give one per input"
        )
    inputs = []
    for i, tensor in enumerate(request.inputs):
        data: Any
        if raw:
            data = raw[i]
        else:
            field = _CONTENTS_FIELD.get(tensor.datatype)
            if field is None:
                raise dataplane.InvalidInputError(
                    f"input {tensor.name!r}: send {tensor.datatype} data in raw_input_contents"
                )
            data = list(getattr(tensor.contents, field))
        inputs.append(
            dataplane.decode_tensor(tensor.name, tensor.datatype, list(tensor.shape), data)
        )
    outputs = [o.name for o in request.outputs] or None
    return dataplane.InferenceRequest(inputs, outputs, request.id or None)


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
        raw_output_contents=[np.ascontiguousarray(o.data).tobytes() for o in response.outputs],
    )


def create_server(
    plane: dataplane.DataPlane, stats: metrics.ModelMetrics, max_message_bytes: int
) -> grpc.aio.Server:
    server = grpc.aio.server(
        options=[
            ("grpc.max_receive_message_length", max_message_bytes),
            ("grpc.max_send_message_length", max_message_bytes),
        ]
    )
    pb_grpc.add_GRPCInferenceServiceServicer_to_server(InferenceServicer(plane, stats), server)
    return server

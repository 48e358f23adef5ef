"""The HTTP adapter: Open Inference Protocol (KServe v2) REST endpoints and ``/metrics``.

JSON tensors and the binary tensor data extension: with an
``Inference-Header-Content-Length: N`` header the first N bytes of the body are the
JSON header and the raw tensors follow, each input marked with
``parameters.binary_data_size``.  Outputs are returned binary when asked for
(``outputs[].parameters.binary_data`` or ``parameters.binary_data_output``).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Awaitable, Callable
from typing import Any

import numpy as np
import orjson
from aiohttp import web

from modeldeploy_runtime import dataplane, metrics

logger = logging.getLogger(__name__)

HEADER_LENGTH = "Inference-Header-Content-Length"

_STATUS: dict[type[dataplane.InferenceError], int] = {
    dataplane.InvalidInputError: 400,
    dataplane.ModelNotFoundError: 404,
    dataplane.RejectedError: 429,
    dataplane.UnavailableError: 503,
    dataplane.InferenceError: 500,
}
Handler = Callable[[web.Request], Awaitable[web.Response]]


def _json(body: Any, status: int = 200) -> web.Response:
    return web.Response(body=orjson.dumps(body), status=status, content_type="application/json")


def _error(status: int, message: str) -> web.Response:
    return _json({"error": message}, status)


def create_app(
    plane: dataplane.DataPlane, stats: metrics.ModelMetrics, max_body: int
) -> web.Application:
    app = web.Application(client_max_size=max_body)

    async def live(_: web.Request) -> web.Response:
        return _json({"live": True})

    async def ready(_: web.Request) -> web.Response:
        return _json({"ready": plane.ready}, 200 if plane.ready else 503)

    async def server_metadata(_: web.Request) -> web.Response:
        return _json(plane.server_metadata())

    def model_endpoint(
        call: Callable[[str, str | None], web.Response],
    ) -> Handler:
        async def handler(request: web.Request) -> web.Response:
            try:
                return call(request.match_info["name"], request.match_info.get("version"))
            except dataplane.InferenceError as error:
                return _error(_STATUS[type(error)], str(error))

        return handler

    def model_metadata(name: str, version: str | None) -> web.Response:
        return _json(plane.model_metadata(name, version))

    def model_ready(name: str, version: str | None) -> web.Response:
        is_ready = plane.model_ready(name, version)
        return _json({"name": name, "ready": is_ready}, 200 if is_ready else 503)

    async def infer(request: web.Request) -> web.Response:
        started = time.perf_counter()
        stats.inflight.inc()
        outcome = metrics.Outcome.SUCCESS
        try:
            try:
                body = await request.read()
            except web.HTTPRequestEntityTooLarge:
                outcome = metrics.Outcome.CLIENT_ERROR
                return _error(413, f"request body is larger than the limit of {max_body} bytes")
            parsed, binary_outputs, all_binary = _parse_infer(
                body, request.headers.get(HEADER_LENGTH)
            )
            response = await plane.infer(
                request.match_info["name"], request.match_info.get("version"), parsed
            )
            return _encode(response, binary_outputs, all_binary)
        except dataplane.InferenceError as error:
            outcome = error.outcome
            if outcome is metrics.Outcome.SERVER_ERROR:
                logger.error("%s", error)
            return _error(_STATUS[type(error)], str(error))
        except Exception:
            outcome = metrics.Outcome.SERVER_ERROR
            logger.exception("inference request failed")
            return _error(500, "internal error; see the server log")
        finally:
            stats.inflight.dec()
            stats.observe_request(metrics.Protocol.HTTP, outcome, time.perf_counter() - started)

    async def metrics_endpoint(_: web.Request) -> web.Response:
        return web.Response(
            body=stats.exposition(), headers={"Content-Type": "text/plain; version=0.0.4"}
        )

    model = "/v2/models/{name}"
    versioned = "/v2/models/{name}/versions/{version}"
    app.router.add_get("/v2/health/live", live)
    app.router.add_get("/v2/health/ready", ready)
    app.router.add_get("/v2", server_metadata)
    app.router.add_get("/metrics", metrics_endpoint)
    for prefix in (model, versioned):
        app.router.add_get(prefix, model_endpoint(model_metadata))
        app.router.add_get(prefix + "/ready", model_endpoint(model_ready))
        app.router.add_post(prefix + "/infer", infer)
    return app


def _parse_infer(
    body: bytes, header_length: str | None
) -> tuple[dataplane.InferenceRequest, set[str], bool]:
    """The request, the outputs wanted in binary, and whether binary is the default."""
    header, binary = body, b""
    if header_length is not None:
        try:
            length = int(header_length)
        except ValueError:
            length = -1
        if not 0 <= length <= len(body):
            raise dataplane.InvalidInputError(
                f"{HEADER_LENGTH} is {header_length!r}, but the body has {len(body)} bytes"
            )
        header, binary = body[:length], body[length:]
    try:
        document = orjson.loads(header)
    except orjson.JSONDecodeError as error:
        raise dataplane.InvalidInputError(f"request body is not valid JSON: {error}") from None
    if not isinstance(document, dict):
        raise dataplane.InvalidInputError("request body must be a JSON object")
    raw_inputs = document.get("inputs")
    if not isinstance(raw_inputs, list) or not raw_inputs:
        raise dataplane.InvalidInputError("request needs a non-empty 'inputs' list")
    inputs = []
    offset = 0
    view = memoryview(binary)
    for i, item in enumerate(raw_inputs):
        if not isinstance(item, dict) or not isinstance(item.get("name"), str):
            raise dataplane.InvalidInputError(f"inputs[{i}] must be an object with a 'name'")
        name = item["name"]
        size = _parameters(item).get("binary_data_size")
        if size is not None:
            if not isinstance(size, int) or size < 0 or offset + size > len(binary):
                raise dataplane.InvalidInputError(
                    f"input {name!r}: binary_data_size {size!r} does not fit the "
                    f"{len(binary)} bytes of binary data after the JSON header"
                )
            data: Any = view[offset : offset + size]
            offset += size
        elif "data" in item:
            data = item["data"]
        else:
            raise dataplane.InvalidInputError(f"input {name!r} has neither 'data' nor binary data")
        inputs.append(dataplane.decode_tensor(name, item.get("datatype"), item.get("shape"), data))

    all_binary = _parameters(document).get("binary_data_output") is True
    requested = document.get("outputs")
    names: list[str] | None = None
    binary_outputs: set[str] = set()
    if requested is not None:
        if not isinstance(requested, list) or not all(
            isinstance(o, dict) and isinstance(o.get("name"), str) for o in requested
        ):
            raise dataplane.InvalidInputError("'outputs' must be a list of objects with a 'name'")
        names = [o["name"] for o in requested]
        binary_outputs = {
            o["name"] for o in requested if _parameters(o).get("binary_data", all_binary) is True
        }
    request_id = document.get("id")
    return (
        dataplane.InferenceRequest(
            inputs, names, request_id if isinstance(request_id, str) else None
        ),
        binary_outputs,
        all_binary and names is None,
    )


def _parameters(item: dict[str, Any]) -> dict[str, Any]:
    parameters = item.get("parameters")
    return parameters if isinstance(parameters, dict) else {}


def _encode(
    response: dataplane.InferenceResponse, binary_outputs: set[str], all_binary: bool
) -> web.Response:
    outputs: list[dict[str, Any]] = []
    chunks: list[bytes] = []
    for output in response.outputs:
        entry: dict[str, Any] = {
            "name": output.name,
            "datatype": output.datatype,
            "shape": list(output.data.shape),
        }
        if all_binary or output.name in binary_outputs:
            raw = np.ascontiguousarray(output.data).tobytes()
            entry["parameters"] = {"binary_data_size": len(raw)}
            chunks.append(raw)
        else:
            entry["data"] = np.ascontiguousarray(output.data).ravel()
        outputs.append(entry)
    document: dict[str, Any] = {
        "model_name": response.model_name,
        "model_version": response.model_version,
        "outputs": outputs,
    }
    if response.id is not None:
        document["id"] = response.id
    header = orjson.dumps(document, option=orjson.OPT_SERIALIZE_NUMPY)
    if not chunks:
        return web.Response(body=header, content_type="application/json")
    return web.Response(
        body=b"".join([header, *chunks]),
        headers={HEADER_LENGTH: str(len(header)), "Content-Type": "application/octet-stream"},
    )

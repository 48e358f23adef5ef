"""The HTTP adapter: Open Inference Protocol (KServe v2) REST endpoints and ``/metrics``.

JSON tensors and the binary tensor data extension: with an
``Inference-Header-Content-Length: N`` header the first N bytes of the body are the
JSON header and the raw tensors follow, each input marked with
``parameters.binary_data_size``.  Outputs are returned binary when asked for
(``outputs[].parameters.binary_data`` or ``parameters.binary_data_output``).  ``BYTES``
tensors are lists of strings in JSON and length-prefixed elements in binary.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import orjson
from aiohttp import web

from modeldeploy_runtime import dataplane, metrics, tensors

HEADER_LENGTH = "Inference-Header-Content-Length"

_STATUS: dict[type[dataplane.InferenceError], int] = {
    dataplane.InvalidInputError: 400,
    dataplane.ModelNotFoundError: 404,
    dataplane.RejectedError: 429,
    dataplane.UnavailableError: 503,
    dataplane.InferenceError: 500,
}


def _json(body: Any, status: int = 200) -> web.Response:
    return web.Response(body=orjson.dumps(body), status=status, content_type="application/json")


def _error(status: int, message: str) -> web.Response:
    return _json({"error": message}, status)


class Endpoints:
    """The HTTP endpoints of one data plane; each method is an aiohttp handler."""

    def __init__(self, plane: dataplane.DataPlane, max_body: int) -> None:
        self._plane = plane
        self._max_body = max_body

    async def live(self, _: web.Request) -> web.Response:
        return _json({"live": True})

    async def ready(self, _: web.Request) -> web.Response:
        return _json({"ready": self._plane.ready}, 200 if self._plane.ready else 503)

    async def server_metadata(self, _: web.Request) -> web.Response:
        return _json(self._plane.server_metadata())

    async def model_metadata(self, request: web.Request) -> web.Response:
        name, version = _model(request)
        try:
            return _json(self._plane.model_metadata(name, version))
        except dataplane.InferenceError as error:
            return _error(_STATUS[type(error)], str(error))

    async def model_config(self, request: web.Request) -> web.Response:
        name, version = _model(request)
        try:
            return _json(self._plane.model_config(name, version))
        except dataplane.InferenceError as error:
            return _error(_STATUS[type(error)], str(error))

    async def model_ready(self, request: web.Request) -> web.Response:
        name, version = _model(request)
        try:
            is_ready = self._plane.model_ready(name, version)
        except dataplane.InferenceError as error:
            return _error(_STATUS[type(error)], str(error))
        return _json({"name": name, "ready": is_ready}, 200 if is_ready else 503)

    async def infer(self, request: web.Request) -> web.Response:
        name, version = _model(request)
        plane = self._plane
        try:
            # An unknown model is refused before its body is read.
            plane.check_model(name, version)
            body = await request.read()
        except dataplane.InferenceError as error:
            plane.stats.observe_request(metrics.Protocol.HTTP, error.outcome, 0.0)
            return _error(_STATUS[type(error)], str(error))
        except web.HTTPRequestEntityTooLarge:
            plane.stats.observe_request(metrics.Protocol.HTTP, metrics.Outcome.CLIENT_ERROR, 0.0)
            return _error(413, f"request body is larger than the limit of {self._max_body} bytes")
        header_length = request.headers.get(HEADER_LENGTH)
        try:
            response, (binary_outputs, all_binary) = await plane.handle(
                metrics.Protocol.HTTP,
                parse_infer,
                name,
                version,
                body,
                header_length,
                # Binary tensors decode in place, for free; only JSON and strings cost.
                offload=_costly_bytes(body, header_length) > dataplane.OFFLOAD_BYTES,
            )
        except dataplane.InferenceError as error:
            return _error(_STATUS[type(error)], str(error))
        return _encode(response, binary_outputs, all_binary)

    async def metrics(self, _: web.Request) -> web.Response:
        return web.Response(
            body=self._plane.stats.exposition(),
            headers={"Content-Type": "text/plain; version=0.0.4"},
        )


def create_app(plane: dataplane.DataPlane, max_body: int, path_prefix: str = "") -> web.Application:
    """The routes at the root and, when given, under `path_prefix` too: a client that reaches
    the runtime through an Ingress or HTTPRoute path uses the same path the pod serves."""
    app = web.Application(client_max_size=max_body)
    endpoints = Endpoints(plane, max_body)
    app.router.add_get("/metrics", endpoints.metrics)
    for root in dict.fromkeys(("", path_prefix)):
        app.router.add_get(root + "/v2/health/live", endpoints.live)
        app.router.add_get(root + "/v2/health/ready", endpoints.ready)
        app.router.add_get(root + "/v2", endpoints.server_metadata)
        for model in ("/v2/models/{name}", "/v2/models/{name}/versions/{version}"):
            app.router.add_get(root + model, endpoints.model_metadata)
            app.router.add_get(root + model + "/ready", endpoints.model_ready)
            app.router.add_get(root + model + "/config", endpoints.model_config)
            app.router.add_post(root + model + "/infer", endpoints.infer)
    return app


def _costly_bytes(body: bytes, header_length: str | None) -> int:
    """The JSON header's bytes, or the whole body's when it may carry binary strings (each
    element becomes an object of its own)."""
    if header_length is not None and header_length.isdigit():
        header = min(int(header_length), len(body))
        return len(body) if b'"BYTES"' in body[:header] else header
    return len(body)


def _model(request: web.Request) -> tuple[str, str | None]:
    return request.match_info["name"], request.match_info.get("version")


def parse_infer(
    plane: dataplane.Decoder,
    name: str,
    version: str | None,
    body: bytes,
    header_length: str | None,
) -> tuple[dataplane.InferenceRequest, tuple[set[str], bool]]:
    """The checked request, the outputs wanted in binary, and whether binary is the default."""
    plane.check_model(name, version)
    # Views, not copies: the tensors' bytes are read where they arrived.
    view = memoryview(body)
    header, start = view, len(body)
    if header_length is not None:
        try:
            start = int(header_length)
        except ValueError:
            start = -1
        if not 0 <= start <= len(body):
            raise dataplane.InvalidInputError(
                f"{HEADER_LENGTH} is {header_length[:32]!r}, but the body has {len(body)} bytes"
            )
        header = view[:start]
    try:
        document = orjson.loads(header)
    except orjson.JSONDecodeError as error:
        raise dataplane.InvalidInputError(f"request body is not valid JSON: {error}") from None
    if not isinstance(document, dict):
        raise dataplane.InvalidInputError("request body must be a JSON object")
    raw_inputs = document.get("inputs")
    if not isinstance(raw_inputs, list) or not raw_inputs:
        raise dataplane.InvalidInputError("request needs a non-empty 'inputs' list")
    # Before looking at any of them: a body of a million inputs costs its parse, no more.
    plane.check_input_count(name, version, len(raw_inputs))
    given = []
    offset = start
    for i, item in enumerate(raw_inputs):
        if not isinstance(item, dict) or not isinstance(item.get("name"), str):
            raise dataplane.InvalidInputError(f"inputs[{i}] must be an object with a 'name'")
        input_name = item["name"]
        parameters = item.get("parameters")
        size = parameters.get("binary_data_size") if isinstance(parameters, dict) else None
        if size is not None:
            if type(size) is not int or size < 0 or offset + size > len(body):
                raise dataplane.InvalidInputError(
                    f"input {input_name[:100]!r}: binary_data_size {str(size)[:32]} does not fit "
                    f"the {len(body) - start} bytes of binary data after the JSON header"
                )
            data: Any = view[offset : offset + size]
            offset += size
        elif "data" in item:
            data = item["data"]
        else:
            raise dataplane.InvalidInputError(
                f"input {input_name[:100]!r} has neither 'data' nor binary data"
            )
        given.append(
            dataplane.WireTensor(input_name, item.get("datatype"), item.get("shape"), data)
        )
    if offset != len(body):
        raise dataplane.InvalidInputError(
            f"{len(body) - offset} bytes of binary data follow the last input's; "
            "each input's parameters.binary_data_size must account for its bytes"
        )

    all_binary = _parameters(document).get("binary_data_output") is True
    requested = document.get("outputs")
    names: list[Any] | None = None
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
    checked = plane.decode(
        name, version, given, names, request_id if isinstance(request_id, str) else None
    )
    return checked, (binary_outputs, all_binary and names is None)


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
            raw = tensors.to_bytes(output.data)
            entry["parameters"] = {"binary_data_size": len(raw)}
            chunks.append(raw)
        elif output.data.dtype == tensors.OBJECT:
            entry["data"] = [str(item) for item in output.data.flat]
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

"""The Open Inference Protocol over HTTP (`/v2/...`): JSON in, domain tensors, JSON out.

Also the binary tensor extension that Triton's HTTP client uses by default: the JSON header is
followed by raw tensor bytes, its length in the `Inference-Header-Content-Length` header, and an
input's `parameters.binary_data_size` says how many of those bytes are its raw contents.
"""

from __future__ import annotations

import json
from collections.abc import Awaitable, Callable
from typing import Any

import numpy as np
from aiohttp import web
from opentelemetry import trace
from prometheus_client import CONTENT_TYPE_LATEST

from services.common import telemetry
from services.common.errors import InvalidArgument, http_error_middleware
from services.runtime import domain

HEADER_LENGTH = "Inference-Header-Content-Length"


def build_app(
    store: domain.ModelStore,
    metrics: domain.Metrics,
    max_elements: int,
    max_body_bytes: int,
    capture: domain.CaptureQueue | None = None,
) -> web.Application:
    app = web.Application(client_max_size=max_body_bytes, middlewares=[_traced, http_error_middleware()])
    routes = web.RouteTableDef()

    @routes.get("/metrics")
    async def prometheus(_: web.Request) -> web.Response:
        return web.Response(body=metrics.exposition(), headers={"Content-Type": CONTENT_TYPE_LATEST})

    @routes.get("/v2/health/live")
    async def live(_: web.Request) -> web.Response:
        return web.json_response({"live": True})

    @routes.get("/v2/health/ready")
    async def ready(_: web.Request) -> web.Response:
        serving = bool(store.names())
        return web.json_response({"ready": serving}, status=200 if serving else 503)

    @routes.get("/v2")
    async def server_metadata(_: web.Request) -> web.Response:
        return web.json_response(
            {"name": "mlmesh-runtime", "version": domain.server_version(), "extensions": ["binary_tensor_data"]}
        )

    @routes.get("/v2/models/{model}/ready")
    @routes.get("/v2/models/{model}/versions/{version}/ready")
    async def model_ready(request: web.Request) -> web.Response:
        _model(store, request)
        return web.json_response({"ready": True})

    @routes.get("/v2/models/{model}")
    @routes.get("/v2/models/{model}/versions/{version}")
    async def model_metadata(request: web.Request) -> web.Response:
        model = _model(store, request)

        def specs(tensors: list[domain.TensorSpec]) -> list[dict[str, Any]]:
            return [{"name": t.name, "datatype": t.datatype, "shape": list(t.shape)} for t in tensors]

        return web.json_response(
            {
                "name": model.name,
                "versions": store.versions(model.name),
                "platform": domain.PLATFORM,
                "inputs": specs(model.signature.inputs),
                "outputs": specs(model.signature.outputs),
            }
        )

    @routes.post("/v2/models/{model}/infer")
    @routes.post("/v2/models/{model}/versions/{version}/infer")
    async def infer(request: web.Request) -> web.Response:
        with metrics.observed("rest", request.match_info["model"], request.match_info.get("version", "")):
            model = _model(store, request)
            body = await request.read()
            header, binary = _split_body(body, request.headers.get(HEADER_LENGTH))
            tensors = _tensors(header, binary, max_elements)
            outputs_wanted = header.get("outputs") or []
            if not isinstance(outputs_wanted, list) or not all(isinstance(o, dict) for o in outputs_wanted):
                raise InvalidArgument("outputs must be a list of objects with a name", field="outputs")
            names = [str(output.get("name", "")) for output in outputs_wanted]
            inputs = model.check(tensors)
            outputs = await domain.run(model, inputs, names)
            request_id = header.get("id")
            if capture:
                capture.offer(model, str(request_id or ""), inputs.values(), outputs)
            return _answer(model, request_id, outputs, _wants_binary(header, outputs_wanted))

    app.add_routes(routes)
    return app


@web.middleware
async def _traced(request: web.Request, handler: Callable[[web.Request], Awaitable[web.StreamResponse]]) -> Any:
    """A server span per request, continuing the caller's trace (W3C `traceparent` header)."""
    resource = request.match_info.route.resource
    route = resource.canonical if resource is not None else "(no route)"  # a template: few span names
    with telemetry.tracer("mlmesh.runtime").start_as_current_span(
        f"{request.method} {route}",
        context=telemetry.extract_context({key.lower(): value for key, value in request.headers.items()}),
        kind=trace.SpanKind.SERVER,
        attributes={"http.request.method": request.method, "http.route": route},
    ) as span:
        response = await handler(request)
        span.set_attribute("http.response.status_code", response.status)
        return response


def _model(store: domain.ModelStore, request: web.Request) -> domain.LoadedModel:
    return store.get(request.match_info["model"], request.match_info.get("version", ""))


def _split_body(body: bytes, header_length: str | None) -> tuple[dict[str, Any], bytes]:
    length = len(body)
    if header_length is not None:
        if not header_length.isdigit() or int(header_length) > len(body):
            raise InvalidArgument(f"{HEADER_LENGTH} {header_length[:20]!r} does not fit a body of {len(body)} bytes")
        length = int(header_length)
    try:
        header = json.loads(body[:length])
    except (ValueError, UnicodeDecodeError) as error:
        raise InvalidArgument(f"the request body is not JSON: {error}") from error
    if not isinstance(header, dict):
        raise InvalidArgument("the request body must be a JSON object with inputs")
    return header, body[length:]


def _tensors(header: dict[str, Any], binary: bytes, max_elements: int) -> list[domain.Tensor]:
    inputs = header.get("inputs")
    if not isinstance(inputs, list) or not all(isinstance(item, dict) for item in inputs):
        raise InvalidArgument("inputs must be a list of objects with name, shape, datatype and data", field="inputs")
    tensors, offset = [], 0
    for item in inputs:
        name, datatype, shape = str(item.get("name", "")), str(item.get("datatype", "")), item.get("shape")
        if not isinstance(shape, list) or not all(isinstance(d, int) and not isinstance(d, bool) for d in shape):
            raise InvalidArgument(f"input {name!r}: shape must be a list of whole numbers", field="inputs.shape")
        parameters = item.get("parameters") or {}
        size = parameters.get("binary_data_size") if isinstance(parameters, dict) else None
        if size is not None:
            if not isinstance(size, int) or size < 0 or offset + size > len(binary):
                raise InvalidArgument(f"input {name!r}: binary_data_size {size!r} runs past the body's binary data")
            tensors.append(domain.tensor_from_raw(name, datatype, shape, binary[offset : offset + size], max_elements))
            offset += size
            continue
        tensors.append(
            domain.tensor_from_values(name, datatype, shape, _flat(name, datatype, item.get("data")), max_elements)
        )
    if offset != len(binary):
        raise InvalidArgument(f"{len(binary) - offset} bytes of binary data belong to no input")
    return tensors


def _flat(name: str, datatype: str, data: Any) -> list[Any]:
    if not isinstance(data, list):
        raise InvalidArgument(f"input {name!r}: data must be a list (flat or nested, row-major)", field="inputs.data")
    try:
        flat = np.asarray(data, dtype=object).reshape(-1).tolist()
    except ValueError as error:
        raise InvalidArgument(f"input {name!r}: nested data is ragged: {error}", field="inputs.data") from error
    if datatype == "BYTES":
        return [item.encode() if isinstance(item, str) else item for item in flat]
    if any(isinstance(item, (str, list, dict)) or item is None for item in flat):
        raise InvalidArgument(f"input {name!r}: {datatype} data must hold numbers", field="inputs.data")
    return flat


def _wants_binary(header: dict[str, Any], outputs_wanted: list[dict[str, Any]]) -> bool:
    parameters = header.get("parameters") or {}
    if isinstance(parameters, dict) and parameters.get("binary_data_output"):
        return True
    return any(isinstance(o.get("parameters"), dict) and o["parameters"].get("binary_data") for o in outputs_wanted)


def _answer(model: domain.LoadedModel, request_id: Any, outputs: list[domain.Tensor], binary: bool) -> web.Response:
    answer: dict[str, Any] = {"model_name": model.name, "model_version": model.version, "outputs": []}
    if request_id is not None:
        answer["id"] = str(request_id)
    chunks = []
    for output in outputs:
        entry: dict[str, Any] = {"name": output.name, "datatype": output.datatype, "shape": list(output.shape)}
        if binary or output.datatype == "FP16":
            chunk = domain.raw_bytes(output)
            entry["parameters"] = {"binary_data_size": len(chunk)}
            chunks.append(chunk)
        elif output.datatype == "BYTES":
            entry["data"] = [
                item.decode(errors="replace") if isinstance(item, bytes) else str(item)
                for item in output.array.reshape(-1)
            ]
        else:
            entry["data"] = output.array.reshape(-1).tolist()
        answer["outputs"].append(entry)
    text = json.dumps(answer).encode()
    if not chunks:
        return web.Response(body=text, content_type="application/json")
    return web.Response(
        body=text + b"".join(chunks), content_type="application/octet-stream", headers={HEADER_LENGTH: str(len(text))}
    )

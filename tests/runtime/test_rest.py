"""The runtime's REST API (`/v2`), called by Triton's HTTP client and by hand, well-formed and hostile."""

from __future__ import annotations

import json
import urllib.error
import urllib.request

import numpy as np
import pytest
import tritonclient.http as triton
from aiohttp.test_utils import TestClient, TestServer
from opentelemetry import trace
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

from services.common import telemetry
from services.runtime import domain, rest
from tests.registry.test_models import tiny_onnx
from tests.runtime.conftest import RuntimeProcess


def call(runtime: RuntimeProcess, path: str, body: bytes | dict | None = None, headers=None) -> tuple[int, dict]:
    data = json.dumps(body).encode() if isinstance(body, dict) else body
    request = urllib.request.Request(f"http://{runtime.http}{path}", data=data, headers=headers or {})
    try:
        with urllib.request.urlopen(request, timeout=10) as answer:
            return answer.status, json.loads(answer.read())
    except urllib.error.HTTPError as error:
        return error.code, json.loads(error.read())


def test_triton_http_client_reads_health_and_metadata(runtime):
    client = triton.InferenceServerClient(url=runtime.http)
    assert client.is_server_live() and client.is_server_ready() and client.is_model_ready("adder")
    metadata = client.get_model_metadata("adder")
    assert metadata["platform"] == "onnx_onnxv1" and metadata["versions"] == ["1"]
    assert metadata["inputs"] == [{"name": "x", "datatype": "FP32", "shape": [-1, 3]}]
    assert not client.is_model_ready("nope")


@pytest.mark.parametrize("binary", [True, False])
def test_triton_http_client_infers_with_binary_and_json_tensors(runtime, binary):
    client = triton.InferenceServerClient(url=runtime.http)
    values = np.random.default_rng(5).normal(size=(3, 3)).astype(np.float32)
    tensor = triton.InferInput("x", [3, 3], "FP32")
    tensor.set_data_from_numpy(values, binary_data=binary)
    output = triton.InferRequestedOutput("y", binary_data=binary)
    result = client.infer("adder", [tensor], outputs=[output], request_id="h-1")
    np.testing.assert_allclose(result.as_numpy("y"), values + 1, rtol=1e-6)
    answer = result.get_response()
    assert (answer["model_name"], answer["model_version"], answer["id"]) == ("adder", "1", "h-1")


def test_nested_json_data_is_read_row_major(runtime):
    status, answer = call(
        runtime,
        "/v2/models/adder/versions/1/infer",
        {"inputs": [{"name": "x", "shape": [2, 3], "datatype": "FP32", "data": [[1, 2, 3], [4, 5, 6]]}]},
    )
    assert status == 200
    assert answer["outputs"] == [{"name": "y", "datatype": "FP32", "shape": [2, 3], "data": [2, 3, 4, 5, 6, 7]}]


def x(shape=(1, 3), data=(1, 2, 3), datatype="FP32", name="x"):
    return {"inputs": [{"name": name, "shape": list(shape), "datatype": datatype, "data": list(data)}]}


HOSTILE = {
    "not json": ("/v2/models/adder/infer", b"{nope", {}, 400, "not JSON"),
    "not an object": ("/v2/models/adder/infer", b"[1, 2]", {}, 400, "JSON object"),
    "no inputs": ("/v2/models/adder/infer", {"inputs": "x"}, {}, 400, "inputs must be a list"),
    "wrong shape": ("/v2/models/adder/infer", x(shape=(1, 4), data=(1, 2, 3, 4)), {}, 400, "[-1, 3]"),
    "wrong datatype": ("/v2/models/adder/infer", x(datatype="INT64"), {}, 400, "must be FP32"),
    "unknown input": ("/v2/models/adder/infer", x(name="z"), {}, 400, "no input 'z'"),
    "text for numbers": ("/v2/models/adder/infer", x(data=("a", "b", "c")), {}, 400, "numbers"),
    "ragged data": ("/v2/models/adder/infer", x(data=([1, 2], [3])), {}, 400, "data"),
    "shape of text": ("/v2/models/adder/infer", x(shape=("a",)), {}, 400, "whole numbers"),
    "huge shape": ("/v2/models/adder/infer", x(shape=(2**31, 2**31)), {}, 413, "at most"),
    "unknown model": ("/v2/models/nope/infer", x(), {}, 404, "not served"),
    "unknown version": ("/v2/models/adder/versions/9/infer", x(), {}, 404, "no version '9'"),
    "binary past the end": (
        "/v2/models/adder/infer",
        b'{"inputs":[{"name":"x","shape":[1,3],"datatype":"FP32","parameters":{"binary_data_size":12}}]}' + b"\0" * 4,
        {"Inference-Header-Content-Length": "94"},
        400,
        "runs past",
    ),
    "header length too long": ("/v2/models/adder/infer", x(), {"Inference-Header-Content-Length": "99999"}, 400, "fit"),
    "stray binary": (
        "/v2/models/adder/infer",
        json.dumps(x()).encode() + b"\0\0",
        {"Inference-Header-Content-Length": str(len(json.dumps(x())))},
        400,
        "belong to no input",
    ),
}


@pytest.mark.parametrize("case", list(HOSTILE))
def test_hostile_requests_get_a_status_and_an_error_and_the_server_keeps_serving(runtime, case):
    path, body, headers, status, words = HOSTILE[case]
    got, answer = call(runtime, path, body, headers)
    assert got == status and words in answer["error"], (got, answer)
    assert call(runtime, "/v2/models/adder/infer", x())[1]["outputs"][0]["data"] == [2, 3, 4]


def test_server_metadata_and_readiness_of_unknown_models(runtime):
    assert call(runtime, "/v2")[1]["name"] == "mlmesh-runtime"
    assert call(runtime, "/v2/models/adder/versions/1/ready") == (200, {"ready": True})
    assert call(runtime, "/v2/models/nope/ready")[0] == 404


def metric(runtime: RuntimeProcess, name: str, **labels: str) -> float:
    with urllib.request.urlopen(f"http://{runtime.http}/metrics", timeout=10) as answer:
        text = answer.read().decode()
    wanted = ",".join(f'{key}="{value}"' for key, value in sorted(labels.items()))
    for line in text.splitlines():
        if line.startswith(name + "{"):
            found = ",".join(sorted(line[len(name) + 1 : line.index("}")].split(",")))
            if found == wanted:
                return float(line.rsplit(" ", 1)[1])
    return 0.0


def test_metrics_count_requests_by_model_protocol_and_outcome(runtime):
    ok = {"model": "adder", "version": "1", "protocol": "rest", "code": "OK"}
    bad = {**ok, "code": "INVALID_ARGUMENT"}
    unknown = {"model": "unknown", "version": "unknown", "protocol": "rest", "code": "NOT_FOUND"}
    before = [metric(runtime, "mlmesh_runtime_requests_total", **labels) for labels in (ok, bad, unknown)]
    call(runtime, "/v2/models/adder/versions/1/infer", x())
    call(runtime, "/v2/models/adder/versions/1/infer", x())
    call(runtime, "/v2/models/adder/versions/1/infer", x(name="z"))
    call(runtime, "/v2/models/made-up-name/versions/7/infer", x())
    after = [metric(runtime, "mlmesh_runtime_requests_total", **labels) for labels in (ok, bad, unknown)]
    assert [later - earlier for earlier, later in zip(before, after, strict=True)] == [2, 1, 1]
    assert metric(runtime, "mlmesh_runtime_request_seconds_count", model="adder", version="1", protocol="rest") >= 3


async def test_a_rest_request_continues_the_callers_trace(tmp_path):
    (tmp_path / "m.onnx").write_bytes(tiny_onnx())
    store = domain.ModelStore()
    store.add(domain.load_model("adder", "1", tmp_path / "m.onnx", None, (1, 1)))
    telemetry.setup("runtime-test")
    exporter = InMemorySpanExporter()
    trace.get_tracer_provider().add_span_processor(SimpleSpanProcessor(exporter))
    app = rest.build_app(store, domain.Metrics(store), 1000, 1024 * 1024)
    caller = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01"
    async with TestClient(TestServer(app)) as client:
        answer = await client.post("/v2/models/adder/infer", json=x(), headers={"Traceparent": caller})
        assert answer.status == 200
    (span,) = [span for span in exporter.get_finished_spans() if span.name == "POST /v2/models/{model}/infer"]
    assert format(span.context.trace_id, "032x") == "4bf92f3577b34da6a3ce929d0e0e4736"
    assert format(span.parent.span_id, "016x") == "00f067aa0ba902b7"
    assert span.attributes["http.response.status_code"] == 200

"""An endpoint's router as its own process, in front of two runtime processes serving two versions
of a real ONNX model from a real registry, called by Triton's clients (gRPC and HTTP) and by
hostile bytes; and its routes file, chooser and request reading on their own."""

from __future__ import annotations

import contextlib
import itertools
import json
import socket
import threading
import time
import urllib.error
import urllib.request
from collections import Counter
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import grpc
import numpy as np
import pytest
import tritonclient.grpc as triton_grpc
import tritonclient.http as triton_http
from google.rpc import error_details_pb2
from grpc_status import rpc_status

# Triton's own messages: the same protocol on the wire (its generated code and mlmesh's cannot
# share one process, since both define the `inference` package).
from tritonclient.grpc import service_pb2 as oip
from tritonclient.grpc import service_pb2_grpc as oip_grpc
from tritonclient.utils import InferenceServerException

from services.common.errors import InvalidArgument
from services.common.natsserver import free_port
from services.deployer.router import (
    RoutesError,
    SmoothWeightedChooser,
    parse_routes,
    request_target,
    with_versions,
)
from services.launcher import health_status
from tests.conftest import RegistryProcess
from tests.deployer.conftest import (
    INFERENCE_SERVICE,
    RouterProcess,
    loaded_generation,
    register_adder_version,
    spawn_router,
    wait_until_loaded,
    write_routes,
)
from tests.runtime.conftest import RuntimeProcess, spawn_runtime

ENDPOINT = "fraud"
ROUTER_MAX_MESSAGE_BYTES = 1024 * 1024
MIRROR_MAX_IN_FLIGHT = 16
X = np.array([[1.0, 2.0, 3.0]], dtype=np.float32)


# ---------------------------------------------------------------- the chooser, the routes file, request bytes


@pytest.mark.parametrize(
    "weights",
    [{"blue": 90, "green": 10}, {"a": 33, "b": 33, "c": 34}, {"a": 1, "b": 99}, {"a": 50, "b": 0, "c": 50}],
)
def test_the_chooser_gives_each_its_weight_over_10000_choices(weights):
    chooser = SmoothWeightedChooser(weights.items())
    picks = [chooser.choose() for _ in range(10_000)]
    counts = Counter(picks)
    for name, weight in weights.items():
        assert abs(counts[name] / 100 - weight) <= 2, counts
    again = SmoothWeightedChooser(weights.items())
    assert [again.choose() for _ in range(10_000)] == picks  # deterministic


def test_the_chooser_spreads_the_smaller_share_out():
    chooser = SmoothWeightedChooser([("blue", 90), ("green", 10)])
    picks = "".join(chooser.choose()[0] for _ in range(100))
    assert picks.count("g") == 10 and "gg" not in picks
    assert max(len(list(run)) for key, run in itertools.groupby(picks) if key == "b") <= 9
    assert SmoothWeightedChooser([("blue", 0)]).choose() is None


def routes(generation: int, *deployments: dict[str, Any], endpoint: str = ENDPOINT) -> dict[str, Any]:
    return {"generation": generation, "endpoint": endpoint, "deployments": list(deployments)}


def deployment(name: str, version: str, weight: int, replicas: list[Any], mirror: int = 0) -> dict[str, Any]:
    return {
        "name": name,
        "model_version": version,
        "weight": weight,
        "mirror_percent": mirror,
        "replicas": [{"grpc": replica.grpc, "http": replica.http} for replica in replicas],
    }


class Address:
    def __init__(self, grpc: str, http: str) -> None:
        self.grpc, self.http = grpc, http


LOCAL = Address("127.0.0.1:1", "127.0.0.1:2")


@pytest.mark.parametrize(
    ("content", "words"),
    [
        (routes(1, deployment("blue", "1", 101, [LOCAL]), deployment("green", "2", -1, [])), "less than or equal"),
        (routes(1, deployment("blue", "1", 50, [LOCAL]), deployment("green", "2", 40, [])), "sum to 100"),
        (routes(1, deployment("blue", "1", 50, [LOCAL]), deployment("blue", "2", 50, [])), "repeated: blue"),
        (routes(1, deployment("blue", "1", 100, [LOCAL], mirror=150)), "mirror_percent"),
        (routes(1, deployment("blue", "1", 100, [Address("nowhere", "x:1")])), "replicas.0.grpc"),
        (routes(1, deployment("blue", "", 100, [])), "model_version"),
        (routes(1, endpoint="../etc"), "endpoint"),
        ({"endpoint": ENDPOINT, "deployments": []}, "generation"),
        (routes(1, {**deployment("blue", "1", 100, []), "weight": "100"}), "weight"),
    ],
)
def test_invalid_routes_are_refused_naming_what_is_wrong(content, words):
    with pytest.raises(RoutesError, match=words):
        parse_routes(json.dumps(content))


def test_routes_parse_when_all_weights_are_zero_and_refuse_what_is_not_json():
    parsed = parse_routes(json.dumps(routes(3, deployment("blue", "1", 0, [LOCAL]), deployment("green", "2", 0, []))))
    assert parsed.generation == 3 and [d.weight for d in parsed.deployments] == [0, 0]
    with pytest.raises(RoutesError, match="JSON"):
        parse_routes("{not json")


def test_model_name_and_version_are_read_from_the_bytes_alone():
    request = oip.ModelInferRequest(model_name=ENDPOINT, model_version="2", id="r-1")
    request.inputs.add(name="x", datatype="FP32", shape=[1, 3])
    request.raw_input_contents.append(X.tobytes())
    message = request.SerializeToString()
    target = request_target(message)
    assert (target.name, target.version) == (ENDPOINT, "2")
    unpinned = oip.ModelInferRequest.FromString(target.without_version(message))
    request.model_version = ""
    assert unpinned == request
    assert request_target(oip.ModelMetadataRequest(name="m", version="7").SerializeToString()).version == "7"
    assert request_target(b"") == request_target(oip.ModelReadyRequest().SerializeToString())
    for garbage in (b"\xff\xff\xff", b"\x0a\x10abc", b"\x00\x01", b"\x0f", b"\x0a\x02\xff\xfe"):
        with pytest.raises(InvalidArgument, match="not a valid protobuf message"):
            request_target(garbage)


def test_metadata_answers_list_every_version_the_endpoint_serves():
    answer = oip.ModelMetadataResponse(name=ENDPOINT, versions=["2"], platform="onnx_onnxv1")
    answer.inputs.add(name="x", datatype="FP32", shape=[-1, 3])
    rewritten = oip.ModelMetadataResponse.FromString(with_versions(answer.SerializeToString(), ["1", "2"]))
    assert list(rewritten.versions) == ["1", "2"]
    assert (rewritten.name, rewritten.platform, rewritten.inputs) == (answer.name, answer.platform, answer.inputs)


# ---------------------------------------------------------------- the router in front of real runtimes


@pytest.fixture(scope="module")
def blue(registry_process: RegistryProcess, tmp_path_factory: pytest.TempPathFactory) -> Iterator[RuntimeProcess]:
    """A replica serving version 1 (y = x + 1) as the endpoint."""
    home = tmp_path_factory.mktemp("blue")
    ref = register_adder_version(registry_process, home, "adder", 1)
    assert ref == "adder:1"
    with spawn_runtime(home, registry_process, ref, served_name=ENDPOINT, deployment="blue") as running:
        yield running


@pytest.fixture(scope="module")
def green(
    registry_process: RegistryProcess, blue: RuntimeProcess, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[RuntimeProcess]:
    """A replica serving version 2 (y = x + 2) as the endpoint."""
    home = tmp_path_factory.mktemp("green")
    ref = register_adder_version(registry_process, home, "adder", 2)
    assert ref == "adder:2"
    with spawn_runtime(home, registry_process, ref, served_name=ENDPOINT, deployment="green") as running:
        yield running


GENERATIONS = itertools.count(1)


@pytest.fixture(scope="module")
def router(blue, green, tmp_path_factory: pytest.TempPathFactory) -> Iterator[RouterProcess]:
    directory = tmp_path_factory.mktemp("endpoint")
    routes_file = directory / "routes.json"
    write_routes(routes_file, routes(next(GENERATIONS), deployment("blue", "1", 100, [blue])))
    settings = {
        "max_message_bytes": str(ROUTER_MAX_MESSAGE_BYTES),
        "mirror_max_in_flight": str(MIRROR_MAX_IN_FLIGHT),
        "mirror_timeout_seconds": "3",
    }
    with spawn_router(routes_file, directory / "router.log", **settings) as running:
        yield running


def route(router: RouterProcess, *deployments: dict[str, Any]) -> int:
    """Put new routes in force; their generation."""
    generation = next(GENERATIONS)
    write_routes(router.routes_file, routes(generation, *deployments))
    wait_until_loaded(router.routes_file, generation)
    return generation


def blue_and_green(router: RouterProcess, blue: RuntimeProcess, green: RuntimeProcess, split=(100, 0), mirror=0):
    return route(
        router,
        deployment("blue", "1", split[0], [blue]),
        deployment("green", "2", split[1], [green], mirror=mirror),
    )


@pytest.fixture
def stub(router: RouterProcess) -> Iterator[oip_grpc.GRPCInferenceServiceStub]:
    with grpc.insecure_channel(router.grpc) as channel:
        yield oip_grpc.GRPCInferenceServiceStub(channel)


def typed_request(model: str = ENDPOINT, version: str = "", shape=(1, 3), values=(1.0, 2.0, 3.0)):
    request = oip.ModelInferRequest(model_name=model, model_version=version)
    request.inputs.add(name="x", datatype="FP32", shape=list(shape)).contents.fp32_contents.extend(values)
    return request


def grpc_infer(client: triton_grpc.InferenceServerClient, version: str = "") -> tuple[np.ndarray, str]:
    tensor = triton_grpc.InferInput("x", list(X.shape), "FP32")
    tensor.set_data_from_numpy(X)
    result = client.infer(ENDPOINT, [tensor], model_version=version, outputs=[triton_grpc.InferRequestedOutput("y")])
    return result.as_numpy("y"), result.get_response().model_version


def http_call(router: RouterProcess, path: str, body: bytes | None = None, headers=None) -> tuple[int, dict]:
    request = urllib.request.Request(f"http://{router.http}{path}", data=body, headers=headers or {})
    try:
        with urllib.request.urlopen(request, timeout=10) as answer:
            return answer.status, json.loads(answer.read())
    except urllib.error.HTTPError as error:
        return error.code, json.loads(error.read())


def metrics_of(http: str) -> str:
    with urllib.request.urlopen(f"http://{http}/metrics", timeout=10) as answer:
        return answer.read().decode()


def metric_sum(text: str, name: str, **labels: str) -> float:
    """The sum of the series of `name` whose labels include `labels`."""
    total = 0.0
    for line in text.splitlines():
        if line.startswith(name + "{") and all(f'{key}="{value}"' in line for key, value in labels.items()):
            total += float(line.rsplit(" ", 1)[1])
    return total


def test_triton_grpc_client_infers_through_the_router(router, blue, green, stub):
    blue_and_green(router, blue, green)
    client = triton_grpc.InferenceServerClient(url=router.grpc)
    values, version = grpc_infer(client)
    np.testing.assert_allclose(values, X + 1)
    assert version == "1"
    values, version = grpc_infer(client, version="2")
    np.testing.assert_allclose(values, X + 2)
    assert version == "2"
    answer = stub.ModelInfer(typed_request(values=(0.5, 1.0, 1.5)))
    assert (answer.model_name, answer.model_version) == (ENDPOINT, "1")
    assert list(answer.outputs[0].contents.fp32_contents) == [1.5, 2.0, 2.5] and not answer.raw_output_contents


@pytest.mark.parametrize("binary", [False, True])
def test_triton_http_client_infers_through_the_router(router, blue, green, binary):
    blue_and_green(router, blue, green)
    client = triton_http.InferenceServerClient(url=router.http)
    for version, addend in (("", 1), ("2", 2), ("1", 1)):
        tensor = triton_http.InferInput("x", list(X.shape), "FP32")
        tensor.set_data_from_numpy(X, binary_data=binary)
        outputs = [triton_http.InferRequestedOutput("y", binary_data=binary)]
        result = client.infer(ENDPOINT, [tensor], model_version=version, outputs=outputs, request_id="r-7")
        np.testing.assert_allclose(result.as_numpy("y"), X + addend)
        answer = result.get_response()
        assert (answer["model_name"], answer["model_version"], answer["id"]) == (ENDPOINT, str(addend), "r-7")


def test_metadata_health_and_readiness_through_the_router(router, blue, green):
    blue_and_green(router, blue, green)
    grpc_client = triton_grpc.InferenceServerClient(url=router.grpc)
    http_client = triton_http.InferenceServerClient(url=router.http)
    for client in (grpc_client, http_client):
        assert client.is_server_live() and client.is_server_ready()
        assert client.is_model_ready(ENDPOINT) and client.is_model_ready(ENDPOINT, "2")
    assert not http_client.is_model_ready("nope")
    with pytest.raises(InferenceServerException, match="not served here"):
        grpc_client.is_model_ready("nope")
    metadata = grpc_client.get_model_metadata(ENDPOINT)
    assert (metadata.name, list(metadata.versions), metadata.platform) == (ENDPOINT, ["1", "2"], "onnx_onnxv1")
    assert [(t.name, t.datatype, list(t.shape)) for t in metadata.inputs] == [("x", "FP32", [-1, 3])]
    assert list(grpc_client.get_model_metadata(ENDPOINT, "2").versions) == ["1", "2"]
    rest_metadata = http_client.get_model_metadata(ENDPOINT)
    assert rest_metadata["versions"] == ["1", "2"] and rest_metadata["outputs"][0]["name"] == "y"
    assert grpc_client.get_server_metadata().name == "mlmesh-router"
    assert http_client.get_server_metadata()["name"] == "mlmesh-router"
    assert health_status(router.grpc, "") == "SERVING"
    assert health_status(router.grpc, INFERENCE_SERVICE) == "SERVING"


def test_weights_split_requests_exactly(router, blue, green, stub):
    blue_and_green(router, blue, green, split=(90, 10))
    request = typed_request()
    versions = Counter(stub.ModelInfer(request).model_version for _ in range(1000))
    assert abs(versions["1"] - 900) <= 20 and abs(versions["2"] - 100) <= 20, versions
    assert versions == {"1": 900, "2": 100}  # the chooser is deterministic: the split is exact
    text = metrics_of(router.http)
    assert metric_sum(text, "mlmesh_router_requests_total", endpoint=ENDPOINT, deployment="green", code="OK") >= 100


def test_a_pinned_version_reaches_its_deployment_at_any_weight(router, blue, green, stub):
    blue_and_green(router, blue, green, split=(100, 0))
    client = triton_grpc.InferenceServerClient(url=router.grpc)
    for _ in range(10):
        values, version = grpc_infer(client, version="2")
        assert version == "2"
        np.testing.assert_allclose(values, X + 2)
    assert {grpc_infer(client)[1] for _ in range(10)} == {"1"}


def test_unknown_versions_and_models_are_not_found(router, blue, green, stub):
    blue_and_green(router, blue, green)
    with pytest.raises(grpc.RpcError) as unknown_version:
        stub.ModelInfer(typed_request(version="7"))
    assert unknown_version.value.code() == grpc.StatusCode.NOT_FOUND
    assert "'7'" in unknown_version.value.details() and "1, 2" in unknown_version.value.details()
    with pytest.raises(grpc.RpcError) as unknown_model:
        stub.ModelInfer(typed_request(model="adder"))
    assert unknown_model.value.code() == grpc.StatusCode.NOT_FOUND
    assert "'adder'" in unknown_model.value.details() and f"endpoint '{ENDPOINT}'" in unknown_model.value.details()
    with pytest.raises(grpc.RpcError) as metadata:
        stub.ModelMetadata(oip.ModelMetadataRequest(name=ENDPOINT, version="9"))
    assert metadata.value.code() == grpc.StatusCode.NOT_FOUND
    body = json.dumps({"inputs": [{"name": "x", "shape": [1, 3], "datatype": "FP32", "data": [1, 2, 3]}]}).encode()
    status, answer = http_call(router, f"/v2/models/{ENDPOINT}/versions/7/infer", body)
    assert status == 404 and "1, 2" in answer["error"]
    status, answer = http_call(router, "/v2/models/adder/infer", body)
    assert status == 404 and f"endpoint '{ENDPOINT}'" in answer["error"]
    status, answer = http_call(router, "/v2/models/adder")
    assert status == 404 and "error" in answer


def test_new_routes_take_effect_and_invalid_ones_keep_the_old(router, blue, green):
    client = triton_grpc.InferenceServerClient(url=router.grpc)
    generation = blue_and_green(router, blue, green, split=(0, 100))
    assert loaded_generation(router.routes_file) == generation
    assert {grpc_infer(client)[1] for _ in range(10)} == {"2"}
    too_little = routes(generation + 1, deployment("blue", "1", 50, [blue]), deployment("green", "2", 20, [green]))
    for invalid, words in (
        (json.dumps(too_little), "must sum to 100 (or all be 0 while nothing takes traffic), not 70"),
        ("{ truncated", "Invalid JSON"),
    ):
        router.routes_file.write_text(invalid)
        wait_for_log(router, words)
        assert loaded_generation(router.routes_file) == generation
        assert {grpc_infer(client)[1] for _ in range(10)} == {"2"}
    generation = blue_and_green(router, blue, green, split=(100, 0))
    assert {grpc_infer(client)[1] for _ in range(10)} == {"1"}


def wait_for_log(router: RouterProcess, words: str, timeout: float = 5) -> None:
    deadline = time.monotonic() + timeout
    while words not in router.log_text():
        assert time.monotonic() < deadline, f"{words!r} not in the router's log"
        time.sleep(0.05)


def test_a_dead_replica_beside_a_live_one_loses_no_request(router, blue, green, stub):
    dead = Address(f"127.0.0.1:{free_port()}", f"127.0.0.1:{free_port()}")
    route(router, deployment("blue", "1", 100, [dead, blue]), deployment("green", "2", 0, [green]))
    grpc_client = triton_grpc.InferenceServerClient(url=router.grpc)
    http_client = triton_http.InferenceServerClient(url=router.http)
    for _ in range(20):
        assert grpc_infer(grpc_client)[1] == "1"
        tensor = triton_http.InferInput("x", list(X.shape), "FP32")
        tensor.set_data_from_numpy(X)
        assert http_client.infer(ENDPOINT, [tensor]).get_response()["model_version"] == "1"
    # Without a live replica of the version pinned, the answer names the replicas tried.
    route(router, deployment("blue", "1", 100, [blue]), deployment("green", "2", 0, [dead]))
    with pytest.raises(grpc.RpcError) as unavailable:
        stub.ModelInfer(typed_request(version="2"))
    assert unavailable.value.code() == grpc.StatusCode.UNAVAILABLE
    assert f"green at {dead.grpc}" in unavailable.value.details()
    status, answer = http_call(router, f"/v2/models/{ENDPOINT}/versions/2/ready")
    assert status == 503 and f"green at {dead.http}" in answer["error"]
    # Unpinned, the other deployments taking traffic answer in its place.
    route(router, deployment("blue", "1", 50, [dead]), deployment("green", "2", 50, [green]))
    assert {grpc_infer(grpc_client)[1] for _ in range(10)} == {"2"}


def test_a_mirror_receives_its_share_and_callers_see_only_the_primary(router, blue, green):
    blue_and_green(router, blue, green, split=(100, 0), mirror=50)
    before = mirror_share(router, green)
    client = triton_grpc.InferenceServerClient(url=router.grpc)
    http_client = triton_http.InferenceServerClient(url=router.http)
    for _ in range(100):
        values, version = grpc_infer(client)
        assert version == "1"
        np.testing.assert_allclose(values, X + 1)
        tensor = triton_http.InferInput("x", list(X.shape), "FP32")
        tensor.set_data_from_numpy(X)
        assert http_client.infer(ENDPOINT, [tensor]).get_response()["model_version"] == "1"
    deadline = time.monotonic() + 10
    while sum(mirror_share(router, green)) - sum(before) < 100:
        assert time.monotonic() < deadline, mirror_share(router, green)
        time.sleep(0.05)
    time.sleep(0.2)
    received, dropped = (after - earlier for after, earlier in zip(mirror_share(router, green), before, strict=True))
    # Half of the 200 requests, counted rather than drawn: copies beyond mirror_max_in_flight
    # (only when this machine is very slow) are dropped and counted instead.
    assert received + dropped == 100 and received >= 80


def mirror_share(router: RouterProcess, green: RuntimeProcess) -> tuple[float, float]:
    """Requests green's runtime received, and copies the router dropped."""
    received = metric_sum(metrics_of(green.http), "mlmesh_runtime_requests_total", model=ENDPOINT)
    dropped = metric_sum(metrics_of(router.http), "mlmesh_router_mirror_dropped_total", endpoint=ENDPOINT)
    return received, dropped


def test_a_silent_mirror_neither_delays_nor_fails_callers_and_copies_beyond_the_limit_are_dropped(
    router, blue, green, stub
):
    with socket.create_server(("127.0.0.1", 0), backlog=64) as silent:  # connects, never answers
        address = f"127.0.0.1:{silent.getsockname()[1]}"
        route(
            router, deployment("blue", "1", 100, [blue]), deployment("green", "2", 0, [Address(address, address)], 100)
        )
        before = mirror_outcomes(router)
        request = typed_request()
        # Each copy waits for the mirror's 3 s timeout; the callers must not. Eight at a time, so
        # that more than MIRROR_MAX_IN_FLIGHT copies are due within those 3 s however slow this machine.
        with ThreadPoolExecutor(8) as callers:
            answers = list(callers.map(lambda _: stub.ModelInfer(request, timeout=2).model_version, range(40)))
        assert answers == ["1"] * 40
        deadline = time.monotonic() + 10
        while sum(mirror_outcomes(router)) - sum(before) < 40:  # every copy sent has timed out
            assert time.monotonic() < deadline, mirror_outcomes(router)
            time.sleep(0.1)
        sent, dropped = (after - earlier for after, earlier in zip(mirror_outcomes(router), before, strict=True))
        assert dropped >= 1 and sent >= MIRROR_MAX_IN_FLIGHT and sent + dropped == 40


def mirror_outcomes(router: RouterProcess) -> tuple[float, float]:
    """Copies sent to green that ended (however), and copies dropped."""
    text = metrics_of(router.http)
    return (
        metric_sum(text, "mlmesh_router_mirrored_total", endpoint=ENDPOINT, deployment="green"),
        metric_sum(text, "mlmesh_router_mirror_dropped_total", endpoint=ENDPOINT),
    )


def test_malformed_requests_are_refused_and_the_router_stays_up(router, blue, green, stub):
    blue_and_green(router, blue, green)
    with grpc.insecure_channel(router.grpc) as channel:
        raw_infer = channel.unary_unary(f"/{INFERENCE_SERVICE}/ModelInfer")
        for garbage in (b"\xff" * 64, b"\x0a\xff\xff\xff\xff\x0f", bytes(range(256))):
            with pytest.raises(grpc.RpcError) as refused:
                raw_infer(garbage, timeout=10)
            assert refused.value.code() == grpc.StatusCode.INVALID_ARGUMENT
            assert "not a valid protobuf message" in refused.value.details()
        with pytest.raises(grpc.RpcError) as too_large:
            raw_infer(b"\x0a\x05fraud" + b"\x3a\x80\x80\x80\x01" + b"\0" * (2 * 1024 * 1024), timeout=10)
        assert too_large.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    with pytest.raises(grpc.RpcError) as wrong_shape:
        stub.ModelInfer(typed_request(shape=(1, 4), values=(1.0, 2.0, 3.0, 4.0)))
    assert wrong_shape.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "shape" in wrong_shape.value.details()
    status = rpc_status.from_call(wrong_shape.value)
    assert status is not None and status.message == wrong_shape.value.details()
    info = error_details_pb2.ErrorInfo()
    assert status.details[0].Unpack(info) and info.domain == "mlmesh.dev"
    path = f"/v2/models/{ENDPOINT}/infer"
    status_code, answer = http_call(router, path, b"this is not json", {"Content-Type": "application/json"})
    assert status_code == 400 and "not JSON" in answer["error"]
    status_code, answer = http_call(router, path, b"{" * (ROUTER_MAX_MESSAGE_BYTES + 10))
    assert status_code == 413 and "MLMESH_ROUTER_MAX_MESSAGE_BYTES" in answer["error"]
    assert http_call(router, "/v2/nowhere")[0] == 404
    with pytest.raises(InferenceServerException, match="not served here"):
        triton_grpc.InferenceServerClient(url=router.grpc).get_model_metadata("nope")
    assert health_status(router.grpc, INFERENCE_SERVICE) == "SERVING"
    assert triton_grpc.InferenceServerClient(url=router.grpc).is_server_ready()
    assert grpc_infer(triton_grpc.InferenceServerClient(url=router.grpc))[1] == "1"
    text = metrics_of(router.http)
    assert metric_sum(text, "mlmesh_router_requests_total", code="INVALID_ARGUMENT") >= 4


class RecordingReplica(oip_grpc.GRPCInferenceServiceServicer):
    """A replica that answers every inference alike and keeps what each request carried."""

    answer = oip.ModelInferResponse(model_name=ENDPOINT, model_version="1", id="recorded")
    http_answer = b'{"model_name": "fraud", "model_version": "1", "outputs": []}' + bytes(range(8))

    def __init__(self) -> None:
        self.grpc_metadata: list[dict[str, str]] = []
        self.http_requests: list[tuple[str, dict[str, str], bytes]] = []
        self.grpc = self.http = ""

    def ModelInfer(self, request: Any, context: grpc.ServicerContext) -> Any:
        self.grpc_metadata.append(dict(context.invocation_metadata()))
        return self.answer


@contextlib.contextmanager
def recording_replica() -> Iterator[RecordingReplica]:
    replica = RecordingReplica()
    server = grpc.server(ThreadPoolExecutor(max_workers=4))
    oip_grpc.add_GRPCInferenceServiceServicer_to_server(replica, server)
    replica.grpc = f"127.0.0.1:{server.add_insecure_port('127.0.0.1:0')}"
    server.start()

    class Handler(BaseHTTPRequestHandler):
        def do_POST(self) -> None:
            body = self.rfile.read(int(self.headers["Content-Length"]))
            replica.http_requests.append((self.path, dict(self.headers), body))
            self.send_response(200)
            self.send_header("Content-Type", "application/octet-stream")
            self.send_header("Inference-Header-Content-Length", str(len(replica.http_answer) - 8))
            self.send_header("Content-Length", str(len(replica.http_answer)))
            self.end_headers()
            self.wfile.write(replica.http_answer)

        def log_message(self, *args: Any) -> None:
            pass

    http = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    replica.http = f"127.0.0.1:{http.server_address[1]}"
    thread = threading.Thread(target=http.serve_forever, daemon=True)
    thread.start()
    try:
        yield replica
    finally:
        http.shutdown()
        http.server_close()
        server.stop(0)


def test_trace_context_and_protocol_headers_pass_through_and_answers_come_back_as_sent(router, blue, green):
    traceparent = "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01"
    with recording_replica() as replica:
        route(router, deployment("blue", "1", 100, [replica]), deployment("green", "2", 0, [green]))
        with grpc.insecure_channel(router.grpc) as channel:
            raw_infer = channel.unary_unary(f"/{INFERENCE_SERVICE}/ModelInfer")
            request = typed_request().SerializeToString()
            answer = raw_infer(request, metadata=(("traceparent", traceparent), ("tracestate", "mlmesh=1")))
        assert answer == RecordingReplica.answer.SerializeToString()
        assert replica.grpc_metadata[-1]["traceparent"] == traceparent
        assert replica.grpc_metadata[-1]["tracestate"] == "mlmesh=1"
        header = (
            b'{"inputs": [{"name": "x", "shape": [1, 3], "datatype": "FP32", "parameters": {"binary_data_size": 12}}]}'
        )
        body = header + X.tobytes()
        sent = urllib.request.Request(
            f"http://{router.http}/v2/models/{ENDPOINT}/versions/1/infer",
            data=body,
            headers={
                "Content-Type": "application/octet-stream",
                "Inference-Header-Content-Length": str(len(header)),
                "traceparent": traceparent,
            },
        )
        with urllib.request.urlopen(sent, timeout=10) as relayed:
            assert relayed.read() == RecordingReplica.http_answer
            assert relayed.headers["Content-Type"] == "application/octet-stream"
            assert relayed.headers["Inference-Header-Content-Length"] == str(len(RecordingReplica.http_answer) - 8)
        path, headers, received = replica.http_requests[-1]
    assert (path, received) == (f"/v2/models/{ENDPOINT}/versions/1/infer", body)
    assert headers["traceparent"] == traceparent and headers["Inference-Header-Content-Length"] == str(len(header))
    assert headers["Content-Type"] == "application/octet-stream"


def test_a_router_waits_for_its_routes_file(blue, tmp_path: Path):
    routes_file = tmp_path / "routes.json"
    with spawn_router(routes_file, tmp_path / "router.log") as waiting:
        with grpc.insecure_channel(waiting.grpc) as channel:
            stub = oip_grpc.GRPCInferenceServiceStub(channel)
            with pytest.raises(grpc.RpcError) as unavailable:
                stub.ModelInfer(typed_request())
            assert unavailable.value.code() == grpc.StatusCode.UNAVAILABLE
            assert "no routes yet" in unavailable.value.details()
            assert not stub.ServerReady(oip.ServerReadyRequest()).ready
            assert stub.ServerLive(oip.ServerLiveRequest()).live
            assert http_call(waiting, "/v2/health/ready")[0] == 503
            status, answer = http_call(waiting, f"/v2/models/{ENDPOINT}")
            assert status == 503 and str(routes_file) in answer["error"]
            write_routes(routes_file, routes(5, deployment("blue", "1", 100, [blue])))
            wait_until_loaded(routes_file, 5)
            assert stub.ServerReady(oip.ServerReadyRequest()).ready
            assert stub.ModelInfer(typed_request()).model_version == "1"

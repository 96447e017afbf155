"""Endpoints end to end: Triton's client (gRPC and HTTP) through an endpoint's address, while the
deployer shifts traffic between blue and green, and while a replica is killed."""

from __future__ import annotations

import json
import os
import signal
import threading
import time
from collections import Counter
from collections.abc import Iterator

import numpy as np
import pytest
import tritonclient.grpc as triton
import tritonclient.http as triton_http
from typer.testing import CliRunner

from services._proto.mlmesh.v1 import deployer_pb2
from services.cli import app
from tests.conftest import RegistryProcess
from tests.deployer.processes import DeployerProcess, running_deployer
from tests.deployer.test_servicer import wait_for
from tests.runtime.conftest import register_adder

READY = deployer_pb2.DEPLOYMENT_STATUS_READY


@pytest.fixture(scope="module")
def deployer(registry_process: RegistryProcess, tmp_path_factory: pytest.TempPathFactory) -> Iterator[DeployerProcess]:
    with running_deployer(tmp_path_factory.mktemp("endpoints-home"), registry_process) as running:
        yield running


@pytest.fixture(scope="module")
def versions(registry_process: RegistryProcess, tmp_path_factory: pytest.TempPathFactory) -> tuple[str, str]:
    folder = tmp_path_factory.mktemp("endpoint-models")
    return register_adder(registry_process, folder), register_adder(registry_process, folder)


def call(address: str, endpoint: str, version: str = "") -> str:
    """One inference through the endpoint; the version that answered."""
    client = triton.InferenceServerClient(url=address)
    tensor = triton.InferInput("x", [1, 3], "FP32")
    tensor.set_data_from_numpy(np.ones((1, 3), np.float32))
    answer = client.infer(endpoint, [tensor], model_version=version)
    np.testing.assert_array_equal(answer.as_numpy("y"), np.full((1, 3), 2, np.float32))
    return answer.get_response().model_version


class Traffic:
    """Callers sending requests to an endpoint without pause, counting answers and failures."""

    def __init__(self, address: str, endpoint: str, callers: int = 4) -> None:
        self.address, self.endpoint = address, endpoint
        self.answers: Counter[str] = Counter()
        self.failures: list[str] = []
        self._stop = threading.Event()
        self._threads = [threading.Thread(target=self._run) for _ in range(callers)]

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                self.answers[call(self.address, self.endpoint)] += 1
            except Exception as error:  # every failure is a finding
                self.failures.append(f"{time.monotonic():.2f} {error}")

    def __enter__(self) -> Traffic:
        for thread in self._threads:
            thread.start()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self._stop.set()
        for thread in self._threads:
            thread.join(30)


def test_blue_green_shift_drops_no_request(deployer, versions):
    blue, green = versions
    with deployer.client() as client:
        client.create("bluegreen", blue)
        wait_for(client, "bluegreen", "blue", READY)
        address = client.get("bluegreen").grpc_address
        with Traffic(address, "bluegreen") as traffic:
            client.create("bluegreen", green, deployment="green")
            wait_for(client, "bluegreen", "green", READY)
            time.sleep(1)
            client.set_traffic("bluegreen", {"blue": 50, "green": 50})
            time.sleep(1)
            client.set_traffic("bluegreen", {"green": 100})
            time.sleep(1)
            client.delete("bluegreen", "blue")
            before_end = traffic.answers.copy()
            time.sleep(1)
        after_delete = traffic.answers - before_end
    assert traffic.failures == [], traffic.failures[:5]
    assert set(traffic.answers) == {blue.split(":")[1], green.split(":")[1]}
    assert set(after_delete) == {green.split(":")[1]}


def test_weights_split_requests_and_a_version_pins_its_deployment(deployer, versions):
    blue, green = versions
    with deployer.client() as client:
        client.create("weights", blue)
        client.create("weights", green, deployment="green")
        wait_for(client, "weights", "green", READY)
        wait_for(client, "weights", "blue", READY)
        endpoint = client.set_traffic("weights", {"blue": 90, "green": 10})
        time.sleep(1)  # the router loads the new routes
    seen = Counter(call(endpoint.grpc_address, "weights") for _ in range(1000))
    assert abs(seen[green.split(":")[1]] - 100) <= 20, seen
    assert {call(endpoint.grpc_address, "weights", green.split(":")[1]) for _ in range(20)} == {green.split(":")[1]}
    http = triton_http.InferenceServerClient(url=endpoint.http_address)
    tensor = triton_http.InferInput("x", [1, 3], "FP32")
    tensor.set_data_from_numpy(np.ones((1, 3), np.float32), binary_data=True)
    assert http.infer("weights", [tensor]).as_numpy("y").tolist() == [[2.0, 2.0, 2.0]]
    assert http.get_model_metadata("weights")["name"] == "weights"


def test_a_killed_replica_drops_no_request_behind_the_router(deployer, versions):
    blue, _ = versions
    with deployer.client() as client:
        client.create("survive", blue, replicas=2)
        ready = wait_for(client, "survive", "blue", READY)
        address = client.get("survive").grpc_address
        time.sleep(1)  # both replicas in the routes
        with Traffic(address, "survive") as traffic:
            time.sleep(0.5)
            os.kill(int(ready.replica_states[0].instance.split(":")[0]), signal.SIGKILL)
            time.sleep(2)
    assert traffic.failures == [], traffic.failures[:5]
    assert sum(traffic.answers.values()) > 50


def test_predict_sends_rows_through_the_endpoint(deployer, versions):
    blue, _ = versions
    with deployer.client() as client:
        client.create("predict", blue)
        wait_for(client, "predict", "blue", READY)
    time.sleep(1)
    environment = {"MLMESH_DEPLOYER_ADDRESS": deployer.address}
    result = CliRunner().invoke(app, ["predict", "predict", "--json", "[[1, 2, 3], [4, 5, 6]]"], env=environment)
    assert result.exit_code == 0, result.output
    answer = json.loads(result.stdout)
    assert answer["model_version"] == blue.split(":")[1]
    assert answer["outputs"][0]["data"] == [2, 3, 4, 5, 6, 7]

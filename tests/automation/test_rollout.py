"""Staged rollouts through a real deployer: a challenger that wins its evaluation takes a canary
share of a live endpoint's traffic, and either takes over (then the champion alias moves) or,
when it answers the endpoint's requests with errors, is rolled back automatically."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import grpc
import numpy as np
import pytest
from tritonclient.grpc import service_pb2 as oip
from tritonclient.grpc import service_pb2_grpc as oip_grpc

from services._proto.mlmesh.v1 import automation_pb2, deployer_pb2
from services.client import AutomationClient, RegistryClient
from tests.automation.conftest import policy, running_automation
from tests.conftest import RegistryProcess, stream_events
from tests.deployer.processes import DeployerProcess, running_deployer

ENDPOINT = "rollout-ep"
ROLLOUT = {"endpoint": ENDPOINT, "canary_percent": 50, "canary_seconds": 2, "min_requests": 10}


@dataclass
class Mesh:
    automation: str
    deployer: DeployerProcess


@pytest.fixture(scope="module")
def mesh(registry_process: RegistryProcess, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Mesh]:
    with running_deployer(tmp_path_factory.mktemp("deployer"), registry_process) as deployer:
        home = tmp_path_factory.mktemp("automation")
        with running_automation(home, registry_process, deployer_address=deployer.address) as automation:
            yield Mesh(automation.address, deployer)


class Traffic:
    """Requests to the endpoint, one after another, in a thread, as its users would send them."""

    def __init__(self, address: str) -> None:
        self.address = address
        self.sent = self.failed = 0
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self.run, daemon=True)

    def run(self) -> None:
        request = oip.ModelInferRequest(model_name=ENDPOINT)
        request.inputs.add(name="X", datatype="FP32", shape=[1, 30])
        request.raw_input_contents.append(np.ones((1, 30), dtype=np.float32).tobytes())
        with grpc.insecure_channel(self.address) as channel:
            stub = oip_grpc.GRPCInferenceServiceStub(channel)
            while not self.stop.is_set():
                try:
                    stub.ModelInfer(request, timeout=10)
                except grpc.RpcError:
                    self.failed += 1
                self.sent += 1
                time.sleep(0.01)

    def __enter__(self) -> Traffic:
        self.thread.start()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.stop.set()
        self.thread.join(15)


def serve_champion(mesh: Mesh, data: dict[str, str]) -> str:
    """A first champion (trained by a policy without rollout) deployed at the endpoint; its address."""
    with AutomationClient(mesh.automation) as client:
        policy(client, "first", "rolled", "shuffled", data)
        first = client.wait_run(client.start_run("first").id, timeout=120)
        assert first.promoted and first.rollout == "none"
    with mesh.deployer.client() as deployer:
        deployer.create(ENDPOINT, "rolled@champion")
        deadline = time.monotonic() + 60
        while (endpoint := deployer.get(ENDPOINT)).deployments[0].status != deployer_pb2.DEPLOYMENT_STATUS_READY:
            assert time.monotonic() < deadline
            time.sleep(0.2)
    return endpoint.grpc_address


def test_a_challenger_that_errors_in_its_canary_is_rolled_back_and_a_good_one_takes_over(
    mesh: Mesh, registry_process: RegistryProcess, data: dict[str, str], tmp_path: Path
) -> None:
    address = serve_champion(mesh, data)
    with RegistryClient(registry_process.address) as registry:
        champion = registry.get("rolled@champion").version
    with AutomationClient(mesh.automation) as client, Traffic(address) as traffic:
        # It wins offline (accuracy) but cannot answer the endpoint's requests (its input is named
        # otherwise): the canary's errors roll it back.
        policy(client, "renamed", "rolled", "renamed", data, rollout=ROLLOUT)
        broken = client.wait_run(client.start_run("renamed").id, timeout=180)
        assert broken.status == automation_pb2.RUN_STATUS_COMPLETED and not broken.promoted
        assert broken.rollout == "rolled_back"
        assert "rolled back from rollout-ep: during the canary the challenger answered" in broken.message
        assert broken.rollout_figures["canary_error_rate"] > 0.5
        assert broken.rollout_figures["canary_serving_error_rate"] == 0
        with mesh.deployer.client() as deployer:
            endpoint = deployer.get(ENDPOINT)
        assert [(d.name, d.traffic) for d in endpoint.deployments] == [("blue", 100)]
        with RegistryClient(registry_process.address) as registry:
            assert registry.get("rolled@champion").version == champion
        # A good one takes a canary share, then all the traffic, then the alias.
        policy(client, "good", "rolled", "logistic", data, rollout=ROLLOUT)
        good = client.wait_run(client.start_run("good").id, timeout=180)
        assert good.status == automation_pb2.RUN_STATUS_COMPLETED and good.promoted, good.message
        assert good.rollout == "rolled_out" and good.rollout_figures["canary_requests"] >= 10
        assert good.rollout_figures["canary_error_rate"] == 0
    with mesh.deployer.client() as deployer:
        endpoint = deployer.get(ENDPOINT)
    assert [(d.name, d.traffic, d.model_version) for d in endpoint.deployments] == [
        (f"v{good.produced_version}", 100, good.produced_version)
    ]
    with RegistryClient(registry_process.address) as registry:
        assert registry.get("rolled@champion").version == good.produced_version
    rolled_back = [
        event
        for event in stream_events(registry_process.nats_url, "mlmesh.events.model.rolled_back")
        if event.data["run_id"] == broken.id
    ]
    assert len(rolled_back) == 1 and rolled_back[0].data["endpoint"] == ENDPOINT
    assert rolled_back[0].data["version"] == broken.produced_version
    # Traffic kept flowing: only the rolled-back canary's share failed, never the serving deployment.
    assert traffic.sent > 100 and traffic.failed < traffic.sent / 2

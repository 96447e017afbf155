"""The docker target end to end on the real engine: the builder builds the model's image, the
deployer runs it as containers with CPU and memory limits on loopback ports, the endpoint answers
Triton's client, captured requests reach NATS from inside the container, a killed container is
replaced, a restarted deployer adopts what runs without a failed request, and deleting removes
the containers."""

from __future__ import annotations

import asyncio
import ipaddress
import json
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import docker
import nats
import numpy as np
import pytest
import tritonclient.grpc as triton_grpc
from typer.testing import CliRunner

from services._proto.mlmesh.v1 import deployer_pb2
from services.cli import app
from services.client import RegistryClient
from services.common import capture, natsserver
from tests.builder.conftest import BuilderProcess
from tests.builder.docker_parts import base_image, docker_engine, image_builder
from tests.conftest import NatsServer, RegistryProcess
from tests.deployer.processes import DeployerProcess, start_deployer, stop_deployer
from tests.deployer.test_servicer import deployment_events, kinds, wait_for, wait_for_event
from tests.runtime.conftest import register_adder

__all__ = ["base_image", "docker_engine", "image_builder"]  # fixtures, used by name
pytestmark = [pytest.mark.slow, pytest.mark.timeout(1800)]
runner = CliRunner()
ENDPOINT = "boxed"
# A first image build downloads the runtime's wheels and builds on the vfs driver: minutes.
IMAGE_TIMEOUT_SECONDS = 900
# Starting a container on vfs copies the whole image first.
CONTAINER_READY_SECONDS = 240


def bridge_gateway(client: docker.APIClient) -> str:
    """The engine's host as its containers see it (the default bridge's gateway)."""
    (config, *_) = client.inspect_network("bridge")["IPAM"]["Config"]
    # Older engines name only the subnet: the gateway is then its first address.
    return config.get("Gateway") or str(next(ipaddress.ip_network(config["Subnet"]).hosts()))


@pytest.fixture(scope="module")
def bridge_nats(docker_engine, tmp_path_factory: pytest.TempPathFactory) -> Iterator[NatsServer]:
    """A nats-server on the docker bridge's address of this machine, so that containers reach it
    (as host.docker.internal) as well as the processes here."""
    home = tmp_path_factory.mktemp("bridge-nats")
    server = NatsServer(port=natsserver.free_port(), store=home / "store", host=bridge_gateway(docker_engine))
    server.start()
    yield server
    server.stop()


@pytest.fixture(scope="module")
def mesh(
    registry_process: RegistryProcess,
    image_builder: BuilderProcess,
    bridge_nats: NatsServer,
    tmp_path_factory: pytest.TempPathFactory,
) -> Iterator[dict]:
    """The deployer of this module (it may be restarted: mesh["deployer"] is the one running)."""
    home = tmp_path_factory.mktemp("deployer")
    settings = {
        "builder_address": image_builder.address,
        "container_nats_url": f"nats://host.docker.internal:{bridge_nats.port}",
        "ready_timeout_seconds": str(CONTAINER_READY_SECONDS),
        "max_restarts": "3",
    }
    port = natsserver.free_port()
    state = {
        "deployer": start_deployer(home, registry_process, port, bridge_nats.url, **settings),
        "restart": lambda: start_deployer(home, registry_process, port, bridge_nats.url, **settings),
    }
    try:
        yield state
    finally:
        deployer: DeployerProcess = state["deployer"]
        with deployer.client() as client:
            for endpoint in client.list():
                client.delete(endpoint.name)
        stop_deployer(deployer)


def containers_of(client: docker.APIClient, endpoint: str) -> list[dict]:
    return client.containers(all=True, filters={"label": f"io.mlmesh.deployer.endpoint={endpoint}"})


def infer(address: str, values: list[float]) -> tuple[list[float], str]:
    with triton_grpc.InferenceServerClient(address) as client:
        tensor = triton_grpc.InferInput("x", [1, 3], "FP32")
        tensor.set_data_from_numpy(np.array([values], dtype=np.float32))
        result = client.infer(ENDPOINT, [tensor], client_timeout=20)
    return result.as_numpy("y").tolist()[0], result.get_response().model_version


def captured(nats_url: str, subject: str) -> list[dict]:
    """Every capture message on `subject` in MLMESH_CAPTURE so far."""

    async def read() -> list[dict]:
        connection = await nats.connect(nats_url)
        try:
            subscription = await connection.jetstream().subscribe(subject, ordered_consumer=True)
            found = []
            while True:
                try:
                    found.append(json.loads(capture.split((await subscription.next_msg(timeout=1)).data)[0]))
                except TimeoutError:
                    return found
        finally:
            await connection.close()

    return asyncio.run(read())


def test_a_docker_deployment_is_built_runs_limited_heals_is_adopted_and_goes(
    mesh,
    registry_process,
    bridge_nats,
    docker_engine,
    tmp_path: Path,
):
    adder = register_adder(registry_process, tmp_path)
    deployer: DeployerProcess = mesh["deployer"]
    arguments = ["deploy", "create", ENDPOINT, adder, "--target", "docker", "--cpus", "1", "--memory", "512"]
    arguments += ["--capture", "--address", deployer.address, "--json"]
    result = runner.invoke(app, arguments)
    assert result.exit_code == 0, result.output
    shown = json.loads(result.output)
    blue = shown["deployments"][0]
    assert (blue["target"], blue["status"], blue["version"]) == ("docker", "READY", int(adder.split(":")[1]))
    assert blue["image"].startswith("mlmesh-model-adder:")

    # One container, limited as asked, its ports on loopback only.
    (container,) = containers_of(docker_engine, ENDPOINT)
    details = docker_engine.inspect_container(container["Id"])
    assert details["HostConfig"]["NanoCpus"] == 1_000_000_000
    assert details["HostConfig"]["Memory"] == 512 * 1024 * 1024
    bindings = details["HostConfig"]["PortBindings"]
    assert {binding["HostIp"] for port in bindings.values() for binding in port} == {"127.0.0.1"}
    assert details["Config"]["Image"] == blue["image"]
    assert blue["replica_states"][0]["instance"] == container["Id"]

    # The endpoint answers Triton's client, through the router and at the replica.
    assert infer(shown["grpc_address"], [1, 2, 3]) == ([2.0, 3.0, 4.0], adder.split(":")[1])
    assert infer(blue["replica_states"][0]["grpc_address"], [0, 0, 0])[0] == [1.0, 1.0, 1.0]

    # What the container received reached NATS from inside it.
    deadline = time.monotonic() + 30
    while not (messages := captured(bridge_nats.url, f"mlmesh.capture.{ENDPOINT}.blue")):
        assert time.monotonic() < deadline, "nothing was captured"
        time.sleep(1)
    records = [record for message in messages for record in message["records"]]
    assert {(record["model"], str(record["version"])) for record in records} == {(ENDPOINT, adder.split(":")[1])}

    # A killed container is reported and replaced by a new one.
    docker_engine.kill(container["Id"])
    wait_for_event(bridge_nats.url, ENDPOINT, "deployment.unhealthy:blue")
    with deployer.client() as client:
        deadline = time.monotonic() + CONTAINER_READY_SECONDS
        while kinds(bridge_nats.url, ENDPOINT).count("deployment.ready:blue") < 2:
            assert time.monotonic() < deadline, kinds(bridge_nats.url, ENDPOINT)
            time.sleep(1)
        healed = wait_for(client, ENDPOINT, "blue", deployer_pb2.DEPLOYMENT_STATUS_READY).replica_states[0]
    unhealthy = [e for e in deployment_events(bridge_nats.url, ENDPOINT) if e.kind == "deployment.unhealthy"]
    assert "exited" in unhealthy[0].data["reason"] and "137" in unhealthy[0].data["reason"]
    assert healed.instance != container["Id"] and healed.restarts == 1
    assert [c["Id"] for c in containers_of(docker_engine, ENDPOINT)] == [healed.instance]

    # A restarted deployer adopts the running container; requests keep being answered meanwhile.
    failures: list[str] = []
    answered = [0]
    stop = threading.Event()

    def traffic() -> None:
        while not stop.is_set():
            try:
                infer(shown["grpc_address"], [1, 1, 1])
                answered[0] += 1
            except Exception as error:
                failures.append(str(error))

    caller = threading.Thread(target=traffic)
    caller.start()
    try:
        stop_deployer(deployer)
        deployer = mesh["deployer"] = mesh["restart"]()
        time.sleep(3)  # a few passes of the new reconciler
    finally:
        stop.set()
        caller.join()
    assert not failures and answered[0] > 0
    with deployer.client() as client:
        adopted = wait_for(client, ENDPOINT, "blue", deployer_pb2.DEPLOYMENT_STATUS_READY).replica_states[0]
    assert adopted.instance == healed.instance and adopted.restarts == 1

    # The logs come from the container.
    logs = runner.invoke(app, ["deploy", "logs", ENDPOINT, "--address", deployer.address, "--json"])
    assert logs.exit_code == 0, logs.output
    assert any("runtime" in line.lower() or "serving" in line.lower() for line in json.loads(logs.output)["lines"])

    # Deleting removes the containers and releases the model version.
    with deployer.client() as client:
        client.delete(ENDPOINT)
        deadline = time.monotonic() + 60
        while any(endpoint.name == ENDPOINT for endpoint in client.list()):
            assert time.monotonic() < deadline, "the endpoint is still there"
            time.sleep(0.5)
    assert containers_of(docker_engine, ENDPOINT) == []
    wait_for_event(bridge_nats.url, ENDPOINT, "deployment.deleted:blue")
    with RegistryClient(registry_process.address) as registry:
        assert not registry.get(adder).used_by


def test_an_image_the_engine_lacks_fails_the_deployment_saying_so(mesh, registry_process, tmp_path: Path):
    adder = register_adder(registry_process, tmp_path)
    deployer: DeployerProcess = mesh["deployer"]
    with deployer.client() as client:
        created = client.create("ghost", adder, target="docker", image="mlmesh-no-such-image:1")
        assert created.image == "mlmesh-no-such-image:1"
        failed = wait_for(client, "ghost", "blue", deployer_pb2.DEPLOYMENT_STATUS_FAILED, timeout=90)
        client.delete("ghost")
    assert "mlmesh-no-such-image:1 is not on the Docker engine" in failed.message
    assert "mlmesh build image" in failed.message

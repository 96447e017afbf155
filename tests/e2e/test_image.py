"""The mesh image that deploy/build-image.sh builds, run as a container: it serves the registry and takes a model."""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from onnx import TensorProto, helper

from services._proto.mlmesh.v1 import registry_pb2_grpc
from services.client import BuilderClient
from services.common import natsserver
from tests.builder.wheels import make_wheel
from tests.conftest import ROOT, missing_part
from tests.registry.uploads import model_upload

IMAGE = "mlmesh:dev"
# A clean machine builds the base image (debootstrap), downloads the wheels and builds the image:
# about 4 minutes; with everything cached it takes a second.
BUILD_TIMEOUT_SECONDS = 1200
# On the vfs storage driver `docker run` copies the whole image first (about 40 s).
START_TIMEOUT_SECONDS = 180
READY_TIMEOUT_SECONDS = 90
REGISTRY_SERVICE = "mlmesh.v1.RegistryService"
BUILDER_SERVICE = "mlmesh.v1.BuilderService"

pytestmark = [
    pytest.mark.slow,
    pytest.mark.timeout(BUILD_TIMEOUT_SECONDS + START_TIMEOUT_SECONDS + 2 * READY_TIMEOUT_SECONDS + 120),
]


def docker(*arguments: str, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["docker", *arguments], capture_output=True, text=True, timeout=timeout)


def why_no_docker_engine() -> str | None:
    """The reason no Docker engine can be used here, or None when one answers."""
    if shutil.which("docker") is None:
        return "no docker client on PATH (Debian: apt-get install docker.io)"
    try:
        answer = docker("version", "--format", "{{.Server.Version}}", timeout=30)
    except subprocess.TimeoutExpired:
        return "the Docker engine did not answer `docker version` within 30 s"
    if answer.returncode != 0:
        return f"no Docker engine answers (start dockerd): {answer.stderr.strip()[:300]}"
    return None


@pytest.fixture(scope="module")
def image() -> str:
    reason = why_no_docker_engine()
    if reason:
        missing_part(reason)
    started = time.monotonic()
    build = subprocess.run(
        ["bash", str(ROOT / "deploy" / "build-image.sh")],
        cwd=ROOT,
        env={**os.environ, "MLMESH_IMAGE": IMAGE, "PYTHON": sys.executable},
        capture_output=True,
        text=True,
        timeout=BUILD_TIMEOUT_SECONDS,
    )
    print(f"deploy/build-image.sh took {time.monotonic() - started:.0f} s:\n{build.stderr[-3000:]}{build.stdout}")
    if build.returncode != 0:
        pytest.fail(
            f"deploy/build-image.sh failed ({build.returncode}):\n{build.stdout[-3000:]}\n{build.stderr[-5000:]}"
        )
    return IMAGE


@dataclass
class Container:
    name: str
    address: str

    def logs(self) -> str:
        answer = docker("logs", "--tail", "60", self.name)
        return answer.stdout + answer.stderr

    def state(self) -> str:
        return docker("inspect", "--format", "{{.State.Status}}", self.name).stdout.strip()


def health_of(channel: grpc.Channel, service: str = REGISTRY_SERVICE) -> str:
    try:
        reply = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(service=service), timeout=2)
    except grpc.RpcError as error:
        return error.code().name
    return health_pb2.HealthCheckResponse.ServingStatus.Name(reply.status)


@pytest.fixture(scope="module")
def registry_container(image: str) -> Iterator[Container]:
    """The image with its defaults (`mlmesh serve registry`), its port 50051 published on a free loopback port."""
    port = natsserver.free_port()
    container = Container(name=f"mlmesh-test-{uuid.uuid4().hex[:10]}", address=f"127.0.0.1:{port}")
    # A short health interval so that Docker's own view of the HEALTHCHECK is known within the test.
    try:
        publish = f"{container.address}:50051"
        options = ["--detach", "--name", container.name, "--publish", publish, "--health-interval", "2s"]
        run = docker("run", *options, image, timeout=START_TIMEOUT_SECONDS)
        assert run.returncode == 0, f"docker run failed: {run.stderr}"
        deadline = time.monotonic() + READY_TIMEOUT_SECONDS
        with grpc.insecure_channel(container.address) as channel:
            while (status := health_of(channel)) != "SERVING":
                state = container.state()
                assert state == "running", f"the container is {state}:\n{container.logs()}"
                assert time.monotonic() < deadline, (
                    f"not SERVING after {READY_TIMEOUT_SECONDS} s ({status}):\n{container.logs()}"
                )
                time.sleep(0.5)
        yield container
    finally:
        docker("rm", "--force", "--volumes", container.name)


def tiny_onnx_model() -> bytes:
    graph = helper.make_graph(
        [helper.make_node("Relu", ["x"], ["y"])],
        "relu",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [None, 4])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [None, 4])],
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]).SerializeToString()


def test_the_image_serves_the_registry_and_registers_a_model_version(registry_container: Container) -> None:
    content = tiny_onnx_model()
    with grpc.insecure_channel(registry_container.address) as channel:
        stub = registry_pb2_grpc.RegistryServiceStub(channel)
        reply = stub.RegisterModelVersion(model_upload("fraud", [("model.onnx", content)]), timeout=30)
    version = reply.model_version
    assert (version.name, version.version, version.framework) == ("fraud", 1, "onnx")
    assert [(file.path, file.size, file.sha256) for file in version.files] == [
        ("model.onnx", len(content), hashlib.sha256(content).hexdigest())
    ]
    # The model's signature was read inside the image: onnx is installed and works there.
    assert [tensor.name for tensor in version.signature.inputs] == ["x"]


def test_the_service_runs_unprivileged_with_its_data_under_mlmesh_home(registry_container: Container) -> None:
    identity = docker("exec", registry_container.name, "id", "-u")
    assert identity.returncode == 0, identity.stderr
    assert identity.stdout.strip() != "0"
    listing = docker("exec", registry_container.name, "ls", "/data")
    assert "registry.db" in listing.stdout.split(), listing.stdout + listing.stderr


def test_docker_sees_the_container_healthy_through_the_image_healthcheck(registry_container: Container) -> None:
    def health() -> str:
        return docker("inspect", "--format", "{{.State.Health.Status}}", registry_container.name).stdout.strip()

    deadline = time.monotonic() + READY_TIMEOUT_SECONDS
    while (status := health()) != "healthy":
        probes = docker("inspect", "--format", "{{json .State.Health.Log}}", registry_container.name).stdout
        assert time.monotonic() < deadline, f"health is {status!r} after {READY_TIMEOUT_SECONDS} s: {probes[-2000:]}"
        time.sleep(1)


@pytest.fixture(scope="module")
def builder_container(image: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Container]:
    """The image running `mlmesh serve builder`, resolving environments from a folder of wheels
    copied into the container (no package index)."""
    wheels = tmp_path_factory.mktemp("wheels")
    make_wheel(wheels, "alpha", "1.0", ("beta>=2",))
    for version in ("1.0", "2.0", "2.1"):
        make_wheel(wheels, "beta", version)
    wheels.chmod(0o755)  # the copy keeps the mode, and the service runs unprivileged
    port = natsserver.free_port()
    container = Container(name=f"mlmesh-test-{uuid.uuid4().hex[:10]}", address=f"127.0.0.1:{port}")
    settings = {
        "MLMESH_HEALTHCHECK_PORT": "50052",
        "MLMESH_BUILDER_FIND_LINKS": '["/data/wheels"]',
        "MLMESH_BUILDER_NO_INDEX": "true",
    }
    try:
        options = ["--name", container.name, "--publish", f"{container.address}:50052"]
        options += [argument for name, value in settings.items() for argument in ("--env", f"{name}={value}")]
        create = docker("create", *options, image, "serve", "builder", timeout=START_TIMEOUT_SECONDS)
        assert create.returncode == 0, f"docker create failed: {create.stderr}"
        copy = docker("cp", f"{wheels}/.", f"{container.name}:/data/wheels")
        assert copy.returncode == 0, copy.stderr
        assert docker("start", container.name).returncode == 0
        deadline = time.monotonic() + READY_TIMEOUT_SECONDS
        with grpc.insecure_channel(container.address) as channel:
            while (status := health_of(channel, BUILDER_SERVICE)) != "SERVING":
                state = container.state()
                assert state == "running", f"the container is {state}:\n{container.logs()}"
                assert time.monotonic() < deadline, f"not SERVING ({status}):\n{container.logs()}"
                time.sleep(0.5)
        yield container
    finally:
        docker("rm", "--force", "--volumes", container.name)


def test_the_builder_in_the_image_resolves_environments_with_pip(builder_container: Container) -> None:
    with BuilderClient(builder_container.address) as client:
        environment, created = client.register_environment("tools", "alpha==1.0\n")
    assert created and environment.version == 1
    lock = {line.split("==")[0]: line for line in environment.lock_text.splitlines() if "==" in line}
    assert set(lock) == {"alpha", "beta"}
    assert "beta==2.1" in lock["beta"] and "--hash=sha256:" in lock["beta"]

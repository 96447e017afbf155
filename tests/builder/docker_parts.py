"""Real parts for tests of model images: the Docker engine, the locally built base image, a small
scikit-learn model as ONNX, and containers run from the images."""

from __future__ import annotations

import contextlib
import hashlib
import json
import shutil
import subprocess
import time
import urllib.request
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import docker
import docker.errors
import numpy as np
import pytest

from services.builder.images import ModelPayload
from services.common import natsserver
from tests.builder.conftest import BuilderProcess, start_builder
from tests.conftest import ROOT, RegistryProcess, missing_part, stop_process

BASE_IMAGE = "mlmesh-base:py3.11"
# debootstrap takes about 2 minutes the first time; later runs find the image and return at once.
BASE_IMAGE_TIMEOUT_SECONDS = 900
# On the vfs storage driver a container starts only once the whole image is copied.
READY_TIMEOUT_SECONDS = 180


def engine_client() -> docker.APIClient:
    """A client of the engine the builder uses by default: DOCKER_HOST, else the local socket."""
    return docker.APIClient(version="auto", timeout=120, **docker.utils.kwargs_from_env())


@pytest.fixture(scope="session")
def docker_engine() -> Iterator[docker.APIClient]:
    """A client of the local Docker engine; skips (fails in CI) when none answers."""
    try:
        client = engine_client()
    except docker.errors.DockerException as error:
        missing_part(f"no Docker engine answers (start dockerd): {error}")
    yield client
    client.close()


@pytest.fixture(scope="session")
def base_image(docker_engine: docker.APIClient) -> str:
    """mlmesh-base:py3.11, built by deploy/build-base-image.sh when missing and kept afterwards."""
    started = time.monotonic()
    build = subprocess.run(
        ["bash", str(ROOT / "deploy" / "build-base-image.sh")],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=BASE_IMAGE_TIMEOUT_SECONDS,
    )
    if build.returncode == 2:  # no engine or no debootstrap: a part this machine lacks
        missing_part(f"deploy/build-base-image.sh cannot build {BASE_IMAGE} here: {build.stderr.strip()[-500:]}")
    if build.returncode != 0:
        pytest.fail(f"deploy/build-base-image.sh failed ({build.returncode}):\n{build.stdout}\n{build.stderr[-5000:]}")
    if build.stderr.strip():
        print(f"deploy/build-base-image.sh took {time.monotonic() - started:.0f} s:\n{build.stderr}")
    return BASE_IMAGE


@dataclass
class SklearnModel:
    """A fitted scikit-learn classifier, its ONNX conversion and data to ask it about."""

    estimator: object
    payload: ModelPayload
    features: np.ndarray


def iris_classifier(folder: Path, name: str = "iris", version: int = 1, seed: int = 7) -> SklearnModel:
    """A seeded RandomForest on iris as ONNX (label and probabilities as plain tensors, no zipmap)."""
    from skl2onnx import to_onnx
    from sklearn.datasets import load_iris
    from sklearn.ensemble import RandomForestClassifier

    features, labels = load_iris(return_X_y=True)
    features = features.astype(np.float32)
    estimator = RandomForestClassifier(n_estimators=10, max_depth=4, random_state=seed).fit(features, labels)
    onnx_model = to_onnx(estimator, features[:1], options={"zipmap": False}, target_opset=17)
    content = onnx_model.SerializeToString()
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"{name}-{version}.onnx"
    path.write_bytes(content)
    signature = {
        "inputs": [{"name": "X", "datatype": "FP32", "shape": [-1, 4]}],
        "outputs": [
            {"name": "label", "datatype": "INT64", "shape": [-1]},
            {"name": "probabilities", "datatype": "FP32", "shape": [-1, 3]},
        ],
    }
    payload = ModelPayload(name, version, hashlib.sha256(content).hexdigest(), path, signature)
    return SklearnModel(estimator, payload, features)


@dataclass
class RunningImage:
    container_id: str
    grpc: str
    http: str


def answers_ok(url: str, timeout: float = 2) -> bool:
    """Whether GET `url` answers 200."""
    try:
        with urllib.request.urlopen(url, timeout=timeout) as answer:
            return answer.status == 200
    except OSError:
        return False


@contextlib.contextmanager
def running(
    client: docker.APIClient,
    image: str,
    environment: dict[str, str] | None = None,
    health_interval_seconds: float | None = None,
) -> Iterator[RunningImage]:
    """The image as a container (one CPU, 1 GB), its ports published on free loopback ports, once it
    answers ready; removed afterwards. `health_interval_seconds` runs the image's HEALTHCHECK more often."""
    grpc_port, http_port = natsserver.free_port(), natsserver.free_port()
    host_config = client.create_host_config(
        port_bindings={8001: ("127.0.0.1", grpc_port), 8000: ("127.0.0.1", http_port)},
        nano_cpus=1_000_000_000,
        mem_limit="1g",
    )
    container = client.create_container(
        image,
        name=f"mlmesh-test-{uuid.uuid4().hex[:10]}",
        ports=[8001, 8000],
        environment=environment or {},
        host_config=host_config,
        # Only the interval: the engine takes the rest of the HEALTHCHECK from the image.
        healthcheck={"interval": int(health_interval_seconds * 1e9)} if health_interval_seconds else None,
    )
    container_id = container["Id"]
    try:
        client.start(container_id)
        started = RunningImage(container_id, f"127.0.0.1:{grpc_port}", f"127.0.0.1:{http_port}")
        deadline = time.monotonic() + READY_TIMEOUT_SECONDS
        while not answers_ok(f"http://{started.http}/v2/health/ready"):
            state = client.inspect_container(container_id)["State"]
            logs = client.logs(container_id, tail=60).decode(errors="replace")
            assert state["Status"] in ("created", "running"), f"the container is {state['Status']}:\n{logs}"
            assert time.monotonic() < deadline, f"not ready after {READY_TIMEOUT_SECONDS} s:\n{logs}"
            time.sleep(0.5)
        yield started
    finally:
        client.remove_container(container_id, force=True, v=True)


def remove_image(client: docker.APIClient, image: str) -> None:
    with contextlib.suppress(docker.errors.NotFound):
        client.remove_image(image, force=True)


def registry_binary() -> str | None:
    """Debian's distribution registry (package docker-registry), when installed."""
    return shutil.which("docker-registry") or next(
        (str(path) for path in (Path("/usr/bin/docker-registry"), Path("/usr/sbin/docker-registry")) if path.exists()),
        None,
    )


@dataclass
class LocalRegistry:
    address: str
    process: subprocess.Popen[bytes]


@pytest.fixture
def local_registry(tmp_path: Path) -> Iterator[LocalRegistry]:
    """Debian's distribution registry on a free loopback port, storing in tmp_path."""
    binary = registry_binary()
    if binary is None:
        missing_part("no image registry binary (Debian: apt-get install docker-registry)")
    port = natsserver.free_port()
    config = tmp_path / "registry.yml"
    config.write_text(
        "version: 0.1\n"
        "log:\n  level: warn\n"
        f"storage:\n  filesystem:\n    rootdirectory: {tmp_path / 'registry'}\n"
        f"http:\n  addr: 127.0.0.1:{port}\n"
    )
    with (tmp_path / "registry.log").open("wb") as log:
        process = subprocess.Popen([binary, "serve", str(config)], stdout=log, stderr=subprocess.STDOUT)
    address = f"127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 30
        while not answers_ok(f"http://{address}/v2/", timeout=1):
            assert process.poll() is None, (tmp_path / "registry.log").read_text()
            assert time.monotonic() < deadline, "the registry did not answer in 30 s"
            time.sleep(0.2)
        yield LocalRegistry(address, process)
    finally:
        process.terminate()
        process.wait(10)


def registry_tags(address: str, repository: str) -> list[str]:
    """The tags a registry holds for `repository` (the distribution API's tags list)."""
    with urllib.request.urlopen(f"http://{address}/v2/{repository}/tags/list", timeout=10) as answer:
        return json.load(answer)["tags"]


@pytest.fixture(scope="module")
def image_builder(
    registry_process: RegistryProcess,
    tmp_path_factory: pytest.TempPathFactory,
    base_image: str,
) -> Iterator[BuilderProcess]:
    """A builder that downloads the runtime's wheels from the package index, on the local base image."""
    builder = start_builder(
        tmp_path_factory.mktemp("image-builder"), registry_process, base_image=base_image, no_index="false"
    )
    try:
        yield builder
    finally:
        stop_process(builder.process)

"""A runtime process serving a real ONNX model from a real registry, for the runtime's tests."""

from __future__ import annotations

import contextlib
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from services.client import RegistryClient
from services.common import natsserver
from services.launcher import health_status
from tests.conftest import ROOT, RegistryProcess, clean_environment
from tests.registry.test_models import tiny_onnx

SERVICE = "inference.GRPCInferenceService"


@dataclass
class RuntimeProcess:
    grpc: str
    """host:port of the OIP gRPC API."""
    http: str
    """host:port of the OIP REST API."""
    process: subprocess.Popen[bytes]


def register_adder(registry: RegistryProcess, home: Path) -> str:
    """adder (y = x + 1 over [batch, 3] floats) registered as a new version; its ref."""
    (home / "model.onnx").write_bytes(tiny_onnx())
    with RegistryClient(registry.address) as client:
        version = client.register_model("adder", [home / "model.onnx"], framework="onnx")
    return f"adder:{version.version}"


@contextlib.contextmanager
def spawn_runtime(home: Path, registry: RegistryProcess, models: str, **settings: str) -> Iterator[RuntimeProcess]:
    """`python -m services.runtime` serving `models`; `settings` become MLMESH_RUNTIME_<NAME> variables."""
    port, http_port = natsserver.free_port(), natsserver.free_port()
    environment = {
        **clean_environment(),
        "MLMESH_HOME": str(home),
        "MLMESH_RUNTIME_PORT": str(port),
        "MLMESH_RUNTIME_HTTP_PORT": str(http_port),
        "MLMESH_RUNTIME_MODELS": models,
        "MLMESH_RUNTIME_REGISTRY_ADDRESS": registry.address,
        **{f"MLMESH_RUNTIME_{name.upper()}": value for name, value in settings.items() if name != "nats_url"},
    }
    if "nats_url" in settings:
        environment["MLMESH_NATS_URL"] = settings["nats_url"]
    with (home / "runtime.log").open("ab") as log:
        process = subprocess.Popen(
            [sys.executable, "-m", "services.runtime"], cwd=ROOT, env=environment, stdout=log, stderr=subprocess.STDOUT
        )
    address = f"127.0.0.1:{port}"
    deadline = time.monotonic() + 60
    while health_status(address, SERVICE, timeout=1) != "SERVING" or not _answers(f"127.0.0.1:{http_port}"):
        if process.poll() is not None or time.monotonic() > deadline:
            process.kill()
            raise RuntimeError(f"the runtime did not start:\n{(home / 'runtime.log').read_text()}")
        time.sleep(0.1)
    try:
        yield RuntimeProcess(address, f"127.0.0.1:{http_port}", process)
    finally:
        if process.poll() is None:
            process.terminate()
            process.wait(20)


@pytest.fixture(scope="module")
def runtime(registry_process: RegistryProcess, tmp_path_factory: pytest.TempPathFactory) -> Iterator[RuntimeProcess]:
    """A runtime serving adder."""
    home = tmp_path_factory.mktemp("runtime-home")
    with spawn_runtime(home, registry_process, register_adder(registry_process, home)) as running:
        yield running


def _answers(http: str) -> bool:
    try:
        with urllib.request.urlopen(f"http://{http}/v2/health/ready", timeout=1) as answer:
            return answer.status == 200
    except OSError:
        return False

"""A runtime process serving a real ONNX model from a real registry, for the runtime's tests."""

from __future__ import annotations

import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass

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


@pytest.fixture(scope="module")
def runtime(registry_process: RegistryProcess, tmp_path_factory: pytest.TempPathFactory) -> Iterator[RuntimeProcess]:
    """`python -m services.runtime` serving adder:1 (y = x + 1 over [batch, 3] floats)."""
    home = tmp_path_factory.mktemp("runtime-home")
    (home / "model.onnx").write_bytes(tiny_onnx())
    with RegistryClient(registry_process.address) as client:
        version = client.register_model("adder", [home / "model.onnx"], framework="onnx")
    port, http_port = natsserver.free_port(), natsserver.free_port()
    environment = {
        **clean_environment(),
        "MLMESH_HOME": str(home),
        "MLMESH_RUNTIME_PORT": str(port),
        "MLMESH_RUNTIME_HTTP_PORT": str(http_port),
        "MLMESH_RUNTIME_MODELS": f"adder:{version.version}",
        "MLMESH_RUNTIME_REGISTRY_ADDRESS": registry_process.address,
    }
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
        yield RuntimeProcess(address, f"127.0.0.1:{http_port}")
    finally:
        process.terminate()
        process.wait(20)


def _answers(http: str) -> bool:
    try:
        with urllib.request.urlopen(f"http://{http}/v2/health/ready", timeout=1) as answer:
            return answer.status == 200
    except OSError:
        return False

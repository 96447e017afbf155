"""A runtime process serving a real ONNX model from a real registry, for the runtime's tests."""

from __future__ import annotations

import contextlib
import subprocess
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from services.client import RegistryClient
from services.common import natsserver
from tests.conftest import RegistryProcess, answers_http, clean_environment, spawn_service, stop_process
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


def runtime_environment(home: Path, registry: RegistryProcess | None, models: str, **settings: str) -> dict[str, str]:
    """The environment of a runtime process; `settings` become MLMESH_RUNTIME_<NAME> variables."""
    environment = {
        **clean_environment(),
        "MLMESH_HOME": str(home),
        "MLMESH_RUNTIME_MODELS": models,
        "MLMESH_RUNTIME_REGISTRY_ADDRESS": registry.address if registry else f"127.0.0.1:{natsserver.free_port()}",
        **{f"MLMESH_RUNTIME_{name.upper()}": value for name, value in settings.items() if name != "nats_url"},
    }
    if "nats_url" in settings:
        environment["MLMESH_NATS_URL"] = settings["nats_url"]
    return environment


@contextlib.contextmanager
def spawn_runtime(
    home: Path, registry: RegistryProcess | None, models: str, **settings: str
) -> Iterator[RuntimeProcess]:
    """`python -m services.runtime` serving `models`; `settings` become MLMESH_RUNTIME_<NAME> variables.
    Without a registry, the address it is given answers nothing (a model_dir runtime must not ask)."""
    port, http_port = natsserver.free_port(), natsserver.free_port()
    environment = runtime_environment(home, registry, models, port=str(port), http_port=str(http_port), **settings)
    address, http = f"127.0.0.1:{port}", f"127.0.0.1:{http_port}"
    process = spawn_service(
        "services.runtime",
        environment,
        home / "runtime.log",
        address,
        SERVICE,
        also_ready=lambda: answers_http(http, "/v2/health/ready"),
        timeout=60,
    )
    try:
        yield RuntimeProcess(address, http, process)
    finally:
        stop_process(process)


@pytest.fixture(scope="module")
def runtime(registry_process: RegistryProcess, tmp_path_factory: pytest.TempPathFactory) -> Iterator[RuntimeProcess]:
    """A runtime serving adder."""
    home = tmp_path_factory.mktemp("runtime-home")
    with spawn_runtime(home, registry_process, register_adder(registry_process, home)) as running:
        yield running

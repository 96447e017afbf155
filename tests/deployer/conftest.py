"""An endpoint's router as its own process, in front of real runtime processes, for its tests."""

from __future__ import annotations

import contextlib
import io
import json
import os
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import onnx
import pytest
from onnx import TensorProto, helper

from services.client import RegistryClient
from services.common import natsserver
from tests.conftest import RegistryProcess, answers_http, clean_environment, spawn_service, stop_process

INFERENCE_SERVICE = "inference.GRPCInferenceService"
RUNNING_ROUTERS: list[RouterProcess] = []
"""Routers of the tests now running, whose logs a failed test's report shows."""


def adder_onnx(addend: float) -> bytes:
    """A real ONNX graph: y = x + addend over [batch, 3] floats."""
    constant = helper.make_tensor("addend", TensorProto.FLOAT, [1], [addend])
    graph = helper.make_graph(
        [helper.make_node("Add", ["x", "addend"], ["y"])],
        f"add_{addend:g}",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", 3])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", 3])],
        initializer=[constant],
    )
    buffer = io.BytesIO()
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), buffer)
    return buffer.getvalue()


def register_adder_version(registry: RegistryProcess, home: Path, name: str, addend: float) -> str:
    """A new version of model `name` that adds `addend`; its ref `name:version`."""
    home.mkdir(parents=True, exist_ok=True)
    path = home / f"add-{addend:g}.onnx"
    path.write_bytes(adder_onnx(addend))
    with RegistryClient(registry.address) as client:
        version = client.register_model(name, [path], framework="onnx")
    return f"{name}:{version.version}"


def write_routes(path: Path, routes: dict[str, Any]) -> None:
    """Replace the routes file atomically, as the deployer does."""
    scratch = path.with_name(f".{path.name}.{os.getpid()}")
    scratch.write_text(json.dumps(routes))
    os.replace(scratch, path)


def loaded_generation(routes_file: Path) -> int | None:
    """The generation the router confirmed in `<routes file>.loaded` (None before any)."""
    try:
        return int(routes_file.with_name(routes_file.name + ".loaded").read_text())
    except (OSError, ValueError):
        return None


def wait_until_loaded(routes_file: Path, generation: int, timeout: float = 10) -> None:
    deadline = time.monotonic() + timeout
    while loaded_generation(routes_file) != generation:
        if time.monotonic() > deadline:
            raise AssertionError(f"generation {generation} not loaded; {loaded_generation(routes_file)} is")
        time.sleep(0.02)


@dataclass
class RouterProcess:
    grpc: str
    """host:port of the endpoint's OIP gRPC API."""
    http: str
    """host:port of the endpoint's OIP REST API."""
    routes_file: Path
    log: Path
    process: subprocess.Popen[bytes]

    def log_text(self, lines: int = 200) -> str:
        if not self.log.exists():
            return "(no log)"
        return "\n".join(self.log.read_text(errors="replace").splitlines()[-lines:])


@contextlib.contextmanager
def spawn_router(routes_file: Path, log: Path, **settings: str) -> Iterator[RouterProcess]:
    """`python -m services.deployer.router` for `routes_file` on free ports; `settings` become
    MLMESH_ROUTER_<NAME> variables. Its log is printed when it does not start or a test fails."""
    port, http_port = natsserver.free_port(), natsserver.free_port()
    environment = {
        **clean_environment(),
        "MLMESH_HOME": str(routes_file.parent),
        "MLMESH_ROUTER_ROUTES_FILE": str(routes_file),
        "MLMESH_ROUTER_PORT": str(port),
        "MLMESH_ROUTER_HTTP_PORT": str(http_port),
        "MLMESH_ROUTER_POLL_SECONDS": "0.05",
        **{f"MLMESH_ROUTER_{name.upper()}": value for name, value in settings.items()},
    }
    grpc_address, http_address = f"127.0.0.1:{port}", f"127.0.0.1:{http_port}"
    process = spawn_service(
        "services.deployer.router",
        environment,
        log,
        grpc_address,
        INFERENCE_SERVICE,
        also_ready=lambda: answers_http(http_address, "/v2/health/live"),
    )
    router = RouterProcess(grpc_address, http_address, routes_file, log, process)
    RUNNING_ROUTERS.append(router)
    try:
        yield router
    finally:
        RUNNING_ROUTERS.remove(router)
        stop_process(process)


@pytest.hookimpl(wrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo[None]) -> Any:
    """A failed test's report shows the log of every router running."""
    report = yield
    if report.failed:
        for router in RUNNING_ROUTERS:
            report.sections.append((f"router log {router.log}", router.log_text()))
    return report

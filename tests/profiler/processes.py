"""The profiler as its own process beside a real registry and NATS, for the tests that need one."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from tritonclient.grpc import service_pb2 as oip

from services.client import ProfilerClient
from services.common import natsserver
from services.profiler.load import grpc_frame
from tests.conftest import RegistryProcess, clean_environment, spawn_service, stop_process

SERVICE = "mlmesh.v1.ProfilerService"


@dataclass
class ProfilerProcess:
    address: str
    home: Path
    nats_url: str

    def client(self) -> ProfilerClient:
        return ProfilerClient(self.address, timeout=600)


@contextlib.contextmanager
def running_profiler(home: Path, registry: RegistryProcess, **settings: str) -> Iterator[ProfilerProcess]:
    """`python -m services.profiler` on a free port; `settings` become MLMESH_PROFILER_<NAME> variables."""
    port = natsserver.free_port()
    environment = {
        **clean_environment(),
        "MLMESH_HOME": str(home),
        "MLMESH_NATS_URL": registry.nats_url,
        "MLMESH_PROFILER_PORT": str(port),
        "MLMESH_PROFILER_REGISTRY_ADDRESS": registry.address,
        **{f"MLMESH_PROFILER_{name.upper()}": value for name, value in settings.items()},
    }
    address = f"127.0.0.1:{port}"
    process = spawn_service("services.profiler", environment, home / "profiler.log", address, SERVICE)
    try:
        yield ProfilerProcess(address, home, registry.nats_url)
    finally:
        stop_process(process)


def adder_request(model: str, rows: int = 1) -> bytes:
    """A gRPC-framed ModelInferRequest for the adder (x: [rows, 3] floats), built with Triton's protos
    (the tests' process holds those; it cannot also load mlmesh's copy of the same package)."""
    request = oip.ModelInferRequest(model_name=model)
    request.inputs.add(name="x", datatype="FP32", shape=[rows, 3])
    request.raw_input_contents.append(np.ones((rows, 3), dtype=np.float32).tobytes())
    return grpc_frame(request.SerializeToString())

"""The profiler as its own process beside a real registry and NATS, for the tests that need one."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from tritonclient.grpc import service_pb2 as oip

from services.client import ProfilerClient
from services.profiler.load import grpc_frame
from tests.conftest import RegistryProcess, start_service, stop_process

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
    started = start_service("profiler", home, registry.nats_url, {"registry_address": registry.address, **settings})
    try:
        yield ProfilerProcess(started.address, home, registry.nats_url)
    finally:
        stop_process(started.process)


def adder_request(model: str, rows: int = 1) -> bytes:
    """A gRPC-framed ModelInferRequest for the adder (x: [rows, 3] floats), built with Triton's protos
    (the tests' process holds those; it cannot also load mlmesh's copy of the same package)."""
    request = oip.ModelInferRequest(model_name=model)
    request.inputs.add(name="x", datatype="FP32", shape=[rows, 3])
    request.raw_input_contents.append(np.ones((rows, 3), dtype=np.float32).tobytes())
    return grpc_frame(request.SerializeToString())

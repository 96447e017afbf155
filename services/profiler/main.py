"""Entry point of the profiler: its API, with the registry, the builder, the runtimes it starts
and the load generator plugged into the domain."""

from __future__ import annotations

import json
import tempfile
from pathlib import Path

import numpy as np
import pyarrow as pa

from services._proto.mlmesh.v1 import profiler_pb2, profiler_pb2_grpc
from services.client import BuilderClient, RegistryClient
from services.common.convert import read_table_file
from services.common.db import Database
from services.common.errors import InvalidArgument
from services.common.outbox import Outbox
from services.common.remote import RemoteCalls
from services.common.server import ServiceRuntime, run_service, service_runtime
from services.profiler import load
from services.profiler.domain import ModelInfo, Profiles, TensorInput, example_columns
from services.profiler.models import TABLES, create_tables
from services.profiler.runtimes import Runtimes
from services.profiler.servicer import ProfilerServicer
from services.profiler.settings import ProfilerSettings

SERVICE_NAME = profiler_pb2.DESCRIPTOR.services_by_name["ProfilerService"].full_name
EXAMPLE_FILES = ("input_example.json", "input_example.csv", "input_example.parquet")
MAX_SAMPLE_BYTES = 512 * 1024**2


class RegistryModels:
    """Model versions (with their input example) and sample datasets, from the registry."""

    def __init__(self, registry: RemoteCalls) -> None:
        self.registry = registry

    def model(self, ref: str) -> ModelInfo:
        version = self.registry.get(ref)
        inputs = tuple(
            TensorInput(tensor.name, tensor.datatype, tuple(tensor.shape)) for tensor in version.signature.inputs
        )
        example = None
        found = [file.path for file in version.files if file.path in EXAMPLE_FILES]
        if found:
            with tempfile.TemporaryDirectory(prefix="mlmesh-profiler-") as scratch:
                self.registry.download(f"{version.name}:{version.version}", Path(scratch))
                path = Path(scratch) / found[0]
                if path.suffix == ".json":
                    try:
                        example = example_columns(json.loads(path.read_text()))
                    except ValueError:
                        raise InvalidArgument(f"{found[0]} of {ref} is not JSON", field="model_ref") from None
                else:
                    example = columns_of(read_table_file(path))
        return ModelInfo(version.name, version.version, version.framework, inputs, example)

    def dataset(self, ref: str) -> tuple[str, dict[str, np.ndarray]]:
        dataset = self.registry.get_dataset(ref)
        if dataset.file.size > MAX_SAMPLE_BYTES:
            raise InvalidArgument(
                f"dataset {dataset.name}:{dataset.version} has {dataset.file.size} bytes; a sample may have "
                f"{MAX_SAMPLE_BYTES}",
                field="sample_dataset",
            )
        resolved = f"{dataset.name}:{dataset.version}"
        with tempfile.TemporaryDirectory(prefix="mlmesh-profiler-") as scratch:
            path = self.registry.download_dataset(resolved, Path(scratch))
            return resolved, columns_of(read_table_file(path))


def columns_of(table: pa.Table) -> dict[str, np.ndarray]:
    return {name: table.column(name).to_numpy() for name in table.column_names}


class Requests(load.LoadGenerator):
    """The load generator, with the request encoding and first call the domain asks of it."""

    def request(self, model: str, inputs: dict[str, tuple[str, np.ndarray]]) -> bytes:
        return load.infer_request(model, inputs)

    def answer_bytes(self, address: str, body: bytes) -> int:
        return load.answer_bytes(address, body)


def build(settings: ProfilerSettings) -> ServiceRuntime:
    """Everything the profiler runs: database, outbox and the gRPC server."""
    if settings.workers != 1:
        raise SystemExit("MLMESH_PROFILER_WORKERS must be 1: profiles run one at a time, in one process")
    database = Database(settings.resolved_database_url(), TABLES)
    create_tables(database)
    outbox = Outbox()
    registry = RemoteCalls(RegistryClient(settings.registry_address, actor="profiler"), "registry")
    builder = RemoteCalls(BuilderClient(settings.builder_address, actor="profiler", timeout=3600), "builder")
    runtimes = Runtimes(
        settings.home.resolve(),
        settings.registry_address,
        settings.docker_url,
        settings.log_level,
        lambda model: builder.build_image([model]).tag,
    )
    profiles = Profiles(
        database,
        outbox,
        RegistryModels(registry),
        runtimes,
        Requests(settings.load_generator),
        start_timeout=settings.start_timeout_seconds,
        max_rows=settings.max_rows_per_request,
        max_seconds=settings.max_profile_seconds,
    )
    profiles.interrupted()
    registration = (profiler_pb2_grpc.add_ProfilerServiceServicer_to_server, ProfilerServicer(profiles), SERVICE_NAME)
    return service_runtime("profiler", settings, [registration], database=database, outbox=outbox)


def build_server(settings: ProfilerSettings) -> object:
    """An unstarted grpc.aio server of the profiler."""
    return build(settings).server


async def main(settings: ProfilerSettings | None = None) -> None:
    """Run the profiler until SIGTERM."""
    settings = settings or ProfilerSettings()
    await run_service(settings, build)

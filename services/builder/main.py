"""Entry point of the builder: its API over environments, conversions and images."""

from __future__ import annotations

from services._proto.mlmesh.v1 import builder_pb2, builder_pb2_grpc
from services.builder.convert import ConversionLimits
from services.builder.domain import Builder
from services.builder.images import ImageBuilder
from services.builder.models import TABLES, create_tables
from services.builder.servicer import BuilderServicer
from services.builder.settings import BuilderSettings
from services.client import RegistryClient
from services.common.db import Database
from services.common.outbox import Outbox
from services.common.remote import RemoteCalls
from services.common.server import ServiceRuntime, run_service, service_runtime

SERVICE_NAME = builder_pb2.DESCRIPTOR.services_by_name["BuilderService"].full_name
# A conversion or build may upload and download models for minutes.
REGISTRY_TIMEOUT_SECONDS = 600.0


def build(settings: BuilderSettings) -> ServiceRuntime:
    """Everything the builder runs: database, outbox and the gRPC server."""
    database = Database(settings.resolved_database_url(), TABLES)
    create_tables(database)
    outbox = Outbox()
    index = settings.package_index()
    work_dir = settings.resolved_work_dir()
    registry = RegistryClient(settings.registry_address, actor="builder", timeout=REGISTRY_TIMEOUT_SECONDS)
    builder = Builder(
        database,
        outbox,
        RemoteCalls(registry, "registry"),
        ImageBuilder(work_dir / "images", docker_url=settings.docker_url, pip_arguments=index.pip_arguments()),
        work_dir,
        index=index,
        resolve_timeout_seconds=settings.resolve_timeout_seconds,
        limits=ConversionLimits(
            cpu_seconds=settings.convert_cpu_seconds,
            memory_mb=settings.convert_memory_mb,
            wall_seconds=settings.convert_wall_seconds,
        ),
        default_base_image=settings.base_image,
        push_registry=settings.push_registry,
    )
    registration = (builder_pb2_grpc.add_BuilderServiceServicer_to_server, BuilderServicer(builder), SERVICE_NAME)
    return service_runtime("builder", settings, [registration], database=database, outbox=outbox)


def build_server(settings: BuilderSettings) -> object:
    """An unstarted grpc.aio server of the builder."""
    return build(settings).server


async def main(settings: BuilderSettings | None = None) -> None:
    """Run the builder until SIGTERM."""
    settings = settings or BuilderSettings()
    await run_service(settings, build)

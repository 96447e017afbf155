"""Entry point of the registry service."""

from __future__ import annotations

import asyncio
import logging

from services._proto.mlmesh.v1 import registry_pb2, registry_pb2_grpc
from services.common.blobs import BlobStore
from services.common.db import Database
from services.common.outbox import Outbox
from services.common.server import ServiceRuntime, run_service, service_runtime
from services.registry.domain import Registry
from services.registry.models import TABLES, create_tables
from services.registry.servicer import RegistryServicer
from services.registry.settings import RegistrySettings

SERVICE_NAME = registry_pb2.DESCRIPTOR.services_by_name["RegistryService"].full_name
SWEEP_INTERVAL_SECONDS = 3600


def build(settings: RegistrySettings) -> ServiceRuntime:
    """Everything the registry runs: database, blobs, outbox, the gRPC server, background work."""
    database = Database(settings.resolved_database_url(), TABLES)
    create_tables(database)
    outbox = Outbox()
    registry = Registry(
        database,
        BlobStore(settings.home / "blobs" / "registry"),
        outbox,
        max_version_bytes=settings.max_version_bytes,
        max_files_per_version=settings.max_files_per_version,
        max_dataset_bytes=settings.max_dataset_bytes,
        blob_grace_seconds=settings.blob_sweep_grace_seconds,
        cached_versions=settings.cached_versions,
    )

    async def sweep_blobs() -> None:
        while True:
            try:
                await asyncio.to_thread(registry.sweep_blobs)
            except Exception:  # a failed sweep is retried next time; it must not stop the service
                logging.getLogger(__name__).exception("blob sweep failed")
            await asyncio.sleep(SWEEP_INTERVAL_SECONDS)

    registration = (registry_pb2_grpc.add_RegistryServiceServicer_to_server, RegistryServicer(registry), SERVICE_NAME)
    return service_runtime(
        "registry", settings, [registration], database=database, outbox=outbox, leader_background=[sweep_blobs]
    )


def build_server(settings: RegistrySettings) -> object:
    """An unstarted grpc.aio server of the registry."""
    return build(settings).server


async def main(settings: RegistrySettings | None = None) -> None:
    """Run the registry (in `settings.workers` processes) until SIGTERM."""
    settings = settings or RegistrySettings()
    await run_service(settings, build)

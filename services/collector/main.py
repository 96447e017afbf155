"""Entry point of the collector: its API, the capture consumer and the retention sweep."""

from __future__ import annotations

import asyncio
import contextlib
import logging

from services._proto.mlmesh.v1 import collector_pb2, collector_pb2_grpc
from services.client import RegistryClient
from services.collector.consumer import CaptureConsumer
from services.collector.domain import Collector, IngestCounters
from services.collector.models import TABLES, create_tables
from services.collector.servicer import CollectorServicer
from services.collector.settings import CollectorSettings
from services.common.db import Database
from services.common.errors import MlmeshError
from services.common.remote import RemoteCalls
from services.common.server import ServiceRuntime, run_service, service_runtime

SERVICE_NAME = collector_pb2.DESCRIPTOR.services_by_name["CollectorService"].full_name
log = logging.getLogger(__name__)


def build(settings: CollectorSettings) -> ServiceRuntime:
    """Everything the collector runs: database, store, the gRPC server, consumer and retention."""
    if settings.workers != 1:
        raise SystemExit("MLMESH_COLLECTOR_WORKERS must be 1: one consumer owns the capture files")
    database = Database(settings.resolved_database_url(), TABLES)
    create_tables(database)
    registry = RemoteCalls(RegistryClient(settings.registry_address, actor="collector"), "registry")
    collector = Collector(
        database,
        settings.resolved_data_dir(),
        registry,
        default_max_age_seconds=settings.retention_days * 86_400,
        default_max_bytes=settings.retention_bytes,
        max_labels_per_call=settings.max_labels_per_call,
        max_export_bytes=settings.max_export_bytes,
        query_batch_rows=settings.query_batch_rows,
        # A record batch travels in one response: half the message limit leaves room for framing.
        max_batch_bytes=settings.max_message_bytes // 2,
    )
    try:
        collector.open_store()
    except MlmeshError as error:
        raise SystemExit(error.message) from None
    counters = IngestCounters()
    retention_changed = asyncio.Event()

    async def enforce_retention() -> None:
        while True:
            try:
                await asyncio.to_thread(collector.enforce_retention)
            except Exception:  # a failed sweep is retried on the next; it must not stop the service
                log.exception("retention sweep failed")
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(retention_changed.wait(), settings.retention_interval_seconds)
            retention_changed.clear()

    background = []
    if settings.nats_url:
        background.append(CaptureConsumer(collector, settings, counters).run)
    else:
        log.warning("MLMESH_NATS_URL is not set: nothing is consumed; stored captures are still served")
    servicer = CollectorServicer(collector, counters, retention_changed.set)
    registration = (collector_pb2_grpc.add_CollectorServiceServicer_to_server, servicer, SERVICE_NAME)
    return service_runtime(
        "collector",
        settings,
        [registration],
        database=database,
        background=background,
        leader_background=[enforce_retention],
    )


def build_server(settings: CollectorSettings) -> object:
    """An unstarted grpc.aio server of the collector."""
    return build(settings).server


async def main(settings: CollectorSettings | None = None) -> None:
    """Run the collector until SIGTERM."""
    settings = settings or CollectorSettings()
    await run_service(settings, build)

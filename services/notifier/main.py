"""Entry point of the notifier: its API, the consumer of every lifecycle event, and the
dispatcher that delivers them."""

from __future__ import annotations

import logging

from services._proto.mlmesh.v1 import notifier_pb2, notifier_pb2_grpc
from services.common.bus import run_subscribers
from services.common.db import Database
from services.common.outbox import Outbox
from services.common.server import ServiceRuntime, run_service, service_runtime
from services.notifier.delivery import Dispatcher
from services.notifier.domain import Webhooks
from services.notifier.models import TABLES, create_tables
from services.notifier.servicer import NotifierServicer
from services.notifier.settings import NotifierSettings
from services.notifier.subscribers import subscribe

SERVICE_NAME = notifier_pb2.DESCRIPTOR.services_by_name["NotifierService"].full_name
log = logging.getLogger(__name__)


def build(settings: NotifierSettings) -> ServiceRuntime:
    """Everything the notifier runs: database, outbox, the gRPC server, the event consumer and the dispatcher."""
    if settings.workers != 1:
        raise SystemExit("MLMESH_NOTIFIER_WORKERS must be 1: one dispatcher owns the deliveries")
    database = Database(settings.resolved_database_url(), TABLES)
    create_tables(database)
    outbox = Outbox()
    webhooks = Webhooks(
        database,
        outbox,
        allowed_hosts=settings.allowed_hosts,
        schedule=settings.retry_schedule,
        rotation_seconds=settings.rotation_seconds,
        retention_seconds=settings.event_retention_seconds,
        max_webhooks=settings.max_webhooks,
    )
    dispatcher = Dispatcher(
        webhooks,
        timeout_seconds=settings.timeout_seconds,
        concurrency_per_endpoint=settings.concurrency_per_endpoint,
        allowed_hosts=settings.allowed_hosts,
        scan_seconds=settings.scan_seconds,
    )

    async def consume() -> None:
        """Every lifecycle event, from a durable consumer (created with the stream if need be)."""
        if not settings.nats_url:
            log.warning("notifier: no MLMESH_NATS_URL, so no events arrive; only test events are delivered")
            return
        await run_subscribers(
            settings.nats_url, "notifier", lambda broker: subscribe(broker, database, webhooks, dispatcher)
        )

    registration = (
        notifier_pb2_grpc.add_NotifierServiceServicer_to_server,
        NotifierServicer(webhooks, dispatcher),
        SERVICE_NAME,
    )
    return service_runtime(
        "notifier", settings, [registration], database=database, outbox=outbox, background=[dispatcher.run, consume]
    )


def build_server(settings: NotifierSettings) -> object:
    """An unstarted grpc.aio server of the notifier."""
    return build(settings).server


async def main(settings: NotifierSettings | None = None) -> None:
    """Run the notifier until SIGTERM."""
    settings = settings or NotifierSettings()
    await run_service(settings, build)

"""Entry point of the drift service: its API, and the scheduler that runs due checks."""

from __future__ import annotations

import asyncio
import logging
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path

import pyarrow as pa

from services._proto.mlmesh.v1 import drift_pb2, drift_pb2_grpc
from services.client import CollectorClient, DeployerClient, RegistryClient
from services.common.convert import read_table_file
from services.common.db import Database
from services.common.errors import InvalidArgument, MlmeshError, NotFound
from services.common.outbox import Outbox
from services.common.remote import RemoteCalls
from services.common.server import ServiceRuntime, run_service, service_runtime
from services.drift.domain import DriftMonitors
from services.drift.models import TABLES, create_tables
from services.drift.servicer import DriftServicer
from services.drift.settings import DriftSettings

SERVICE_NAME = drift_pb2.DESCRIPTOR.services_by_name["DriftService"].full_name
log = logging.getLogger(__name__)


class CollectorCaptures:
    """Captured windows, read from the collector."""

    def __init__(self, collector: RemoteCalls) -> None:
        self.collector = collector

    def read(self, endpoint: str, start: float | None, end: float, columns: Sequence[str] | None) -> pa.Table:
        try:
            return self.collector.query(endpoint, start=start, end=end, columns=list(columns or ()))
        except NotFound:  # nothing captured for the endpoint yet: an empty window
            return pa.table({})


class DeployedEndpoints:
    """The endpoints serving a model, as the deployer knows them."""

    def __init__(self, deployer: RemoteCalls) -> None:
        self.deployer = deployer

    def serving(self, model: str) -> list[str]:
        return [
            endpoint.name
            for endpoint in self.deployer.list()
            if any(deployment.model_name == model for deployment in endpoint.deployments)
        ]


class RegistryDatasets:
    """Baseline datasets, downloaded from the registry and read as tables."""

    def __init__(self, registry: RemoteCalls, max_bytes: int) -> None:
        self.registry = registry
        self.max_bytes = max_bytes

    def read(self, ref: str) -> tuple[str, pa.Table]:
        dataset = self.registry.get_dataset(ref)
        if dataset.file.size > self.max_bytes:
            raise InvalidArgument(
                f"dataset {dataset.name}:{dataset.version} has {dataset.file.size} bytes; a baseline may have "
                f"{self.max_bytes} (MLMESH_DRIFT_MAX_BASELINE_BYTES)",
                field="baseline_dataset",
            )
        resolved = f"{dataset.name}:{dataset.version}"
        with tempfile.TemporaryDirectory(prefix="mlmesh-drift-") as scratch:
            path = self.registry.download_dataset(resolved, Path(scratch))
            return resolved, read_table_file(path)


def build(settings: DriftSettings) -> ServiceRuntime:
    """Everything the drift service runs: database, outbox, the gRPC server and the scheduler."""
    database = Database(settings.resolved_database_url(), TABLES)
    create_tables(database)
    outbox = Outbox()
    collector = RemoteCalls(CollectorClient(settings.collector_address, actor="drift"), "collector")
    registry = RemoteCalls(RegistryClient(settings.registry_address, actor="drift"), "registry")
    monitors = DriftMonitors(
        database,
        outbox,
        CollectorCaptures(collector),
        RegistryDatasets(registry, settings.max_baseline_bytes),
        DeployedEndpoints(RemoteCalls(DeployerClient(settings.deployer_address, actor="drift"), "deployer")),
        max_window_rows=settings.max_window_rows,
    )

    async def schedule() -> None:
        """Run the checks that are due, one at a time, every tick."""
        while True:
            try:
                for name in await database.run(monitors.due_monitors, time.time()):
                    try:
                        result = await asyncio.to_thread(monitors.check, name)
                        log.info("monitor %s: %d rows, drift %s", name, result.rows, result.drift_detected)
                    except MlmeshError as error:
                        log.warning("monitor %s: the scheduled check did not run: %s", name, error.message)
            except Exception:  # a failed tick is retried on the next; it must not stop the loop
                log.exception("drift schedule tick failed")
            await asyncio.sleep(settings.schedule_tick_seconds)

    registration = (drift_pb2_grpc.add_DriftServiceServicer_to_server, DriftServicer(monitors), SERVICE_NAME)
    return service_runtime(
        "drift", settings, [registration], database=database, outbox=outbox, leader_background=[schedule]
    )


def build_server(settings: DriftSettings) -> object:
    """An unstarted grpc.aio server of the drift service."""
    return build(settings).server


async def main(settings: DriftSettings | None = None) -> None:
    """Run the drift service until SIGTERM."""
    settings = settings or DriftSettings()
    await run_service(settings, build)

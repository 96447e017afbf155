"""Entry point of the deployer: its API, and the reconciler that keeps endpoints running."""

from __future__ import annotations

from services._proto.mlmesh.v1 import deployer_pb2, deployer_pb2_grpc
from services.client import BuilderClient, ProfilerClient, RegistryClient
from services.common.db import Database
from services.common.errors import FailedPrecondition
from services.common.natsserver import free_port
from services.common.outbox import Outbox
from services.common.remote import RemoteCalls
from services.common.server import ServiceRuntime, run_service, service_runtime
from services.deployer.batch import BatchRunner
from services.deployer.containers import DockerContainers
from services.deployer.domain import Deployer, Recommended
from services.deployer.local import LocalProcesses
from services.deployer.models import TABLES, create_tables
from services.deployer.reconciler import Reconciler
from services.deployer.servicer import DeployerServicer
from services.deployer.settings import DeployerSettings

SERVICE_NAME = deployer_pb2.DESCRIPTOR.services_by_name["DeployerService"].full_name


class ProfiledResources:
    """Recommended resources: the newest completed profile of a version on a target, from the profiler."""

    def __init__(self, profiler: RemoteCalls) -> None:
        self.profiler = profiler

    def latest(self, model_name: str, model_version: int, target: str) -> Recommended:
        for profile in self.profiler.list(model_name, model_version, completed_only=True):
            if profile.target != target:
                continue
            recommendation = profile.recommendation
            if not recommendation.met:
                raise FailedPrecondition(
                    f"the newest {target} profile of {model_name}:{model_version} ({profile.id}) found no size that "
                    f"meets its SLO: {recommendation.explanation}",
                    field="recommended_resources",
                )
            return Recommended(
                profile=profile.name,
                cpus=recommendation.cpus,
                memory_mb=recommendation.memory_mb,
                replicas=recommendation.replicas,
                max_batch_rows=recommendation.max_batch_rows,
            )
        raise FailedPrecondition(
            f"{model_name}:{model_version} has no completed {target} profile to take resources from; run "
            f"`mlmesh profile {model_name}:{model_version} --target {target}` first",
            field="recommended_resources",
        )


def build(settings: DeployerSettings) -> ServiceRuntime:
    """Everything the deployer runs: database, outbox, the gRPC server and the reconciler."""
    if settings.workers != 1:
        raise SystemExit("MLMESH_DEPLOYER_WORKERS must be 1: one reconciler owns the replicas")
    database = Database(settings.resolved_database_url(), TABLES)
    create_tables(database)
    outbox = Outbox()
    registry = RemoteCalls(RegistryClient(settings.registry_address, actor="deployer"), "registry")
    deployer = Deployer(
        database,
        outbox,
        registry,
        free_port,
        max_restarts=settings.max_restarts,
        restart_window_seconds=settings.restart_window_seconds,
        recommendations=ProfiledResources(
            RemoteCalls(ProfilerClient(settings.profiler_address, actor="deployer", timeout=30), "profiler")
        ),
    )
    processes = LocalProcesses(
        settings.home, settings.registry_address, settings.nats_url, settings.log_level, settings.endpoint_host
    )
    containers = DockerContainers(
        settings.docker_url,
        str(settings.home),
        settings.resolved_container_nats_url(),
        settings.log_level,
        processes.launch_log,
    )
    builder = RemoteCalls(BuilderClient(settings.builder_address, actor="deployer"), "builder")
    reconciler = Reconciler(
        deployer,
        processes,
        interval_seconds=settings.reconcile_seconds,
        ready_timeout_seconds=settings.ready_timeout_seconds,
        cluster=settings,
        containers=containers,
        builder=builder,
    )
    batches = BatchRunner(
        deployer, processes, registry, settings.nats_url, ack_wait_seconds=settings.batch_ack_wait_seconds
    )
    servicer = DeployerServicer(deployer, reconciler, batches)
    registration = (deployer_pb2_grpc.add_DeployerServiceServicer_to_server, servicer, SERVICE_NAME)
    return service_runtime(
        "deployer",
        settings,
        [registration],
        database=database,
        outbox=outbox,
        leader_background=[reconciler.run, batches.run],
    )


def build_server(settings: DeployerSettings) -> object:
    """An unstarted grpc.aio server of the deployer."""
    return build(settings).server


async def main(settings: DeployerSettings | None = None) -> None:
    """Run the deployer until SIGTERM; the endpoints it started keep running."""
    settings = settings or DeployerSettings()
    await run_service(settings, build)

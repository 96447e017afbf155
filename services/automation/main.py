"""Entry point of the automation service: its API, the triggers (events and schedules) and the
workers that run retraining."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

from prometheus_client.parser import text_string_to_metric_families

from services._proto.mlmesh.v1 import automation_pb2, automation_pb2_grpc, deployer_pb2, registry_pb2
from services.automation.domain import CHAMPION, Automation, Figures
from services.automation.models import TABLES, create_tables
from services.automation.servicer import AutomationServicer
from services.automation.settings import AutomationSettings
from services.automation.subscribers import subscribe
from services.automation.training import LockedEnvironment
from services.client import BuilderClient, DeployerClient, RegistryClient
from services.common.bus import run_subscribers
from services.common.db import Database
from services.common.errors import MlmeshError, NotFound
from services.common.outbox import Outbox
from services.common.remote import RemoteCalls
from services.common.server import ServiceRuntime, run_service, service_runtime

SERVICE_NAME = automation_pb2.DESCRIPTOR.services_by_name["AutomationService"].full_name
log = logging.getLogger(__name__)


class RegistryModels:
    """What runs need of the registry, over its client."""

    def __init__(self, registry: RemoteCalls, cache: Path) -> None:
        self.registry = registry
        self.cache = cache

    def dataset_file(self, ref: str, directory: Path) -> tuple[str, Path]:
        dataset = self.registry.get_dataset(ref)
        resolved = f"{dataset.name}:{dataset.version}"
        return resolved, self.registry.download_dataset(resolved, directory)

    def champion(self, model: str) -> int:
        try:
            return int(self.registry.get(f"{model}@{CHAMPION}").version)
        except NotFound:
            return 0

    def model_file(self, model: str, version: int) -> Path:
        return self.registry.fetch_onnx(f"{model}:{version}", self.cache)[1]

    def register(self, model: str, output_dir: Path, lineage: dict[str, Any], description: str) -> int:
        git = lineage["git"]
        version = self.registry.register_model(
            model,
            [output_dir / "model.onnx"],
            framework="onnx",
            description=description,
            tags={"trained-by": "mlmesh-automation", "retrain-run": lineage["run_id"]},
            lineage=registry_pb2.Lineage(
                run_id=lineage["run_id"],
                experiment=lineage["experiment"],
                git=registry_pb2.GitInfo(**git) if git else None,
                datasets=lineage["datasets"],
                parent_version=lineage["parent"],
                environment=lineage["environment"],
            ),
        )
        return int(version.version)

    def record_run(self, run_id: str, experiment: str, metrics: dict[str, float], lineage: dict[str, Any]) -> None:
        git = lineage["git"]
        self.registry.record_run(
            run_id=run_id,
            experiment=experiment,
            name=f"retrain {experiment}",
            metrics=metrics,
            git=registry_pb2.GitInfo(**git) if git else None,
            datasets=lineage["datasets"],
            status="FINISHED",
        )

    def promote(self, model: str, version: int, reason: str) -> int:
        return int(self.registry.set_alias(model, CHAMPION, version, reason[:500]).previous_version)


class BuilderEnvironments:
    """What runs need of the builder, over its client."""

    def __init__(self, builder: RemoteCalls) -> None:
        self.builder = builder

    def locked(self, ref: str) -> LockedEnvironment:
        found = self.builder.get_environment(ref)
        return LockedEnvironment(f"{found.name}:{found.version}", found.python_version, found.lock_text)


class DeployedEndpoints:
    """What rollouts need of the deployer, over its client, and of the replicas' /metrics."""

    def __init__(self, deployer: RemoteCalls, ready_timeout: float = 600) -> None:
        self.deployer = deployer
        self.ready_timeout = ready_timeout

    def serving(self, endpoint: str) -> tuple[str, str, int]:
        found = max(self.deployer.get(endpoint).deployments, key=lambda deployment: deployment.traffic)
        return found.name, found.target, found.replicas

    def add(self, endpoint: str, deployment: str, model_ref: str, target: str, replicas: int) -> None:
        self.deployer.create(endpoint, model_ref, deployment=deployment, target=target, replicas=replicas, traffic=0)
        deadline = time.monotonic() + self.ready_timeout
        while True:
            state = {d.name: d for d in self.deployer.get(endpoint).deployments}[deployment]
            if state.status == deployer_pb2.DEPLOYMENT_STATUS_READY:
                return
            if state.status == deployer_pb2.DEPLOYMENT_STATUS_FAILED or time.monotonic() > deadline:
                with contextlib.suppress(MlmeshError):
                    self.deployer.delete(endpoint, deployment)
                raise RuntimeError(
                    f"the challenger's deployment {endpoint}/{deployment} did not start: {state.message}"
                )
            time.sleep(0.3)

    def route(self, endpoint: str, traffic: dict[str, int], mirror: dict[str, int]) -> None:
        current = {deployment.name: 0 for deployment in self.deployer.get(endpoint).deployments}
        self.deployer.set_traffic(endpoint, {**current, **traffic}, mirror)

    def remove(self, endpoint: str, deployment: str) -> None:
        self.deployer.delete(endpoint, deployment)

    def counters(self, endpoint: str, deployment: str) -> dict[str, Any]:
        """Requests by outcome and latency buckets of every replica, summed (Prometheus text)."""
        state = {d.name: d for d in self.deployer.get(endpoint).deployments}[deployment]
        requests: dict[str, float] = {}
        buckets: dict[float, float] = {}
        for replica in state.replica_states:
            try:
                with urllib.request.urlopen(f"http://{replica.http_address}/metrics", timeout=5) as answer:
                    text = answer.read().decode()
            except OSError:
                continue
            for family in text_string_to_metric_families(text):
                for sample in family.samples:
                    if sample.name == "mlmesh_runtime_requests_total":
                        code = sample.labels.get("code", "")
                        requests[code] = requests.get(code, 0.0) + sample.value
                    elif sample.name == "mlmesh_runtime_request_seconds_bucket":
                        bound = float(sample.labels["le"])
                        buckets[bound] = buckets.get(bound, 0.0) + sample.value
        return {"requests": requests, "buckets": buckets}

    def figures(self, before: dict[str, Any], after: dict[str, Any]) -> Figures:
        counts = {code: value - before["requests"].get(code, 0.0) for code, value in after["requests"].items()}
        total = int(sum(counts.values()))
        errors = int(total - counts.get("OK", 0.0))
        buckets = sorted(
            (bound, value - before["buckets"].get(bound, 0.0)) for bound, value in after["buckets"].items()
        )
        answered = buckets[-1][1] if buckets else 0.0  # the +Inf bucket counts every answer
        p99 = next((bound for bound, count in buckets if count >= 0.99 * answered), None) if answered else None
        return Figures(total, errors, None if p99 == float("inf") else p99)


def build(settings: AutomationSettings) -> ServiceRuntime:
    """Everything the automation service runs: database, outbox, the gRPC server, the triggers."""
    if settings.workers != 1:
        raise SystemExit("MLMESH_AUTOMATION_WORKERS must be 1: one process owns the runs")
    database = Database(settings.resolved_database_url(), TABLES)
    create_tables(database)
    outbox = Outbox()
    work_dir = settings.resolved_work_dir()
    registry = RemoteCalls(RegistryClient(settings.registry_address, actor="automation", timeout=600), "registry")
    automation = Automation(
        database,
        outbox,
        RegistryModels(registry, work_dir / "model-cache"),
        work_dir,
        min_schedule_seconds=settings.min_schedule_seconds,
        log_lines=settings.log_lines,
        endpoints=DeployedEndpoints(
            RemoteCalls(DeployerClient(settings.deployer_address, actor="automation"), "deployer")
        ),
        environments=BuilderEnvironments(
            RemoteCalls(BuilderClient(settings.builder_address, actor="automation"), "builder")
        ),
        pip_arguments=settings.package_index().pip_arguments(),
    )
    automation.interrupted()
    runners = ThreadPoolExecutor(max_workers=settings.parallel_runs, thread_name_prefix="retrain")

    def launch(run_id: str) -> None:
        runners.submit(automation.execute, run_id)

    async def schedule() -> None:
        while True:
            try:
                for name in await database.run(automation.due_policies, time.time()):
                    launch((await database.run(automation.start_run, name, "schedule")).id)
            except Exception:  # a failed tick is retried on the next; it must not stop the loop
                log.exception("automation: the schedule tick failed")
            await asyncio.sleep(settings.schedule_tick_seconds)

    async def consume() -> None:
        if not settings.nats_url:
            log.warning("automation: no MLMESH_NATS_URL, so only manual and scheduled runs start")
            return
        try:
            await run_subscribers(
                settings.nats_url, "automation", lambda broker: subscribe(broker, database, automation, launch)
            )
        finally:
            runners.shutdown(wait=False, cancel_futures=True)

    registration = (
        automation_pb2_grpc.add_AutomationServiceServicer_to_server,
        AutomationServicer(automation, launch),
        SERVICE_NAME,
    )
    return service_runtime(
        "automation", settings, [registration], database=database, outbox=outbox, background=[schedule, consume]
    )


def build_server(settings: AutomationSettings) -> object:
    """An unstarted grpc.aio server of the automation service."""
    return build(settings).server


async def main(settings: AutomationSettings | None = None) -> None:
    """Run the automation service until SIGTERM."""
    settings = settings or AutomationSettings()
    await run_service(settings, build)

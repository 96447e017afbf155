"""The reconciler: makes what runs match what the deployer's tables say, over and over.

Each pass, per endpoint: its router runs; every replica of every deployment runs and answers
health checks (a dead or silent one is restarted with backoff, and the deployment reported
unhealthy, or failed after too many restarts); the router's routes list exactly the replicas
that are ready, with the traffic weights; deployments being deleted leave the routes first,
and their replicas stop only once the router has loaded routes without them, so no request
is dropped.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import time
from pathlib import Path
from typing import Any

from services.common.errors import MlmeshError, Unavailable
from services.deployer import containers as containers_module
from services.deployer import domain, kubernetes, local
from services.deployer.models import DeploymentRow, EndpointRow, ReplicaRow
from services.deployer.settings import DeployerSettings
from services.launcher import health_status

log = logging.getLogger(__name__)
RUNTIME_SERVICE = "inference.GRPCInferenceService"
FAILED_CHECKS_BEFORE_RESTART = 3
ROUTES_LOADED_TIMEOUT_SECONDS = 10.0


def backoff_seconds(restarts: int) -> float:
    """1, 2, 4, ... seconds between restarts of a replica, at most 30."""
    return min(30.0, 2.0 ** max(0, restarts - 1))


def routes_for(endpoint: str, deployments: list[tuple[DeploymentRow, list[ReplicaRow]]]) -> dict[str, Any]:
    """The router's routes: the ready replicas of every deployment that may take requests."""
    entries = []
    for row, replicas in deployments:
        if row.status in (domain.DELETING, domain.FAILED):
            continue
        entries.append(
            {
                "name": row.name,
                "model_version": str(row.model_version),
                "weight": row.traffic,
                "mirror_percent": row.mirror,
                "replicas": [
                    {"grpc": f"127.0.0.1:{replica.grpc_port}", "http": f"127.0.0.1:{replica.http_port}"}
                    for replica in replicas
                    if replica.status == domain.REPLICA_READY
                ],
            }
        )
    weights = {entry["name"]: entry["weight"] for entry in entries}
    if sum(weights.values()) not in (0, 100):  # a failed deployment's share goes to the others
        shares = domain.scale_others(weights, 100)
        for entry in entries:
            entry["weight"] = shares[entry["name"]]
    return {"endpoint": endpoint, "deployments": entries}


def launch_of(row: DeploymentRow, replica: ReplicaRow) -> local.ReplicaLaunch:
    """What one replica of a deployment runs, as its target's runner takes it."""
    model = f"{row.model_name}:{row.model_version}"
    return local.ReplicaLaunch(
        row.endpoint,
        row.name,
        replica.index,
        model,
        row.cpus,
        row.capture,
        row.memory_mb,
        row.image,
        row.max_batch_rows,
    )


class Reconciler:
    def __init__(
        self,
        deployer: domain.Deployer,
        processes: local.LocalProcesses,
        *,
        interval_seconds: float,
        ready_timeout_seconds: float,
        containers: containers_module.DockerContainers,
        cluster: DeployerSettings | None = None,
        builder: Any = None,
    ) -> None:
        self.deployer = deployer
        self.cluster = cluster or DeployerSettings()
        self.processes = processes
        self.runners: dict[str, local.ReplicaRunner] = {"local": processes, "docker": containers}
        self.builder = builder
        """The builder's client (services.client.BuilderClient in RemoteCalls): builds docker images."""
        self._builds: dict[int, asyncio.Task[str]] = {}
        self._build_lines: dict[int, str] = {}
        self.interval_seconds = interval_seconds
        self.ready_timeout_seconds = ready_timeout_seconds
        self.routes_dir = processes.home / "deployer" / "endpoints"
        self._wake = asyncio.Event()
        self._lock = asyncio.Lock()
        self._written: dict[str, dict[str, Any]] = {}

    def kick(self) -> None:
        """Reconcile now rather than at the next tick."""
        self._wake.set()

    async def run(self) -> None:
        """Reconcile every interval (or when kicked) until cancelled."""
        while True:
            try:
                await self.reconcile()
            except Exception:  # a failed pass is retried on the next; it must not stop the loop
                log.exception("reconcile pass failed")
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._wake.wait(), self.interval_seconds)
            self._wake.clear()

    async def reconcile(self) -> None:
        async with self._lock:
            for endpoint in await self._db(self.deployer.endpoint_rows):
                await self._reconcile_endpoint(endpoint)

    def routes_file(self, endpoint: str) -> Path:
        return self.routes_dir / endpoint / "routes.json"

    async def _db(self, function: Any, *args: Any) -> Any:
        return await self.deployer.database.run(function, *args)

    async def _reconcile_endpoint(self, endpoint: EndpointRow) -> None:
        await self._ensure_router(endpoint)
        addresses = (f"127.0.0.1:{endpoint.grpc_port}", f"127.0.0.1:{endpoint.http_port}")
        deployments = await self._db(self.deployer.deployment_rows, endpoint.name)
        for row, replicas in deployments:
            if row.status in (domain.DELETING, domain.FAILED):
                continue
            if row.target == "kubernetes":
                await self._reconcile_cluster(row)
                continue
            if row.target == "docker" and not await self._image_ready(row):
                continue
            await asyncio.gather(*(self._reconcile_replica(row, replica) for replica in replicas))
        deployments = await self._db(self.deployer.deployment_rows, endpoint.name)
        generation = await self._write_routes(endpoint.name, routes_for(endpoint.name, deployments))
        settling = [
            row
            for row, replicas in deployments
            if row.status in (domain.CREATING, domain.UNHEALTHY)
            and row.target != "kubernetes"
            and all(replica.status == domain.REPLICA_READY for replica in replicas)
        ]
        if settling:
            await self._routes_loaded(endpoint.name, generation)
            for row in settling:
                await self._db(self.deployer.deployment_routed, row.id, addresses)
        leaving = [
            (row, replicas)
            for row, replicas in deployments
            if row.status == domain.DELETING or (row.status == domain.FAILED and any(r.instance for r in replicas))
        ]
        if not leaving:
            return
        await self._routes_loaded(endpoint.name, generation)
        for row, replicas in leaving:
            if row.target == "kubernetes":
                await asyncio.to_thread(self._remove_from_cluster, row)
            await asyncio.gather(*(self._stop_replica(row, replica) for replica in replicas if replica.instance))
        if all(row.status == domain.DELETING for row, _ in deployments):
            # The endpoint goes with its last deployment: its router first, so that once the
            # deletion is visible nothing of the endpoint runs any more.
            await asyncio.to_thread(local.stop, endpoint.router_instance, local.ROUTER_MODULE)
            self._written.pop(endpoint.name, None)
            for path in (self.routes_file(endpoint.name), self._loaded_file(endpoint.name)):
                path.unlink(missing_ok=True)
        for row, _ in leaving:
            if row.status == domain.DELETING:
                await self._db(self.deployer.finish_delete, endpoint.name, row.name)

    # ------------------------------------------------------------ the kubernetes target

    def cluster_spec(self, row: DeploymentRow) -> kubernetes.KubernetesDeployment:
        cluster = self.cluster
        return kubernetes.KubernetesDeployment(
            endpoint=row.endpoint,
            deployment=row.name,
            model_name=row.model_name,
            model_version=row.model_version,
            registry_address=cluster.cluster_registry_address or cluster.registry_address,
            image=cluster.kubernetes_image,
            cpus=row.cpus or 1.0,
            memory_mb=row.memory_mb or 1024,
            replicas=row.replicas,
            max_batch_rows=row.max_batch_rows,
            nats_url=cluster.cluster_nats_url or cluster.nats_url,
            capture=row.capture,
            namespace=cluster.kubernetes_namespace,
        )

    def manifests_file(self, row: DeploymentRow) -> Path:
        return self.processes.home / "deployer" / "kubernetes" / row.endpoint / f"{row.name}.yaml"

    async def _reconcile_cluster(self, row: DeploymentRow) -> None:
        """Render the deployment's manifests (kept under <home>), and apply them to the cluster
        when a kubeconfig is configured; again whenever they change."""
        assert row.id is not None
        message = await asyncio.to_thread(self._sync_cluster, row)  # files and the cluster's API block
        if message is not None:
            await self._db(self.deployer.deployment_message, row.id, message)

    def _sync_cluster(self, row: DeploymentRow) -> str | None:
        """What to tell of the deployment after bringing the cluster in line; None: nothing new."""
        manifests = kubernetes.render(self.cluster_spec(row))
        text = kubernetes.to_yaml(manifests)
        path = self.manifests_file(row)
        if path.exists() and path.read_text() == text and row.message:
            return None
        kubeconfig = self.cluster.kubeconfig
        if kubeconfig is None:
            message = f"manifests rendered at {path}; set MLMESH_DEPLOYER_KUBECONFIG to apply them, or kubectl apply -f"
        else:
            try:
                kubernetes.apply(manifests, kubeconfig, self.cluster.kubernetes_namespace)
            except kubernetes.KubernetesError as error:
                return f"applying to the cluster failed: {error}"  # retried next pass: nothing written yet
            message = f"applied to the cluster of {kubeconfig} (namespace {self.cluster.kubernetes_namespace})"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
        return message

    def _remove_from_cluster(self, row: DeploymentRow) -> None:
        if self.cluster.kubeconfig is not None:
            try:
                kubernetes.delete(self.cluster_spec(row), self.cluster.kubeconfig)
            except kubernetes.KubernetesError as error:
                log.warning("%s/%s: could not delete it from the cluster: %s", row.endpoint, row.name, error)
        self.manifests_file(row).unlink(missing_ok=True)

    async def _ensure_router(self, endpoint: EndpointRow) -> None:
        if local.running(endpoint.router_instance, local.ROUTER_MODULE):
            return
        routes_file = self.routes_file(endpoint.name)
        routes_file.parent.mkdir(parents=True, exist_ok=True)
        instance = await asyncio.to_thread(
            self.processes.start_router, endpoint.name, routes_file, endpoint.grpc_port, endpoint.http_port
        )
        await self._db(self.deployer.router_started, endpoint.name, instance)
        log.info("endpoint %s: router started (%s) on 127.0.0.1:%s", endpoint.name, instance, endpoint.grpc_port)

    def runner(self, row: DeploymentRow) -> local.ReplicaRunner:
        return self.runners[row.target]

    async def replica_logs(self, endpoint: str, deployment: str, index: int, lines: int) -> list[str]:
        """The last `lines` lines a replica logged (running or, as far as kept, before)."""
        for row, replicas in await self._db(self.deployer.deployment_rows, endpoint):
            for replica in replicas:
                if row.name == deployment and replica.index == index:
                    launch = launch_of(row, replica)
                    return await asyncio.to_thread(self.runner(row).replica_logs, launch, replica.instance, lines)
        return []

    async def _reconcile_replica(self, row: DeploymentRow, replica: ReplicaRow) -> None:
        assert row.id is not None
        now = time.time()
        runner, launch = self.runner(row), launch_of(row, replica)
        if not replica.instance:
            if replica.status != domain.STOPPED and now >= replica.next_start_at:
                try:
                    started = await asyncio.to_thread(runner.start_replica, launch)
                except MlmeshError as error:
                    await self._db(self.deployer.replica_down, row.id, replica.index, error.message, backoff_seconds)
                    log.warning("%s/%s replica %d did not start: %s", row.endpoint, row.name, replica.index, error)
                    return
                await self._db(
                    self.deployer.replica_started,
                    row.id,
                    replica.index,
                    started.instance,
                    started.grpc_port,
                    started.http_port,
                )
                log.info("%s/%s replica %d started (%s)", row.endpoint, row.name, replica.index, started.instance)
            return
        if not await asyncio.to_thread(runner.replica_running, launch, replica.instance):
            reason = await asyncio.to_thread(runner.replica_reason, launch, replica.instance)
            reason = f"the runtime exited: {reason}"
            await asyncio.to_thread(runner.stop_replica, launch, replica.instance)  # what is left of it
            await self._db(self.deployer.replica_down, row.id, replica.index, reason, backoff_seconds)
            log.warning("%s/%s replica %d down: %s", row.endpoint, row.name, replica.index, reason)
            return
        status = await asyncio.to_thread(health_status, f"127.0.0.1:{replica.grpc_port}", RUNTIME_SERVICE, 1.0)
        if status == "SERVING":
            if replica.status != domain.REPLICA_READY or replica.failed_checks:
                await self._db(self.deployer.replica_ready, row.id, replica.index)
            return
        if replica.status == domain.STARTING:
            if now - replica.started_at > self.ready_timeout_seconds:
                reason = await asyncio.to_thread(runner.replica_reason, launch, replica.instance)
                await self._restart(row, replica, f"not ready within {self.ready_timeout_seconds:.0f}s: {reason}")
            return
        failed = await self._db(self.deployer.replica_check_failed, row.id, replica.index)
        if failed >= FAILED_CHECKS_BEFORE_RESTART:
            await self._restart(row, replica, f"{failed} health checks in a row failed ({status})")

    async def _restart(self, row: DeploymentRow, replica: ReplicaRow, reason: str) -> None:
        await asyncio.to_thread(self.runner(row).stop_replica, launch_of(row, replica), replica.instance)
        await self._db(self.deployer.replica_down, row.id, replica.index, reason, backoff_seconds)
        log.warning("%s/%s replica %d restarted: %s", row.endpoint, row.name, replica.index, reason)

    async def _stop_replica(self, row: DeploymentRow, replica: ReplicaRow) -> None:
        assert row.id is not None
        await asyncio.to_thread(self.runner(row).stop_replica, launch_of(row, replica), replica.instance)
        await self._db(self.deployer.replica_stopped, row.id, replica.index)

    # ------------------------------------------------------------ the docker target's image

    async def _image_ready(self, row: DeploymentRow) -> bool:
        """Whether the docker deployment's image is known. If not, the builder builds it (in the
        background: a first build takes minutes); the deployment's message follows the build, and
        a build that fails fails the deployment."""
        assert row.id is not None
        if row.image:
            return True
        task = self._builds.get(row.id)
        if task is None:
            if self.builder is None:
                await self._db(self.deployer.deployment_failed, row.id, "no builder is configured to build its image")
                return False
            self._builds[row.id] = asyncio.create_task(asyncio.to_thread(self._build_image, row))
            await self._db(self.deployer.deployment_message, row.id, "building its image")
            return False
        if not task.done():
            line = self._build_lines.get(row.id)
            if line:
                await self._db(self.deployer.deployment_message, row.id, f"building its image: {line}")
            return False
        del self._builds[row.id]
        self._build_lines.pop(row.id, None)
        try:
            image = task.result()
        except Unavailable as error:  # the builder or the engine is away: asked again next pass
            await self._db(self.deployer.deployment_message, row.id, f"waiting to build its image: {error.message}")
            return False
        except MlmeshError as error:
            await self._db(self.deployer.deployment_failed, row.id, f"its image could not be built: {error.message}")
            return False
        await self._db(self.deployer.deployment_image, row.id, image)
        log.info("%s/%s: image %s", row.endpoint, row.name, image)
        row.image = image
        return True

    def _build_image(self, row: DeploymentRow) -> str:
        assert row.id is not None
        deployment_id = row.id

        def progress(line: str) -> None:
            self._build_lines[deployment_id] = line[:300]

        image = self.builder.build_image([f"{row.model_name}:{row.model_version}"], on_log=progress)
        return str(image.tag)

    def _loaded_file(self, endpoint: str) -> Path:
        routes = self.routes_file(endpoint)
        return routes.with_name(routes.name + ".loaded")

    async def _write_routes(self, endpoint: str, routes: dict[str, Any]) -> int:
        """Write the routes when they changed (atomically, with the next generation); the
        generation now in force."""
        if endpoint not in self._written:
            self._written[endpoint] = self._read_routes(endpoint)
        previous = self._written[endpoint]
        if {key: value for key, value in previous.items() if key != "generation"} == routes:
            return int(previous.get("generation", 0))
        generation = await self._db(self.deployer.next_routes_generation, endpoint)
        content = {"generation": generation, **routes}
        target = self.routes_file(endpoint)
        target.parent.mkdir(parents=True, exist_ok=True)
        scratch = target.with_name(f".{target.name}.{os.getpid()}")
        scratch.write_text(json.dumps(content, indent=2))
        os.replace(scratch, target)
        self._written[endpoint] = content
        return generation

    def _read_routes(self, endpoint: str) -> dict[str, Any]:
        try:
            return json.loads(self.routes_file(endpoint).read_text())
        except (OSError, ValueError):
            return {}

    async def _routes_loaded(self, endpoint: str, generation: int) -> None:
        """Wait until the router has loaded `generation` (or give up after a while: a router
        that does not run cannot route to what is about to stop either)."""
        loaded = self._loaded_file(endpoint)
        deadline = time.monotonic() + ROUTES_LOADED_TIMEOUT_SECONDS
        while time.monotonic() < deadline:
            try:
                if int(loaded.read_text().strip() or 0) >= generation:
                    return
            except (OSError, ValueError):
                pass
            await asyncio.sleep(0.05)
        log.warning("endpoint %s: the router did not confirm routes generation %d", endpoint, generation)

"""Endpoints, deployments, traffic and replica states: the deployer's rules, over its own tables.

Nothing here starts processes or talks to the network except through what it is given: the
registry (to resolve a model ref and record the usage) and, from the reconciler, the facts it
observed about replicas. Every change of state that matters outside writes its event to the
outbox in the same transaction.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Protocol

from sqlalchemy import delete
from sqlmodel import Session, col, select

from services.common import events, paging
from services.common.db import Database
from services.common.docker_engine import is_reference
from services.common.errors import AlreadyExists, FailedPrecondition, InvalidArgument, NotFound
from services.common.names import ENDPOINT_NAME
from services.common.outbox import Outbox
from services.deployer.models import BatchJobRow, DeploymentRow, EndpointRow, ReplicaRow

SERVICE = "deployer"
TARGETS = ("local", "docker", "kubernetes")

# Deployment statuses
CREATING = "creating"
READY = "ready"
UNHEALTHY = "unhealthy"
FAILED = "failed"
DELETING = "deleting"

# Replica statuses
STARTING = "starting"
REPLICA_READY = "ready"
DOWN = "down"
STOPPED = "stopped"

# Batch job statuses
QUEUED = "queued"
RUNNING = "running"
COMPLETED = "completed"
BATCH_FAILED = "failed"
BATCH_FORMATS = (".parquet", ".csv")
MAX_BATCH_WORKERS = 32
MAX_MINI_BATCH_ROWS = 1_000_000

MAX_REPLICAS = 64
MAX_CPUS = 256
MAX_MEMORY_MB = 4 * 1024 * 1024


class Registry(Protocol):
    """What the deployer needs of the registry (services.client.RegistryClient has it)."""

    def acquire_usage(self, ref: str, deployment_id: str) -> Any: ...

    def get_dataset(self, ref: str) -> Any: ...

    def release_usage(self, ref: str, deployment_id: str) -> None: ...


@dataclass(frozen=True)
class DeploymentSpec:
    endpoint: str
    deployment: str
    model_ref: str
    target: str = "local"
    cpus: float = 0
    memory_mb: int = 0
    replicas: int = 1
    traffic: int | None = None
    capture: bool = False
    image: str = ""
    """docker target: an image that serves the model (empty: the builder builds one)."""
    max_batch_rows: int = 0
    recommended_resources: bool = False
    """Take the resources from the version's newest profile (replicas too when `replicas` is 0)."""
    profile: str = ""


@dataclass(frozen=True)
class Recommended:
    """A profile's recommendation, as the deployer applies it."""

    profile: str
    cpus: float
    memory_mb: int
    replicas: int
    max_batch_rows: int


class Recommendations(Protocol):
    """Where recommended resources come from (the profiler)."""

    def latest(self, model_name: str, model_version: int, target: str) -> Recommended: ...


@dataclass(frozen=True)
class BatchSpec:
    model_ref: str = ""
    endpoint: str = ""
    inputs: tuple[str, ...] = ()
    dataset: str = ""
    output_dir: str = ""
    mini_batch_rows: int = 1000
    workers: int = 2
    columns: tuple[str, ...] = ()


@dataclass
class BatchJobView:
    id: str
    model_ref: str
    model_name: str
    model_version: int
    endpoint: str
    inputs: list[str]
    dataset: str
    columns: list[str]
    output_dir: str
    mini_batch_rows: int
    workers: int
    status: str
    message: str
    parts_total: int
    parts_done: int
    rows_total: int
    worker_instances: list[str]
    created_at: float
    finished_at: float | None


def check_batch_spec(spec: BatchSpec) -> None:
    if bool(spec.model_ref) == bool(spec.endpoint):
        raise InvalidArgument("give exactly one of model_ref and endpoint: what scores the rows", field="model_ref")
    if spec.endpoint:
        check_name(spec.endpoint, "endpoint")
    if bool(spec.dataset) == bool(spec.inputs):
        raise InvalidArgument("give exactly one of inputs (files) and dataset (name:version)", field="inputs")
    if len(spec.dataset) > 300:
        raise InvalidArgument("dataset must be a reference `name:version` of at most 300 characters", field="dataset")
    if len(spec.inputs) > 10_000:
        raise InvalidArgument("give at most 10,000 input files (Parquet or CSV)", field="inputs")
    for text in spec.inputs:
        path = Path(text)
        if not path.is_absolute() or path.suffix.lower() not in BATCH_FORMATS:
            raise InvalidArgument(
                f"input {text[:300]!r} must be an absolute path to a .parquet or .csv file", field="inputs"
            )
        if not path.is_file():
            raise NotFound(f"input file {text[:300]} does not exist on the deployer's machine", field="inputs")
    output = Path(spec.output_dir)
    if not spec.output_dir or not output.is_absolute():
        raise InvalidArgument("output_dir must be an absolute folder", field="output_dir")
    if output.exists() and (not output.is_dir() or any(output.iterdir())):
        raise FailedPrecondition(
            f"output_dir {spec.output_dir[:300]} is not an empty folder; pick a new one", field="output_dir"
        )
    if not 1 <= spec.mini_batch_rows <= MAX_MINI_BATCH_ROWS:
        raise InvalidArgument(f"mini_batch_rows must be 1 to {MAX_MINI_BATCH_ROWS}", field="mini_batch_rows")
    if not 1 <= spec.workers <= MAX_BATCH_WORKERS:
        raise InvalidArgument(f"workers must be 1 to {MAX_BATCH_WORKERS}", field="workers")
    if len(spec.columns) > 10_000 or any(not column or len(column) > 200 for column in spec.columns):
        raise InvalidArgument("columns must be at most 10,000 names of 1-200 characters", field="columns")


def batch_usage_id(job_id: str) -> str:
    return f"batch/{job_id}"


@dataclass
class ReplicaView:
    index: int
    status: str
    grpc_address: str
    http_address: str
    instance: str
    restarts: int
    message: str


@dataclass
class DeploymentView:
    endpoint: str
    name: str
    model_ref: str
    model_name: str
    model_version: int
    target: str
    cpus: float
    memory_mb: int
    max_batch_rows: int
    profile: str
    replicas: int
    traffic: int
    mirror: int
    capture: bool
    image: str
    status: str
    message: str
    created_at: float
    updated_at: float
    replica_states: list[ReplicaView] = field(default_factory=list)


@dataclass
class EndpointView:
    name: str
    grpc_address: str
    http_address: str
    created_at: float
    deployments: list[DeploymentView]

    @property
    def traffic(self) -> dict[str, int]:
        return {deployment.name: deployment.traffic for deployment in self.deployments}

    @property
    def mirror(self) -> dict[str, int]:
        return {deployment.name: deployment.mirror for deployment in self.deployments if deployment.mirror}


def usage_id(endpoint: str, deployment: str) -> str:
    """How the registry knows this deployment among the users of a model version."""
    return f"endpoints/{endpoint}/deployments/{deployment}"


def check_name(value: str, what: str) -> str:
    if not ENDPOINT_NAME.fullmatch(value or ""):
        raise InvalidArgument(
            f"{what} name {value[:100]!r} is not valid: 1-40 lowercase letters, digits and '-', starting with a letter",
            field=what,
        )
    return value


def check_spec(spec: DeploymentSpec) -> None:
    check_name(spec.endpoint, "endpoint")
    check_name(spec.deployment, "deployment")
    if not spec.model_ref or len(spec.model_ref) > 300:
        raise InvalidArgument("model_ref is required: `name:version`, `name@alias` or `name`", field="model_ref")
    if spec.target not in TARGETS:
        raise InvalidArgument(f"target {spec.target[:50]!r} is not one of {', '.join(TARGETS)}", field="target")
    if spec.image and spec.target != "docker":
        raise InvalidArgument(f"an image is for the docker target, not {spec.target}", field="image")
    if spec.image and not is_reference(spec.image):
        raise InvalidArgument(
            f"image {spec.image[:100]!r} is not a Docker image reference ([host[:port]/]path[:tag], lowercase path)",
            field="image",
        )
    if spec.recommended_resources and (spec.cpus or spec.memory_mb or spec.max_batch_rows):
        raise InvalidArgument(
            "give either recommended resources or cpus and memory, not both", field="recommended_resources"
        )
    if spec.recommended_resources and spec.replicas == 0:
        pass  # the recommendation says how many
    elif not 1 <= spec.replicas <= MAX_REPLICAS:
        raise InvalidArgument(f"replicas must be between 1 and {MAX_REPLICAS}, not {spec.replicas}", field="replicas")
    if not 0 <= spec.cpus <= MAX_CPUS or spec.cpus != spec.cpus:
        raise InvalidArgument(f"cpus must be between 0 (no limit) and {MAX_CPUS}", field="resources.cpus")
    if not 0 <= spec.memory_mb <= MAX_MEMORY_MB:
        raise InvalidArgument(f"memory_mb must be 0 (no limit) to {MAX_MEMORY_MB}", field="resources.memory_mb")
    if spec.memory_mb and spec.memory_mb < 64:
        raise InvalidArgument("memory_mb below 64 cannot hold the runtime", field="resources.memory_mb")
    if spec.traffic is not None and not 0 <= spec.traffic <= 100:
        raise InvalidArgument(f"traffic must be a percentage 0-100, not {spec.traffic}", field="traffic")


def scale_others(current: dict[str, int], remaining: int) -> dict[str, int]:
    """Share `remaining` percent among `current` deployments in their present proportions
    (largest remainder, so the shares are whole numbers summing exactly to `remaining`)."""
    total = sum(current.values())
    if not current:
        return {}
    if total == 0:
        if remaining:
            raise InvalidArgument(
                f"the endpoint's other deployments take no traffic, so {remaining}% has nowhere to go: "
                "give this deployment 100 or set the weights with `mlmesh deploy traffic`",
                field="traffic",
            )
        return dict.fromkeys(current, 0)
    exact = {name: weight * remaining / total for name, weight in current.items()}
    shares = {name: int(value) for name, value in exact.items()}
    leftover = remaining - sum(shares.values())
    for name in sorted(exact, key=lambda name: exact[name] - shares[name], reverse=True)[:leftover]:
        shares[name] += 1
    return shares


def check_traffic(names: Iterable[str], traffic: dict[str, int], mirror: dict[str, int]) -> None:
    known = set(names)
    for what, weights in (("traffic", traffic), ("mirror", mirror)):
        for name, percent in weights.items():
            if name not in known:
                raise NotFound(
                    f"{what} names deployment {name[:50]!r}, which the endpoint does not have "
                    f"(it has {', '.join(sorted(known)) or 'none'})",
                    field=what,
                )
            if not 0 <= percent <= 100:
                raise InvalidArgument(f"{what} of {name} must be 0-100, not {percent}", field=what)
    if known and sum(traffic.values()) != 100:
        raise InvalidArgument(f"traffic weights must sum to 100; these sum to {sum(traffic.values())}", field="traffic")
    for name, percent in mirror.items():
        if percent and traffic.get(name, 0):
            raise InvalidArgument(
                f"{name} takes live traffic, so it cannot also receive mirrored copies; mirror to a "
                "deployment at 0% traffic",
                field="mirror",
            )


class Deployer:
    """The deployer's state: endpoints, deployments, traffic, and what replicas were seen doing."""

    def __init__(
        self,
        database: Database,
        outbox: Outbox,
        registry: Registry,
        free_port: Callable[[], int],
        *,
        max_restarts: int = 5,
        restart_window_seconds: float = 600,
        recommendations: Recommendations | None = None,
    ) -> None:
        self.database = database
        self.outbox = outbox
        self.registry = registry
        self.recommendations = recommendations
        self.free_port = free_port
        self.max_restarts = max_restarts
        self.restart_window_seconds = restart_window_seconds

    # ------------------------------------------------------------ commands

    def create_deployment(self, spec: DeploymentSpec) -> DeploymentView:
        """Resolve the model ref, record the usage at the registry, add the deployment (and the
        endpoint when new). Replicas are started by the reconciler."""
        check_spec(spec)
        with self.database.session() as session:
            if self._deployment(session, spec.endpoint, spec.deployment, missing_ok=True) is not None:
                raise AlreadyExists(
                    f"endpoint {spec.endpoint} already has a deployment {spec.deployment}; "
                    "pick another name (e.g. green) or delete it first",
                    field="deployment",
                )
        version = self.registry.acquire_usage(spec.model_ref, usage_id(spec.endpoint, spec.deployment))
        try:
            if not any(file.path.endswith(".onnx") for file in version.files):
                raise FailedPrecondition(
                    f"{version.name}:{version.version} has no .onnx file and the runtime serves ONNX; "
                    "convert it first (mlmesh build convert)",
                    field="model_ref",
                )
            if spec.recommended_resources:
                spec = self._recommended(spec, version.name, version.version)
            return self._add_deployment(spec, version.name, version.version)
        except BaseException:
            self.registry.release_usage(f"{version.name}:{version.version}", usage_id(spec.endpoint, spec.deployment))
            raise

    def _recommended(self, spec: DeploymentSpec, model_name: str, model_version: int) -> DeploymentSpec:
        """The spec with the resources of the version's newest profile on its target."""
        if self.recommendations is None:
            raise FailedPrecondition("this deployer has no profiler configured (MLMESH_DEPLOYER_PROFILER_ADDRESS)")
        found = self.recommendations.latest(model_name, model_version, spec.target)
        sized = replace(
            spec,
            cpus=found.cpus,
            memory_mb=found.memory_mb,
            max_batch_rows=found.max_batch_rows,
            replicas=spec.replicas or found.replicas,
            profile=found.profile,
            recommended_resources=False,
        )
        check_spec(sized)
        return sized

    def _add_deployment(self, spec: DeploymentSpec, model_name: str, model_version: int) -> DeploymentView:
        now = time.time()
        with self.database.transaction() as session:
            endpoint = session.get(EndpointRow, spec.endpoint)
            if endpoint is None:
                endpoint = EndpointRow(
                    name=spec.endpoint,
                    grpc_port=self.free_port(),
                    http_port=self.free_port(),
                    created_at=now,
                    updated_at=now,
                )
                session.add(endpoint)
            if self._deployment(session, spec.endpoint, spec.deployment, missing_ok=True) is not None:
                raise AlreadyExists(f"endpoint {spec.endpoint} already has a deployment {spec.deployment}")
            others = self._deployments(session, spec.endpoint)
            current = {other.name: other.traffic for other in others}
            traffic = spec.traffic if spec.traffic is not None else (0 if others else 100)
            if not others and traffic != 100:
                raise InvalidArgument(
                    f"the first deployment of an endpoint takes all its traffic; traffic {traffic} cannot apply",
                    field="traffic",
                )
            shares = scale_others(current, 100 - traffic) if spec.traffic is not None else current
            for other in others:
                if shares[other.name] != other.traffic:
                    other.traffic = shares[other.name]
                    other.updated_at = now
                    session.add(other)
            row = DeploymentRow(
                endpoint=spec.endpoint,
                name=spec.deployment,
                model_ref=spec.model_ref,
                model_name=model_name,
                model_version=model_version,
                target=spec.target,
                cpus=spec.cpus,
                memory_mb=spec.memory_mb,
                max_batch_rows=spec.max_batch_rows,
                profile=spec.profile,
                replicas=spec.replicas,
                traffic=traffic,
                capture=spec.capture,
                image=spec.image,
                status=CREATING,
                created_at=now,
                updated_at=now,
            )
            session.add(row)
            session.flush()
            for index in range(spec.replicas):
                session.add(ReplicaRow(deployment_id=row.id, index=index, status=STARTING))
            all_traffic = {**{other.name: other.traffic for other in others}, row.name: traffic}
            self._emit(
                session,
                row,
                events.DeploymentCreated,
                model_ref=spec.model_ref,
                cpus=spec.cpus,
                memory_mb=spec.memory_mb,
                replicas=spec.replicas,
                traffic=all_traffic,
            )
            for other in others:
                if other.traffic != current[other.name]:
                    self._emit_updated(session, other, ["traffic"], all_traffic, {})
            session.flush()
            return self._view(session, row)

    def set_traffic(self, endpoint: str, traffic: dict[str, int], mirror: dict[str, int]) -> EndpointView:
        check_name(endpoint, "endpoint")
        with self.database.transaction() as session:
            row = self._endpoint(session, endpoint)
            deployments = [d for d in self._deployments(session, endpoint) if d.status != DELETING]
            check_traffic((d.name for d in deployments), traffic, mirror)
            now = time.time()
            full_traffic = {d.name: traffic.get(d.name, 0) for d in deployments}
            full_mirror = {d.name: mirror.get(d.name, 0) for d in deployments}
            for deployment in deployments:
                changed = []
                if deployment.traffic != full_traffic[deployment.name]:
                    changed.append("traffic")
                if deployment.mirror != full_mirror[deployment.name]:
                    changed.append("mirror")
                if changed:
                    deployment.traffic = full_traffic[deployment.name]
                    deployment.mirror = full_mirror[deployment.name]
                    deployment.updated_at = now
                    session.add(deployment)
                    self._emit_updated(session, deployment, changed, full_traffic, mirror)
            row.updated_at = now
            session.add(row)
            session.flush()
            return self._endpoint_view(session, row)

    def mark_deleting(self, endpoint: str, deployment: str | None) -> list[str]:
        """Mark one deployment (or all of an endpoint's) for deletion; the names marked.
        A deployment that takes traffic beside others must give it up first."""
        check_name(endpoint, "endpoint")
        with self.database.transaction() as session:
            self._endpoint(session, endpoint)
            rows = self._deployments(session, endpoint)
            if deployment is not None:
                check_name(deployment, "deployment")
                row = self._deployment(session, endpoint, deployment)
                live_others = [other for other in rows if other.name != deployment and other.status != DELETING]
                if row.traffic and live_others:
                    others = " ".join(f"{other.name}=..." for other in live_others)
                    raise FailedPrecondition(
                        f"{deployment} takes {row.traffic}% of {endpoint}'s traffic; shift it first "
                        f"(mlmesh deploy traffic {endpoint} {others})",
                        field="deployment",
                    )
                rows = [row]
            for row in rows:
                row.status = DELETING
                row.traffic = 0
                row.mirror = 0
                row.updated_at = time.time()
                session.add(row)
            return [row.name for row in rows]

    def finish_delete(self, endpoint: str, deployment: str) -> None:
        """The deployment's replicas are stopped: release the usage and forget it (the endpoint
        too when this was its last deployment)."""
        with self.database.session() as session:
            row = self._deployment(session, endpoint, deployment, missing_ok=True)
            if row is None:
                return
            ref = f"{row.model_name}:{row.model_version}"
        self.registry.release_usage(ref, usage_id(endpoint, deployment))
        with self.database.transaction() as session:
            row = self._deployment(session, endpoint, deployment, missing_ok=True)
            if row is None:
                return
            session.execute(delete(ReplicaRow).where(col(ReplicaRow.deployment_id) == row.id))
            session.delete(row)
            self._emit(session, row, events.DeploymentDeleted)
            session.flush()
            if not self._deployments(session, endpoint):
                endpoint_row = session.get(EndpointRow, endpoint)
                if endpoint_row is not None:
                    session.delete(endpoint_row)

    def endpoint_gone(self, endpoint: str) -> bool:
        with self.database.session() as session:
            return session.get(EndpointRow, endpoint) is None

    # ------------------------------------------------------------ what the reconciler observed

    def replica_started(self, deployment_id: int, index: int, instance: str, grpc_port: int, http_port: int) -> None:
        with self.database.transaction() as session:
            replica = session.get(ReplicaRow, (deployment_id, index))
            if replica is None:
                return
            replica.status = STARTING
            replica.instance = instance
            replica.grpc_port = grpc_port
            replica.http_port = http_port
            replica.started_at = time.time()
            replica.failed_checks = 0
            replica.message = ""
            session.add(replica)

    def replica_ready(self, deployment_id: int, index: int) -> None:
        """A replica answered its health check: the router may send it requests."""
        with self.database.transaction() as session:
            replica = session.get(ReplicaRow, (deployment_id, index))
            if replica is None:
                return
            replica.failed_checks = 0
            if replica.status != REPLICA_READY:
                replica.status = REPLICA_READY
                replica.message = ""
            session.add(replica)

    def deployment_routed(self, deployment_id: int, endpoint_addresses: tuple[str, str]) -> None:
        """The router has loaded routes holding every replica of the deployment: it is ready
        (a caller told so can send requests at once)."""
        with self.database.transaction() as session:
            row = session.get(DeploymentRow, deployment_id)
            if row is None or row.status not in (CREATING, UNHEALTHY):
                return
            replicas = self._replicas(session, deployment_id)
            if not all(replica.status == REPLICA_READY for replica in replicas):
                return
            row.status = READY
            row.message = ""
            row.was_ready = True
            row.updated_at = time.time()
            session.add(row)
            grpc_address, http_address = endpoint_addresses
            self._emit(
                session,
                row,
                events.DeploymentReady,
                replicas=len(replicas),
                grpc_address=grpc_address,
                http_address=http_address,
            )

    def replica_down(self, deployment_id: int, index: int, reason: str, backoff: Callable[[int], float]) -> None:
        """A replica died or stopped answering: schedule its restart, or fail the deployment when
        it has restarted too often."""
        with self.database.transaction() as session:
            replica = session.get(ReplicaRow, (deployment_id, index))
            row = session.get(DeploymentRow, deployment_id)
            if replica is None or row is None:
                return
            now = time.time()
            window_start = now - self.restart_window_seconds
            restarts = [moment for moment in json.loads(replica.restart_times) if moment > window_start]
            restarts.append(now)
            replica.restart_times = json.dumps(restarts)
            replica.restarts += 1
            replica.status = DOWN
            replica.instance = ""
            replica.message = reason[:2000]
            replica.next_start_at = now + backoff(len(restarts))
            session.add(replica)
            row.updated_at = now
            if len(restarts) > self.max_restarts:
                row.status = FAILED
                row.message = f"replica {index} failed {len(restarts)} times; last: {reason}"[:2000]
                session.add(row)
                self._emit(session, row, events.DeploymentFailed, reason=row.message)
            elif row.was_ready and row.status != UNHEALTHY:
                row.status = UNHEALTHY
                row.message = f"replica {index}: {reason}"[:2000]
                session.add(row)
                unhealthy = events.DeploymentUnhealthy
                self._emit(session, row, unhealthy, replica=index, reason=reason[:2000], restarts=replica.restarts)
            else:
                session.add(row)

    def deployment_image(self, deployment_id: int, image: str) -> None:
        """The image a docker deployment's replicas run, once the builder has it."""
        with self.database.transaction() as session:
            row = session.get(DeploymentRow, deployment_id)
            if row is not None and not row.image:
                row.image = image
                row.message = f"image {image}"
                row.updated_at = time.time()
                session.add(row)

    def deployment_failed(self, deployment_id: int, reason: str) -> None:
        """The deployment cannot run as it is (say, its image could not be built): failed, for good."""
        with self.database.transaction() as session:
            row = session.get(DeploymentRow, deployment_id)
            if row is None or row.status in (FAILED, DELETING):
                return
            row.status = FAILED
            row.message = reason[:2000]
            row.updated_at = time.time()
            session.add(row)
            self._emit(session, row, events.DeploymentFailed, reason=row.message)

    def deployment_message(self, deployment_id: int, message: str) -> None:
        """Note what the target reported (e.g. where a kubernetes deployment's manifests are)."""
        with self.database.transaction() as session:
            row = session.get(DeploymentRow, deployment_id)
            if row is not None and row.message != message[:2000]:
                row.message = message[:2000]
                row.updated_at = time.time()
                session.add(row)

    def replica_check_failed(self, deployment_id: int, index: int) -> int:
        """Count a failed health check of a replica that is running; the count so far."""
        with self.database.transaction() as session:
            replica = session.get(ReplicaRow, (deployment_id, index))
            if replica is None:
                return 0
            replica.failed_checks += 1
            session.add(replica)
            return replica.failed_checks

    def replica_stopped(self, deployment_id: int, index: int) -> None:
        with self.database.transaction() as session:
            replica = session.get(ReplicaRow, (deployment_id, index))
            if replica is not None:
                replica.status = STOPPED
                replica.instance = ""
                session.add(replica)

    def router_started(self, endpoint: str, instance: str) -> None:
        with self.database.transaction() as session:
            row = session.get(EndpointRow, endpoint)
            if row is not None:
                row.router_instance = instance
                session.add(row)

    def next_routes_generation(self, endpoint: str) -> int:
        with self.database.transaction() as session:
            row = self._endpoint(session, endpoint)
            row.routes_generation += 1
            session.add(row)
            return row.routes_generation

    # ------------------------------------------------------------ batch jobs

    def create_batch_job(self, spec: BatchSpec) -> BatchJobView:
        """Record a job (QUEUED); the batch runner plans, queues and scores it. A model version
        is resolved now and its usage recorded until the job ends."""
        check_batch_spec(spec)
        job_id = events.uuid7()
        model_name, model_version = "", 0
        dataset = ""
        if spec.dataset:
            found = self.registry.get_dataset(spec.dataset)
            if found.format not in ("csv", "parquet"):
                raise FailedPrecondition(f"dataset {spec.dataset} is {found.format}; batch jobs read csv or parquet")
            dataset = f"{found.name}:{found.version}"
        if spec.endpoint:
            with self.database.session() as session:
                self._endpoint(session, spec.endpoint)
        else:
            version = self.registry.acquire_usage(spec.model_ref, batch_usage_id(job_id))
            model_name, model_version = version.name, version.version
        try:
            with self.database.transaction() as session:
                row = BatchJobRow(
                    id=job_id,
                    model_ref=spec.model_ref,
                    model_name=model_name,
                    model_version=model_version,
                    endpoint=spec.endpoint,
                    inputs=json.dumps(list(spec.inputs)),
                    dataset=dataset,
                    columns=json.dumps(list(spec.columns)),
                    output_dir=spec.output_dir,
                    mini_batch_rows=spec.mini_batch_rows,
                    workers=spec.workers,
                    status=QUEUED,
                    created_at=time.time(),
                )
                session.add(row)
                session.flush()
                return _batch_view(row)
        except BaseException:
            if model_name:
                self.registry.release_usage(f"{model_name}:{model_version}", batch_usage_id(job_id))
            raise

    def batch_started(self, job_id: str, parts: int, rows: int, workers: list[str]) -> None:
        with self.database.transaction() as session:
            row = self._batch(session, job_id)
            row.status, row.parts_total, row.rows_total = RUNNING, parts, rows
            row.worker_instances = json.dumps(workers)
            session.add(row)

    def batch_progress(self, job_id: str, parts_done: int, workers: list[str]) -> None:
        with self.database.transaction() as session:
            row = self._batch(session, job_id)
            row.parts_done = parts_done
            row.worker_instances = json.dumps(workers)
            session.add(row)

    def finish_batch(self, job_id: str, failure: str | None) -> None:
        """The job completed (every part written) or failed: record it, emit its event and
        release the model version."""
        with self.database.transaction() as session:
            row = self._batch(session, job_id)
            if row.status in (COMPLETED, BATCH_FAILED):
                return
            now = time.time()
            row.status = BATCH_FAILED if failure else COMPLETED
            row.message = (failure or "")[:2000]
            row.finished_at = now
            row.worker_instances = "[]"
            if not failure:
                row.parts_done = row.parts_total
            session.add(row)
            fields = {
                "job_id": row.id,
                "model_name": row.model_name,
                "model_version": row.model_version,
                "endpoint": row.endpoint,
                "output_dir": row.output_dir,
                "parts": row.parts_done,
                "rows": row.rows_total,
                "seconds": round(now - row.created_at, 3),
            }
            payload = events.BatchFailed(**fields, reason=row.message) if failure else events.BatchCompleted(**fields)
            self.outbox.add(session, events.make_event(SERVICE, payload, f"batch/{row.id}"))
            model = f"{row.model_name}:{row.model_version}" if row.model_name else ""
        if model:
            self.registry.release_usage(model, batch_usage_id(job_id))

    def get_batch_job(self, job_id: str) -> BatchJobView:
        with self.database.session() as session:
            return _batch_view(self._batch(session, job_id))

    def list_batch_jobs(self, page_size: int, page_token: str) -> tuple[list[BatchJobView], str]:
        """A page of jobs, newest first; the token is the last id of the page before."""
        page_size = paging.page_size(page_size)
        with self.database.session() as session:
            query = select(BatchJobRow).order_by(col(BatchJobRow.id).desc()).limit(page_size + 1)
            if page_token:
                query = query.where(col(BatchJobRow.id) < page_token)
            rows = list(session.exec(query).all())
            more = len(rows) > page_size
            rows = rows[:page_size]
            return [_batch_view(row) for row in rows], (rows[-1].id if more else "")

    def active_batch_jobs(self) -> list[BatchJobView]:
        with self.database.session() as session:
            query = select(BatchJobRow).where(col(BatchJobRow.status).in_([QUEUED, RUNNING]))
            return [_batch_view(row) for row in session.exec(query).all()]

    def endpoint_address(self, endpoint: str) -> str:
        with self.database.session() as session:
            return f"127.0.0.1:{self._endpoint(session, endpoint).grpc_port}"

    @staticmethod
    def _batch(session: Session, job_id: str) -> BatchJobRow:
        row = session.get(BatchJobRow, job_id[:100])
        if row is None:
            raise NotFound(f"batch job {job_id[:100]} does not exist (mlmesh batch list shows the jobs)", field="id")
        return row

    # ------------------------------------------------------------ queries

    def get_endpoint(self, name: str) -> EndpointView:
        check_name(name, "endpoint")
        with self.database.session() as session:
            return self._endpoint_view(session, self._endpoint(session, name))

    def list_endpoints(self, page_size: int, page_token: str) -> tuple[list[EndpointView], str]:
        """A page of endpoints by name; the token is the last name of the page before."""
        page_size = paging.page_size(page_size)
        with self.database.session() as session:
            query = select(EndpointRow).order_by(col(EndpointRow.name)).limit(page_size + 1)
            if page_token:
                query = query.where(col(EndpointRow.name) > page_token)
            rows = list(session.exec(query).all())
            more = len(rows) > page_size
            rows = rows[:page_size]
            views = [self._endpoint_view(session, row) for row in rows]
            return views, (rows[-1].name if more else "")

    def endpoint_rows(self) -> list[EndpointRow]:
        with self.database.session() as session:
            return list(session.exec(select(EndpointRow)).all())

    def deployment_rows(self, endpoint: str) -> list[tuple[DeploymentRow, list[ReplicaRow]]]:
        with self.database.session() as session:
            return [(row, self._replicas(session, row.id)) for row in self._deployments(session, endpoint)]

    def deployment_view(self, endpoint: str, deployment: str) -> DeploymentView:
        with self.database.session() as session:
            return self._view(session, self._deployment(session, endpoint, deployment))

    # ------------------------------------------------------------ helpers

    def _endpoint(self, session: Session, name: str) -> EndpointRow:
        row = session.get(EndpointRow, name)
        if row is None:
            raise NotFound(f"endpoint {name} does not exist (mlmesh deploy list shows the endpoints)", field="endpoint")
        return row

    @staticmethod
    def _deployments(session: Session, endpoint: str) -> list[DeploymentRow]:
        query = select(DeploymentRow).where(DeploymentRow.endpoint == endpoint).order_by(col(DeploymentRow.name))
        return list(session.exec(query).all())

    @staticmethod
    def _replicas(session: Session, deployment_id: int | None) -> list[ReplicaRow]:
        query = select(ReplicaRow).where(ReplicaRow.deployment_id == deployment_id).order_by(col(ReplicaRow.index))
        return list(session.exec(query).all())

    def _deployment(self, session: Session, endpoint: str, name: str, missing_ok: bool = False) -> DeploymentRow | None:
        row = session.exec(
            select(DeploymentRow).where(DeploymentRow.endpoint == endpoint, DeploymentRow.name == name)
        ).first()
        if row is None and not missing_ok:
            raise NotFound(f"endpoint {endpoint} has no deployment {name}", field="deployment")
        return row

    def _view(self, session: Session, row: DeploymentRow) -> DeploymentView:
        replicas = [
            ReplicaView(
                index=replica.index,
                status=replica.status,
                grpc_address=f"127.0.0.1:{replica.grpc_port}" if replica.grpc_port else "",
                http_address=f"127.0.0.1:{replica.http_port}" if replica.http_port else "",
                instance=replica.instance,
                restarts=replica.restarts,
                message=replica.message,
            )
            for replica in self._replicas(session, row.id)
        ]
        values = row.model_dump(exclude={"id", "was_ready"})
        return DeploymentView(**values, replica_states=replicas)

    def _endpoint_view(self, session: Session, row: EndpointRow) -> EndpointView:
        return EndpointView(
            name=row.name,
            grpc_address=f"127.0.0.1:{row.grpc_port}",
            http_address=f"127.0.0.1:{row.http_port}",
            created_at=row.created_at,
            deployments=[self._view(session, deployment) for deployment in self._deployments(session, row.name)],
        )

    def _emit(
        self, session: Session, row: DeploymentRow, payload_type: type[events.DeploymentEvent], **fields: Any
    ) -> None:
        payload = payload_type(
            endpoint=row.endpoint,
            deployment=row.name,
            model_name=row.model_name,
            model_version=row.model_version,
            target=row.target,
            **fields,
        )
        subject = usage_id(row.endpoint, row.name)
        self.outbox.add(session, events.make_event(SERVICE, payload, subject))

    def _emit_updated(
        self, session: Session, row: DeploymentRow, changed: list[str], traffic: dict[str, int], mirror: dict[str, int]
    ) -> None:
        self._emit(session, row, events.DeploymentUpdated, changed=changed, traffic=traffic, mirror=mirror)


def _batch_view(row: BatchJobRow) -> BatchJobView:
    values = row.model_dump()
    for field_name in ("inputs", "columns", "worker_instances"):
        values[field_name] = json.loads(values[field_name])
    return BatchJobView(**values)

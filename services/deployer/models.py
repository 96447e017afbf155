"""Tables owned by the deployer. Timestamps are Unix seconds (float)."""

from __future__ import annotations

from sqlalchemy import UniqueConstraint
from sqlmodel import Field, SQLModel

from services.common.db import Database
from services.common.outbox import OutboxEvent


class EndpointRow(SQLModel, table=True):
    """An endpoint and its router: the process that owns the endpoint's stable ports."""

    __tablename__ = "endpoints"

    name: str = Field(primary_key=True)
    grpc_port: int
    http_port: int
    router_instance: str = ""
    """The router's process id and start time (`pid:start`), so a reused pid is not mistaken for it."""
    routes_generation: int = 0
    created_at: float
    updated_at: float


class DeploymentRow(SQLModel, table=True):
    __tablename__ = "deployments"
    __table_args__ = (UniqueConstraint("endpoint", "name", name="uq_deployments_endpoint_name"),)

    id: int | None = Field(default=None, primary_key=True)
    endpoint: str = Field(index=True)
    name: str
    model_ref: str
    model_name: str
    model_version: int
    target: str
    cpus: float = 0
    memory_mb: int = 0
    max_batch_rows: int = 0
    """Adaptive batching of the replicas' runtime (0: off)."""
    profile: str = ""
    """`profiles/<id>` whose recommendation set the resources, if one did."""
    replicas: int = 1
    traffic: int = 0
    mirror: int = 0
    capture: bool = False
    image: str = ""
    """docker target: the image its replicas run (given, or built by the builder at deploy time)."""
    status: str
    message: str = ""
    was_ready: bool = False
    """Every replica answered at least once: a later failure is `unhealthy`, not a failed start."""
    created_at: float
    updated_at: float


class ReplicaRow(SQLModel, table=True):
    """One running copy of a deployment and what the reconciler knows of it."""

    __tablename__ = "replicas"

    deployment_id: int = Field(primary_key=True, foreign_key="deployments.id")
    index: int = Field(primary_key=True)
    status: str
    instance: str = ""
    """Local target: `pid:start` of the runtime process; docker: the container id."""
    grpc_port: int = 0
    http_port: int = 0
    started_at: float = 0
    restarts: int = 0
    restart_times: str = "[]"
    """When the last restarts happened (JSON list of Unix seconds), to count them in a window."""
    next_start_at: float = 0
    failed_checks: int = 0
    message: str = ""


class BatchJobRow(SQLModel, table=True):
    """A batch scoring job; its mini-batches live on the MLMESH_BATCH work queue while it runs."""

    __tablename__ = "batch_jobs"

    id: str = Field(primary_key=True)
    model_ref: str = ""
    model_name: str = ""
    model_version: int = 0
    endpoint: str = ""
    inputs: str = "[]"
    """Input files as given (JSON list)."""
    dataset: str = ""
    """Or a registered dataset, `name:version` as resolved when the job was created."""
    columns: str = "[]"
    output_dir: str
    mini_batch_rows: int
    workers: int
    status: str
    message: str = ""
    parts_total: int = 0
    parts_done: int = 0
    rows_total: int = 0
    worker_instances: str = "[]"
    """`pid:start` of each worker process (JSON list)."""
    created_at: float
    finished_at: float | None = None


TABLES = [EndpointRow, DeploymentRow, ReplicaRow, BatchJobRow, OutboxEvent]


def create_tables(database: Database) -> None:
    database.create_tables()

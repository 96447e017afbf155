"""Settings of the deployer (environment prefix MLMESH_DEPLOYER_) and of an endpoint's router
(MLMESH_ROUTER_), the process the deployer starts to give each endpoint its stable address."""

from __future__ import annotations

from pathlib import Path
from urllib.parse import urlsplit, urlunsplit

from pydantic import Field
from pydantic_settings import SettingsConfigDict

from services.common.docker_engine import HOST_ALIAS
from services.common.settings import ServiceSettings

"""How a container names the engine's host (the deployer starts containers with it)."""


class DeployerSettings(ServiceSettings):
    model_config = SettingsConfigDict(env_prefix="MLMESH_DEPLOYER_", extra="ignore", populate_by_name=True)

    service_name: str = "deployer"
    """Name used in event sources, file names and telemetry."""

    port: int = 50054
    """gRPC port of the deployer."""

    registry_address: str = "127.0.0.1:50051"
    """host:port of the registry: model refs are resolved there and usages recorded."""

    builder_address: str = "127.0.0.1:50052"
    """host:port of the builder: it builds the images of `docker` deployments given no image."""

    profiler_address: str = "127.0.0.1:50053"
    """host:port of the profiler: recommended resources (`--resources recommended`) come from it."""

    docker_url: str = ""
    """The Docker engine of `docker` deployments (unix:///var/run/docker.sock, tcp://host:2375);
    empty means DOCKER_HOST, else the local socket. The deployer must run on the engine's host:
    replicas publish their ports on its 127.0.0.1."""

    container_nats_url: str = ""
    """NATS as `docker` deployments' containers reach it (for capture); empty means MLMESH_NATS_URL
    with a loopback host replaced by host.docker.internal (the engine's host), which needs NATS to
    listen on an address of the docker bridge too."""

    endpoint_host: str = "127.0.0.1"
    """Address the endpoints' routers bind to (0.0.0.0 to serve other machines or containers)."""

    reconcile_seconds: float = Field(default=1.0, gt=0)
    """How often the reconciler checks every replica's process and health."""

    ready_timeout_seconds: float = Field(default=120, gt=0)
    """How long a new replica may take to load its model and answer health checks."""

    kubeconfig: Path | None = None
    """kubeconfig of the cluster that `kubernetes` deployments are applied to; without one, their
    manifests are only rendered (under <home>/deployer/kubernetes/)."""

    kubernetes_namespace: str = "default"
    """Namespace of `kubernetes` deployments."""

    kubernetes_image: str = "mlmesh:latest"
    """Image the pods of `kubernetes` deployments run (the mesh image holds the runtime)."""

    cluster_registry_address: str = ""
    """host:port of the registry as pods in the cluster reach it; empty means `registry_address`."""

    cluster_nats_url: str = ""
    """NATS as pods in the cluster reach it (for capture); empty means MLMESH_NATS_URL."""

    batch_ack_wait_seconds: float = Field(default=30, gt=0)
    """How long a batch worker may hold a mini-batch before it is given to another worker."""

    max_restarts: int = Field(default=5, ge=0)
    """Restarts of a replica within `restart_window_seconds` before its deployment is failed."""

    restart_window_seconds: float = Field(default=600, gt=0)
    """The window in which restarts are counted."""

    def resolved_container_nats_url(self) -> str | None:
        if self.container_nats_url:
            return self.container_nats_url
        if not self.nats_url:
            return None
        parts = urlsplit(self.nats_url)
        if parts.hostname in ("127.0.0.1", "localhost", "::1"):
            netloc = parts.netloc.replace(f"[{parts.hostname}]", HOST_ALIAS).replace(parts.hostname, HOST_ALIAS)
            return urlunsplit(parts._replace(netloc=netloc))
        return self.nats_url


class BatchWorkerSettings(ServiceSettings):
    """A batch scoring worker, started by the deployer for one job."""

    model_config = SettingsConfigDict(env_prefix="MLMESH_BATCH_WORKER_", extra="ignore", populate_by_name=True)

    service_name: str = "batch-worker"
    """Name used in logs and telemetry."""

    job_id: str = ""
    """The job whose mini-batches this worker takes from the MLMESH_BATCH work queue."""

    work_dir: Path = Path(".")
    """The job's folder: its inputs, rewritten as Parquet with one row group per mini-batch."""

    output_dir: Path = Path(".")
    """Where part-NNNNN.parquet files are written."""

    model_file: Path | None = None
    """The ONNX model to score with in this process; or, with `endpoint_address`, an endpoint."""

    endpoint: str = ""
    """The endpoint to send the rows to (its router's gRPC address in `endpoint_address`)."""

    endpoint_address: str = ""

    columns: str = ""
    """Comma-separated input columns, in order; empty means every numeric column."""

    max_deliver: int = Field(default=5, ge=1)
    """Attempts at one mini-batch before the job fails."""

    intra_op_threads: int = Field(default=1, ge=0)
    """onnxruntime threads of the worker's session."""


class RouterSettings(ServiceSettings):
    model_config = SettingsConfigDict(env_prefix="MLMESH_ROUTER_", extra="ignore", populate_by_name=True)

    service_name: str = "router"
    """Name used in file names and telemetry."""

    routes_file: Path = Path("routes.json")
    """The endpoint's routes as the deployer writes them (JSON); re-read when it changes."""

    port: int = 0
    """gRPC port of the endpoint's Open Inference Protocol address."""

    http_port: int = 0
    """HTTP port of the endpoint's Open Inference Protocol REST address."""

    poll_seconds: float = Field(default=0.1, gt=0)
    """How often the routes file is checked for a change."""

    mirror_max_in_flight: int = Field(default=64, ge=1)
    """Mirrored copies in flight at most; beyond, copies are dropped (and counted)."""

    mirror_timeout_seconds: float = Field(default=10.0, gt=0)
    """Longest a mirrored copy may take; its answer is discarded anyway, so a slow mirror only
    holds one of the `mirror_max_in_flight` places that long."""

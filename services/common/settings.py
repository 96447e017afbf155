"""Settings shared by every service. Nothing else in mlmesh reads the environment."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from pydantic import AliasChoices, Field
from pydantic_settings import BaseSettings, SettingsConfigDict


class MeshSettings(BaseSettings):
    """Settings of the whole mesh, read from MLMESH_* variables."""

    model_config = SettingsConfigDict(env_prefix="MLMESH_", extra="ignore", populate_by_name=True)

    home: Path = Field(default=Path(".mlmesh"))
    """Data directory: databases, blobs, the embedded NATS store, logs and pid files."""

    nats_url: str | None = None
    """NATS server to use; when unset, `mlmesh up` starts an embedded nats-server."""

    log_level: str = "INFO"
    """Python logging level of every service."""

    require_all: bool = False
    """Tests: fail instead of skipping when a real part (Docker, PostgreSQL) is missing."""

    postgres_admin_url: str = "postgresql+psycopg://postgres@127.0.0.1:5432/postgres"
    """Tests and benchmarks: a PostgreSQL server where throwaway databases may be created."""

    actor: str = ""
    """CLI: who the caller is, sent as `x-mlmesh-actor`; defaults to the login name."""


class ServiceSettings(BaseSettings):
    """Base of every service's settings; subclasses set `env_prefix` to MLMESH_<SERVICE>_."""

    model_config = SettingsConfigDict(extra="ignore", populate_by_name=True)

    service_name: str = "service"
    """Name of the service, used in event sources, file names and telemetry."""

    home: Path = Field(default=Path(".mlmesh"), validation_alias=AliasChoices("MLMESH_HOME", "home"))
    """Data directory shared by the mesh (MLMESH_HOME)."""

    nats_url: str | None = Field(default=None, validation_alias=AliasChoices("MLMESH_NATS_URL", "nats_url"))
    """NATS server (MLMESH_NATS_URL); the service runs without events when unset."""

    log_level: str = Field(default="INFO", validation_alias=AliasChoices("MLMESH_LOG_LEVEL", "log_level"))
    """Python logging level (MLMESH_LOG_LEVEL)."""

    host: str = "127.0.0.1"
    """Address the gRPC server binds to."""

    port: int = 0
    """gRPC port; 0 picks a free one."""

    database_url: str = ""
    """SQLAlchemy URL; empty means SQLite at <home>/<service>.db."""

    workers: int = Field(default=1, ge=1, le=64)
    """Server processes sharing the port (SO_REUSEPORT), each with its own connections and outbox
    relay; one Python process uses about one core, so up to the number of cores pays."""

    max_message_bytes: int = 8 * 1024 * 1024
    """Largest gRPC message accepted or sent; large payloads are streamed in chunks below it."""

    outbox_retention_seconds: float = 7 * 24 * 3600
    """How long sent outbox rows are kept before the relay prunes them."""

    outbox_batch_size: int = 500
    """How many events the relay publishes at once."""

    outbox_poll_seconds: float = 1.0
    """How often the relay looks for unsent events when nothing wakes it."""

    def resolved_database_url(self) -> str:
        """The database URL, defaulting to a SQLite file under `home`."""
        if self.database_url:
            return self.database_url
        return f"sqlite:///{(self.home / f'{self.service_name}.db').resolve()}"


@dataclass(frozen=True)
class PackageIndex:
    """Where pip looks for packages; mirrors pip's own options."""

    index_url: str | None = None
    extra_index_urls: tuple[str, ...] = ()
    find_links: tuple[str, ...] = ()
    no_index: bool = False

    def pip_arguments(self) -> list[str]:
        """pip's command-line options for this index (none for what pip's configuration decides)."""
        arguments: list[str] = []
        if self.index_url:
            arguments += ["--index-url", self.index_url]
        for url in self.extra_index_urls:
            arguments += ["--extra-index-url", url]
        for link in self.find_links:
            arguments += ["--find-links", link]
        if self.no_index:
            arguments.append("--no-index")
        return arguments


class PackageIndexSettings(BaseSettings):
    """The package index of a service that runs pip (with its own MLMESH_<SERVICE>_ prefix)."""

    index_url: str | None = None
    """Package index pip uses (pip's --index-url; default: pip's own configuration)."""

    extra_index_urls: list[str] = Field(default_factory=list)
    """More package indexes (pip's --extra-index-url)."""

    find_links: list[str] = Field(default_factory=list)
    """Folders or pages of wheels (pip's --find-links)."""

    no_index: bool = False
    """Use only find_links, never an index (pip's --no-index): for machines without Internet access."""

    def package_index(self) -> PackageIndex:
        return PackageIndex(self.index_url, tuple(self.extra_index_urls), tuple(self.find_links), self.no_index)

"""Settings of the builder (environment prefix MLMESH_BUILDER_)."""

from __future__ import annotations

from pathlib import Path

from pydantic import Field
from pydantic_settings import SettingsConfigDict

from services.common.settings import PackageIndexSettings, ServiceSettings


class BuilderSettings(ServiceSettings, PackageIndexSettings):
    """The package index (index_url, extra_index_urls, find_links, no_index) is the one environments
    resolve against and images download wheels from."""

    model_config = SettingsConfigDict(env_prefix="MLMESH_BUILDER_", extra="ignore", populate_by_name=True)

    service_name: str = "builder"
    """Name used in event sources, file names and telemetry."""

    port: int = 50052
    """gRPC port of the builder."""

    registry_address: str = "127.0.0.1:50051"
    """host:port of the registry: models are downloaded from it and converted versions registered in it."""

    resolve_timeout_seconds: float = Field(default=300, gt=0)
    """How long pip may take to resolve an environment."""

    convert_cpu_seconds: int = Field(default=300, ge=1)
    """CPU time a conversion worker may use; a model that loads or converts longer fails its conversion."""

    convert_memory_mb: int = Field(default=4096, ge=256)
    """Memory a conversion worker may use."""

    convert_wall_seconds: float = Field(default=600, gt=0)
    """Wall time a conversion may take before its worker is killed (a pickle that hangs when loaded)."""

    base_image: str = "python:3.11-slim"
    """Base image of model images unless an environment or a build names another; it needs CPython with venv."""

    docker_url: str | None = None
    """Docker engine to build with (e.g. unix:///var/run/docker.sock); default: DOCKER_HOST or the local socket."""

    push_registry: str = ""
    """Registry that `push` sends images to, e.g. registry.example.com/ml (empty: pushing is refused)."""

    work_dir: Path | None = None
    """Where conversions and build contexts are prepared and wheels cached; default <home>/builder."""

    def resolved_work_dir(self) -> Path:
        return self.work_dir or self.home / "builder"

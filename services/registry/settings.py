"""Settings of the registry service (environment prefix MLMESH_REGISTRY_)."""

from __future__ import annotations

from pydantic import Field
from pydantic_settings import SettingsConfigDict

from services.common.settings import ServiceSettings


class RegistrySettings(ServiceSettings):
    model_config = SettingsConfigDict(env_prefix="MLMESH_REGISTRY_", extra="ignore", populate_by_name=True)

    service_name: str = "registry"
    """Name used in event sources, file names and telemetry."""

    port: int = 50051
    """gRPC port of the registry."""

    max_version_bytes: int = 2 * 1024**3
    """Largest total size of one model version's files; more answers RESOURCE_EXHAUSTED."""

    max_files_per_version: int = 10_000
    """Most files one model version may hold."""

    max_dataset_bytes: int = 2 * 1024**3
    """Largest dataset file accepted."""

    blob_sweep_grace_seconds: float = 3600
    """Unreferenced blobs younger than this are kept (an upload may be about to commit)."""

    cached_versions: int = Field(default=10_000, ge=0)
    """Model versions kept in memory, as last read, for GetModelVersion (0: none). Any change to
    the registry's models empties it; on PostgreSQL another process's change does so when its
    notification arrives, a fraction of a millisecond after the commit."""

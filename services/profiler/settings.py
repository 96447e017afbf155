"""Settings of the profiler (environment prefix MLMESH_PROFILER_)."""

from __future__ import annotations

from pydantic import Field
from pydantic_settings import SettingsConfigDict

from services.common.settings import ServiceSettings


class ProfilerSettings(ServiceSettings):
    model_config = SettingsConfigDict(env_prefix="MLMESH_PROFILER_", extra="ignore", populate_by_name=True)

    service_name: str = "profiler"
    """Name used in event sources, file names and telemetry."""

    port: int = 50053
    """gRPC port of the profiler."""

    registry_address: str = "127.0.0.1:50051"
    """host:port of the registry: model versions (and sample datasets) come from it."""

    builder_address: str = "127.0.0.1:50052"
    """host:port of the builder: it builds the image a docker profile runs when none is given."""

    docker_url: str = ""
    """The Docker engine of the docker target (empty: DOCKER_HOST or the local socket)."""

    load_generator: str = Field(default="auto", pattern=r"^(auto|h2load|python)$")
    """auto: h2load when installed, else a Python process; or one of them by name."""

    start_timeout_seconds: float = Field(default=120, gt=0)
    """Longest the runtime of one size may take to load the model and answer; longer fails the profile."""

    max_profile_seconds: float = Field(default=1800, gt=0)
    """Longest a profile may plan to load the runtime (steps x (warm-up + step)); longer is refused."""

    max_rows_per_request: int = Field(default=100_000, ge=1)
    """Most rows one request of a profile may carry."""

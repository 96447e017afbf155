"""Settings of the automation service (environment prefix MLMESH_AUTOMATION_)."""

from __future__ import annotations

from pathlib import Path

from pydantic import Field
from pydantic_settings import SettingsConfigDict

from services.common.settings import PackageIndexSettings, ServiceSettings


class AutomationSettings(ServiceSettings, PackageIndexSettings):
    """The package index (index_url, extra_index_urls, find_links, no_index) is the one pip installs
    the locks of registered environments from, when a policy trains in one."""

    model_config = SettingsConfigDict(env_prefix="MLMESH_AUTOMATION_", extra="ignore", populate_by_name=True)

    service_name: str = "automation"
    """Name used in event sources, file names and telemetry."""

    port: int = 50058
    """gRPC port of the automation service."""

    registry_address: str = "127.0.0.1:50051"
    """host:port of the registry: datasets come from it, produced versions go to it, aliases move there."""

    deployer_address: str = "127.0.0.1:50054"
    """host:port of the deployer: staged rollouts of challengers go through it."""

    builder_address: str = "127.0.0.1:50052"
    """host:port of the builder: policies that train in a registered environment get its lock there."""

    work_dir: Path | None = None
    """Where runs download data, training writes its output and registered environments are made
    (each once, then reused); default <home>/automation."""

    parallel_runs: int = Field(default=1, ge=1, le=16)
    """Runs that train at the same time at most; more wait their turn."""

    schedule_tick_seconds: float = Field(default=10, gt=0)
    """How often scheduled policies are looked at."""

    min_schedule_seconds: float = Field(default=60, gt=0)
    """The shortest schedule a policy may have."""

    log_lines: int = Field(default=200, ge=1, le=10_000)
    """Lines of the training command's output kept with each run."""

    def resolved_work_dir(self) -> Path:
        return (self.work_dir or self.home / "automation").resolve()

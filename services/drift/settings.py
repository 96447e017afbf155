"""Settings of the drift service (environment prefix MLMESH_DRIFT_)."""

from __future__ import annotations

from pydantic import Field
from pydantic_settings import SettingsConfigDict

from services.common.settings import ServiceSettings


class DriftSettings(ServiceSettings):
    model_config = SettingsConfigDict(env_prefix="MLMESH_DRIFT_", extra="ignore", populate_by_name=True)

    service_name: str = "drift"
    """Name used in event sources, file names and telemetry."""

    port: int = 50056
    """gRPC port of the drift service."""

    registry_address: str = "127.0.0.1:50051"
    """host:port of the registry: baseline datasets are downloaded from it."""

    collector_address: str = "127.0.0.1:50055"
    """host:port of the collector: the captured windows that checks read."""

    deployer_address: str = "127.0.0.1:50054"
    """host:port of the deployer: which endpoints serve the model of a model's monitor."""

    schedule_tick_seconds: float = Field(default=10, gt=0)
    """How often the scheduler looks for monitors whose next check is due."""

    max_window_rows: int = Field(default=5_000_000, ge=1)
    """Most rows one check reads (a larger window_rows is refused)."""

    max_baseline_bytes: int = Field(default=2 * 1024**3, ge=1)
    """Largest baseline dataset file a monitor summarises."""

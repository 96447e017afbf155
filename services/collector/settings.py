"""Settings of the collector (environment prefix MLMESH_COLLECTOR_)."""

from __future__ import annotations

from pathlib import Path

from pydantic import Field, model_validator
from pydantic_settings import SettingsConfigDict

from services.common.settings import ServiceSettings


class CollectorSettings(ServiceSettings):
    model_config = SettingsConfigDict(env_prefix="MLMESH_COLLECTOR_", extra="ignore", populate_by_name=True)

    service_name: str = "collector"
    """Name used in file names and telemetry."""

    port: int = 50055
    """gRPC port of the collector."""

    data_dir: Path | None = None
    """Where the Parquet files go; unset means <home>/collector/captures."""

    registry_address: str = "127.0.0.1:50051"
    """host:port of the registry: exported windows are registered there as datasets."""

    flush_rows: int = Field(default=100_000, ge=1, le=10_000_000)
    """Decoded rows that trigger a flush (Parquet files written and committed, messages acked)."""

    flush_seconds: float = Field(default=10.0, gt=0, le=3600)
    """Longest a consumed message waits for its flush: the delay before captures can be queried."""

    flush_bytes: int = Field(default=256 * 1024**2, ge=1024 * 1024)
    """Decoded tensor bytes that trigger a flush, whatever the row count: bounds the memory held."""

    ack_wait_seconds: float = Field(default=60.0, gt=0)
    """How long JetStream waits for the ack of a delivered message before delivering it again;
    it must exceed `flush_seconds`, since messages are acked only once their rows are committed."""

    fetch_messages: int = Field(default=256, ge=1, le=10_000)
    """Most messages asked for in one pull from the capture stream."""

    fetch_bytes: int = Field(default=64 * 1024**2, ge=1024 * 1024)
    """Most bytes one pull may bring: a pull asks for at most this over the server's max_payload
    messages, since the client drops what exceeds its pending limit (and JetStream then waits
    ack_wait_seconds to deliver it again)."""

    retention_days: float = Field(default=30.0, ge=0)
    """Default age limit of an endpoint's captures (0: none); SetRetention overrides it per endpoint."""

    retention_bytes: int = Field(default=10 * 1024**3, ge=0)
    """Default size limit of each endpoint's Parquet files (0: none); SetRetention overrides it."""

    retention_interval_seconds: float = Field(default=60.0, gt=0)
    """How often retention is enforced (and at once after SetRetention)."""

    stream_max_age_seconds: float = Field(default=7 * 24 * 3600, gt=0)
    """Age limit the collector gives MLMESH_CAPTURE when it creates the stream or finds it set
    otherwise (as the runtime does with its own setting; keep the two equal)."""

    stream_max_bytes: int = Field(default=1024**3, ge=1024 * 1024)
    """Size limit the collector gives MLMESH_CAPTURE, likewise."""

    max_labels_per_call: int = Field(default=100_000, ge=1)
    """Most labels one IngestLabels call may carry."""

    max_export_bytes: int = Field(default=2 * 1024**3, ge=1024)
    """Largest Parquet file an export may write (the registry's dataset limit is 2 GiB by default)."""

    query_batch_rows: int = Field(default=65_536, ge=1)
    """Most rows in one record batch of a query's answer (fewer when rows are wide)."""

    @model_validator(mode="after")
    def _ack_wait_outlasts_flush(self) -> CollectorSettings:
        if self.ack_wait_seconds <= self.flush_seconds:
            raise ValueError(
                f"MLMESH_COLLECTOR_ACK_WAIT_SECONDS ({self.ack_wait_seconds}) must exceed "
                f"MLMESH_COLLECTOR_FLUSH_SECONDS ({self.flush_seconds}): messages are acked only after their flush, "
                "and JetStream would deliver them again meanwhile"
            )
        return self

    def resolved_data_dir(self) -> Path:
        return (self.data_dir or self.home / "collector" / "captures").resolve()

"""Tables owned by the drift service. Timestamps are Unix seconds (float)."""

from __future__ import annotations

from sqlmodel import Field, SQLModel

from services.common.db import Database
from services.common.outbox import OutboxEvent


class MonitorRow(SQLModel, table=True):
    """A monitor and its baseline's summaries (computed once, when it was created)."""

    __tablename__ = "monitors"

    name: str = Field(primary_key=True)
    endpoint: str = Field(index=True)
    """Empty for a monitor of a model."""
    model: str = ""
    """A monitor of a model: the captures of every endpoint serving it."""
    baseline: str
    """`name:version` of a registered dataset, or `captures:<endpoint>:<start>:<end>`."""
    baseline_rows: int
    features: str
    """JSON object: captured column -> baseline column."""
    summaries: str
    """JSON object: captured column -> services.drift.statistics.BaselineSummary.to_dict()."""
    window_rows: int = 0
    window_seconds: float = 0
    schedule_seconds: float = 0
    thresholds: str = "{}"
    """JSON object of services.drift.statistics.Thresholds fields."""
    consecutive: int = 1
    created_at: float
    last_checked_at: float | None = None


class CheckRow(SQLModel, table=True):
    """One check of a monitor: its window and what was found, feature by feature."""

    __tablename__ = "checks"

    id: str = Field(primary_key=True)
    monitor: str = Field(index=True, foreign_key="monitors.name")
    endpoint: str
    model: str = ""
    baseline: str
    window_start: float
    window_end: float
    rows: int
    drifted: bool
    """Drift in this window alone."""
    drift_detected: bool
    """Drift that held over the monitor's `consecutive` windows."""
    drift_coefficient: float
    drifted_features: str
    """JSON list."""
    features: str
    """JSON object: captured column -> the per-feature result (services.drift.domain.feature_dict)."""
    checked_at: float = Field(index=True)


TABLES = [MonitorRow, CheckRow, OutboxEvent]


def create_tables(database: Database) -> None:
    database.create_tables()

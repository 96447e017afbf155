"""Tables owned by the automation service. Timestamps are Unix seconds (float)."""

from __future__ import annotations

from sqlmodel import Field, SQLModel

from services.common.bus import ParkedEvent, ProcessedEvent
from services.common.db import Database
from services.common.outbox import OutboxEvent


class PolicyRow(SQLModel, table=True):
    """A retrain policy: what triggers it, how it trains, how its result is judged."""

    __tablename__ = "policies"

    name: str = Field(primary_key=True)
    model: str = Field(index=True)
    trigger: str
    """JSON object: kind, monitor, dataset, schedule_seconds."""
    training: str
    """JSON object: command, dataset, working_dir, timeout_seconds."""
    evaluation: str
    """JSON object: holdout_dataset, label_column, metric, min_delta."""
    rollout: str = "{}"
    """JSON object: endpoint, shadow_seconds, canary_percent, canary_seconds, max_error_rate,
    max_latency_ratio, min_requests (no endpoint: no rollout)."""
    created_at: float
    last_run_at: float | None = None


class RunRow(SQLModel, table=True):
    """One run of a policy."""

    __tablename__ = "runs"

    id: str = Field(primary_key=True)
    policy: str = Field(index=True)
    model: str
    trigger: str
    status: str = Field(index=True)
    """running, completed or failed."""
    message: str = ""
    produced_version: int = 0
    champion_version: int = 0
    metric: str = ""
    challenger_score: float | None = None
    champion_score: float | None = None
    promoted: bool = False
    training_metrics: str = "{}"
    log_tail: str = "[]"
    rollout: str = "none"
    """none, rolled_out or rolled_back."""
    rollout_figures: str = "{}"
    started_at: float = Field(index=True)
    finished_at: float | None = None


TABLES = [PolicyRow, RunRow, OutboxEvent, ProcessedEvent, ParkedEvent]


def create_tables(database: Database) -> None:
    database.create_tables()

"""Tables owned by the notifier. Timestamps are Unix seconds (float)."""

from __future__ import annotations

from sqlalchemy import UniqueConstraint
from sqlmodel import Field, SQLModel

from services.common.bus import ParkedEvent, ProcessedEvent
from services.common.db import Database
from services.common.outbox import OutboxEvent


class WebhookRow(SQLModel, table=True):
    """A webhook endpoint and its signing secrets."""

    __tablename__ = "webhooks"

    id: str = Field(primary_key=True)
    url: str
    events: str
    """JSON list of event kind patterns."""
    description: str = ""
    secret: str
    """`whsec_...`: it signs every delivery (never logged)."""
    previous_secret: str = ""
    """The secret before the last rotation, still signing until `previous_secret_expires_at`."""
    previous_secret_expires_at: float | None = None
    enabled: bool = True
    disabled_reason: str = ""
    created_at: float = Field(index=True)
    updated_at: float


class EventRow(SQLModel, table=True):
    """An event as it arrived, kept for deliveries, redelivery and replay."""

    __tablename__ = "events"

    id: str = Field(primary_key=True)
    kind: str = Field(index=True)
    time: float = Field(index=True)
    """The event's own time (its `time` attribute)."""
    body: bytes
    """The CloudEvent JSON exactly as delivered."""
    received_at: float = Field(index=True)


class DeliveryRow(SQLModel, table=True):
    """One event to one endpoint: its state and when it is next tried."""

    __tablename__ = "deliveries"
    __table_args__ = (UniqueConstraint("webhook_id", "event_id", "origin", "generation", name="uq_delivery"),)

    id: str = Field(primary_key=True)
    webhook_id: str = Field(index=True, foreign_key="webhooks.id")
    event_id: str = Field(index=True)
    event_kind: str
    origin: str
    """event, redeliver, replay or test."""
    generation: int = 0
    """Counts redeliveries and replays of the same event to the same endpoint."""
    status: str = Field(index=True)
    """pending, delivered or failed."""
    attempts: int = 0
    next_attempt_at: float | None = Field(default=None, index=True)
    created_at: float = Field(index=True)
    delivered_at: float | None = None


class AttemptRow(SQLModel, table=True):
    """One HTTP attempt of a delivery."""

    __tablename__ = "attempts"

    id: int | None = Field(default=None, primary_key=True)
    delivery_id: str = Field(index=True, foreign_key="deliveries.id")
    attempted_at: float
    status_code: int = 0
    latency_ms: float = 0
    response_snippet: str = ""
    error: str = ""


TABLES = [WebhookRow, EventRow, DeliveryRow, AttemptRow, OutboxEvent, ProcessedEvent, ParkedEvent]


def create_tables(database: Database) -> None:
    database.create_tables()

"""Tables owned by the profiler. Timestamps are Unix seconds (float)."""

from __future__ import annotations

from sqlmodel import Field, SQLModel

from services.common.db import Database
from services.common.outbox import OutboxEvent


class ProfileRow(SQLModel, table=True):
    """One profile: what was asked, what each step measured, and the recommendation."""

    __tablename__ = "profiles"

    id: str = Field(primary_key=True)
    model_ref: str
    model_name: str = Field(index=True)
    model_version: int
    target: str
    image: str = ""
    spec: str
    """JSON object: the request with its defaults filled in (services.profiler.domain.ProfileSpec)."""
    samples: str = ""
    load_generator: str = ""
    status: str = Field(index=True)
    """running, completed or failed."""
    reason: str = ""
    sizes: str = "[]"
    """JSON list of services.profiler.domain.SizeResult as dicts."""
    recommendation: str = "{}"
    seconds: float = 0
    created_at: float = Field(index=True)


TABLES = [ProfileRow, OutboxEvent]


def create_tables(database: Database) -> None:
    database.create_tables()

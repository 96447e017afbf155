"""Tables owned by the builder. Timestamps are Unix seconds (float); lists are JSON text."""

from __future__ import annotations

from sqlalchemy import UniqueConstraint
from sqlmodel import Field, SQLModel

from services.common.db import Database
from services.common.outbox import OutboxEvent


class EnvironmentRow(SQLModel, table=True):
    """One version of an environment: its spec and the lock pip resolved it to."""

    __tablename__ = "environments"
    __table_args__ = (
        UniqueConstraint("name", "version", name="uq_environments_name_version"),
        UniqueConstraint("name", "spec_digest", name="uq_environments_name_spec"),
    )

    id: int | None = Field(default=None, primary_key=True)
    name: str = Field(index=True)
    version: int
    python_version: str
    requirements: str
    """The normalised requirement lines (JSON list)."""
    base_image: str = ""
    description: str = ""
    lock: str
    """The locked packages (JSON list of {name, version, sha256, filename})."""
    lock_text: str
    spec_digest: str
    created_by: str = ""
    created_at: float


class ConversionRow(SQLModel, table=True):
    """A finished conversion: which version became which ONNX version, and how faithful and fast it is."""

    __tablename__ = "conversions"

    id: str = Field(primary_key=True)
    source_name: str = Field(index=True)
    source_version: int
    source_framework: str
    estimator: str
    version: int
    rows_checked: int
    labels_equal: bool
    max_abs_diff: float
    native_one_row_ms: float
    onnx_one_row_ms: float
    native_1000_rows_ms: float
    onnx_1000_rows_ms: float
    speedup_one_row: float
    speedup_1000_rows: float
    optimized: bool
    quantized: bool
    quantization_label_agreement: float = 0
    quantization_max_abs_diff: float = 0
    seconds: float
    created_at: float


class ImageRow(SQLModel, table=True):
    """A built image; `key` identifies what went into it, so the same inputs reuse it."""

    __tablename__ = "images"

    key: str = Field(primary_key=True)
    tag: str
    image_id: str
    size_bytes: int
    models: str
    """"name:version" of each model served (JSON list)."""
    environment: str = ""
    base_image: str
    pushed: str = ""
    seconds: float
    created_at: float


TABLES = [EnvironmentRow, ConversionRow, ImageRow, OutboxEvent]


def create_tables(database: Database) -> None:
    database.create_tables()

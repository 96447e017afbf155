"""Tables owned by the collector. Timestamps are Unix seconds (float)."""

from __future__ import annotations

from sqlalchemy import Column, Index, LargeBinary
from sqlmodel import Field, SQLModel

from services.common.db import Database


class CaptureFileRow(SQLModel, table=True):
    """One Parquet file of captured rows, and the capture stream messages whose rows it holds.

    A file is written, renamed into place, and only then recorded here (with its sequences) in
    the transaction that commits its flush; a file on disk without a row is a flush that did
    not commit, and is deleted at start.
    """

    __tablename__ = "capture_files"
    __table_args__ = (Index("ix_capture_files_endpoint_time", "endpoint", "first_time"),)

    id: str = Field(primary_key=True)
    endpoint: str
    deployment: str
    model_version: str
    hour: int
    """Start of the file's hour partition (Unix seconds, UTC)."""
    path: str = Field(unique=True)
    """Relative to the data folder, POSIX."""
    rows: int
    bytes: int
    first_time: float
    last_time: float
    arrow_schema: bytes = Field(sa_column=Column(LargeBinary, nullable=False))
    """The file's Arrow schema, serialized: queries plan their columns without opening files."""
    stream_epoch: str
    """Creation time of the capture stream the sequences belong to: a stream deleted and made
    again counts from 1 anew, and its sequences must not be mistaken for recorded ones."""
    sequences: str
    """Stream sequences of the messages whose rows are here, as JSON ranges [[first, last], ...]."""
    created_at: float


class RetentionRow(SQLModel, table=True):
    """An endpoint's own retention limits; a null limit means the service's default."""

    __tablename__ = "retention_policies"

    endpoint: str = Field(primary_key=True)
    max_age_seconds: float | None = None
    max_bytes: int | None = None
    updated_at: float


class LabelRow(SQLModel, table=True):
    """Ground truth of one captured row."""

    __tablename__ = "labels"

    endpoint: str = Field(primary_key=True)
    request_id: str = Field(primary_key=True)
    row: int = Field(primary_key=True)
    text: str
    """The label as text (a number as its shortest decimal form)."""
    number: float | None = None
    """The label when it is a number."""
    ingested_at: float = Field(index=True)


class StoreRow(SQLModel, table=True):
    """Facts about the store itself (`store_id`: the id also written in the data folder)."""

    __tablename__ = "collector_store"

    key: str = Field(primary_key=True)
    value: str


TABLES = [CaptureFileRow, RetentionRow, LabelRow, StoreRow]


def create_tables(database: Database) -> None:
    database.create_tables()

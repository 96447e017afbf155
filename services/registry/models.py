"""Tables owned by the registry. Timestamps are Unix seconds (float)."""

from __future__ import annotations

from sqlalchemy import BigInteger, Column, ForeignKey, Index, Integer, UniqueConstraint, text
from sqlmodel import Field, SQLModel

from services.common.bus import ParkedEvent, ProcessedEvent
from services.common.db import Database
from services.common.outbox import OutboxEvent


class RegisteredModel(SQLModel, table=True):
    """A model name; `latest_version` only grows, so version numbers are never reused."""

    __tablename__ = "registered_models"

    name: str = Field(primary_key=True)
    latest_version: int = Field(default=0, sa_type=BigInteger)
    created_at: float
    updated_at: float


class ModelVersionRow(SQLModel, table=True):
    __tablename__ = "model_versions"
    __table_args__ = (
        UniqueConstraint("name", "version", name="uq_model_versions_name_version"),
        Index("ix_model_versions_created", "created_at"),
    )

    id: int | None = Field(default=None, primary_key=True)
    name: str = Field(index=True)
    version: int = Field(sa_type=BigInteger)
    framework: str
    description: str = ""
    signature: str = "{}"
    run_id: str = ""
    experiment: str = ""
    git_repo: str = ""
    git_branch: str = ""
    git_commit: str = ""
    datasets: str = "[]"
    environment: str = ""
    parent_version: int = Field(default=0, sa_type=BigInteger)
    status: str = "READY"
    created_by: str = ""
    created_at: float
    updated_at: float


def _version_fk() -> Column:
    return Column(Integer, ForeignKey("model_versions.id", ondelete="CASCADE"), primary_key=True)


class ModelFile(SQLModel, table=True):
    __tablename__ = "model_files"

    version_id: int = Field(sa_column=_version_fk())
    path: str = Field(primary_key=True)
    size: int
    sha256: str = Field(index=True)


class ModelTag(SQLModel, table=True):
    """A tag of a version. `created_at` repeats the version's (which never changes) so that a tag
    search newest-first walks one index in order and stops after a page."""

    __tablename__ = "model_tags"
    __table_args__ = (Index("ix_model_tags_search", "key", "value", "created_at", "version_id"),)

    version_id: int = Field(sa_column=_version_fk())
    key: str = Field(primary_key=True)
    value: str
    created_at: float


class ModelAlias(SQLModel, table=True):
    """Where an alias points now."""

    __tablename__ = "model_aliases"

    name: str = Field(primary_key=True)
    alias: str = Field(primary_key=True)
    version: int = Field(sa_type=BigInteger)
    set_at: float
    set_by: str
    reason: str


class AliasChange(SQLModel, table=True):
    """Every move of an alias, so "which version was champion at time t" has an answer."""

    __tablename__ = "alias_changes"
    __table_args__ = (Index("ix_alias_changes_lookup", "name", "alias", "at"),)

    id: int | None = Field(default=None, primary_key=True)
    name: str
    alias: str
    version: int = Field(sa_type=BigInteger)
    """0 when the alias was removed."""
    at: float
    actor: str
    reason: str


class ModelUsage(SQLModel, table=True):
    """A deployment that uses a version; such a version cannot be archived or deleted."""

    __tablename__ = "model_usages"

    version_id: int = Field(sa_column=_version_fk())
    deployment_id: str = Field(primary_key=True)
    acquired_at: float


class DatasetName(SQLModel, table=True):
    __tablename__ = "dataset_names"

    name: str = Field(primary_key=True)
    latest_version: int = Field(default=0, sa_type=BigInteger)
    created_at: float
    updated_at: float


class DatasetRow(SQLModel, table=True):
    __tablename__ = "datasets"
    __table_args__ = (UniqueConstraint("name", "version", name="uq_datasets_name_version"),)

    id: int | None = Field(default=None, primary_key=True)
    name: str = Field(index=True)
    version: int = Field(sa_type=BigInteger)
    format: str
    description: str = ""
    tags: str = "{}"
    path: str
    size: int
    sha256: str = Field(index=True)
    row_count: int
    columns: str = "[]"
    fingerprint: str
    created_by: str = ""
    created_at: float


class RunRow(SQLModel, table=True):
    __tablename__ = "runs"

    id: str = Field(primary_key=True)
    experiment: str = Field(default="", index=True)
    name: str = ""
    params: str = "{}"
    metrics: str = "{}"
    git_repo: str = ""
    git_branch: str = ""
    git_commit: str = ""
    datasets: str = "[]"
    status: str = "FINISHED"
    started_at: float | None = None
    ended_at: float | None = None
    created_by: str = ""
    recorded_at: float


class AuditEntryRow(SQLModel, table=True):
    """Append-only: database triggers refuse UPDATE and DELETE (see `create_tables`)."""

    __tablename__ = "audit_log"
    __table_args__ = (Index("ix_audit_log_resource", "resource", "at"),)

    id: int | None = Field(default=None, primary_key=True)
    at: float = Field(index=True)
    actor: str
    action: str
    resource: str
    reason: str = ""
    details: str = "{}"


TABLES = [
    RegisteredModel,
    ModelVersionRow,
    ModelFile,
    ModelTag,
    ModelAlias,
    AliasChange,
    ModelUsage,
    DatasetName,
    DatasetRow,
    RunRow,
    AuditEntryRow,
    OutboxEvent,
    ProcessedEvent,
    ParkedEvent,
]


_SQLITE_APPEND_ONLY = [
    """CREATE TRIGGER IF NOT EXISTS audit_log_no_update BEFORE UPDATE ON audit_log
       BEGIN SELECT RAISE(ABORT, 'the audit log is append-only'); END""",
    """CREATE TRIGGER IF NOT EXISTS audit_log_no_delete BEFORE DELETE ON audit_log
       BEGIN SELECT RAISE(ABORT, 'the audit log is append-only'); END""",
]

_POSTGRESQL_APPEND_ONLY = [
    """CREATE OR REPLACE FUNCTION audit_log_append_only() RETURNS trigger AS $$
       BEGIN RAISE EXCEPTION 'the audit log is append-only'; END; $$ LANGUAGE plpgsql""",
    "DROP TRIGGER IF EXISTS audit_log_append_only ON audit_log",
    """CREATE TRIGGER audit_log_append_only BEFORE UPDATE OR DELETE ON audit_log
       FOR EACH ROW EXECUTE FUNCTION audit_log_append_only()""",
]


def create_tables(database: Database) -> None:
    """Create the registry's tables and make the audit log append-only in the database itself."""
    database.create_tables()
    statements = _SQLITE_APPEND_ONLY if database.is_sqlite else _POSTGRESQL_APPEND_ONLY
    with database.engine.begin() as connection:
        for statement in statements:
            connection.execute(text(statement))

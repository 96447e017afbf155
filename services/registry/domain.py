"""The registry's behaviour: model versions, aliases, usages, datasets, runs and the audit log.

Plain Python over a Database, a BlobStore and an Outbox: no gRPC, no NATS. Every mutation
writes its audit entry and its event in the same transaction as the change.
"""

from __future__ import annotations

import functools
import json
import math
import re
import threading
import time
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator
from sqlalchemy import Integer, Select, String, bindparam, cast, func, insert, literal, null, union_all
from sqlalchemy.engine import Connection
from sqlalchemy.exc import IntegrityError
from sqlmodel import Session, SQLModel, col, delete, select

from services.common import events, paging
from services.common.blobs import BlobStore, BlobWriter
from services.common.db import Database, execute_direct, in_list
from services.common.errors import (
    Aborted,
    AlreadyExists,
    FailedPrecondition,
    InvalidArgument,
    NotFound,
    ResourceExhausted,
)
from services.common.names import REGISTERED_NAME
from services.common.outbox import Outbox
from services.registry import formats
from services.registry.models import (
    AliasChange,
    AuditEntryRow,
    DatasetName,
    DatasetRow,
    ModelAlias,
    ModelFile,
    ModelTag,
    ModelUsage,
    ModelVersionRow,
    RegisteredModel,
    RunRow,
)

SERVICE = "registry"
FRAMEWORKS = ("onnx", "sklearn", "xgboost", "lightgbm", "pytorch", "other")
TAG_KEY_PATTERN = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.:/-]{0,127}")
ID_PATTERN = re.compile(r"[A-Za-z0-9][A-Za-z0-9._:/-]{0,199}")
MAX_TAG_VALUE = 1024
MAX_TAGS = 256
MAX_TAGS_BYTES = 16 * 1024
MAX_TAG_FILTERS = 16
LATEST_TIMESTAMP = 253402300799  # 9999-12-31T23:59:59Z, the last moment a protobuf Timestamp holds
EVENT_LIST_BUDGET_BYTES = 16 * 1024
MAX_TEXT = 10_000
MAX_PATH = 1024
MAX_TENSORS = 1024
RUN_STATUSES = ("FINISHED", "FAILED", "KILLED")
READY, ARCHIVED = "READY", "ARCHIVED"

Reader = Session | Connection
"""Where reads run: a write transaction's session, or a plain connection (`Database.reader()`)."""


# ---------------------------------------------------------------- input validation


def check_name(value: str, what: str = "name") -> str:
    if not REGISTERED_NAME.fullmatch(value or ""):
        raise InvalidArgument(
            f"{what} {value[:140]!r} is not valid: use 1-128 letters, digits, '.', '_' or '-', "
            "starting with a letter or digit",
            field=what,
        )
    return value


def check_text(value: str, what: str, limit: int = MAX_TEXT) -> str:
    if len(value) > limit:
        raise InvalidArgument(f"{what} is {len(value)} characters; at most {limit} are allowed", field=what)
    if "\x00" in value:
        raise InvalidArgument(f"{what} must not contain NUL characters", field=what)
    return value


def check_key(key: str, what: str) -> str:
    """A tag, param or metric key: 1-128 letters, digits, '_', '.', ':', '/' or '-'."""
    if not TAG_KEY_PATTERN.fullmatch(key):
        noun = {"run.params": "param", "run.metrics": "metric"}.get(what, "tag")
        raise InvalidArgument(
            f"{noun} key {key[:140]!r} is not valid: use 1-128 letters, digits, '_', '.', ':', '/' or '-'",
            field=what,
        )
    return key


def check_tags(tags: dict[str, str], what: str = "tags") -> dict[str, str]:
    if len(tags) > MAX_TAGS:
        raise InvalidArgument(f"{len(tags)} tags given; at most {MAX_TAGS} are allowed", field=what)
    for key, value in tags.items():
        check_key(key, what)
        check_text(value, f"{what}.{key}", MAX_TAG_VALUE)
    check_tags_size(tags, what)
    return tags


def check_tags_size(tags: dict[str, str], what: str = "tags") -> None:
    """All tags of a version together stay small enough to travel in its events."""
    size = sum(len(key.encode()) + len(value.encode()) for key, value in tags.items())
    if size > MAX_TAGS_BYTES:
        raise InvalidArgument(
            f"the tags add up to {size} bytes; all tags of a version together may hold {MAX_TAGS_BYTES}",
            field=what,
        )


def check_file_path(path: str) -> str:
    """A relative POSIX path inside the version: no '..', no absolute paths, no odd characters."""
    if not path or len(path) > MAX_PATH:
        raise InvalidArgument(f"file path must have 1-{MAX_PATH} characters", field="files.path")
    if "\x00" in path or "\\" in path or any(ord(char) < 32 for char in path):
        raise InvalidArgument(f"file path {path[:200]!r} has forbidden characters", field="files.path")
    pure = PurePosixPath(path)
    if pure.is_absolute() or re.match(r"^[A-Za-z]:", path):
        raise InvalidArgument(f"file path {path[:200]!r} must be relative", field="files.path")
    if any(part in ("..", ".", "") for part in path.split("/")):
        raise InvalidArgument(f"file path {path[:200]!r} must not contain '..', '.' or empty parts", field="files.path")
    return path


class TensorSpec(BaseModel):
    model_config = ConfigDict(extra="forbid")
    name: str = Field(min_length=1, max_length=256)
    datatype: str
    shape: list[int] = Field(default_factory=list, max_length=32)

    @field_validator("datatype")
    @classmethod
    def _known_datatype(cls, value: str) -> str:
        if value not in formats.OIP_DATATYPES:
            raise ValueError(f"datatype {value[:40]!r} is not an Open Inference Protocol datatype")
        return value

    @field_validator("shape")
    @classmethod
    def _dimensions(cls, value: list[int]) -> list[int]:
        if any(dim < -1 for dim in value):
            raise ValueError("dimensions are sizes >= 0, or -1 for a variable size")
        return value


class Signature(BaseModel):
    model_config = ConfigDict(extra="forbid")
    inputs: list[TensorSpec] = Field(default_factory=list, max_length=MAX_TENSORS)
    outputs: list[TensorSpec] = Field(default_factory=list, max_length=MAX_TENSORS)

    def is_empty(self) -> bool:
        return not self.inputs and not self.outputs


class Lineage(BaseModel):
    model_config = ConfigDict(extra="forbid")
    run_id: str = Field(default="", max_length=200)
    experiment: str = Field(default="", max_length=256)
    git_repo: str = Field(default="", max_length=1024)
    git_branch: str = Field(default="", max_length=256)
    git_commit: str = Field(default="", max_length=64)
    datasets: list[str] = Field(default_factory=list, max_length=100)
    environment: str = Field(default="", max_length=300)
    parent_version: int = Field(default=0, ge=0)


class VersionMetadata(BaseModel):
    """What a caller says about a new model version."""

    model_config = ConfigDict(extra="forbid")
    name: str
    framework: str = ""
    description: str = ""
    tags: dict[str, str] = Field(default_factory=dict)
    signature: Signature = Field(default_factory=Signature)
    lineage: Lineage = Field(default_factory=Lineage)
    format: Literal["files", "mlflow"] = "files"

    def validated(self) -> VersionMetadata:
        check_name(self.name)
        if self.framework and self.framework not in FRAMEWORKS:
            raise InvalidArgument(
                f"framework {self.framework[:40]!r} is not one of {', '.join(FRAMEWORKS)}",
                field="framework",
            )
        check_text(self.description, "description")
        check_tags(self.tags)
        for text_field in ("run_id", "experiment", "git_repo", "git_branch", "git_commit", "environment"):
            check_text(getattr(self.lineage, text_field), f"lineage.{text_field}", 1024)
        return self


VERSION_PATTERN = re.compile(r"[1-9][0-9]{0,17}")


def parse_version(number: str, ref: str) -> int:
    """The version in a `name:version` reference: ASCII digits only, 1 or more, below 10**18."""
    if not VERSION_PATTERN.fullmatch(number):
        raise InvalidArgument(
            f"version {number[:40]!r} in {ref[:160]!r} must be a positive whole number (1, 2, ...)", field="ref"
        )
    return int(number)


@dataclass
class Reference:
    """A parsed model reference: `name:version`, `name@alias` or `name` (latest)."""

    name: str
    version: int | None = None
    alias: str | None = None

    @classmethod
    def parse(cls, ref: str) -> Reference:
        if "@" in ref:
            name, alias = ref.split("@", 1)
            return cls(check_name(name), alias=check_name(alias, "alias"))
        if ":" in ref:
            name, number = ref.split(":", 1)
            return cls(check_name(name), version=parse_version(number, ref))
        return cls(check_name(ref, "ref"))

    def __str__(self) -> str:
        if self.alias:
            return f"{self.name}@{self.alias}"
        return f"{self.name}:{self.version}" if self.version else self.name


# ---------------------------------------------------------------- views returned to callers


@dataclass
class FileView:
    path: str
    size: int
    sha256: str


@dataclass
class VersionView:
    name: str
    version: int
    framework: str
    description: str
    tags: dict[str, str]
    signature: Signature
    lineage: Lineage
    files: list[FileView]
    aliases: list[str]
    status: str
    created_by: str
    created_at: float
    updated_at: float
    used_by: list[str] = field(default_factory=list)

    @property
    def resource(self) -> str:
        return f"models/{self.name}/versions/{self.version}"


@dataclass
class ModelSummaryView:
    name: str
    latest_version: int
    version_count: int
    aliases: dict[str, int]
    created_at: float
    updated_at: float


@dataclass
class AliasChangeView:
    name: str
    alias: str
    version: int
    at: float
    actor: str
    reason: str


@dataclass
class SearchQuery:
    name_prefix: str = ""
    tags: list[str] = field(default_factory=list)
    framework: str = ""
    alias: str = ""
    created_after: float | None = None
    created_before: float | None = None
    order_by: str = ""
    include_archived: bool = False
    page_size: int = 0
    page_token: str = ""


ORDERINGS = {
    "": (ModelVersionRow.created_at, True),
    "created_at": (ModelVersionRow.created_at, False),
    "-created_at": (ModelVersionRow.created_at, True),
    "name": (ModelVersionRow.name, False),
    "-name": (ModelVersionRow.name, True),
    "version": (ModelVersionRow.version, False),
    "-version": (ModelVersionRow.version, True),
}


# ---------------------------------------------------------------- prepared reads
# Reads are the hot path, and building a SQLAlchemy statement costs several times more than
# running it: the fixed ones are built once here, with bound parameters.

_VERSION_COLUMNS = tuple(ModelVersionRow.__table__.columns)  # type: ignore[attr-defined]
_VERSION_BY_NUMBER = select(*_VERSION_COLUMNS).where(
    ModelVersionRow.name == bindparam("name"), ModelVersionRow.version == bindparam("version")
)
_LATEST_READY_VERSION = (
    select(*_VERSION_COLUMNS)
    .where(ModelVersionRow.name == bindparam("name"), ModelVersionRow.status == READY)
    .order_by(col(ModelVersionRow.version).desc())
    .limit(1)
)
_MODEL_NAME = select(RegisteredModel.name).where(RegisteredModel.name == bindparam("name"))
_ALIAS_NOW = select(ModelAlias.version).where(
    ModelAlias.name == bindparam("name"), ModelAlias.alias == bindparam("alias")
)
_ALIAS_AT = (
    select(AliasChange.version)
    .where(
        AliasChange.name == bindparam("name"),
        AliasChange.alias == bindparam("alias"),
        AliasChange.at <= bindparam("at"),
    )
    .order_by(col(AliasChange.at).desc(), col(AliasChange.id).desc())
    .limit(1)
)
_FILES_OF = (
    select(ModelFile.version_id, ModelFile.path, ModelFile.size, ModelFile.sha256)
    .where(col(ModelFile.version_id).in_(bindparam("ids", expanding=True)))
    .order_by(col(ModelFile.path))
)
# Inserts into the tables themselves (not the ORM classes) skip the ORM's bulk-insert machinery.
_INSERT_VERSION = insert(ModelVersionRow.__table__).returning(ModelVersionRow.__table__.c.id)  # type: ignore[attr-defined]
_INSERT_FILE = insert(ModelFile.__table__)  # type: ignore[attr-defined]
_INSERT_TAG = insert(ModelTag.__table__)  # type: ignore[attr-defined]
_INSERT_AUDIT = insert(AuditEntryRow.__table__)  # type: ignore[attr-defined]
_NO_TEXT = cast(null(), String)


def _related_statement(how: Literal["one", "list", "array"]) -> Any:
    """Everything a view needs besides the version row, in one statement: (kind, version_id or
    version, text, text, number). Kinds: "f" file (path, sha256, size), "t" tag (key, value),
    "u" usage (deployment), "a" alias (alias, model name; the second column is the version).
    `how` the versions are given: "one" (parameters id, name), without a list to render per call;
    "list" (ids, names) as an IN list; "array" (ids, names) as one PostgreSQL array each, which
    PostgreSQL takes as one parameter, not one per item (a page of 50 versions: ~0.9 ms less)."""

    def matches(column: Any, single: str, many: str, element: Any) -> Any:
        if how == "one":
            return column == bindparam(single)
        return in_list(column, many, element, postgresql=how == "array")

    return union_all(
        select(literal("f"), ModelFile.version_id, ModelFile.path, ModelFile.sha256, ModelFile.size).where(
            matches(ModelFile.version_id, "id", "ids", Integer)
        ),
        select(literal("t"), ModelTag.version_id, ModelTag.key, ModelTag.value, null()).where(
            matches(ModelTag.version_id, "id", "ids", Integer)
        ),
        select(literal("u"), ModelUsage.version_id, ModelUsage.deployment_id, _NO_TEXT, null()).where(
            matches(ModelUsage.version_id, "id", "ids", Integer)
        ),
        select(literal("a"), ModelAlias.version, ModelAlias.alias, ModelAlias.name, null()).where(
            matches(ModelAlias.name, "name", "names", String)
        ),
    )


_RELATED_OF_ONE = _related_statement("one")
_RELATED_OF_LIST = _related_statement("list")
_RELATED_OF_ARRAY = _related_statement("array")


def _like_prefix(prefix: str) -> str:
    """A LIKE pattern (escape character '/') matching strings that start with `prefix`."""
    return prefix.replace("/", "//").replace("%", "/%").replace("_", "/_") + "%"


@functools.lru_cache(maxsize=256)
def _search_statement(
    has_prefix: bool,
    include_archived: bool,
    has_framework: bool,
    has_after: bool,
    has_before: bool,
    tag_filters: tuple[bool, ...],
    has_alias: bool,
    order_by: str,
) -> Select[Any]:
    """The search statement for one combination of filters, with every value a bound parameter
    (`tag_filters` says, per tag filter, whether it has a value)."""
    statement = select(*_VERSION_COLUMNS)
    if has_prefix:
        statement = statement.where(col(ModelVersionRow.name).like(bindparam("prefix"), escape="/"))
    if not include_archived:
        statement = statement.where(ModelVersionRow.status == READY)
    if has_framework:
        statement = statement.where(ModelVersionRow.framework == bindparam("framework"))
    if has_after:
        statement = statement.where(ModelVersionRow.created_at >= bindparam("after"))
    if has_before:
        statement = statement.where(ModelVersionRow.created_at < bindparam("before"))
    # Newest-first (or oldest-first) with a `k=v` filter: join that tag and walk its index
    # (key, value, created_at, version_id) in order, so a page costs a page of rows.
    drive_by_tag = order_by in ("", "created_at", "-created_at")
    driving_tag = False
    for number, has_value in enumerate(tag_filters):
        key, value = bindparam(f"key{number}"), bindparam(f"value{number}")
        if drive_by_tag and has_value and not driving_tag:
            statement = statement.join(
                ModelTag,
                (ModelTag.version_id == ModelVersionRow.id) & (ModelTag.key == key) & (ModelTag.value == value),
            )
            driving_tag = True
            continue
        tagged = select(ModelTag.version_id).where(ModelTag.key == key)
        if has_value:
            tagged = tagged.where(ModelTag.value == value)
        statement = statement.where(col(ModelVersionRow.id).in_(tagged))
    if has_alias:
        statement = statement.join(
            ModelAlias, (ModelAlias.name == ModelVersionRow.name) & (ModelAlias.version == ModelVersionRow.version)
        ).where(ModelAlias.alias == bindparam("alias"))
    column, descending = ORDERINGS[order_by]
    keys = (
        [col(ModelTag.created_at), col(ModelTag.version_id)] if driving_tag else [col(column), col(ModelVersionRow.id)]
    )
    statement = statement.order_by(*(key.desc() if descending else key.asc() for key in keys))
    return statement.offset(bindparam("offset")).limit(bindparam("limit"))


def resource_of(name: str, version: int) -> str:
    return f"models/{name}/versions/{version}"


# ---------------------------------------------------------------- the registry


class _VersionCache:
    """Views of versions by the reference they were asked by, kept while the database's
    generation stays the one they were read in: any commit to the tables a view is made of (by
    this process at once; by another on SQLite at once, on PostgreSQL once its notification
    arrives) empties it. At most `capacity` views, the oldest dropped first."""

    def __init__(self, database: Database, capacity: int) -> None:
        self.database = database
        self.capacity = capacity
        self._lock = threading.Lock()
        self._views: dict[str, VersionView] = {}
        self._generation: int | None = None

    def get(self, ref: str) -> VersionView | None:
        generation = self.database.generation()
        with self._lock:
            if generation != self._generation or generation is None:
                self._views.clear()
                self._generation = generation
                return None
            return self._views.get(ref)

    def put(self, ref: str, read_in: int | None, view: VersionView) -> None:
        """Keep `view`, read after the generation was `read_in`, unless something changed since."""
        if read_in is None or self.capacity == 0 or self.database.generation() != read_in:
            return
        with self._lock:
            if self._generation != read_in:
                return
            if len(self._views) >= self.capacity:
                del self._views[next(iter(self._views))]
            self._views[ref] = view


class Registry:
    """Everything the registry does, over its own database, blob store and outbox."""

    def __init__(
        self,
        database: Database,
        blobs: BlobStore,
        outbox: Outbox,
        *,
        max_version_bytes: int = 2 * 1024**3,
        max_files_per_version: int = 10_000,
        max_dataset_bytes: int = 2 * 1024**3,
        blob_grace_seconds: float = 3600,
        cached_versions: int = 10_000,
    ) -> None:
        self.blob_grace_seconds = blob_grace_seconds
        self.database = database
        if cached_versions:
            database.watch_changes([RegisteredModel, ModelVersionRow, ModelFile, ModelTag, ModelAlias, ModelUsage])
        self._cache = _VersionCache(database, cached_versions)
        self.blobs = blobs
        self.outbox = outbox
        self.max_version_bytes = max_version_bytes
        self.max_files_per_version = max_files_per_version
        self.max_dataset_bytes = max_dataset_bytes
        self._counters: dict[type[SQLModel], Any] = {}

    # ------------------------------------------------------------ shared steps

    def _audit(
        self, session: Session, actor: str, action: str, resource: str, reason: str = "", **details: Any
    ) -> None:
        execute_direct(
            session,
            _INSERT_AUDIT,
            {
                "at": time.time(),
                "actor": actor,
                "action": action,
                "resource": resource,
                "reason": reason,
                "details": json.dumps(details, default=str),
            },
        )

    def _emit(self, session: Session, payload: events.EventPayload, subject: str) -> None:
        self.outbox.add(session, events.make_event(SERVICE, payload, subject))

    def _next_version(self, session: Session, table: type[RegisteredModel] | type[DatasetName], name: str) -> int:
        """Allocate the next version of `name` in one upsert; its row lock serialises concurrent callers."""
        statement = self._counters.get(table)
        if statement is None:
            insert = self.database.insert(table)
            statement = self._counters[table] = insert.on_conflict_do_update(
                index_elements=[table.name],
                set_={"latest_version": table.latest_version + 1, "updated_at": insert.excluded.updated_at},
            ).returning(table.latest_version)
        now = time.time()
        values = {"name": name, "latest_version": 1, "created_at": now, "updated_at": now}
        return execute_direct(session, statement, values).fetchone()[0]

    def _version_row(
        self, reader: Reader, ref: Reference, *, at: float | None = None, lock: bool = False, read_only: bool = False
    ) -> ModelVersionRow:
        """The version a reference names; `read_only` gives a plain row (faster) instead of an ORM object."""
        version = ref.version
        if ref.alias:
            version = self._alias_target(reader, ref.name, ref.alias, at)
        row: Any
        if read_only:
            if version is None:
                row = reader.execute(_LATEST_READY_VERSION, {"name": ref.name}).first()
            else:
                row = reader.execute(_VERSION_BY_NUMBER, {"name": ref.name, "version": version}).first()
        else:
            assert isinstance(reader, Session)
            query = select(ModelVersionRow).where(ModelVersionRow.name == ref.name)
            if version is None:
                query = query.where(ModelVersionRow.status == READY).order_by(col(ModelVersionRow.version).desc())
            else:
                query = query.where(ModelVersionRow.version == version)
            if lock:
                query = query.with_for_update()
            row = reader.exec(query.limit(1)).first()
        if row is None:
            self._require_model(reader, ref.name)
            if version is None:
                raise NotFound(f"model {ref.name!r} has no version that is not archived")
            raise NotFound(f"model {ref.name!r} has no version {version}", reason="VERSION_NOT_FOUND")
        return row

    def _alias_target(self, reader: Reader, name: str, alias: str, at: float | None) -> int:
        if at is None:
            current = reader.execute(_ALIAS_NOW, {"name": name, "alias": alias}).scalar()
            if current is None:
                self._require_model(reader, name)
                raise NotFound(f"model {name!r} has no alias {alias!r}", reason="ALIAS_NOT_FOUND")
            return current
        version = reader.execute(_ALIAS_AT, {"name": name, "alias": alias, "at": at}).scalar()
        if not version:
            raise NotFound(
                f"alias {alias!r} of model {name!r} pointed at no version at that time",
                reason="ALIAS_NOT_FOUND",
            )
        return version

    def _require_model(self, reader: Reader, name: str) -> None:
        if reader.execute(_MODEL_NAME, {"name": name}).first() is None:
            raise NotFound(f"model {name!r} does not exist", reason="MODEL_NOT_FOUND")

    def _views(self, reader: Reader, rows: list[Any]) -> list[VersionView]:
        """Assemble views for many rows with one query per related table."""
        if not rows:
            return []
        # Plain column rows, not ORM objects: building views is the hot path of every read.
        files: dict[int, list[FileView]] = {}
        tags: dict[int, dict[str, str]] = {}
        usages: dict[int, list[str]] = {}
        aliases: dict[tuple[str, int], list[str]] = {}
        if len(rows) == 1:
            statement, related = _RELATED_OF_ONE, {"id": rows[0].id, "name": rows[0].name}
        else:
            statement, related = (
                _RELATED_OF_LIST if self.database.is_sqlite else _RELATED_OF_ARRAY,
                {"ids": [row.id for row in rows], "names": list({row.name for row in rows})},
            )
        for kind, number, first, second, size in reader.execute(statement, related).all():
            if kind == "f":
                files.setdefault(number, []).append(FileView(first, size, second))
            elif kind == "t":
                tags.setdefault(number, {})[first] = second
            elif kind == "u":
                usages.setdefault(number, []).append(first)
            else:
                aliases.setdefault((second, number), []).append(first)
        return [
            VersionView(
                name=row.name,
                version=row.version,
                framework=row.framework,
                description=row.description,
                tags=tags.get(row.id, {}),
                signature=_stored_signature(row.signature),
                lineage=_stored_lineage(
                    row.run_id,
                    row.experiment,
                    row.git_repo,
                    row.git_branch,
                    row.git_commit,
                    row.datasets,
                    row.environment,
                    row.parent_version,
                ),
                files=sorted(files.get(row.id, []), key=_path),
                aliases=sorted(aliases.get((row.name, row.version), [])),
                status=row.status,
                created_by=row.created_by,
                created_at=row.created_at,
                updated_at=row.updated_at,
                used_by=sorted(usages.get(row.id, [])),
            )
            for row in rows
        ]

    def _view(self, reader: Reader, row: Any) -> VersionView:
        return self._views(reader, [row])[0]

    # ------------------------------------------------------------ registering versions

    def begin_upload(self, metadata: VersionMetadata, actor: str) -> Upload:
        """Start receiving a new version's files; nothing is visible until `Upload.finish`."""
        return Upload(self, metadata.validated(), actor)

    def _describe(self, upload: Upload) -> tuple[str, Signature, Lineage]:
        """Framework, signature and lineage: as given, else read from the uploaded files."""
        metadata = upload.metadata
        signature = metadata.signature
        framework = metadata.framework
        lineage = metadata.lineage
        if metadata.format == "mlflow":
            framework, signature, lineage = upload.read_mlflow(framework, signature, lineage)
        if not framework:
            framework = "onnx" if any(path.endswith(".onnx") for path in upload.files) else "other"
        if framework == "onnx" and signature.is_empty():
            signature = Signature.model_validate(formats.onnx_signature(*upload.main_onnx_file()))
        return framework, signature, lineage

    def _commit_version(self, upload: Upload) -> VersionView:
        metadata = upload.metadata
        assert upload.described is not None, "seal() the upload first"
        framework, signature, lineage = upload.described
        now = time.time()
        with self.database.transaction() as session:
            version = self._next_version(session, RegisteredModel, metadata.name)
            missing = [path for path, (_, digest) in upload.files.items() if not self.blobs.exists(digest)]
            if missing:
                # Another registry process deleted shared content meanwhile; nothing was written.
                raise Aborted(f"stored content of {', '.join(missing[:5])} vanished during the upload; upload again")
            if lineage.parent_version and lineage.parent_version >= version:
                raise InvalidArgument(
                    f"lineage.parent_version {lineage.parent_version} must be an earlier version",
                    field="lineage.parent_version",
                )
            version_id = execute_direct(
                session,
                _INSERT_VERSION,
                {
                    "name": metadata.name,
                    "version": version,
                    "framework": framework,
                    "description": metadata.description,
                    "signature": signature.model_dump_json(),
                    "run_id": lineage.run_id,
                    "experiment": lineage.experiment,
                    "git_repo": lineage.git_repo,
                    "git_branch": lineage.git_branch,
                    "git_commit": lineage.git_commit,
                    "datasets": json.dumps(lineage.datasets),
                    "environment": lineage.environment,
                    "parent_version": lineage.parent_version,
                    "status": READY,
                    "created_by": upload.actor,
                    "created_at": now,
                    "updated_at": now,
                },
            ).fetchone()[0]
            execute_direct(
                session,
                _INSERT_FILE,
                [
                    {"version_id": version_id, "path": path, "size": size, "sha256": digest}
                    for path, (size, digest) in upload.files.items()
                ],
            )
            if metadata.tags:
                execute_direct(
                    session,
                    _INSERT_TAG,
                    [
                        {"version_id": version_id, "key": key, "value": value, "created_at": now}
                        for key, value in metadata.tags.items()
                    ],
                )
            resource = resource_of(metadata.name, version)
            self._audit(session, upload.actor, "model.register", resource, files=len(upload.files), framework=framework)
            file_records = _within_budget(
                events.FileRecord(path=path, size=size, sha256=digest) for path, (size, digest) in upload.files.items()
            )
            self._emit(
                session,
                events.ModelRegistered(
                    name=metadata.name,
                    version=version,
                    framework=framework,
                    tags=metadata.tags,
                    files=file_records,
                    file_count=len(upload.files),
                    run_id=lineage.run_id,
                    created_by=upload.actor,
                ),
                resource,
            )
            session.flush()
            upload.check_not_cancelled()
        # A new version has no aliases or usages yet: its view needs no second read.
        return VersionView(
            name=metadata.name,
            version=version,
            framework=framework,
            description=metadata.description,
            tags=dict(metadata.tags),
            signature=signature,
            lineage=lineage,
            files=sorted((FileView(path, size, digest) for path, (size, digest) in upload.files.items()), key=_path),
            aliases=[],
            status=READY,
            created_by=upload.actor,
            created_at=now,
            updated_at=now,
        )

    # ------------------------------------------------------------ reading

    def cached_version(self, ref: str, at: float | None = None) -> VersionView | None:
        """The view `get_version` gave for `ref` (without `at`), when nothing has changed since;
        in memory, without the database. Callers must not change it."""
        return self._cache.get(ref) if at is None else None

    def get_version(self, ref: str, at: float | None = None) -> VersionView:
        reference = Reference.parse(ref)
        generation = self.database.generation() if at is None else None
        with self.database.reader() as reader:
            view = self._view(reader, self._version_row(reader, reference, at=at, read_only=True))
        self._cache.put(ref, generation, view)  # kept only when read at no past time, nothing changing meanwhile
        return view

    def download(self, ref: str, chunk_bytes: int) -> list[tuple[FileView, Iterator[bytes]]]:
        """The version's files, each with its content as a lazy, checksum-verified chunk stream."""
        reference = Reference.parse(ref)
        with self.database.reader() as reader:
            row = self._version_row(reader, reference, read_only=True)
            files = reader.execute(_FILES_OF, {"ids": [row.id]}).all()
        return [(FileView(path, size, digest), self.blobs.read(digest, chunk_bytes)) for _, path, size, digest in files]

    def list_models(
        self, name_prefix: str = "", page_size: int = 0, page_token: str = ""
    ) -> tuple[list[ModelSummaryView], str]:
        size, offset = paging.page_size(page_size), paging.decode(page_token)
        check_text(name_prefix, "name_prefix", 128)
        with self.database.session() as session:
            query = select(RegisteredModel).order_by(col(RegisteredModel.name))
            if name_prefix:
                query = query.where(col(RegisteredModel.name).startswith(name_prefix, autoescape=True))
            models = list(session.exec(query.offset(offset).limit(size + 1)))
            page = models[:size]
            names = [model.name for model in page]
            counts = dict(
                session.exec(
                    select(ModelVersionRow.name, func.count())
                    .where(col(ModelVersionRow.name).in_(names))
                    .group_by(ModelVersionRow.name)
                ).all()
            )
            aliases: dict[str, dict[str, int]] = {}
            for alias in session.exec(select(ModelAlias).where(col(ModelAlias.name).in_(names))):
                aliases.setdefault(alias.name, {})[alias.alias] = alias.version
            views = [
                ModelSummaryView(
                    name=model.name,
                    latest_version=model.latest_version,
                    version_count=counts.get(model.name, 0),
                    aliases=aliases.get(model.name, {}),
                    created_at=model.created_at,
                    updated_at=model.updated_at,
                )
                for model in page
            ]
        return views, paging.next_token(offset, size, len(models))

    def search_versions(self, query: SearchQuery) -> tuple[list[VersionView], str]:
        size, offset = paging.page_size(query.page_size), paging.decode(query.page_token)
        if query.order_by not in ORDERINGS:
            raise InvalidArgument(
                f"order_by {query.order_by[:40]!r} is not one of {', '.join(k for k in ORDERINGS if k)}",
                field="order_by",
            )
        if query.framework and query.framework not in FRAMEWORKS:
            raise InvalidArgument(
                f"framework {query.framework[:40]!r} is not one of {', '.join(FRAMEWORKS)}", field="framework"
            )
        check_text(query.name_prefix, "name_prefix", 128)
        if len(query.tags) > MAX_TAG_FILTERS:
            raise InvalidArgument(
                f"{len(query.tags)} tag filters given; at most {MAX_TAG_FILTERS} may be combined", field="tags"
            )
        values: dict[str, Any] = {"offset": offset, "limit": size + 1}
        tag_filters = []
        for number, tag_filter in enumerate(query.tags):
            key, has_value, value = tag_filter.partition("=")
            check_tags({key: value}, "tags")
            values[f"key{number}"], values[f"value{number}"] = key, value
            tag_filters.append(bool(has_value))
        if query.alias:
            check_name(query.alias, "alias")
        statement = _search_statement(
            bool(query.name_prefix),
            query.include_archived,
            bool(query.framework),
            query.created_after is not None,
            query.created_before is not None,
            tuple(tag_filters),
            bool(query.alias),
            query.order_by,
        )
        values.update(
            prefix=_like_prefix(query.name_prefix),
            framework=query.framework,
            after=query.created_after,
            before=query.created_before,
            alias=query.alias,
        )
        with self.database.reader() as reader:
            rows = reader.execute(statement, values).all()
            return self._views(reader, rows[:size]), paging.next_token(offset, size, len(rows))

    # ------------------------------------------------------------ changing

    def update_version(
        self,
        ref: str,
        actor: str,
        *,
        set_tags: dict[str, str],
        remove_tags: list[str],
        description: str | None,
        reason: str,
    ) -> VersionView:
        check_tags(set_tags, "set_tags")
        for key in remove_tags:
            check_key(key, "remove_tags")
        if description is not None:
            check_text(description, "description")
        check_text(reason, "reason", 2000)
        if not set_tags and not remove_tags and description is None:
            raise InvalidArgument("nothing to change: give tags to set or remove, or a description")
        reference = Reference.parse(ref)
        with self.database.transaction() as session:
            row = self._version_row(session, reference, lock=True)
            assert row.id is not None
            existing = {tag.key: tag for tag in session.exec(select(ModelTag).where(ModelTag.version_id == row.id))}
            final = {key: tag.value for key, tag in existing.items() if key not in remove_tags} | set_tags
            if len(final) > MAX_TAGS:
                raise InvalidArgument(f"a version may carry at most {MAX_TAGS} tags", field="set_tags")
            check_tags_size(final, "set_tags")
            for key in remove_tags:
                if key in existing:
                    session.delete(existing.pop(key))
            for key, value in set_tags.items():
                if key in existing:
                    existing[key].value = value
                    session.add(existing[key])
                else:
                    session.add(ModelTag(version_id=row.id, key=key, value=value, created_at=row.created_at))
            changed = [
                *(["tags"] if set_tags or remove_tags else []),
                *(["description"] if description is not None else []),
            ]
            if description is not None:
                row.description = description
            row.updated_at = time.time()
            session.add(row)
            session.flush()
            view = self._view(session, row)
            self._audit(
                session,
                actor,
                "model.update",
                view.resource,
                reason,
                set_tags=set_tags,
                remove_tags=remove_tags,
                description=description,
            )
            self._emit(
                session,
                events.ModelUpdated(
                    name=view.name, version=view.version, tags=view.tags, description=view.description, changed=changed
                ),
                view.resource,
            )
            return view

    def set_alias(self, name: str, alias: str, version: int, actor: str, reason: str) -> tuple[VersionView, int]:
        check_name(name)
        check_name(alias, "alias")
        check_text(reason, "reason", 2000)
        if not reason.strip():
            raise InvalidArgument("setting an alias needs a reason (why this version?)", field="reason")
        if version < 1:
            raise InvalidArgument("version must be a positive whole number", field="version")
        with self.database.transaction() as session:
            model = session.exec(select(RegisteredModel).where(RegisteredModel.name == name).with_for_update()).first()
            if model is None:
                raise NotFound(f"model {name!r} does not exist", reason="MODEL_NOT_FOUND")
            row = self._version_row(session, Reference(name, version=version))
            if row.status != READY:
                raise FailedPrecondition(
                    f"version {version} of {name!r} is archived; an alias must point at a live version"
                )
            current = session.get(ModelAlias, (name, alias))
            previous = current.version if current else 0
            now = time.time()
            if current is None:
                current = ModelAlias(name=name, alias=alias, version=version, set_at=now, set_by=actor, reason=reason)
            else:
                current.version, current.set_at, current.set_by, current.reason = version, now, actor, reason
            session.add(current)
            session.add(AliasChange(name=name, alias=alias, version=version, at=now, actor=actor, reason=reason))
            resource = resource_of(name, version)
            self._audit(session, actor, "model.alias.set", resource, reason, alias=alias, previous_version=previous)
            self._emit(
                session,
                events.ModelAliasSet(
                    name=name, alias=alias, version=version, previous_version=previous or None, reason=reason
                ),
                resource,
            )
            session.flush()
            return self._view(session, row), previous

    def remove_alias(self, name: str, alias: str, actor: str, reason: str) -> int:
        check_name(name)
        check_name(alias, "alias")
        check_text(reason, "reason", 2000)
        with self.database.transaction() as session:
            model = session.exec(select(RegisteredModel).where(RegisteredModel.name == name).with_for_update()).first()
            if model is None:
                raise NotFound(f"model {name!r} does not exist", reason="MODEL_NOT_FOUND")
            current = session.get(ModelAlias, (name, alias))
            if current is None:
                raise NotFound(f"model {name!r} has no alias {alias!r}", reason="ALIAS_NOT_FOUND")
            previous = current.version
            session.delete(current)
            session.add(AliasChange(name=name, alias=alias, version=0, at=time.time(), actor=actor, reason=reason))
            resource = f"models/{name}/aliases/{alias}"
            self._audit(session, actor, "model.alias.remove", resource, reason, previous_version=previous)
            self._emit(
                session,
                events.ModelAliasRemoved(name=name, alias=alias, previous_version=previous, reason=reason),
                resource,
            )
            return previous

    def alias_history(self, name: str, alias: str = "") -> list[AliasChangeView]:
        check_name(name)
        if alias:
            check_name(alias, "alias")
        with self.database.session() as session:
            self._require_model(session, name)
            query = select(AliasChange).where(AliasChange.name == name)
            if alias:
                query = query.where(AliasChange.alias == alias)
            changes = session.exec(query.order_by(col(AliasChange.at), col(AliasChange.id))).all()
            return [AliasChangeView(c.name, c.alias, c.version, c.at, c.actor, c.reason) for c in changes]

    def _check_removable(self, session: Session, row: ModelVersionRow, verb: str) -> None:
        usages = session.exec(select(ModelUsage.deployment_id).where(ModelUsage.version_id == row.id)).all()
        if usages:
            raise FailedPrecondition(
                f"cannot {verb} {row.name}:{row.version}: deployments {', '.join(sorted(usages))} use it; "
                "delete or move those deployments first",
                reason="VERSION_IN_USE",
                metadata={"deployments": ",".join(sorted(usages))},
            )
        aliases = session.exec(
            select(ModelAlias.alias).where(ModelAlias.name == row.name, ModelAlias.version == row.version)
        ).all()
        if aliases:
            raise FailedPrecondition(
                f"cannot {verb} {row.name}:{row.version}: aliases {', '.join(sorted(aliases))} point at it; "
                "move or remove them first",
                reason="VERSION_ALIASED",
            )

    def archive_version(self, ref: str, actor: str, reason: str) -> VersionView:
        check_text(reason, "reason", 2000)
        reference = Reference.parse(ref)
        with self.database.transaction() as session:
            self._lock_model(session, reference.name)
            row = self._version_row(session, reference, lock=True)
            if row.status == ARCHIVED:
                return self._view(session, row)
            self._check_removable(session, row, "archive")
            row.status, row.updated_at = ARCHIVED, time.time()
            session.add(row)
            resource = resource_of(row.name, row.version)
            self._audit(session, actor, "model.archive", resource, reason)
            self._emit(session, events.ModelArchived(name=row.name, version=row.version, reason=reason), resource)
            session.flush()
            return self._view(session, row)

    def delete_version(self, ref: str, actor: str, reason: str) -> None:
        check_text(reason, "reason", 2000)
        reference = Reference.parse(ref)
        if reference.version is None:
            raise InvalidArgument(
                "delete needs an exact version, e.g. name:3 (not an alias or the latest)", field="ref"
            )
        with self.database.transaction() as session:
            self._lock_model(session, reference.name)
            row = self._version_row(session, reference, lock=True)
            self._check_removable(session, row, "delete")
            digests = set(session.exec(select(ModelFile.sha256).where(ModelFile.version_id == row.id)).all())
            session.execute(delete(ModelTag).where(col(ModelTag.version_id) == row.id))
            session.execute(delete(ModelFile).where(col(ModelFile.version_id) == row.id))
            session.delete(row)
            resource = resource_of(row.name, row.version)
            self._audit(session, actor, "model.delete", resource, reason)
            self._emit(session, events.ModelDeleted(name=row.name, version=row.version, reason=reason), resource)
            session.flush()
            still_used = set(session.exec(select(ModelFile.sha256).where(col(ModelFile.sha256).in_(digests))).all())
            still_used |= set(session.exec(select(DatasetRow.sha256).where(col(DatasetRow.sha256).in_(digests))).all())
        # After the commit: a crash here leaves only unreferenced blobs, which the sweep removes.
        self.blobs.delete(digests - still_used)

    def _lock_model(self, session: Session, name: str) -> None:
        """Serialise changes to one model's versions (alias moves, usages, archive, delete)."""
        session.exec(select(RegisteredModel).where(RegisteredModel.name == name).with_for_update()).first()

    # ------------------------------------------------------------ usages

    def acquire_usage(self, ref: str, deployment_id: str, actor: str) -> VersionView:
        self._check_deployment_id(deployment_id)
        reference = Reference.parse(ref)
        with self.database.transaction() as session:
            self._lock_model(session, reference.name)
            row = self._version_row(session, reference)
            if row.status != READY:
                raise FailedPrecondition(f"{row.name}:{row.version} is archived and cannot be deployed")
            if session.get(ModelUsage, (row.id, deployment_id)) is None:
                session.add(ModelUsage(version_id=row.id, deployment_id=deployment_id, acquired_at=time.time()))
                self._audit(
                    session, actor, "model.usage.acquire", resource_of(row.name, row.version), deployment=deployment_id
                )
            session.flush()
            return self._view(session, row)

    def release_usage(self, ref: str, deployment_id: str, actor: str) -> None:
        """Forget that `deployment_id` uses the version; releasing twice is harmless."""
        self._check_deployment_id(deployment_id)
        reference = Reference.parse(ref)
        with self.database.transaction() as session:
            self._lock_model(session, reference.name)
            row = self._version_row(session, reference)
            usage = session.get(ModelUsage, (row.id, deployment_id))
            if usage is not None:
                session.delete(usage)
                self._audit(
                    session, actor, "model.usage.release", resource_of(row.name, row.version), deployment=deployment_id
                )

    @staticmethod
    def _check_deployment_id(deployment_id: str) -> None:
        if not ID_PATTERN.fullmatch(deployment_id or ""):
            raise InvalidArgument(
                f"deployment_id {deployment_id[:200]!r} is not valid: 1-200 letters, digits, '.', '_', ':', '/' or '-'",
                field="deployment_id",
            )

    # ------------------------------------------------------------ datasets

    def begin_dataset_upload(
        self, name: str, file_format: str, description: str, tags: dict[str, str], actor: str
    ) -> DatasetUpload:
        check_name(name)
        if file_format and file_format not in ("csv", "parquet"):
            raise InvalidArgument(f"format {file_format[:40]!r} is not csv or parquet", field="format")
        check_text(description, "description")
        check_tags(tags)
        return DatasetUpload(self, name, file_format, description, tags, actor)

    def _commit_dataset(
        self, upload: DatasetUpload, path: str, size: int, digest: str, file_format: str, summary: dict[str, Any]
    ) -> dict[str, Any]:
        fingerprint = formats.fingerprint(summary["schema"], digest)
        with self.database.transaction() as session:
            version = self._next_version(session, DatasetName, upload.name)
            row = DatasetRow(
                name=upload.name,
                version=version,
                format=file_format,
                description=upload.description,
                tags=json.dumps(upload.tags),
                path=path,
                size=size,
                sha256=digest,
                row_count=summary["row_count"],
                columns=json.dumps(summary["columns"]),
                fingerprint=fingerprint,
                created_by=upload.actor,
                created_at=time.time(),
            )
            session.add(row)
            resource = f"datasets/{upload.name}/versions/{version}"
            self._audit(session, upload.actor, "dataset.register", resource, rows=row.row_count)
            self._emit(
                session,
                events.DatasetRegistered(
                    name=upload.name,
                    version=version,
                    format=file_format,
                    row_count=row.row_count,
                    fingerprint=fingerprint,
                ),
                resource,
            )
            session.flush()
            upload.check_not_cancelled()
            return _dataset_view(row)

    def get_dataset(self, ref: str) -> dict[str, Any]:
        name, has_version, number = ref.partition(":")
        check_name(name)
        version = parse_version(number, ref) if has_version else None
        with self.database.session() as session:
            query = select(DatasetRow).where(DatasetRow.name == name)
            query = (
                query.where(DatasetRow.version == version)
                if version
                else query.order_by(col(DatasetRow.version).desc()).limit(1)
            )
            row = session.exec(query).first()
            if row is None:
                raise NotFound(f"dataset {ref[:160]!r} does not exist", reason="DATASET_NOT_FOUND")
            return _dataset_view(row)

    def download_dataset(self, ref: str, chunk_bytes: int) -> tuple[FileView, Iterator[bytes]]:
        """The dataset's file, with its content as a lazy, checksum-verified chunk stream."""
        file = self.get_dataset(ref)["file"]
        return file, self.blobs.read(file.sha256, chunk_bytes)

    def list_datasets(
        self, name_prefix: str = "", page_size: int = 0, page_token: str = ""
    ) -> tuple[list[dict[str, Any]], str]:
        size, offset = paging.page_size(page_size), paging.decode(page_token)
        check_text(name_prefix, "name_prefix", 128)
        query = select(DatasetRow).order_by(col(DatasetRow.name), col(DatasetRow.version).desc())
        if name_prefix:
            query = query.where(col(DatasetRow.name).startswith(name_prefix, autoescape=True))
        with self.database.session() as session:
            rows = list(session.exec(query.offset(offset).limit(size + 1)))
            return [_dataset_view(row) for row in rows[:size]], paging.next_token(offset, size, len(rows))

    # ------------------------------------------------------------ runs

    def record_run(self, run: dict[str, Any], actor: str) -> dict[str, Any]:
        run_id = run.get("id") or events.uuid7()
        if not ID_PATTERN.fullmatch(run_id):
            raise InvalidArgument(
                f"run id {run_id[:200]!r} is not valid: 1-200 letters, digits, '.', '_', ':', '/' or '-'",
                field="run.id",
            )
        status = run.get("status") or "FINISHED"
        if status not in RUN_STATUSES:
            raise InvalidArgument(
                f"run status {status[:40]!r} is not one of {', '.join(RUN_STATUSES)}", field="run.status"
            )
        params, metrics = run.get("params", {}), run.get("metrics", {})
        if len(params) > 1000 or len(metrics) > 1000:
            raise InvalidArgument("a run may carry at most 1000 params and 1000 metrics", field="run")
        for key, value in params.items():
            check_key(key, "run.params")
            check_text(value, f"run.params.{key}", 6000)
        for key, value in metrics.items():
            check_key(key, "run.metrics")
            if not math.isfinite(value):
                raise InvalidArgument(f"metric {key!r} is not a finite number", field="run.metrics")
        for text_field in ("experiment", "name", "git_repo", "git_branch", "git_commit"):
            check_text(run.get(text_field, ""), f"run.{text_field}", 1024)
        for time_field in ("started_at", "ended_at"):
            moment = run.get(time_field)
            if moment is not None and not 0 <= moment <= LATEST_TIMESTAMP:
                raise InvalidArgument(f"run.{time_field} must lie between 1970 and 9999", field=f"run.{time_field}")
        row = RunRow(
            id=run_id,
            experiment=run.get("experiment", ""),
            name=run.get("name", ""),
            params=json.dumps(params),
            metrics=json.dumps(metrics),
            git_repo=run.get("git_repo", ""),
            git_branch=run.get("git_branch", ""),
            git_commit=run.get("git_commit", ""),
            datasets=json.dumps(run.get("datasets", [])),
            status=status,
            started_at=run.get("started_at"),
            ended_at=run.get("ended_at"),
            created_by=actor,
            recorded_at=time.time(),
        )
        try:
            with self.database.transaction() as session:
                if session.get(RunRow, run_id) is not None:
                    raise AlreadyExists(f"run {run_id!r} is already recorded", reason="RUN_EXISTS")
                session.add(row)
                resource = f"runs/{run_id}"
                self._audit(session, actor, "run.record", resource, status=status)
                self._emit(
                    session,
                    events.RunCompleted(
                        run_id=run_id,
                        experiment=row.experiment,
                        status=status,
                        metrics=dict(_within_budget(metrics.items())),
                        metric_count=len(metrics),
                    ),
                    resource,
                )
        except IntegrityError as error:
            raise AlreadyExists(f"run {run_id!r} is already recorded", reason="RUN_EXISTS") from error
        return _run_view(row)

    def get_run(self, run_id: str) -> dict[str, Any]:
        if not ID_PATTERN.fullmatch(run_id or ""):
            raise InvalidArgument(f"run id {run_id[:200]!r} is not valid", field="id")
        with self.database.session() as session:
            row = session.get(RunRow, run_id)
            if row is None:
                raise NotFound(f"run {run_id!r} does not exist", reason="RUN_NOT_FOUND")
            return _run_view(row)

    # ------------------------------------------------------------ audit

    def list_audit(
        self,
        *,
        resource_prefix: str = "",
        actor: str = "",
        action: str = "",
        since: float | None = None,
        until: float | None = None,
        page_size: int = 0,
        page_token: str = "",
    ) -> tuple[list[AuditEntryRow], str]:
        size, offset = paging.page_size(page_size), paging.decode(page_token)
        for value, what in ((resource_prefix, "resource_prefix"), (actor, "actor"), (action, "action")):
            check_text(value, what, 512)
        query = select(AuditEntryRow)
        if resource_prefix:
            query = query.where(col(AuditEntryRow.resource).startswith(resource_prefix, autoescape=True))
        if actor:
            query = query.where(AuditEntryRow.actor == actor)
        if action:
            query = query.where(AuditEntryRow.action == action)
        if since is not None:
            query = query.where(AuditEntryRow.at >= since)
        if until is not None:
            query = query.where(AuditEntryRow.at < until)
        with self.database.session() as session:
            rows = list(session.exec(query.order_by(col(AuditEntryRow.id).desc()).offset(offset).limit(size + 1)))
            return rows[:size], paging.next_token(offset, size, len(rows))

    # ------------------------------------------------------------ housekeeping

    def sweep_blobs(self) -> int:
        """Remove partial uploads and blobs no version or dataset references."""
        grace_seconds = self.blob_grace_seconds
        with self.database.session() as session:
            referenced = set(session.exec(select(ModelFile.sha256)).all())
            referenced |= set(session.exec(select(DatasetRow.sha256)).all())
        return self.blobs.sweep(referenced, grace_seconds)


class _Receiving:
    """What every upload shares: the caller may cancel it until the moment it commits."""

    def __init__(self) -> None:
        self._cancelled = threading.Event()

    def cancel(self) -> None:
        """Called from another thread when the caller goes away; the commit then rolls back."""
        self._cancelled.set()

    def check_not_cancelled(self) -> None:
        if self._cancelled.is_set():
            raise Aborted("the upload was cancelled by the caller; nothing was registered")


class Upload(_Receiving):
    """A model version being received: files stream into the blob store, then one commit."""

    def __init__(self, registry: Registry, metadata: VersionMetadata, actor: str) -> None:
        super().__init__()
        self.registry = registry
        self.metadata = metadata
        self.actor = actor
        self.files: dict[str, tuple[int, str]] = {}
        self.total = 0
        self.described: tuple[str, Signature, Lineage] | None = None
        self._path: str | None = None
        self._writer: BlobWriter | None = None

    def start_file(self, path: str) -> None:
        self._close_file()
        check_file_path(path)
        if path in self.files or any(
            path.startswith(f"{other}/") or other.startswith(f"{path}/") for other in self.files
        ):
            raise InvalidArgument(f"file path {path!r} is sent twice or clashes with a folder", field="files.path")
        if len(self.files) >= self.registry.max_files_per_version:
            raise ResourceExhausted(f"a version may hold at most {self.registry.max_files_per_version} files")
        self._path, self._writer = path, self.registry.blobs.writer()

    def write(self, data: bytes) -> None:
        if self._writer is None:
            raise InvalidArgument("file data arrived before a file header naming its path", field="files")
        self.total += len(data)
        if self.total > self.registry.max_version_bytes:
            raise ResourceExhausted(
                f"the version's files exceed {self.registry.max_version_bytes} bytes, the limit per "
                "version (MLMESH_REGISTRY_MAX_VERSION_BYTES)"
            )
        self._writer.write(data)

    def _close_file(self) -> None:
        if self._writer is None or self._path is None:
            return
        writer, path = self._writer, self._path
        self._writer = self._path = None
        digest = writer.commit()  # empty files are fine (__init__.py); an all-empty version is not
        self.files[path] = (writer.size, digest)

    def seal(self) -> None:
        """Make the received files durable and read what they say about the model: the slow,
        blocking part of finishing, run before the short commit."""
        self._close_file()
        if not self.files:
            raise InvalidArgument("a model version needs at least one file", field="files")
        if self.total == 0:
            raise InvalidArgument("every file of this version is empty; upload the model's content", field="files")
        self.described = self.registry._describe(self)

    def commit(self) -> VersionView:
        """Register the sealed upload as the model's next version, in one short transaction."""
        view = self.registry._commit_version(self)
        self.registry.blobs.unpin(digest for _, digest in self.files.values())
        self.files = {}
        return view

    def finish(self) -> VersionView:
        self.seal()
        return self.commit()

    def abort(self) -> None:
        """Drop what was received; blobs shared with committed versions stay."""
        if self._writer is not None:
            self._writer.discard()
        self._writer = None
        # Blobs already stored may be shared with another upload of the same content that is
        # about to commit; the periodic sweep removes them once nothing references them.
        self.registry.blobs.unpin(digest for _, digest in self.files.values())
        self.files = {}

    def main_onnx_file(self) -> tuple[Path, str]:
        """The stored path and the uploaded name of the version's main .onnx file."""
        onnx_files = [path for path in self.files if path.endswith(".onnx")]
        if not onnx_files:
            raise InvalidArgument("framework is onnx but no .onnx file was uploaded", field="files")
        main = sorted(onnx_files, key=len)[0]
        return self.registry.blobs.path_of(self.files[main][1]), main

    def read_mlflow(self, framework: str, signature: Signature, lineage: Lineage) -> tuple[str, Signature, Lineage]:
        if "MLmodel" not in self.files:
            raise InvalidArgument("an MLflow import needs the MLmodel file at the top of the directory", field="files")
        described = formats.mlflow_model(self.registry.blobs.path_of(self.files["MLmodel"][1]))
        if described["main_file"] not in self.files:
            raise InvalidArgument(f"MLmodel names {described['main_file']!r}, which was not uploaded", field="files")
        if signature.is_empty():
            signature = Signature.model_validate(described["signature"])
        if not lineage.run_id and described["run_id"]:
            check_text(described["run_id"], "MLmodel run_id", 200)
            lineage = Lineage.model_validate({**lineage.model_dump(), "run_id": described["run_id"]})
        return framework or described["framework"], signature, lineage


class DatasetUpload(_Receiving):
    """One dataset file being received."""

    def __init__(
        self, registry: Registry, name: str, file_format: str, description: str, tags: dict[str, str], actor: str
    ) -> None:
        super().__init__()
        self.registry = registry
        self.name = name
        self.format = file_format
        self.description = description
        self.tags = tags
        self.actor = actor
        self.path: str | None = None
        self._writer: BlobWriter | None = None
        self._stored: tuple[int, str] | None = None
        self._summary: dict[str, Any] = {}

    def start_file(self, path: str) -> None:
        if self.path is not None:
            raise InvalidArgument("a dataset version is one file; a second file header arrived", field="file")
        check_file_path(path)
        if not self.format:
            suffix = path.rsplit(".", 1)[-1].lower()
            self.format = {"csv": "csv", "parquet": "parquet", "pq": "parquet"}.get(suffix, "")
            if not self.format:
                raise InvalidArgument(f"cannot tell the format of {path!r}; pass format csv or parquet", field="format")
        self.path, self._writer = path, self.registry.blobs.writer()

    def write(self, data: bytes) -> None:
        if self._writer is None:
            raise InvalidArgument("file data arrived before a file header naming its path", field="file")
        if self._writer.size + len(data) > self.registry.max_dataset_bytes:
            raise ResourceExhausted(
                f"the dataset exceeds {self.registry.max_dataset_bytes} bytes (MLMESH_REGISTRY_MAX_DATASET_BYTES)"
            )
        self._writer.write(data)

    def seal(self) -> None:
        """Make the file durable and summarise it (schema, rows, per-column statistics)."""
        if self._writer is None or self.path is None:
            raise InvalidArgument("a dataset needs one CSV or Parquet file", field="file")
        if self._writer.size == 0:
            raise InvalidArgument(f"file {self.path!r} is empty", field="file")
        writer, self._writer = self._writer, None
        self._stored = (writer.size, writer.commit())
        self._summary = formats.table_summary(self.registry.blobs.path_of(self._stored[1]), self.format, self.path)

    def commit(self) -> dict[str, Any]:
        assert self._stored is not None and self.path is not None, "seal() the upload first"
        size, digest = self._stored
        view = self.registry._commit_dataset(self, self.path, size, digest, self.format, self._summary)
        self.registry.blobs.unpin([digest])
        self._stored = None
        return view

    def finish(self) -> dict[str, Any]:
        self.seal()
        return self.commit()

    def abort(self) -> None:
        if self._writer is not None:
            self._writer.discard()
            self._writer = None
        if self._stored is not None:
            self.registry.blobs.unpin([self._stored[1]])
            self._stored = None


def _path(file: FileView) -> str:
    return file.path


@functools.lru_cache(maxsize=4096)
def _stored_lineage(
    run_id: str,
    experiment: str,
    git_repo: str,
    git_branch: str,
    git_commit: str,
    datasets: str,
    environment: str,
    parent_version: int,
) -> Lineage:
    """A lineage as stored (validated when registered), rebuilt without validating again. Many
    versions share one (most often the empty one), so rebuilt ones are kept (never mutate them)."""
    return Lineage.model_construct(
        run_id=run_id,
        experiment=experiment,
        git_repo=git_repo,
        git_branch=git_branch,
        git_commit=git_commit,
        datasets=json.loads(datasets) if datasets != "[]" else [],
        environment=environment,
        parent_version=parent_version,
    )


@functools.lru_cache(maxsize=4096)
def _stored_signature(stored: str) -> Signature:
    """A signature as stored (validated when registered), rebuilt without validating again.
    Versions of a model mostly share one signature, so rebuilt ones are kept (never mutate them)."""
    data = json.loads(stored)
    return Signature.model_construct(
        inputs=[TensorSpec.model_construct(**spec) for spec in data.get("inputs", [])],
        outputs=[TensorSpec.model_construct(**spec) for spec in data.get("outputs", [])],
    )


def _within_budget(items: Iterable[Any]) -> list[Any]:
    """The leading items whose JSON fits in an event's list budget (events stay under 64 KiB)."""
    kept, used = [], 0
    for item in items:
        used += len(json.dumps(item.model_dump() if isinstance(item, BaseModel) else item)) + 2
        if used > EVENT_LIST_BUDGET_BYTES:
            break
        kept.append(item)
    return kept


def _dataset_view(row: DatasetRow) -> dict[str, Any]:
    return {
        "name": row.name,
        "version": row.version,
        "format": row.format,
        "description": row.description,
        "tags": json.loads(row.tags),
        "file": FileView(row.path, row.size, row.sha256),
        "row_count": row.row_count,
        "columns": json.loads(row.columns),
        "fingerprint": row.fingerprint,
        "created_by": row.created_by,
        "created_at": row.created_at,
    }


def _run_view(row: RunRow) -> dict[str, Any]:
    return {
        "id": row.id,
        "experiment": row.experiment,
        "name": row.name,
        "params": json.loads(row.params),
        "metrics": json.loads(row.metrics),
        "git_repo": row.git_repo,
        "git_branch": row.git_branch,
        "git_commit": row.git_commit,
        "datasets": json.loads(row.datasets),
        "status": row.status,
        "started_at": row.started_at,
        "ended_at": row.ended_at,
        "created_by": row.created_by,
    }

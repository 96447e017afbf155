"""The collector's store: captured rows in Parquet files that its database records, written
exactly once; retention; queries, exports, labels and statistics over them.

Files live at `<data_dir>/endpoint=<e>/deployment=<d>/model_version=<v>/date=<YYYY-MM-DD>/hour=<HH>/
part-<uuid>.parquet` (Hive partitioning: pyarrow.dataset reads the tree with those five columns).

Exactly once: a flush writes each file under a hidden temporary name, fsyncs it, renames it into
place and fsyncs its folder; then ONE transaction records every file of the flush together with
the stream sequences of the messages whose rows it holds. The consumer acknowledges the messages
only after that commit. At start, Parquet files the database does not know (a crash between
rename and commit) are deleted, and the recorded sequences are loaded as ranges: a message
delivered again is acknowledged and skipped when its sequence is among them.

Nothing here talks gRPC or NATS.
"""

from __future__ import annotations

import bisect
import contextlib
import json
import logging
import math
import os
import shutil
import threading
import time
import uuid
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
from sqlalchemy import delete, func
from sqlmodel import Session, col, select

from services.collector.models import CaptureFileRow, LabelRow, RetentionRow, StoreRow
from services.collector.records import FIXED_COLUMNS, TIME_TYPE, CaptureBuffer, CapturedTable, sequence_ranges
from services.collector.records import valid_name as _valid_name
from services.common.db import Database
from services.common.errors import FailedPrecondition, InvalidArgument, NotFound, ResourceExhausted
from services.common.names import REGISTERED_NAME

log = logging.getLogger(__name__)

COMPRESSION = "zstd"
STORE_MARKER = ".mlmesh-collector-store"
EXPORTS = ".exports"
MAX_REQUEST_ID_CHARS = 1024
MAX_LABEL_CHARS = 1024
MAX_ROW = 2**31 - 1
MAX_COLUMNS = 10_000
MAX_AGE_SECONDS = 100 * 365 * 86_400
MAX_BYTES = 2**62
SQL_CHUNK = 500
"""Values per IN (...) list or rows per INSERT: far below SQLite's limit on bound parameters."""
ORIGIN_COLUMNS = ("deployment", "model_version")
"""Columns a query adds from each file's partition."""


class Registry(Protocol):
    """What exports need of the registry (services.client.RegistryClient has it)."""

    def register_dataset(
        self, name: str, path: Path, format: str = "", description: str = "", tags: dict[str, str] | None = None
    ) -> Any: ...


def check_endpoint(name: str, what: str = "endpoint") -> str:
    if not isinstance(name, str) or not _valid_name(name):
        shown = repr(name[:80]) if isinstance(name, str) and name else "empty"
        raise InvalidArgument(
            f"{what} {shown} is not a valid name: 1-63 letters, digits, '-' and '_', starting with a letter or digit",
            field=what,
        )
    return name


def partition_folder(endpoint: str, deployment: str, model_version: str, hour: int) -> str:
    """The Hive-style folder of a partition, relative to the data folder."""
    moment = time.gmtime(hour)
    return (
        f"endpoint={endpoint}/deployment={deployment}/model_version={model_version}/"
        f"date={time.strftime('%Y-%m-%d', moment)}/hour={moment.tm_hour:02d}"
    )


def parquet_options(schema: pa.Schema) -> dict[str, Any]:
    """How capture files are written: zstd, and dictionary encoding only for columns that may
    repeat (strings, integers, booleans). Floating-point features rarely repeat, and trying a
    dictionary on them made writing six times slower."""
    return {
        "compression": COMPRESSION,
        "use_dictionary": [field.name for field in schema if not pa.types.is_floating(field.type)],
    }


class _FolderLock:
    """Flushes share the data folder (each writes files of its own); deleting files and pruning
    empty folders takes it alone, so that no folder goes while a flush writes into it. A deletion
    that waits holds off new flushes, so that back-to-back flushes cannot starve it."""

    def __init__(self) -> None:
        self._condition = threading.Condition()
        self._sharing = 0
        self._exclusive = False
        self._waiting_exclusive = 0

    @contextlib.contextmanager
    def shared(self) -> Iterator[None]:
        with self._condition:
            self._condition.wait_for(lambda: not self._exclusive and not self._waiting_exclusive)
            self._sharing += 1
        try:
            yield
        finally:
            with self._condition:
                self._sharing -= 1
                self._condition.notify_all()

    @contextlib.contextmanager
    def exclusive(self) -> Iterator[None]:
        with self._condition:
            self._waiting_exclusive += 1
            self._condition.wait_for(lambda: not self._exclusive and not self._sharing)
            self._waiting_exclusive -= 1
            self._exclusive = True
        try:
            yield
        finally:
            with self._condition:
                self._exclusive = False
                self._condition.notify_all()


def _warm_up_parquet() -> None:
    """Write a small capture-like table to memory: pyarrow readies its codec and threads on the
    first write, which took a third of a second, so that the first flush does not pay for it."""
    table = pa.table(
        {
            "request_id": pa.array(["warm-up"] * 8),
            "time": pa.array(np.zeros(8, np.int64), TIME_TYPE),
            "x": np.zeros(8, np.float32),
        }
    )
    pq.write_table(table, pa.BufferOutputStream(), **parquet_options(table.schema))


def microseconds(seconds: float) -> int:
    """Seconds as the `time` column counts them (rounded as the column was)."""
    return round(seconds * 1e6)


# ---------------------------------------------------------------- what the API sees


class SequenceRanges:
    """Stream sequences already committed, as sorted disjoint ranges: a lookup is a bisection,
    and a consumer that goes through the stream in order keeps a handful of ranges."""

    def __init__(self) -> None:
        self._firsts: list[int] = []
        self._lasts: list[int] = []

    def __contains__(self, sequence: int) -> bool:
        index = bisect.bisect_right(self._firsts, sequence) - 1
        return index >= 0 and sequence <= self._lasts[index]

    def __len__(self) -> int:
        return len(self._firsts)

    def add(self, sequences: Iterable[int]) -> None:
        for first, last in sequence_ranges(sequences):
            self.add_range(first, last)

    def add_range(self, first: int, last: int) -> None:
        index = bisect.bisect_left(self._lasts, first - 1)  # the first range that could touch it
        stop = index
        while stop < len(self._firsts) and self._firsts[stop] <= last + 1:
            first, last = min(first, self._firsts[stop]), max(last, self._lasts[stop])
            stop += 1
        self._firsts[index:stop] = [first]
        self._lasts[index:stop] = [last]


@dataclass
class IngestCounters:
    """What the consumer did since this process started."""

    rows_written: int = 0
    files_written: int = 0
    messages_consumed: int = 0
    duplicates_skipped: int = 0
    malformed_messages: int = 0
    malformed_records: int = 0
    pending_rows: int = 0
    last_flush_at: float | None = None


@dataclass(frozen=True)
class Window:
    """Which captured rows a query or export reads: start <= time < end (None: unbounded)."""

    endpoint: str
    deployment: str = ""
    start: float | None = None
    end: float | None = None
    columns: tuple[str, ...] = ()
    include_labels: bool = False


@dataclass(frozen=True)
class LabelInput:
    request_id: str
    row: int
    text: str | None = None
    number: float | None = None


@dataclass
class RetentionView:
    endpoint: str
    max_age_seconds: float
    """0: no age limit."""
    max_bytes: int
    """0: no size limit."""
    max_age_is_default: bool
    max_bytes_is_default: bool


@dataclass
class PartStats:
    deployment: str
    model_version: str
    rows: int
    bytes: int
    files: int
    first_time: float
    last_time: float


@dataclass
class StatsView:
    endpoint: str
    total: PartStats
    partitions: list[PartStats]
    labels: int
    retention: RetentionView


@dataclass
class ExportView:
    dataset_ref: str
    dataset: str
    version: int
    rows: int
    bytes: int


@dataclass
class RetentionSweep:
    files: int = 0
    rows: int = 0
    bytes: int = 0
    labels: int = 0


@dataclass
class CaptureQuery:
    """A planned query: its schema, and its record batches, read file by file when iterated."""

    schema: pa.Schema
    batches: Iterator[pa.RecordBatch]


@dataclass
class _Plan:
    window: Window
    schema: pa.Schema
    files: list[Any]
    numeric_labels: bool
    read_columns: list[str] = field(default_factory=list)


# ---------------------------------------------------------------- the store


class Collector:
    """Captured rows on disk and in the database, and everything the API does with them."""

    def __init__(
        self,
        database: Database,
        data_dir: Path,
        registry: Registry | None = None,
        *,
        default_max_age_seconds: float = 30 * 86_400,
        default_max_bytes: int = 10 * 1024**3,
        max_labels_per_call: int = 100_000,
        max_export_bytes: int = 2 * 1024**3,
        query_batch_rows: int = 65_536,
        max_batch_bytes: int = 4 * 1024**2,
    ) -> None:
        self.database = database
        self.data_dir = data_dir
        self.registry = registry
        self.default_max_age_seconds = default_max_age_seconds
        self.default_max_bytes = default_max_bytes
        self.max_labels_per_call = max_labels_per_call
        self.max_export_bytes = max_export_bytes
        self.query_batch_rows = query_batch_rows
        self.max_batch_bytes = max_batch_bytes
        # Flushes create folders and retention removes empty ones: one at a time.
        self._files_lock = _FolderLock()

    # ------------------------------------------------------------ start

    def open_store(self) -> None:
        """Check that the data folder belongs to this database, then make them agree: files no
        commit recorded (and temporary files) go; rows whose file vanished go, with a warning."""
        self.data_dir.mkdir(parents=True, exist_ok=True)
        self._claim_folder()
        shutil.rmtree(self.data_dir / EXPORTS, ignore_errors=True)
        with self.database.session() as session:
            known = {path: file_id for file_id, path in session.exec(select(CaptureFileRow.id, CaptureFileRow.path))}
        on_disk = set()
        for path in self.data_dir.rglob("*"):
            if not path.is_file():
                continue
            if path.name.startswith(".part-") and path.name.endswith(".tmp"):
                path.unlink()
                continue
            if path.suffix != ".parquet":
                continue
            relative = path.relative_to(self.data_dir).as_posix()
            if relative in known:
                on_disk.add(relative)
            else:
                log.warning("deleting %s: written by a flush that did not commit", relative)
                path.unlink()
        missing = [file_id for path, file_id in known.items() if path not in on_disk]
        if missing:
            log.warning("%d recorded capture files are gone from %s; forgetting them", len(missing), self.data_dir)
            with self.database.transaction() as session:
                for chunk in _chunks(missing):
                    session.execute(delete(CaptureFileRow).where(col(CaptureFileRow.id).in_(chunk)))
        self._prune_empty_folders()
        _warm_up_parquet()

    def _claim_folder(self) -> None:
        """The data folder and the database name the same store id, or the service refuses to
        start: cleaning up a folder against another store's database would delete its files."""
        marker = self.data_dir / STORE_MARKER
        on_disk = marker.read_text().strip() if marker.is_file() else ""
        holds_files = next(self.data_dir.rglob("*.parquet"), None) is not None
        with self.database.transaction() as session:
            row = session.get(StoreRow, "store_id")
            recorded = row.value if row else ""
            if (recorded or on_disk) and recorded != on_disk and (holds_files or (recorded and on_disk)):
                raise FailedPrecondition(
                    f"the data folder {self.data_dir} holds captures of another collector database (store "
                    f"{on_disk or 'unmarked'}, this database's store {recorded or 'new'}): point "
                    "MLMESH_COLLECTOR_DATABASE_URL and MLMESH_COLLECTOR_DATA_DIR at the pair that belong together"
                )
            store_id = recorded or on_disk or uuid.uuid4().hex
            if not recorded:
                session.add(StoreRow(key="store_id", value=store_id))
        if on_disk != store_id:
            temporary = marker.with_suffix(".tmp")
            temporary.write_text(store_id + "\n")
            os.replace(temporary, marker)

    def recorded_sequences(self, stream_epoch: str) -> SequenceRanges:
        """Sequences of the capture stream `stream_epoch` whose rows are committed."""
        ranges = SequenceRanges()
        with self.database.reader() as connection:
            rows = connection.execute(
                select(CaptureFileRow.sequences).where(CaptureFileRow.stream_epoch == stream_epoch)
            )
            for (text,) in rows:
                for first, last in json.loads(text):
                    ranges.add_range(first, last)
        return ranges

    # ------------------------------------------------------------ flush

    def flush(self, buffer: CaptureBuffer, stream_epoch: str) -> list[CaptureFileRow]:
        """Write the buffer's rows as Parquet files and record them with their stream sequences
        in one transaction. On failure nothing is recorded and the files written are removed."""
        tables = buffer.tables()
        written: list[Path] = []
        records: list[CaptureFileRow] = []
        now = time.time()
        with self._files_lock.shared():
            try:
                for captured in tables:
                    record = self._write_file(captured, stream_epoch, now)
                    written.append(self.data_dir / record.path)
                    records.append(record)
                with self.database.transaction() as session:
                    session.add_all(records)
            except BaseException:
                self._discard_unrecorded(written, [record.id for record in records])
                raise
        return records

    def _write_file(self, captured: CapturedTable, stream_epoch: str, now: float) -> CaptureFileRow:
        key = captured.partition
        folder = partition_folder(key.endpoint, key.deployment, key.model_version, key.hour)
        file_id = uuid.uuid4().hex
        relative = f"{folder}/part-{file_id}.parquet"
        target = self.data_dir / relative
        _make_folders(target.parent, self.data_dir)
        # Hidden while incomplete: readers of the tree (pyarrow.dataset) skip names starting with '.'.
        temporary = target.with_name(f".part-{file_id}.tmp")
        pq.write_table(captured.table, temporary, **parquet_options(captured.table.schema))
        _fsync(temporary)
        os.replace(temporary, target)
        _fsync(target.parent)
        return CaptureFileRow(
            id=file_id,
            endpoint=key.endpoint,
            deployment=key.deployment,
            model_version=key.model_version,
            hour=key.hour,
            path=relative,
            rows=captured.table.num_rows,
            bytes=target.stat().st_size,
            first_time=captured.first_time,
            last_time=captured.last_time,
            arrow_schema=captured.table.schema.serialize().to_pybytes(),
            stream_epoch=stream_epoch,
            sequences=json.dumps(sequence_ranges(captured.sequences), separators=(",", ":")),
            created_at=now,
        )

    def _discard_unrecorded(self, written: list[Path], ids: list[str]) -> None:
        """Remove a failed flush's files, unless its commit did land after all (the error came
        later): then they are recorded and must stay. When that cannot be told, they stay, and
        the next start deletes whichever are not recorded."""
        try:
            with self.database.session() as session:
                if ids and session.exec(select(CaptureFileRow.id).where(col(CaptureFileRow.id).in_(ids))).first():
                    return
        except Exception:
            return
        for path in written:
            path.unlink(missing_ok=True)

    # ------------------------------------------------------------ retention

    def retention(self, endpoint: str) -> RetentionView:
        check_endpoint(endpoint)
        with self.database.session() as session:
            return self._retention_view(endpoint, session.get(RetentionRow, endpoint))

    def set_retention(
        self, endpoint: str, max_age_seconds: float | None, max_bytes: int | None, use_defaults: bool = False
    ) -> RetentionView:
        """Change the endpoint's limits: None leaves one as it is (after `use_defaults` forgot
        both), 0 removes it."""
        check_endpoint(endpoint)
        if max_age_seconds is not None and not (
            math.isfinite(max_age_seconds) and 0 <= max_age_seconds <= MAX_AGE_SECONDS
        ):
            raise InvalidArgument(
                f"max_age_seconds must be between 0 (no limit) and {MAX_AGE_SECONDS} (100 years), "
                f"not {max_age_seconds}",
                field="max_age_seconds",
            )
        if max_bytes is not None and not 0 <= max_bytes <= MAX_BYTES:
            raise InvalidArgument(
                f"max_bytes must be between 0 (no limit) and {MAX_BYTES}, not {max_bytes}", field="max_bytes"
            )
        with self.database.transaction() as session:
            row = session.get(RetentionRow, endpoint) or RetentionRow(endpoint=endpoint, updated_at=0)
            if use_defaults:
                row.max_age_seconds = row.max_bytes = None
            if max_age_seconds is not None:
                row.max_age_seconds = max_age_seconds
            if max_bytes is not None:
                row.max_bytes = max_bytes
            row.updated_at = time.time()
            if row.max_age_seconds is None and row.max_bytes is None:
                session.execute(delete(RetentionRow).where(col(RetentionRow.endpoint) == endpoint))
                return self._retention_view(endpoint, None)
            session.merge(row)
        return self._retention_view(endpoint, row)

    def _retention_view(self, endpoint: str, row: RetentionRow | None) -> RetentionView:
        age = row.max_age_seconds if row else None
        size = row.max_bytes if row else None
        return RetentionView(
            endpoint=endpoint,
            max_age_seconds=self.default_max_age_seconds if age is None else age,
            max_bytes=self.default_max_bytes if size is None else size,
            max_age_is_default=age is None,
            max_bytes_is_default=size is None,
        )

    def enforce_retention(self, now: float | None = None) -> RetentionSweep:
        """Delete, per endpoint, whole files oldest first: those whose last row is older than the
        age limit, then more while the endpoint's files exceed the size limit; labels ingested
        before the age limit go too. Each file's row goes before the file itself."""
        now = time.time() if now is None else now
        sweep = RetentionSweep()
        with self.database.session() as session:
            endpoints = set(session.exec(select(CaptureFileRow.endpoint).distinct()))
            endpoints |= set(session.exec(select(LabelRow.endpoint).distinct()))
            policies = {row.endpoint: row for row in session.exec(select(RetentionRow))}
        for endpoint in sorted(endpoints):
            policy = self._retention_view(endpoint, policies.get(endpoint))
            doomed = self._files_beyond(endpoint, policy, now)
            if doomed:
                self._delete_files(doomed, sweep)
            if policy.max_age_seconds:
                with self.database.transaction() as session:
                    removed = session.execute(
                        delete(LabelRow).where(
                            col(LabelRow.endpoint) == endpoint,
                            col(LabelRow.ingested_at) < now - policy.max_age_seconds,
                        )
                    )
                    sweep.labels += removed.rowcount or 0
        if sweep.files or sweep.labels:
            log.info(
                "retention deleted %d files (%d rows, %d bytes) and %d labels",
                sweep.files,
                sweep.rows,
                sweep.bytes,
                sweep.labels,
            )
        return sweep

    def _files_beyond(self, endpoint: str, policy: RetentionView, now: float) -> list[Any]:
        with self.database.session() as session:
            files = list(
                session.exec(
                    select(
                        CaptureFileRow.id,
                        CaptureFileRow.path,
                        CaptureFileRow.rows,
                        CaptureFileRow.bytes,
                        CaptureFileRow.last_time,
                    )
                    .where(CaptureFileRow.endpoint == endpoint)
                    .order_by(col(CaptureFileRow.last_time), col(CaptureFileRow.first_time))
                )
            )
        doomed = []
        kept_bytes = sum(file.bytes for file in files)
        for file in files:  # oldest first
            too_old = policy.max_age_seconds and file.last_time < now - policy.max_age_seconds
            too_big = policy.max_bytes and kept_bytes > policy.max_bytes
            if not (too_old or too_big):
                break
            doomed.append(file)
            kept_bytes -= file.bytes
        return doomed

    def _delete_files(self, files: list[Any], sweep: RetentionSweep) -> None:
        with self._files_lock.exclusive():
            with self.database.transaction() as session:
                for chunk in _chunks([file.id for file in files]):
                    session.execute(delete(CaptureFileRow).where(col(CaptureFileRow.id).in_(chunk)))
            for file in files:
                (self.data_dir / file.path).unlink(missing_ok=True)
                sweep.files += 1
                sweep.rows += file.rows
                sweep.bytes += file.bytes
            self._prune_empty_folders()

    def _prune_empty_folders(self) -> None:
        for folder, _, _ in sorted(os.walk(self.data_dir), key=lambda entry: -len(entry[0])):
            if Path(folder) != self.data_dir:
                with contextlib.suppress(OSError):  # not empty
                    os.rmdir(folder)

    # ------------------------------------------------------------ reading

    def query(self, window: Window) -> CaptureQuery:
        """The window's rows as record batches of one schema, read file by file (and batch by
        batch within a file) as they are iterated, each below `max_batch_bytes` or so."""
        plan = self._plan(window)
        return CaptureQuery(plan.schema, self._batches(plan))

    def _plan(self, window: Window) -> _Plan:
        check_endpoint(window.endpoint)
        if window.deployment:
            check_endpoint(window.deployment, "deployment")
        for name, value in (("start_time", window.start), ("end_time", window.end)):
            if value is not None and not math.isfinite(value):
                raise InvalidArgument(f"{name} is not a time", field=name)
        if window.start is not None and window.end is not None and window.start >= window.end:
            raise InvalidArgument(
                f"start_time ({_iso(window.start)}) must be before end_time ({_iso(window.end)})", field="start_time"
            )
        scope = [col(CaptureFileRow.endpoint) == window.endpoint]
        if window.deployment:
            scope.append(col(CaptureFileRow.deployment) == window.deployment)
        with self.database.session() as session:
            schemas = [
                pa.ipc.read_schema(pa.py_buffer(blob))
                for blob, _ in session.exec(
                    select(CaptureFileRow.arrow_schema, func.min(CaptureFileRow.first_time))
                    .where(*scope)
                    .group_by(CaptureFileRow.arrow_schema)
                    .order_by(func.min(CaptureFileRow.first_time))
                )
            ]
            if not schemas:
                raise self._nothing_captured(session, window)
            in_window = list(scope)
            if window.start is not None:
                in_window.append(col(CaptureFileRow.last_time) >= window.start)
            if window.end is not None:
                in_window.append(col(CaptureFileRow.first_time) < window.end)
            files = list(
                session.exec(
                    select(
                        CaptureFileRow.id,
                        CaptureFileRow.path,
                        CaptureFileRow.deployment,
                        CaptureFileRow.model_version,
                        CaptureFileRow.first_time,
                        CaptureFileRow.last_time,
                    )
                    .where(*in_window)
                    .order_by(col(CaptureFileRow.first_time), col(CaptureFileRow.id))
                )
            )
            numeric_labels = window.include_labels and (
                session.exec(
                    select(LabelRow.row).where(LabelRow.endpoint == window.endpoint, col(LabelRow.number).is_(None))
                ).first()
                is None
            )
        schema = self._output_schema(window, schemas, numeric_labels)
        plan = _Plan(window, schema, files, numeric_labels)
        wanted = set(schema.names)
        plan.read_columns = [name for name in schema.names if name not in (*ORIGIN_COLUMNS, "label")]
        for needed in ("time", *(("request_id", "row") if "label" in wanted else ())):
            if needed not in plan.read_columns:
                plan.read_columns.append(needed)
        return plan

    def _nothing_captured(self, session: Session, window: Window) -> NotFound:
        if window.deployment:
            deployments = select(CaptureFileRow.deployment).where(CaptureFileRow.endpoint == window.endpoint)
            others = sorted(session.exec(deployments.distinct()))
            if others:
                return NotFound(
                    f"endpoint {window.endpoint} has no captures of deployment {window.deployment}; it has "
                    f"captures of {', '.join(others)}",
                    field="deployment",
                )
        return NotFound(
            f"endpoint {window.endpoint} has no captures (none consumed yet, or retention deleted them)",
            field="endpoint",
        )

    def _output_schema(self, window: Window, schemas: list[pa.Schema], numeric_labels: bool) -> pa.Schema:
        try:
            unified = pa.unify_schemas(schemas, promote_options="permissive")
        except (pa.ArrowInvalid, pa.ArrowTypeError) as error:
            raise FailedPrecondition(
                f"the captures of {window.endpoint} disagree on a column's type ({error}); query one "
                "deployment at a time, or name the columns you need",
            ) from None
        fields = [unified.field(name) for name in FIXED_COLUMNS]
        fields += [pa.field(name, pa.string()) for name in ORIGIN_COLUMNS]
        fields += [item for item in unified if item.name not in FIXED_COLUMNS]
        if window.include_labels:
            fields.append(pa.field("label", pa.float64() if numeric_labels else pa.string()))
        schema = pa.schema(fields)
        if not window.columns:
            return schema
        if len(window.columns) > MAX_COLUMNS:
            raise InvalidArgument(f"at most {MAX_COLUMNS} columns may be named", field="columns")
        repeated = sorted({name for name in window.columns if window.columns.count(name) > 1})
        if repeated:
            raise InvalidArgument(f"columns named twice: {_names(repeated)}", field="columns")
        if "label" in window.columns and not window.include_labels:
            raise InvalidArgument("the label column comes with include_labels (--labels)", field="columns")
        unknown = [name for name in window.columns if schema.get_field_index(name) < 0]
        if unknown:
            raise InvalidArgument(
                f"unknown column(s) {_names(unknown)}; the captures of {window.endpoint} have {_names(schema.names)}",
                field="columns",
            )
        # Asking for labels adds them, whether or not the columns name them.
        names = [*window.columns, *(("label",) if window.include_labels and "label" not in window.columns else ())]
        return pa.schema([schema.field(name) for name in names])

    def _batches(self, plan: _Plan) -> Iterator[pa.RecordBatch]:
        window = plan.window
        start = None if window.start is None else microseconds(window.start)
        end = None if window.end is None else microseconds(window.end)
        for file in plan.files:
            try:
                parquet = pq.ParquetFile(self.data_dir / file.path)
            except FileNotFoundError:
                continue  # retention deleted it after the query was planned
            present = set(parquet.schema_arrow.names)
            whole = (start is None or microseconds(file.first_time) >= start) and (
                end is None or microseconds(file.last_time) < end
            )
            columns = [name for name in plan.read_columns if name in present]
            with parquet:
                for batch in parquet.iter_batches(batch_size=self.query_batch_rows, columns=columns):
                    if not whole:
                        batch = batch.filter(_in_window(batch.column("time"), start, end))
                    if batch.num_rows:
                        yield from self._slices(self._conform(batch, file, plan))

    def _slices(self, batch: pa.RecordBatch) -> Iterator[pa.RecordBatch]:
        """`batch` cut so that each piece stays near `max_batch_bytes` (one gRPC message)."""
        rows = max(1, self.max_batch_bytes * batch.num_rows // max(1, batch.nbytes))
        for start in range(0, batch.num_rows, rows):
            yield batch.slice(start, rows)

    def _conform(self, batch: pa.RecordBatch, file: Any, plan: _Plan) -> pa.RecordBatch:
        """A file's batch in the query's schema: partition columns added, missing columns null,
        types cast where the files disagree, labels joined."""
        rows = batch.num_rows
        arrays = []
        for item in plan.schema:
            if item.name in ORIGIN_COLUMNS:
                arrays.append(_repeated(getattr(file, item.name), rows))
            elif item.name == "label":
                arrays.append(self._labels(plan, batch.column("request_id"), batch.column("row"), item.type))
            elif batch.schema.get_field_index(item.name) >= 0:
                column = batch.column(item.name)
                arrays.append(column if column.type == item.type else column.cast(item.type))
            else:
                arrays.append(pa.nulls(rows, item.type))
        return pa.RecordBatch.from_arrays(arrays, schema=plan.schema)

    def _labels(self, plan: _Plan, request_ids: pa.Array, rows: pa.Array, label_type: pa.DataType) -> pa.Array:
        """The label of each (request_id, row), null where none was ingested."""
        found: dict[str, Any] = {}
        with self.database.reader() as connection:
            for chunk in _chunks(pc.unique(request_ids).to_pylist()):
                labels = connection.execute(
                    select(LabelRow.request_id, LabelRow.row, LabelRow.text, LabelRow.number).where(
                        LabelRow.endpoint == plan.window.endpoint, col(LabelRow.request_id).in_(chunk)
                    )
                )
                for request_id, row, text, number in labels:
                    found[f"{request_id}\x1f{row}"] = number if plan.numeric_labels else text
        if not found:
            return pa.nulls(len(request_ids), label_type)
        # A row's key ends with its number, which holds no separator: keys cannot collide.
        keys = pc.binary_join_element_wise(request_ids, pc.cast(rows, pa.string()), "\x1f")
        positions = pc.index_in(keys, value_set=pa.array(list(found), pa.string()))
        return pa.array(list(found.values()), label_type).take(positions)

    def export(self, window: Window, dataset: str, description: str = "") -> ExportView:
        """Write the window as one Parquet file and register it as the dataset's next version."""
        if not isinstance(dataset, str) or not REGISTERED_NAME.fullmatch(dataset):
            raise InvalidArgument(
                f"dataset {dataset[:80]!r} is not a valid name: 1-128 letters, digits, '.', '_' and '-', "
                "starting with a letter or digit",
                field="dataset",
            )
        if self.registry is None:
            raise FailedPrecondition("exports need the registry: set MLMESH_COLLECTOR_REGISTRY_ADDRESS")
        plan = self._plan(window)
        folder = self.data_dir / EXPORTS / uuid.uuid4().hex
        folder.mkdir(parents=True)
        path = folder / f"{dataset}.parquet"
        rows = 0
        try:
            with pq.ParquetWriter(path, plan.schema, **parquet_options(plan.schema)) as writer:
                for batch in self._batches(plan):
                    writer.write_batch(batch)
                    rows += batch.num_rows
                    if path.stat().st_size > self.max_export_bytes:
                        raise self._export_too_large()
            if not rows:
                raise FailedPrecondition(
                    f"no captured rows of {window.endpoint} between {_iso(window.start)} and {_iso(window.end)}; "
                    "nothing to export",
                    field="start_time",
                )
            size = path.stat().st_size
            if size > self.max_export_bytes:
                raise self._export_too_large()
            tags = {
                "source": "mlmesh-collector",
                "endpoint": window.endpoint,
                "deployment": window.deployment or "*",
                "start": _iso(window.start),
                "end": _iso(window.end),
            }
            registered = self.registry.register_dataset(
                dataset,
                path,
                format="parquet",
                description=description
                or f"captures of {window.endpoint} from {_iso(window.start)} to {_iso(window.end)}",
                tags=tags,
            )
        finally:
            shutil.rmtree(folder, ignore_errors=True)
        return ExportView(
            dataset_ref=f"{registered.name}:{registered.version}",
            dataset=registered.name,
            version=registered.version,
            rows=rows,
            bytes=size,
        )

    def _export_too_large(self) -> ResourceExhausted:
        return ResourceExhausted(
            f"the export would exceed {self.max_export_bytes} bytes (MLMESH_COLLECTOR_MAX_EXPORT_BYTES); "
            "export a shorter window or fewer columns",
            field="end_time",
        )

    # ------------------------------------------------------------ labels and statistics

    def ingest_labels(self, endpoint: str, labels: Sequence[LabelInput]) -> tuple[int, int]:
        """Store ground truth; a row labelled again is replaced. Returns (stored, replaced)."""
        check_endpoint(endpoint)
        if not labels:
            raise InvalidArgument("no labels given", field="labels")
        if len(labels) > self.max_labels_per_call:
            raise InvalidArgument(
                f"{len(labels)} labels in one call; at most {self.max_labels_per_call} "
                "(MLMESH_COLLECTOR_MAX_LABELS_PER_CALL): send them in several calls",
                field="labels",
            )
        now = time.time()
        by_key: dict[tuple[str, int], dict[str, Any]] = {}
        for index, label in enumerate(labels):
            by_key[(label.request_id, label.row)] = _label_values(index, endpoint, label, now)
        with self.database.transaction() as session:
            replaced = 0
            ids = sorted({request_id for request_id, _ in by_key})
            for chunk in _chunks(ids):
                existing = session.exec(
                    select(LabelRow.request_id, LabelRow.row).where(
                        LabelRow.endpoint == endpoint, col(LabelRow.request_id).in_(chunk)
                    )
                )
                replaced += sum(1 for request_id, row in existing if (request_id, row) in by_key)
            statement = self.database.insert(LabelRow)
            statement = statement.on_conflict_do_update(
                index_elements=["endpoint", "request_id", "row"],
                set_={
                    "text": statement.excluded.text,
                    "number": statement.excluded.number,
                    "ingested_at": statement.excluded.ingested_at,
                },
            )
            for chunk in _chunks(list(by_key.values())):
                session.execute(statement, chunk)
        return len(by_key), replaced

    def stats(self, endpoint: str) -> StatsView:
        check_endpoint(endpoint)
        with self.database.session() as session:
            partitions = [
                PartStats(deployment, model_version, int(rows), int(size), int(files), first, last)
                for deployment, model_version, rows, size, files, first, last in session.exec(
                    select(
                        CaptureFileRow.deployment,
                        CaptureFileRow.model_version,
                        func.sum(CaptureFileRow.rows),
                        func.sum(CaptureFileRow.bytes),
                        func.count(),
                        func.min(CaptureFileRow.first_time),
                        func.max(CaptureFileRow.last_time),
                    )
                    .where(CaptureFileRow.endpoint == endpoint)
                    .group_by(CaptureFileRow.deployment, CaptureFileRow.model_version)
                    .order_by(CaptureFileRow.deployment, CaptureFileRow.model_version)
                )
            ]
            if not partitions:
                raise NotFound(
                    f"endpoint {endpoint} has no captures (none consumed yet, or retention deleted them)",
                    field="endpoint",
                )
            labels = session.exec(select(func.count()).select_from(LabelRow).where(LabelRow.endpoint == endpoint)).one()
            retention = self._retention_view(endpoint, session.get(RetentionRow, endpoint))
        total = PartStats(
            "",
            "",
            sum(part.rows for part in partitions),
            sum(part.bytes for part in partitions),
            sum(part.files for part in partitions),
            min(part.first_time for part in partitions),
            max(part.last_time for part in partitions),
        )
        return StatsView(endpoint, total, partitions, int(labels), retention)


# ---------------------------------------------------------------- helpers


def _label_values(index: int, endpoint: str, label: LabelInput, now: float) -> dict[str, Any]:
    """A label checked and made into a row of the labels table."""
    where = f"labels[{index}]"
    if not isinstance(label.request_id, str) or not 0 < len(label.request_id) <= MAX_REQUEST_ID_CHARS:
        raise InvalidArgument(f"{where}: request_id must have 1-{MAX_REQUEST_ID_CHARS} characters", field="labels")
    if not 0 <= label.row <= MAX_ROW:
        raise InvalidArgument(f"{where}: row must be between 0 and {MAX_ROW}, not {label.row}", field="labels")
    if label.number is not None:
        value = float(label.number)
        if not math.isfinite(value):
            raise InvalidArgument(f"{where}: the label {label.number} is not a finite number", field="labels")
        text = str(int(value)) if value.is_integer() and abs(value) < 1e15 else repr(value)
        number: float | None = value
    elif label.text is not None:
        if not 0 < len(label.text) <= MAX_LABEL_CHARS:
            raise InvalidArgument(f"{where}: a text label must have 1-{MAX_LABEL_CHARS} characters", field="labels")
        text, number = label.text, None
    else:
        raise InvalidArgument(f"{where}: the label has no value (text or number)", field="labels")
    return {
        "endpoint": endpoint,
        "request_id": label.request_id,
        "row": label.row,
        "text": text,
        "number": number,
        "ingested_at": now,
    }


def _in_window(times: pa.Array, start: int | None, end: int | None) -> pa.Array:
    checks = []
    if start is not None:
        checks.append(pc.greater_equal(times, pa.scalar(start, TIME_TYPE)))
    if end is not None:
        checks.append(pc.less(times, pa.scalar(end, TIME_TYPE)))
    return checks[0] if len(checks) == 1 else pc.and_(*checks)


def _repeated(value: str, rows: int) -> pa.Array:
    return pa.array([value], pa.string()).take(pa.array(np.zeros(rows, np.int32)))


def _chunks(values: list[Any], size: int = SQL_CHUNK) -> Iterator[list[Any]]:
    for start in range(0, len(values), size):
        yield values[start : start + size]


def _names(names: Sequence[str], limit: int = 20) -> str:
    shown = ", ".join(repr(name[:100]) for name in names[:limit])
    return shown + (f" and {len(names) - limit} more" if len(names) > limit else "")


def _iso(seconds: float | None) -> str:
    if seconds is None:
        return "unbounded"
    return time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(seconds)) + f".{int(seconds % 1 * 1e6):06d}Z"


def _fsync(path: Path) -> None:
    descriptor = os.open(path, os.O_RDONLY)
    try:
        os.fsync(descriptor)
    finally:
        os.close(descriptor)


def _make_folders(folder: Path, root: Path) -> None:
    """Create `folder` below `root`, making each new folder's entry durable in its parent."""
    missing = []
    while folder != root and not folder.is_dir():
        missing.append(folder)
        folder = folder.parent
    for new in reversed(missing):
        with contextlib.suppress(FileExistsError):
            new.mkdir()
        _fsync(new.parent)

"""One database per service: SQLite (WAL) by default, PostgreSQL by URL, the same code for both."""

from __future__ import annotations

import asyncio
import contextvars
import fcntl
import functools
import logging
import sqlite3
import threading
import weakref
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager, nullcontext
from pathlib import Path
from typing import Any, TypeVar

from sqlalchemy import Float, LargeBinary, Table, any_, bindparam, event, text
from sqlalchemy.dialects.postgresql import ARRAY
from sqlalchemy.dialects.postgresql import insert as postgresql_insert
from sqlalchemy.dialects.sqlite import insert as sqlite_insert
from sqlalchemy.engine import Connection, Engine, make_url
from sqlalchemy.exc import DBAPIError, OperationalError
from sqlmodel import Session, SQLModel, col, create_engine

from services.common.errors import Unavailable

SQLITE_BUSY_TIMEOUT_MS = 30_000
CHECKPOINT_SECONDS = 1.0
WAL_RESTART_BYTES = 64 * 1024 * 1024
CHANGES_CHANNEL = "mlmesh_changes"
"""The PostgreSQL notification channel on which a watched table's changes are announced."""
LISTEN_RETRY_SECONDS = 1.0
log = logging.getLogger(__name__)
T = TypeVar("T")


def in_list(column: Any, parameter: str, element: Any, *, postgresql: bool) -> Any:
    """`column` is one of the values of the list bound to `parameter` (of `element` type). On
    PostgreSQL as `= ANY` of one array parameter: one parameter whatever the list's length, so the
    statement stays the same from call to call; elsewhere as an IN list, expanded per call."""
    if postgresql:
        return column == any_(bindparam(parameter, type_=ARRAY(element)))
    return col(column).in_(bindparam(parameter, expanding=True))


_DIRECT: weakref.WeakKeyDictionary[Any, dict[tuple[str, tuple[str, ...]], tuple[Any, dict[str, Any]]]] = (
    weakref.WeakKeyDictionary()
)
"""Per statement, per dialect and set of keys: its compiled form and the defaults of the columns left out."""


def _compiled_for_direct(statement: Any, dialect: Any, keys: tuple[str, ...]) -> tuple[Any, dict[str, Any]]:
    compiled = statement.compile(dialect=dialect, column_keys=list(keys))
    converted = [  # the processors of these two only wrap what the drivers take as it is: floats, bytes
        bind.key
        for bind in compiled.binds.values()
        if not isinstance(bind.type, Float | LargeBinary)
        and bind.type.dialect_impl(dialect).bind_processor(dialect) is not None
    ]
    if converted:
        raise ValueError(f"execute_direct cannot convert the values of {converted}; use session.execute")
    defaults = {}  # columns left out that have a default: SQLAlchemy would compute those per call
    for column in [*compiled.insert_prefetch, *compiled.update_prefetch]:
        if column.default is None or not column.default.is_scalar:
            raise ValueError(f"execute_direct cannot compute {column.name}'s default; give it a value")
        defaults[column.key] = column.default.arg
    return compiled, defaults


def execute_direct(session: Session, statement: Any, parameters: dict[str, Any] | list[dict[str, Any]]) -> Any:
    """Run a Core statement in `session`'s transaction on the DB-API cursor itself and return
    that cursor, for the few statements every write repeats (a registration's inserts, the
    outbox row). SQLAlchemy's execution machinery (result objects, events, per-call checks)
    costs about as much as the driver's own work on such a statement; this skips it. The
    statement is compiled once per set of keys; its values must need no conversion (numbers,
    text, bytes), which is checked then. Several dicts run as one executemany. Driver errors
    come out as SQLAlchemy's (IntegrityError, OperationalError), as from `session.execute`."""
    rows = parameters if isinstance(parameters, list) else [parameters]
    connection = session.connection()
    dialect = connection.dialect
    keys = tuple(rows[0])
    forms = _DIRECT.setdefault(statement, {})
    known = forms.get((dialect.name, keys))
    if known is None:
        known = forms[(dialect.name, keys)] = _compiled_for_direct(statement, dialect, keys)
    compiled, defaults = known
    bound: list[Any] = [
        compiled.construct_params({**defaults, **row} if defaults else row, _check=False) for row in rows
    ]
    if compiled.positiontup is not None:  # SQLite's "?" placeholders
        bound = [tuple(values[name] for name in compiled.positiontup) for values in bound]
    cursor = connection.connection.driver_connection.cursor()  # type: ignore[union-attr]
    try:
        if len(bound) == 1:
            cursor.execute(compiled.string, bound[0])
        else:
            cursor.executemany(compiled.string, bound)
    except dialect.loaded_dbapi.Error as error:
        raise DBAPIError.instance(compiled.string, bound, error, dialect.loaded_dbapi.Error) from error
    return cursor


class Database:
    """Engine and sessions of one service's database.

    `transaction()` is for writes: on SQLite it takes the write lock up front (BEGIN IMMEDIATE)
    so that read-then-write sequences such as "next version number" cannot interleave; on
    PostgreSQL callers lock the rows they read with `SELECT ... FOR UPDATE`.
    """

    def __init__(self, url: str, tables: Sequence[type[SQLModel]], *, pool_size: int = 8) -> None:
        parsed = make_url(url)
        self.is_sqlite = parsed.get_backend_name() == "sqlite"
        on_file = self.is_sqlite and bool(parsed.database) and parsed.database != ":memory:"
        if self.is_sqlite:
            if on_file:
                Path(str(parsed.database)).parent.mkdir(parents=True, exist_ok=True)
            self.engine = create_engine(
                url, connect_args={"check_same_thread": False, "timeout": 30}, pool_size=pool_size
            )
            _configure_sqlite(self.engine)
        else:
            # No ping before each use (a round trip per call): after the server restarts, the
            # first call on each old connection answers UNAVAILABLE and the pool starts afresh.
            self.engine = create_engine(url, pool_size=pool_size, max_overflow=pool_size)
        self._write_engine = self.engine.execution_options(sqlite_begin="BEGIN IMMEDIATE")
        # Reads skip BEGIN: each statement reads the latest commit on its own (as it would in a
        # READ COMMITTED transaction), two round trips fewer per read on PostgreSQL (BEGIN and the
        # ROLLBACK that ends it, which also makes psycopg forget the statements it has prepared).
        self._read_engine = self.engine.execution_options(
            **({"sqlite_begin": None} if self.is_sqlite else {"isolation_level": "AUTOCOMMIT"})
        )
        # SQLite has one writer at a time, and a writer that finds the lock taken sleeps in
        # growing steps (1, 2, 5, 10 ms...): writers queue on a lock instead, woken at once, the
        # threads of this process and (for a file) every process using the same file.
        # PostgreSQL writers run side by side.
        self._writer_turn: _WriterTurn | None = None
        self._stopped = threading.Event()
        self._page_bytes = 0  # SQLite's page size, asked once
        if self.is_sqlite:
            self._writer_turn = _WriterTurn(Path(f"{parsed.database}.writer") if on_file else None)
            if on_file:
                threading.Thread(
                    target=self._checkpoint_until_disposed,
                    name="sqlite-checkpoint",
                    daemon=True,
                ).start()
        self.tables: list[Table] = [model.__table__ for model in tables]  # type: ignore[attr-defined]
        self._threads = ThreadPoolExecutor(max_workers=2 if self.is_sqlite else pool_size, thread_name_prefix="db")
        self._changes: _Changes | None = None
        self._file = str(parsed.database) if on_file else None

    async def run(self, function: Callable[..., T], *args: Any, **kwargs: Any) -> T:
        """Run blocking work that uses this database on its own few threads, in the caller's
        context (trace). Few threads, because more only fight over the GIL: two on SQLite, whose
        writers take turns anyway, more on PostgreSQL, where they wait on the network."""
        call = functools.partial(contextvars.copy_context().run, function, *args, **kwargs)
        return await asyncio.get_running_loop().run_in_executor(self._threads, call)

    async def run_short(self, function: Callable[..., T], *args: Any, **kwargs: Any) -> T:
        """Run a short database call (a read, a small transaction). On SQLite inline: it takes a
        fraction of a millisecond, never waits on a network, and commits without an fsync (the
        WAL is checkpointed in the background), so this is cheaper than a hop to a thread."""
        if self.is_sqlite:
            return function(*args, **kwargs)
        return await self.run(function, *args, **kwargs)

    async def run_then_short(self, slow: Callable[[], Any], short: Callable[[], T]) -> T:
        """Blocking work (`slow`: the disk, parsing) and then a short transaction that depends on
        it, as `run` and `run_short` would run them, but on PostgreSQL in one hop to a thread, not
        two (measured: about 6% less CPU per model registration)."""
        if self.is_sqlite:
            await self.run(slow)
            return short()

        def both() -> T:
            slow()
            return short()

        return await self.run(both)

    def create_tables(self) -> None:
        """Create this service's tables (and append-only triggers) when missing."""
        SQLModel.metadata.create_all(self.engine, tables=self.tables)

    def session(self) -> Session:
        """A session for reading; use `transaction()` to change anything."""
        return Session(self.engine, expire_on_commit=False)

    @contextmanager
    def reader(self) -> Iterator[Connection]:
        """A plain connection for reads: lighter than a session, for the hot read paths."""
        try:
            with self._read_engine.connect() as connection:
                yield connection
        except OperationalError as error:
            raise Unavailable(f"the database did not answer: {error.orig}; try again") from error

    @contextmanager
    def transaction(self) -> Iterator[Session]:
        """A session whose work commits at the end of the block, or rolls back on error."""
        with self._writer_turn or nullcontext():
            session = Session(self._write_engine, expire_on_commit=False)
            try:
                yield session
                session.commit()
                if self._changes is not None:
                    self._changes.committed()
            except OperationalError as error:
                session.rollback()
                raise Unavailable(f"the database did not answer: {error.orig}") from error
            except BaseException:
                session.rollback()
                raise
            finally:
                session.close()

    def watch_changes(self, tables: Sequence[type[SQLModel]]) -> None:
        """Start following every commit to `tables`, by this process or any other, so that
        `generation()` can tell whether something read earlier may be out of date."""
        names = [model.__table__.name for model in tables]  # type: ignore[attr-defined]
        if self.is_sqlite:
            self._changes = _Changes(self._file)
            return
        with self.engine.begin() as connection:
            # Serialised: the workers of one service start side by side, and concurrent
            # CREATE OR REPLACE of one function fails in PostgreSQL.
            connection.execute(text("SELECT pg_advisory_xact_lock(hashtext(:key))"), {"key": CHANGES_CHANNEL})
            connection.execute(text(_NOTIFY_FUNCTION))
            for name in names:
                connection.execute(text(f"DROP TRIGGER IF EXISTS {name}_changes ON {name}"))
                connection.execute(
                    text(
                        f"CREATE TRIGGER {name}_changes AFTER INSERT OR UPDATE OR DELETE OR TRUNCATE ON {name} "
                        "FOR EACH STATEMENT EXECUTE FUNCTION mlmesh_notify_change()"
                    )
                )
        import psycopg  # only here: model images, which never reach PostgreSQL, leave it out

        arguments, keywords = self.engine.dialect.create_connect_args(self.engine.url)
        self._changes = _Changes(None)
        threading.Thread(
            target=self._changes.listen,
            args=(functools.partial(psycopg.connect, *arguments, autocommit=True, **keywords), self._stopped),
            name="db-changes",
            daemon=True,
        ).start()

    def generation(self) -> int | None:
        """A number that moves on whenever a watched table may have changed since it was last
        read: a commit by this process counts at once, on SQLite so does any other process's (the
        file's data version), on PostgreSQL another's counts when its notification arrives (a
        fraction of a millisecond later). None when changes are not known: not watched, or the
        PostgreSQL listener is not connected."""
        return self._changes.generation() if self._changes is not None else None

    def insert(self, model: type[SQLModel]) -> Any:
        """This database's own INSERT construct for `model`'s table (it has ON CONFLICT clauses),
        on the table itself so that running it skips the ORM's bulk-insert machinery."""
        table = model.__table__  # type: ignore[attr-defined]
        return sqlite_insert(table) if self.is_sqlite else postgresql_insert(table)

    def _checkpoint_until_disposed(self) -> None:
        """Copy the write-ahead log into the database file every second, off the callers'
        threads, so that commits never wait for it (each connection has autocheckpoint off)."""
        while not self._stopped.wait(CHECKPOINT_SECONDS):
            try:
                self.checkpoint()
            except Exception as error:  # the next round tries again
                log.warning("SQLite checkpoint failed: %s", error)

    def checkpoint(self) -> None:
        """One round of copying the write-ahead log into the database file. A PASSIVE checkpoint
        copies what no reader still needs and never waits; under steady writes it never catches
        up with the log's end, so the log never starts over and would grow without end. Once it
        holds WAL_RESTART_BYTES, writers wait (in their queue) for a RESTART checkpoint, which
        waits for readers of older snapshots and copies the rest. The passive round just before
        has copied all but the last moment's pages, so that wait is short; the next writer then
        writes the log from its start again (reusing the file: truncating it would take longer)."""
        if self._writer_turn is None:
            return
        self._page_bytes = self._page_bytes or int(self._pragma("page_size")[0])
        _, log_pages, _ = self._pragma("wal_checkpoint(PASSIVE)")
        if log_pages * self._page_bytes > WAL_RESTART_BYTES:
            with self._writer_turn.paused():
                self._pragma("wal_checkpoint(RESTART)")

    def _pragma(self, pragma: str) -> tuple[Any, ...]:
        """The first row of a PRAGMA; wal_checkpoint answers (busy, pages in the log, pages copied)."""
        connection = self.engine.raw_connection()
        try:
            return tuple(connection.driver_connection.execute(f"PRAGMA {pragma}").fetchone())  # type: ignore[union-attr]
        finally:
            connection.close()

    def dispose(self) -> None:
        self._stopped.set()
        if self._changes is not None:
            self._changes.close()
        self._threads.shutdown(wait=False)
        self.engine.dispose()


_NOTIFY_FUNCTION = f"""CREATE OR REPLACE FUNCTION mlmesh_notify_change() RETURNS trigger AS $$
    BEGIN PERFORM pg_notify('{CHANGES_CHANNEL}', ''); RETURN NULL; END; $$ LANGUAGE plpgsql"""


class _Changes:
    """The generation counter behind `Database.generation()`. On a SQLite file a connection of
    its own asks the file's data version, which moves with every commit of any other
    connection; on PostgreSQL `listen` counts the notifications of the watched tables' triggers."""

    def __init__(self, sqlite_file: str | None) -> None:
        self._lock = threading.Lock()
        self._count = 0
        self._connected = sqlite_file is not None
        self._sqlite = sqlite3.connect(sqlite_file, check_same_thread=False) if sqlite_file else None
        self._data_version: int | None = None

    def close(self) -> None:
        with self._lock:
            if self._sqlite is not None:
                self._sqlite.close()
                self._sqlite, self._connected = None, False

    def committed(self) -> None:
        with self._lock:
            self._count += 1

    def generation(self) -> int | None:
        with self._lock:
            if self._sqlite is not None:
                data_version = self._sqlite.execute("PRAGMA data_version").fetchone()[0]
                if data_version != self._data_version:
                    self._data_version = data_version
                    self._count += 1
            return self._count if self._connected else None

    def listen(self, connect: Callable[[], Any], stopped: threading.Event) -> None:
        """Count the change notifications until `stopped`, connecting again after a failure;
        while not connected the generation is unknown, so nothing read meanwhile is trusted."""
        import psycopg

        while not stopped.is_set():
            try:
                with connect() as connection:
                    connection.execute(f"LISTEN {CHANGES_CHANNEL}")
                    with self._lock:  # what changed before LISTEN took hold went unannounced
                        self._count += 1
                        self._connected = True
                    while not stopped.is_set():
                        for _ in connection.notifies(timeout=LISTEN_RETRY_SECONDS):
                            self.committed()
            except psycopg.Error as error:
                log.warning("not following database changes, trying again: %s", error)
            finally:
                with self._lock:
                    self._connected = False
            stopped.wait(LISTEN_RETRY_SECONDS)


class _WriterTurn:
    """One SQLite writer at a time: a thread lock, and an flock on `path` across processes.
    `paused()` lets one caller (the checkpoint) in ahead of every writer still to come."""

    def __init__(self, path: Path | None) -> None:
        self._lock = threading.Lock()
        self._open = threading.Event()
        self._open.set()
        self._file = open(path, "a+b") if path else None  # noqa: SIM115 (held for the database's life)

    def __enter__(self) -> None:
        self._open.wait()
        self._acquire()

    def __exit__(self, *_: Any) -> None:
        self._release()

    @contextmanager
    def paused(self) -> Iterator[None]:
        self._open.clear()
        try:
            self._acquire()
            try:
                yield
            finally:
                self._release()
        finally:
            self._open.set()

    def _acquire(self) -> None:
        self._lock.acquire()
        if self._file is not None:
            try:
                fcntl.flock(self._file, fcntl.LOCK_EX)
            except BaseException:
                self._lock.release()
                raise

    def _release(self) -> None:
        if self._file is not None:
            fcntl.flock(self._file, fcntl.LOCK_UN)
        self._lock.release()


def _configure_sqlite(engine: Engine) -> None:
    @event.listens_for(engine, "connect")
    def on_connect(connection: Any, _record: Any) -> None:
        # Let SQLAlchemy's "begin" event below issue BEGIN, so writers can ask for IMMEDIATE.
        connection.isolation_level = None
        cursor = connection.cursor()
        cursor.execute("PRAGMA journal_mode=WAL")
        cursor.execute("PRAGMA synchronous=NORMAL")
        cursor.execute("PRAGMA wal_autocheckpoint=0")  # see Database._checkpoint_until_disposed
        # When the log starts over, the file is cut back to this size (not to nothing: reused is faster).
        cursor.execute(f"PRAGMA journal_size_limit={WAL_RESTART_BYTES}")
        cursor.execute("PRAGMA foreign_keys=ON")
        cursor.execute(f"PRAGMA busy_timeout={SQLITE_BUSY_TIMEOUT_MS}")
        cursor.close()

    @event.listens_for(engine, "begin")
    def on_begin(connection: Any) -> None:
        begin = connection.get_execution_options().get("sqlite_begin", "BEGIN")
        if begin:
            # On the driver's connection: through exec_driver_sql, SQLAlchemy's statement
            # machinery would cost more than SQLite's own work for the whole transaction.
            connection.connection.driver_connection.execute(begin)

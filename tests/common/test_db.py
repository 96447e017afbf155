"""The database layer on real SQLite and PostgreSQL."""

from __future__ import annotations

import asyncio
import itertools
import sqlite3
import threading
import time

import pytest
from opentelemetry import trace
from sqlalchemy import JSON, bindparam, create_engine, text
from sqlalchemy.exc import IntegrityError

from services.common import db, telemetry
from services.common.errors import Unavailable
from services.common.outbox import OutboxEvent
from services.common.settings import MeshSettings
from tests.conftest import wait_until


def _write_rows(database: db.Database, first: int, count: int) -> None:
    for number in range(first, first + count):
        with database.transaction() as session:
            session.add(OutboxEvent(id=f"e{number}", subject="s", payload=b"x" * 10_000, created_at=time.time()))


def test_a_log_past_its_limit_starts_over_even_while_a_reader_holds_an_older_snapshot(tmp_path, monkeypatch):
    # Under steady writes some reader always holds a snapshot older than the log's end, so a
    # PASSIVE checkpoint never copies all of it and the log never starts over. Here one reader
    # holds such a snapshot while the checkpoint runs, and ends a moment later.
    monkeypatch.setattr(db, "CHECKPOINT_SECONDS", 3600.0)  # only the rounds the test runs
    monkeypatch.setattr(db, "WAL_RESTART_BYTES", 256 * 1024)
    path = tmp_path / "w.db"
    database = db.Database(f"sqlite:///{path}", [OutboxEvent])
    database.create_tables()
    wal = tmp_path / "w.db-wal"
    reader = sqlite3.connect(path, isolation_level=None, check_same_thread=False)
    try:
        _write_rows(database, 0, 30)
        reader.execute("BEGIN")
        assert reader.execute("SELECT count(*) FROM outbox").fetchone() == (30,)  # its snapshot
        _write_rows(database, 30, 30)
        grown = wal.stat().st_size
        assert grown > 2 * 256 * 1024
        ending = threading.Timer(0.3, reader.execute, ["COMMIT"])
        ending.start()
        database.checkpoint()  # the passive part stops at the reader's snapshot; the restart waits for it
        ending.join()
        _write_rows(database, 60, 1)  # the first write after a restart starts the log over
        assert wal.stat().st_size <= 256 * 1024, f"the log was not started over: {wal.stat().st_size} bytes"
        with database.session() as session:
            assert session.query(OutboxEvent).count() == 61
    finally:
        reader.close()
        database.dispose()


def test_the_background_checkpoint_starts_the_log_over_after_writes(tmp_path, monkeypatch):
    monkeypatch.setattr(db, "CHECKPOINT_SECONDS", 0.05)
    monkeypatch.setattr(db, "WAL_RESTART_BYTES", 256 * 1024)
    database = db.Database(f"sqlite:///{tmp_path / 'w.db'}", [OutboxEvent])
    database.create_tables()
    wal = tmp_path / "w.db-wal"
    try:
        _write_rows(database, 0, 60)  # 600 KB: without checkpoints the log would only grow
        numbers = itertools.count(60)

        def started_over() -> bool:  # a restart shows at the first write after it
            _write_rows(database, next(numbers), 1)
            return wal.stat().st_size <= 256 * 1024

        wait_until(started_over, what="the background checkpoint to start the log over")
    finally:
        database.dispose()


def test_reads_after_the_server_dropped_every_connection_answer_unavailable_once_then_work(postgres_url):
    database = db.Database(postgres_url, [OutboxEvent])
    database.create_tables()
    admin = create_engine(MeshSettings().postgres_admin_url, isolation_level="AUTOCOMMIT")
    try:
        with database.reader() as reader:
            assert reader.execute(text("SELECT 1")).scalar() == 1
        name = postgres_url.rsplit("/", 1)[1]
        with admin.connect() as connection:  # as if the server had restarted
            connection.execute(
                text("SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE datname = :name"), {"name": name}
            )
        outcomes = []
        for _ in range(2):
            try:
                with database.reader() as reader:
                    outcomes.append(reader.execute(text("SELECT 1")).scalar())
            except Unavailable as error:
                assert "try again" in str(error)
                outcomes.append("unavailable")
        assert outcomes == ["unavailable", 1]  # the old connection fails once, then the pool reconnects
    finally:
        admin.dispose()
        database.dispose()


def test_reads_on_postgresql_open_no_transaction_and_keep_prepared_statements(postgres_url):
    database = db.Database(postgres_url, [OutboxEvent])
    database.create_tables()
    count = text("SELECT count(*) FROM outbox WHERE subject = :subject")
    try:
        for _ in range(8):  # psycopg prepares a statement on its fifth run on a connection
            with database.reader() as reader:
                assert reader.execute(count, {"subject": "s"}).scalar() == 0
                connection = reader.connection.dbapi_connection
                # In a transaction, the read would have to end with a ROLLBACK: a round trip more,
                # after which psycopg forgets every statement it prepared on the connection.
                assert connection.info.transaction_status == connection.info.transaction_status.IDLE
        with database.reader() as reader:
            prepared = reader.execute(text("SELECT statement FROM pg_prepared_statements")).scalars().all()
        assert any("FROM outbox WHERE subject" in statement for statement in prepared), prepared
        with database.transaction() as session:  # and each read sees what was committed before it
            session.add(OutboxEvent(id="e1", subject="s", payload=b"x", created_at=time.time()))
        with database.reader() as reader:
            assert reader.execute(count, {"subject": "s"}).scalar() == 1
    finally:
        database.dispose()


@pytest.mark.parametrize("database_url", ["sqlite", "postgresql"], indirect=True)
def test_short_calls_keep_the_callers_trace_context(database_url):
    telemetry.setup("test")
    database = db.Database(database_url, [OutboxEvent])

    def current_trace() -> int:
        return trace.get_current_span().get_span_context().trace_id

    async def main() -> tuple[int, int, int]:
        with telemetry.tracer("test").start_as_current_span("caller") as span:
            return (
                span.get_span_context().trace_id,
                await database.run(current_trace),
                await database.run_short(current_trace),
            )

    try:
        caller, on_thread, short = asyncio.run(main())
        assert caller == on_thread == short != 0
    finally:
        database.dispose()


@pytest.mark.parametrize("database_url", ["sqlite", "postgresql"], indirect=True)
def test_the_generation_moves_with_every_commit_of_any_process_and_is_unknown_while_not_listening(database_url):
    ours, theirs = db.Database(database_url, [OutboxEvent]), db.Database(database_url, [OutboxEvent])
    ours.create_tables()
    assert ours.generation() is None  # nothing watched: nothing known
    ours.watch_changes([OutboxEvent])
    admin = create_engine(MeshSettings().postgres_admin_url, isolation_level="AUTOCOMMIT")

    def add(database: db.Database, number: int) -> None:
        with database.transaction() as session:
            session.add(OutboxEvent(id=f"e{number}", subject="s", payload=b"x", created_at=time.time()))

    try:
        wait_until(lambda: ours.generation() is not None)
        before = ours.generation()
        assert ours.generation() == before  # still: nothing committed
        add(ours, 1)
        assert ours.generation() != before  # our own commit counts at once
        before = ours.generation()
        add(theirs, 2)  # another process's commit
        if ours.is_sqlite:
            assert ours.generation() != before
            return
        wait_until(lambda: ours.generation() != before)
        known = ours.generation()
        name = database_url.rsplit("/", 1)[1]
        with admin.connect() as connection:  # the listening connection goes away
            connection.execute(
                text(
                    "SELECT pg_terminate_backend(pid) FROM pg_stat_activity "
                    "WHERE datname = :name AND query LIKE 'LISTEN%'"
                ),
                {"name": name},
            )
        wait_until(lambda: ours.generation() is None)
        add(theirs, 3)  # unannounced: nobody listens
        wait_until(lambda: ours.generation() is not None)  # listening again, under a new number
        before = ours.generation()
        assert before != known
        add(theirs, 4)
        wait_until(lambda: ours.generation() != before)
    finally:
        admin.dispose()
        ours.dispose()
        theirs.dispose()


def test_execute_direct_writes_in_the_callers_transaction_and_fails_as_session_execute_does(database_url):
    database = db.Database(database_url, [OutboxEvent])
    database.create_tables()
    insert = database.insert(OutboxEvent).returning(OutboxEvent.id)
    rows = [{"id": f"d{number}", "subject": "s", "payload": b"\x00\xff", "created_at": 1.5} for number in range(3)]
    try:
        with database.transaction() as session:
            assert db.execute_direct(session, insert, rows[0]).fetchone() == ("d0",)
            db.execute_direct(session, OutboxEvent.__table__.insert(), rows[1:])  # executemany
        with pytest.raises(RuntimeError), database.transaction() as session:
            db.execute_direct(session, OutboxEvent.__table__.insert(), {**rows[0], "id": "rolled-back"})
            raise RuntimeError("the transaction fails after the insert")
        with pytest.raises(IntegrityError), database.transaction() as session:
            db.execute_direct(session, OutboxEvent.__table__.insert(), rows[0])  # the same id again
        with database.session() as session:
            stored = session.query(OutboxEvent).order_by(OutboxEvent.id).all()
        assert [(row.id, row.payload, row.created_at, row.attempts) for row in stored] == [
            (f"d{number}", b"\x00\xff", 1.5, 0)
            for number in range(3)  # defaults filled in as by the ORM
        ]
        with pytest.raises(ValueError, match="cannot convert"), database.transaction() as session:
            db.execute_direct(session, text("SELECT :at").bindparams(bindparam("at", type_=JSON)), {"at": {}})
    finally:
        database.dispose()

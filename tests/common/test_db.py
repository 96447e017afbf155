"""The database layer on real SQLite and PostgreSQL."""

from __future__ import annotations

import asyncio
import time

import pytest
from opentelemetry import trace
from sqlalchemy import create_engine, text

from services.common import db, telemetry
from services.common.errors import Unavailable
from services.common.outbox import OutboxEvent
from services.common.settings import MeshSettings
from tests.conftest import wait_until


def test_steady_writes_keep_the_write_ahead_log_bounded(tmp_path, monkeypatch):
    monkeypatch.setattr(db, "CHECKPOINT_SECONDS", 0.05)
    monkeypatch.setattr(db, "WAL_RESTART_BYTES", 256 * 1024)
    database = db.Database(f"sqlite:///{tmp_path / 'w.db'}", [OutboxEvent])
    database.create_tables()
    wal = tmp_path / "w.db-wal"
    try:
        # A writer that never pauses: a passive checkpoint never reaches the log's end, so only the
        # restart keeps the log from growing with everything written.
        largest = written = 0
        started = time.monotonic()
        while written * 10_000 < 12 * 1024 * 1024 and time.monotonic() - started < 3.0:
            with database.transaction() as session:
                session.add(OutboxEvent(id=f"e{written}", subject="s", payload=b"x" * 10_000, created_at=time.time()))
            written += 1
            largest = max(largest, wal.stat().st_size)
        assert written * 10_000 > 4 * 1024 * 1024, f"only {written} writes: too few to tell"
        assert largest < written * 10_000 / 4, f"the log grew to {largest} bytes of {written * 10_000} written"
        time.sleep(0.5)  # the checkpoint's next rounds: whatever the log holds is copied, a restart asked for
        with database.transaction() as session:  # the first write after a restart starts the log over
            session.add(OutboxEvent(id="last", subject="s", payload=b"x" * 10_000, created_at=time.time()))
        assert wal.stat().st_size <= 256 * 1024, "the log was never started over"
        with database.session() as session:
            assert session.query(OutboxEvent).count() == written + 1
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

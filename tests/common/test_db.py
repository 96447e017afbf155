"""The database layer on a real SQLite file: the write-ahead log stays bounded under steady writes."""

from __future__ import annotations

import time

from services.common import db
from services.common.outbox import OutboxEvent


def test_steady_writes_keep_the_write_ahead_log_bounded(tmp_path, monkeypatch):
    monkeypatch.setattr(db, "CHECKPOINT_SECONDS", 0.05)
    monkeypatch.setattr(db, "WAL_RESTART_BYTES", 256 * 1024)
    database = db.Database(f"sqlite:///{tmp_path / 'w.db'}", [OutboxEvent])
    database.create_tables()
    wal = tmp_path / "w.db-wal"
    try:
        largest = 0
        for number in range(400):  # about 5.5 MiB of log without checkpoints, over about 0.5 s
            with database.transaction() as session:
                session.add(OutboxEvent(id=f"e{number}", subject="s", payload=b"x" * 10_000, created_at=time.time()))
            largest = max(largest, wal.stat().st_size)
            time.sleep(0.001)
        deadline = time.monotonic() + 10
        while wal.stat().st_size > 256 * 1024 and time.monotonic() < deadline:
            time.sleep(0.05)
        assert wal.stat().st_size <= 256 * 1024, "the log was never started over"
        assert largest < 2.5 * 1024 * 1024, f"the log grew to {largest} bytes while writing"
        with database.session() as session:
            assert session.query(OutboxEvent).count() == 400
    finally:
        database.dispose()

"""Transactional outbox and its relay to JetStream.

A service adds an event to its outbox in the same database transaction as the change the
event describes, so either both happen or neither. The relay publishes unsent rows to the
`MLMESH_EVENTS` stream with `Nats-Msg-Id` = event id, waits for each ack, and marks them sent.
While NATS is unreachable rows simply wait; nothing is lost. On PostgreSQL several relays may
share one database: rows are claimed with FOR UPDATE SKIP LOCKED.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from sqlalchemy import Column, Index, LargeBinary, String, any_, bindparam, delete, func, update
from sqlalchemy import event as sqlalchemy_event
from sqlalchemy.dialects.postgresql import ARRAY
from sqlmodel import Field, Session, SQLModel, col, select

from services.common import telemetry
from services.common.db import Database
from services.common.errors import ResourceExhausted
from services.common.events import CONTENT_TYPE, MAX_EVENT_BYTES, CloudEvent, subject_of

log = logging.getLogger(__name__)


class OutboxEvent(SQLModel, table=True):
    """An event waiting to be published (sent_at is None) or kept for a while after."""

    __tablename__ = "outbox"
    __table_args__ = (Index("ix_outbox_pending", "sent_at", "created_at"),)

    id: str = Field(primary_key=True)
    subject: str
    payload: bytes = Field(sa_column=Column(LargeBinary, nullable=False))
    headers: str = "{}"
    created_at: float
    sent_at: float | None = None
    attempts: int = 0


class Outbox:
    """Adds events to a session; wakes the relay when that session commits."""

    def __init__(self) -> None:
        self._loop: asyncio.AbstractEventLoop | None = None
        self._wake = asyncio.Event()

    def add(self, session: Session, event: CloudEvent) -> None:
        """Stage `event` in the caller's transaction."""
        payload = event.to_json()
        if len(payload) > MAX_EVENT_BYTES:
            raise ResourceExhausted(
                f"event {event.type} is {len(payload)} bytes; events must stay under {MAX_EVENT_BYTES} bytes"
            )
        headers = {"Content-Type": CONTENT_TYPE, **telemetry.inject_headers()}
        session.add(
            OutboxEvent(
                id=event.id,
                subject=subject_of(event.kind),
                payload=payload,
                headers=json.dumps(headers),
                created_at=time.time(),
            )
        )
        if not session.info.get("outbox_listening"):
            session.info["outbox_listening"] = True
            sqlalchemy_event.listen(session, "after_commit", lambda _session: self.notify())

    def notify(self) -> None:
        """Wake the relay (safe from any thread)."""
        if self._loop is not None and not self._loop.is_closed():
            self._loop.call_soon_threadsafe(self._wake.set)

    def bind(self, loop: asyncio.AbstractEventLoop) -> None:
        self._loop = loop

    async def wait(self, timeout: float) -> None:
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._wake.wait(), timeout)
        self._wake.clear()


class Relay:
    """Publishes the outbox to JetStream, retrying with backoff while NATS is away."""

    def __init__(
        self,
        database: Database,
        outbox: Outbox,
        nats_url: str,
        *,
        batch_size: int = 500,
        poll_seconds: float = 1.0,
        retention_seconds: float = 7 * 24 * 3600,
        publish_timeout: float = 5.0,
    ) -> None:
        self.database = database
        self.outbox = outbox
        self.nats_url = nats_url
        self.batch_size = batch_size
        self.poll_seconds = poll_seconds
        self.retention_seconds = retention_seconds
        self.publish_timeout = publish_timeout
        self.published = 0
        self._next_prune = 0.0
        self._thread = ThreadPoolExecutor(max_workers=1, thread_name_prefix="outbox-relay")

    async def run(self) -> None:
        """Run until cancelled."""
        from services.common import bus

        self.outbox.bind(asyncio.get_running_loop())
        connection = await bus.connect_with_retry(self.nats_url, name="outbox-relay")
        try:
            jetstream = connection.jetstream(timeout=self.publish_timeout)
            await bus.ensure_stream(jetstream)
            backoff = 0.1
            while True:
                try:
                    moved = await self.drain(jetstream)
                    backoff = 0.1
                except Exception as error:  # NATS or the database is away: wait and retry
                    log.warning("outbox relay: %s; retrying in %.1fs", error, backoff)
                    await asyncio.sleep(backoff)
                    backoff = min(backoff * 2, 5.0)
                    continue
                await self.prune_if_due()
                if moved < self.batch_size:
                    await self.outbox.wait(self.poll_seconds)
        finally:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(connection.close(), 2)

    async def drain(self, jetstream: Any) -> int:
        """Publish one batch of pending events; return how many were marked sent."""
        session = self.database.session()
        try:
            rows = await self._in_relay_thread(self._claim, session)
            if not rows:
                return 0
            results = await asyncio.gather(*(self._publish(jetstream, row) for row in rows), return_exceptions=True)
            sent = [row.id for row, result in zip(rows, results, strict=True) if not isinstance(result, BaseException)]
            await self._in_relay_thread(self._mark_sent, session, sent)
            self.published += len(sent)
            failed = [result for result in results if isinstance(result, BaseException)]
            if failed:
                raise failed[0]
            return len(sent)
        finally:
            # Queued behind any database work still running, even when this task was cancelled.
            self._thread.submit(session.close)

    async def _publish(self, jetstream: Any, row: Any) -> Any:
        headers = json.loads(row.headers)
        with telemetry.messaging_span("send", row.subject, headers):
            headers.update(telemetry.inject_headers())  # the send span becomes the consumer's parent
            headers["Nats-Msg-Id"] = row.id
            return await jetstream.publish(row.subject, row.payload, headers=headers)

    async def _in_relay_thread(self, function: Any, *args: Any) -> Any:
        """Database work runs in the relay's one thread: off the event loop, one session at a time."""
        return await asyncio.get_running_loop().run_in_executor(self._thread, function, *args)

    def _claim(self, session: Session) -> list[Any]:
        """Pending events as plain rows (id, subject, payload, headers), oldest first."""
        query = (
            select(OutboxEvent.id, OutboxEvent.subject, OutboxEvent.payload, OutboxEvent.headers)
            .where(col(OutboxEvent.sent_at).is_(None))
            .order_by(col(OutboxEvent.created_at))
            .limit(self.batch_size)
        )
        if self.database.is_sqlite:
            rows = list(session.execute(query).all())
            session.rollback()  # end the read; marking takes SQLite's write lock only briefly
            return rows
        # PostgreSQL: the row locks are the claim, held while publishing, so that no other
        # relay on the same database takes these rows.
        return list(session.execute(query.with_for_update(skip_locked=True)).all())

    def _mark_sent(self, session: Session, ids: list[str]) -> None:
        if self.database.is_sqlite:
            if ids:
                with self.database.transaction() as writer:
                    writer.execute(update(OutboxEvent).where(col(OutboxEvent.id).in_(ids)).values(sent_at=time.time()))
            return
        if ids:
            # One array parameter, not one per id: the statement stays the same for every batch.
            batch = bindparam("ids", value=ids, type_=ARRAY(String))
            session.execute(update(OutboxEvent).where(col(OutboxEvent.id) == any_(batch)).values(sent_at=time.time()))
        session.commit()  # releases the claim on rows that failed to publish, too

    async def prune_if_due(self) -> None:
        now = time.time()
        if now < self._next_prune:
            return
        self._next_prune = now + 60
        await asyncio.to_thread(self.prune, now - self.retention_seconds)

    def prune(self, before: float) -> None:
        """Delete rows sent before `before` (Unix seconds)."""
        with self.database.transaction() as session:
            session.execute(
                delete(OutboxEvent).where(col(OutboxEvent.sent_at).is_not(None), col(OutboxEvent.sent_at) < before)
            )


def pending_count(database: Database) -> int:
    """How many events wait to be published."""
    with database.session() as session:
        return session.exec(select(func.count()).where(col(OutboxEvent.sent_at).is_(None))).one()

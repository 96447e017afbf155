"""The outbox relay against a real nats-server, on SQLite and PostgreSQL."""

from __future__ import annotations

import asyncio
import contextlib
import json
import time

import nats
import pytest
from sqlmodel import select

from services.common import bus, events
from services.common import outbox as outbox_module
from services.common.db import Database
from services.common.outbox import Outbox, OutboxEvent, Relay, pending_count


def make_database(url: str) -> Database:
    database = Database(url, [OutboxEvent])
    database.create_tables()
    return database


def stage(database: Database, outbox: Outbox, count: int, prefix: str = "m") -> list[str]:
    ids = []
    with database.transaction() as session:
        for index in range(count):
            event = events.make_event(
                "test", events.ModelDeleted(name=f"{prefix}{index}", version=1), f"models/{prefix}{index}/versions/1"
            )
            outbox.add(session, event)
            ids.append(event.id)
    return ids


async def stream_ids(url: str) -> list[str]:
    """Every Nats-Msg-Id in the events stream, in stream order."""
    connection = await nats.connect(url)
    try:
        jetstream = connection.jetstream()
        info = await jetstream.stream_info(events.STREAM)
        ids = []
        for sequence in range(info.state.first_seq, info.state.last_seq + 1):
            message = await jetstream.get_msg(events.STREAM, sequence)
            ids.append(message.headers["Nats-Msg-Id"])
        return ids
    finally:
        await connection.close()


async def wait_until(condition, timeout: float = 20.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise TimeoutError("condition not met in time")
        await asyncio.sleep(0.05)


@contextlib.asynccontextmanager
async def running(relay: Relay):
    task = asyncio.create_task(relay.run())
    try:
        yield relay
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task


async def test_relay_publishes_in_order_with_headers_and_marks_sent(tmp_path, nats_server):
    database = make_database(f"sqlite:///{tmp_path / 'o.db'}")
    outbox = Outbox()
    ids = stage(database, outbox, 50)
    async with running(Relay(database, outbox, nats_server.url)):
        await wait_until(lambda: pending_count(database) == 0)
    assert await stream_ids(nats_server.url) == ids
    connection = await nats.connect(nats_server.url)
    message = await connection.jetstream().get_msg(events.STREAM, 1)
    await connection.close()
    assert message.headers["Content-Type"] == events.CONTENT_TYPE
    assert message.subject == "mlmesh.events.model.deleted"
    assert json.loads(message.data)["id"] == ids[0]


async def test_events_wait_in_the_outbox_while_nats_is_down(tmp_path, nats_server):
    database = make_database(f"sqlite:///{tmp_path / 'o.db'}")
    outbox = Outbox()
    nats_server.stop()
    async with running(Relay(database, outbox, nats_server.url, poll_seconds=0.2)):
        ids = stage(database, outbox, 20)
        await asyncio.sleep(1.5)
        assert pending_count(database) == 20
        nats_server.start()
        await wait_until(lambda: pending_count(database) == 0, timeout=30)
    assert await stream_ids(nats_server.url) == ids


async def test_nats_restart_mid_run_loses_nothing(tmp_path, nats_server):
    database = make_database(f"sqlite:///{tmp_path / 'o.db'}")
    outbox = Outbox()
    async with running(Relay(database, outbox, nats_server.url, poll_seconds=0.2)):
        first = stage(database, outbox, 10, "a")
        await wait_until(lambda: pending_count(database) == 0)
        nats_server.stop()
        second = stage(database, outbox, 10, "b")
        await asyncio.sleep(1.0)
        nats_server.start()
        await wait_until(lambda: pending_count(database) == 0, timeout=30)
    assert sorted(await stream_ids(nats_server.url)) == sorted(first + second)


async def test_several_relays_on_postgresql_never_publish_a_row_twice(postgres_url, nats_server):
    database = make_database(postgres_url)
    outbox = Outbox()
    ids = stage(database, outbox, 600)
    relays = [Relay(make_database(postgres_url), Outbox(), nats_server.url, batch_size=50) for _ in range(3)]
    tasks = [asyncio.create_task(relay.run()) for relay in relays]
    try:
        await wait_until(lambda: pending_count(database) == 0, timeout=60)
        await wait_until(lambda: sum(relay.published for relay in relays) >= 600, timeout=5)
        await asyncio.sleep(0.5)
    finally:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
    # Each row was claimed by exactly one relay, and the stream holds each event once.
    assert sum(relay.published for relay in relays) == 600
    assert sorted(await stream_ids(nats_server.url)) == sorted(ids)
    assert sum(1 for relay in relays if relay.published) >= 2


async def test_a_republished_row_is_dropped_by_jetstream_deduplication(tmp_path, nats_server):
    database = make_database(f"sqlite:///{tmp_path / 'o.db'}")
    outbox = Outbox()
    ids = stage(database, outbox, 5)
    async with running(Relay(database, outbox, nats_server.url)):
        await wait_until(lambda: pending_count(database) == 0)
    with database.transaction() as session:  # as if the relay died between publish and mark
        for row in session.exec(select(OutboxEvent)):
            row.sent_at = None
            session.add(row)
    async with running(Relay(database, outbox, nats_server.url)):
        await wait_until(lambda: pending_count(database) == 0)
    assert await stream_ids(nats_server.url) == ids


async def test_live_events_keep_commit_order_and_an_overflow_catches_up_from_the_table(
    tmp_path, nats_server, monkeypatch
):
    monkeypatch.setattr(outbox_module, "MAX_READY", 10)
    database = make_database(f"sqlite:///{tmp_path / 'o.db'}")
    outbox = Outbox()
    relay = Relay(database, outbox, nats_server.url, poll_seconds=60)  # no idle catch-up in this test
    async with running(relay):
        ids = stage(database, outbox, 1, "first")
        await wait_until(lambda: relay.published == 1)  # live now
        for batch in range(8):  # 32 rows handed over at once: more than the live queue holds
            ids += stage(database, outbox, 4, f"b{batch}-")
        await wait_until(lambda: pending_count(database) == 0)
    assert await stream_ids(nats_server.url) == ids


async def test_events_keep_flowing_while_marking_rows_sent_waits_on_the_database(postgres_url, nats_server):
    database = make_database(postgres_url)
    outbox = Outbox()
    relay = Relay(database, outbox, nats_server.url, poll_seconds=60)
    async with running(relay):
        ids = stage(database, outbox, 1, "warmup")
        await wait_until(lambda: relay.published == 1 and pending_count(database) == 0)  # live now
        ids += stage(database, outbox, 1, "locked")
        # Another transaction holds that row's lock before the relay gets to it: marking it sent
        # after publishing has to wait for the lock.
        with database.transaction() as blocker:
            blocker.exec(select(OutboxEvent).where(OutboxEvent.id == ids[-1]).with_for_update()).one()
            await wait_until(lambda: relay.published == 2)
            await asyncio.sleep(0.2)  # the marking UPDATE is waiting on the lock by now
            ids += stage(database, outbox, 1, "meanwhile")
            await wait_until(lambda: relay.published == 3, timeout=5)
            assert await stream_ids(nats_server.url) == ids
            assert pending_count(database) == 2  # the locked row's marking waits; the next queues behind it
        await wait_until(lambda: pending_count(database) == 0)


async def test_a_row_jetstream_does_not_acknowledge_stays_pending_and_the_rest_are_marked_sent(tmp_path, nats_server):
    database = make_database(f"sqlite:///{tmp_path / 'o.db'}")
    outbox = Outbox()
    ids = stage(database, outbox, 3, "before")
    with database.transaction() as session:  # a subject no stream takes: NATS answers "no responders"
        session.add(OutboxEvent(id="unroutable", subject="elsewhere.x", payload=b"{}", created_at=time.time()))
    ids += stage(database, outbox, 3, "after")
    relay = Relay(database, outbox, nats_server.url, poll_seconds=0.2)
    async with running(relay):
        await wait_until(lambda: relay.published == 6)
        await wait_until(lambda: pending_count(database) == 1)
    assert await stream_ids(nats_server.url) == ids
    with database.session() as session:
        assert session.get(OutboxEvent, "unroutable").sent_at is None


def test_sent_rows_are_pruned_after_retention(tmp_path):
    database = make_database(f"sqlite:///{tmp_path / 'o.db'}")
    outbox = Outbox()
    stage(database, outbox, 3)
    with database.transaction() as session:
        rows = session.exec(select(OutboxEvent)).all()
        rows[0].sent_at = time.time() - 100
        rows[1].sent_at = time.time()
        session.add_all(rows[:2])
    Relay(database, outbox, "nats://unused").prune(before=time.time() - 50)
    with database.session() as session:
        left = session.exec(select(OutboxEvent)).all()
    assert len(left) == 2 and pending_count(database) == 1


def test_an_event_over_64_kib_is_refused(tmp_path):
    from services.common.errors import ResourceExhausted

    database = make_database(f"sqlite:///{tmp_path / 'o.db'}")
    event = events.make_event("test", events.ModelDeleted(name="x" * 70_000, version=1), "models/x")
    with pytest.raises(ResourceExhausted), database.transaction() as session:
        Outbox().add(session, event)
    assert pending_count(database) == 0


async def test_ensure_stream_is_idempotent(nats_server):
    connection = await nats.connect(nats_server.url)
    jetstream = connection.jetstream()
    await bus.ensure_stream(jetstream)
    await bus.ensure_stream(jetstream)
    info = await jetstream.stream_info(events.STREAM)
    await connection.close()
    assert info.config.subjects == [events.SUBJECTS]
    assert info.config.duplicate_window == events.DUPLICATE_WINDOW_SECONDS


async def test_only_committed_events_reach_the_live_path_each_to_its_own_outbox(tmp_path):
    database = make_database(f"sqlite:///{tmp_path / 'handover.db'}")
    first, second = Outbox(), Outbox()
    for outbox in (first, second):
        outbox.bind(asyncio.get_running_loop())
    try:
        committed = stage(database, first, 2, prefix="kept")
        with pytest.raises(RuntimeError), database.transaction() as session:
            first.add(session, events.make_event("test", events.ModelDeleted(name="gone", version=1), "models/gone"))
            raise RuntimeError("the change failed")
        # A session that rolls back and then commits more hands over only what it committed.
        with database.transaction() as session:
            first.add(session, events.make_event("test", events.ModelDeleted(name="undone", version=1), "models/u"))
            session.rollback()
            retried = events.make_event("test", events.ModelDeleted(name="retried", version=1), "models/r")
            first.add(session, retried)
        committed.append(retried.id)
        stage(database, second, 1, prefix="other")
        await asyncio.sleep(0.05)  # the hand-over is scheduled on the loop
        assert [row["id"] for row in first.ready] == committed
        assert [json.loads(row["payload"])["data"]["name"] for row in second.ready] == ["other0"]
        assert pending_count(database) == 4
    finally:
        database.dispose()

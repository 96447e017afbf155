"""The durable event consumer helper against a real nats-server."""

from __future__ import annotations

import asyncio
import contextlib
from collections import Counter

import nats
import nats.js.errors
from faststream.nats import NatsBroker
from sqlmodel import select

from services.common import bus, events
from services.common.bus import ParkedEvent, ProcessedEvent
from services.common.db import Database
from tests.common.test_outbox import wait_until


async def publish(url: str, event: events.CloudEvent, *, body: bytes | None = None) -> None:
    connection = await nats.connect(url)
    jetstream = connection.jetstream()
    await bus.ensure_stream(jetstream)
    await jetstream.publish(f"mlmesh.events.{event.kind}", body or event.to_json(), headers={"Nats-Msg-Id": event.id})
    await connection.close()


def deleted(name: str) -> events.CloudEvent:
    return events.make_event("test", events.ModelDeleted(name=name, version=1), f"models/{name}/versions/1")


@contextlib.asynccontextmanager
async def consuming(url: str, database: Database, handler, **options):
    broker = NatsBroker(url)
    bus.subscribe_events(broker, database, durable="test-consumer", handler=handler, **options)
    await broker.start()
    try:
        yield broker
    finally:
        await broker.stop()


def consumer_database(tmp_path) -> Database:
    database = Database(f"sqlite:///{tmp_path / 'consumer.db'}", [ProcessedEvent, ParkedEvent])
    database.create_tables()
    return database


async def test_each_event_is_handled_once_even_when_redelivered(tmp_path, nats_server):
    database = consumer_database(tmp_path)
    seen: Counter[str] = Counter()

    async def handler(event: events.CloudEvent) -> None:
        seen[event.id] += 1

    sent = [deleted(f"m{index}") for index in range(20)]
    for event in sent:
        await publish(nats_server.url, event)
    async with consuming(nats_server.url, database, handler):
        await wait_until(lambda: len(seen) == 20)
    # The same events again under new stream ids (as after a publisher retry past the window):
    connection = await nats.connect(nats_server.url)
    for event in sent[:5]:
        await connection.jetstream().publish(f"mlmesh.events.{event.kind}", event.to_json())
    await connection.close()
    async with consuming(nats_server.url, database, handler):
        await asyncio.sleep(1.5)
    assert set(seen) == {event.id for event in sent} and set(seen.values()) == {1}


async def test_a_failing_handler_is_retried_then_succeeds(tmp_path, nats_server):
    database = consumer_database(tmp_path)
    attempts: Counter[str] = Counter()
    done: list[str] = []

    async def flaky(event: events.CloudEvent) -> None:
        attempts[event.id] += 1
        if attempts[event.id] < 3:
            raise RuntimeError("downstream not ready")
        done.append(event.id)

    event = deleted("flaky")
    await publish(nats_server.url, event)
    async with consuming(nats_server.url, database, flaky, max_deliver=5):
        await wait_until(lambda: done == [event.id], timeout=20)
    assert attempts[event.id] == 3


async def test_poison_events_are_parked_not_retried_forever(tmp_path, nats_server):
    database = consumer_database(tmp_path)
    attempts: Counter[str] = Counter()

    async def always_fails(event: events.CloudEvent) -> None:
        attempts[event.id] += 1
        raise ValueError("cannot handle this")

    poison = deleted("poison")
    await publish(nats_server.url, poison)
    await publish(nats_server.url, deleted("garbage"), body=b"not a cloud event")

    def parked() -> list[ParkedEvent]:
        with database.session() as session:
            return list(session.exec(select(ParkedEvent)))

    async with consuming(nats_server.url, database, always_fails, max_deliver=3):
        await wait_until(lambda: len(parked()) == 2, timeout=30)
        await asyncio.sleep(2)
    assert attempts[poison.id] == 3
    by_id = {row.event_id: row for row in parked()}
    assert "cannot handle this" in by_id[poison.id].error
    assert any(row.payload == b"not a cloud event" for row in by_id.values())


async def test_a_batch_is_sent_whole_and_each_message_gets_its_own_outcome(nats_server):
    connection = await nats.connect(nats_server.url)
    try:
        jetstream = connection.jetstream()
        await bus.ensure_stream(jetstream)
        sent: list[str] = []

        async def send(subject: str) -> asyncio.Future:
            if subject == "unreachable":
                raise nats.errors.ConnectionClosedError
            sent.append(subject)
            return await jetstream.publish_async(subject, b"{}")

        # A subject no stream holds: that message alone is refused (no stream answers for it).
        subjects = ["mlmesh.events.model.deleted", "nowhere.at.all", "mlmesh.events.model.archived"]
        outcomes = await bus.publish_batch(subjects, send, timeout=5)
        assert [outcome is None for outcome in outcomes] == [True, False, True]
        assert isinstance(outcomes[1], nats.js.errors.NoStreamResponseError)
        assert (await jetstream.stream_info(events.STREAM)).state.messages == 2

        # A send that fails stops the batch: what was sent before is still stored, the rest is not sent.
        sent.clear()
        subjects = ["mlmesh.events.model.deleted", "unreachable", "mlmesh.events.model.archived"]
        outcomes = await bus.publish_batch(subjects, send, timeout=5)
        assert outcomes[0] is None and all(
            isinstance(outcome, nats.errors.ConnectionClosedError) for outcome in outcomes[1:]
        )
        assert sent == ["mlmesh.events.model.deleted"]
        assert (await jetstream.stream_info(events.STREAM)).state.messages == 3
    finally:
        await connection.close()


async def test_an_ack_that_does_not_come_in_time_counts_as_a_timeout(nats_server):
    connection = await nats.connect(nats_server.url)
    try:
        jetstream = connection.jetstream()
        await bus.ensure_stream(jetstream)

        # A plain subscriber takes the message and never answers: no ack will come for it.
        async def ignore(_message) -> None:
            pass

        await connection.subscribe("silent.subject", cb=ignore)
        await connection.flush()

        async def send(subject: str) -> asyncio.Future:
            return await jetstream.publish_async(subject, b"{}")

        outcomes = await bus.publish_batch(["mlmesh.events.model.deleted", "silent.subject"], send, timeout=0.5)
        assert outcomes[0] is None and isinstance(outcomes[1], TimeoutError)
    finally:
        await connection.close()

"""NATS JetStream plumbing: connecting, the events stream, and durable event consumers.

`subscribe_events` wraps a FastStream handler so that every subscriber in mlmesh behaves the
same: a durable JetStream consumer with explicit acks, idempotent on the CloudEvent id,
bounded redelivery, and poison messages parked (logged and stored) instead of retried forever.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable, Sequence
from typing import Any, TypeVar

import nats
from faststream import AckPolicy
from faststream.nats import ConsumerConfig, JStream, NatsBroker, NatsMessage, PullSub
from nats.js.api import DeliverPolicy, StorageType, StreamConfig
from nats.js.client import JetStreamContext
from nats.js.errors import BadRequestError
from pydantic import ValidationError
from sqlalchemy.exc import IntegrityError
from sqlmodel import Field, SQLModel

from services.common import telemetry
from services.common.db import Database
from services.common.events import DUPLICATE_WINDOW_SECONDS, STREAM, SUBJECTS, CloudEvent

log = logging.getLogger(__name__)
T = TypeVar("T")


async def connect_with_retry(url: str, *, name: str, first_wait: float = 0.2) -> nats.NATS:
    """Connect to NATS, waiting (with backoff) while it is down; reconnects forever after."""
    wait = first_wait
    while True:
        try:
            return await nats.connect(
                url,
                name=name,
                connect_timeout=2,
                allow_reconnect=True,
                max_reconnect_attempts=-1,
                reconnect_time_wait=0.5,
            )
        except Exception as error:
            log.warning("NATS at %s not reachable (%s); retrying in %.1fs", url, error, wait)
            await asyncio.sleep(wait)
            wait = min(wait * 2, 5.0)


def stream_config() -> StreamConfig:
    return StreamConfig(
        name=STREAM,
        subjects=[SUBJECTS],
        storage=StorageType.FILE,
        duplicate_window=DUPLICATE_WINDOW_SECONDS,
    )


CAPTURE_STREAM = "MLMESH_CAPTURE"
CAPTURE_SUBJECT_PREFIX = "mlmesh.capture."


def capture_stream_config(max_age_seconds: float, max_bytes: int) -> StreamConfig:
    """Captured inference records: `mlmesh.capture.<endpoint>.<deployment>`, bounded by age and
    size (the oldest messages go first)."""
    return StreamConfig(
        name=CAPTURE_STREAM,
        subjects=[f"{CAPTURE_SUBJECT_PREFIX}>"],
        storage=StorageType.FILE,
        max_age=max_age_seconds,
        max_bytes=max_bytes,
    )


async def ensure_stream(jetstream: JetStreamContext, config: StreamConfig | None = None) -> None:
    """Create a stream (by default the events stream), or bring an existing one to `config`."""
    config = config or stream_config()
    try:
        await jetstream.add_stream(config)
    except BadRequestError:
        await jetstream.update_stream(config)


async def publish_batch(
    messages: Sequence[T], send: Callable[[T], Awaitable[asyncio.Future[Any]]], timeout: float
) -> list[BaseException | None]:
    """Send every message with `send` (a JetStream `publish_async`, which answers the future of
    its ack), then wait for their acks all together, up to `timeout` seconds: per message, None
    when JetStream stored it, else why not. An ack still missing at the end is cancelled and
    counts as a TimeoutError; when a send fails (NATS went away), the messages after it are not
    sent and count as that failure, while those sent before may still be stored.

    A batch sent whole and then awaited once costs a future per message; `publish` waits for each
    in turn, as a request of its own (a reply subject, a future and a timer per message)."""
    acks: list[asyncio.Future[Any]] = []
    failure: BaseException | None = None
    try:
        for message in messages:
            acks.append(await send(message))
    except Exception as error:
        failure = error
    if acks:
        _, late = await asyncio.wait(acks, timeout=timeout)
        for ack in late:
            ack.cancel()
    return [
        TimeoutError(f"no ack from JetStream within {timeout:g}s") if ack.cancelled() else ack.exception()
        for ack in acks
    ] + [failure] * (len(messages) - len(acks))


class ProcessedEvent(SQLModel, table=True):
    """Event ids a consumer has handled, so a redelivered event is acknowledged, not redone."""

    __tablename__ = "processed_events"

    consumer: str = Field(primary_key=True)
    event_id: str = Field(primary_key=True)
    processed_at: float


class ParkedEvent(SQLModel, table=True):
    """Events a consumer gave up on after its redelivery limit (dead letters)."""

    __tablename__ = "parked_events"

    consumer: str = Field(primary_key=True)
    event_id: str = Field(primary_key=True)
    subject: str
    payload: bytes
    error: str
    parked_at: float


EventHandler = Callable[[CloudEvent], Awaitable[None]]


def subscribe_events(
    broker: NatsBroker,
    database: Database,
    *,
    durable: str,
    handler: EventHandler,
    subject: str = SUBJECTS,
    max_deliver: int = 5,
    ack_wait_seconds: float = 30,
    batch_size: int = 64,
    handler_is_idempotent: bool = False,
) -> None:
    """Register `handler` on `broker` as a durable JetStream consumer named `durable`.

    The handler runs at most once per event id: ids are recorded in `database`
    (tables ProcessedEvent and ParkedEvent must be among its tables). A handler that raises is
    retried with growing delay up to `max_deliver` deliveries, then the event is parked.
    `handler_is_idempotent`: the handler itself ignores an event it has handled (in the same
    transaction as its effect), so the ids need no recording of their own: two fewer database
    round trips per event.
    """

    def seen(event_id: str) -> bool:
        with database.session() as session:
            return session.get(ProcessedEvent, (durable, event_id)) is not None

    def remember(event_id: str) -> None:
        try:
            with database.transaction() as session:
                session.add(ProcessedEvent(consumer=durable, event_id=event_id, processed_at=time.time()))
        except IntegrityError:
            pass  # another worker of the same consumer finished it first

    def park(message: NatsMessage, event_id: str, error: str) -> None:
        with database.transaction() as session:
            session.merge(
                ParkedEvent(
                    consumer=durable,
                    event_id=event_id,
                    subject=message.raw_message.subject,
                    payload=message.body,
                    error=error[:2000],
                    parked_at=time.time(),
                )
            )

    @broker.subscriber(
        subject,
        stream=JStream(STREAM, declare=False),
        durable=durable,
        pull_sub=PullSub(batch_size=batch_size, timeout=1.0),
        config=ConsumerConfig(
            durable_name=durable,
            max_deliver=max_deliver,
            ack_wait=ack_wait_seconds,
            deliver_policy=DeliverPolicy.ALL,
        ),
        ack_policy=AckPolicy.MANUAL,
    )
    async def consume(message: NatsMessage) -> None:
        try:
            event = CloudEvent.from_json(message.body)
        except ValidationError as error:
            log.error("consumer %s: parking a message that is not a CloudEvent: %s", durable, error)
            await asyncio.to_thread(park, message, message.message_id or "unknown", str(error))
            await message.reject()
            return
        if not handler_is_idempotent and await asyncio.to_thread(seen, event.id):
            await message.ack()
            return
        try:
            with telemetry.messaging_span("process", message.raw_message.subject, message.headers):
                await handler(event)
        except Exception as error:
            deliveries = message.raw_message.metadata.num_delivered or 1
            if deliveries >= max_deliver:
                log.error(
                    "consumer %s: parking event %s (%s) after %d deliveries: %s",
                    durable,
                    event.id,
                    event.type,
                    deliveries,
                    error,
                )
                await asyncio.to_thread(park, message, event.id, repr(error))
                await message.reject()
            else:
                await message.nack(delay=min(0.5 * 2**deliveries, 30))
            return
        if not handler_is_idempotent:
            await asyncio.to_thread(remember, event.id)
        await message.ack()


async def run_subscribers(nats_url: str, name: str, register: Callable[[NatsBroker], None]) -> None:
    """Run a service's event subscribers until cancelled: make sure the events stream exists
    (waiting for NATS while it is down), then start a broker with the handlers `register` adds."""
    connection = await connect_with_retry(nats_url, name=f"{name}-setup")
    try:
        await ensure_stream(connection.jetstream())
    finally:
        await connection.close()
    # FastStream logs every message it receives and handles at log_level: DEBUG, not the service's INFO.
    broker = NatsBroker(nats_url, max_reconnect_attempts=-1, log_level=logging.DEBUG)
    register(broker)
    await broker.start()
    try:
        await asyncio.Event().wait()
    finally:
        await broker.stop()

"""Events the notifier reacts to: every lifecycle event. A durable JetStream consumer keeps each
event and queues a delivery per endpoint whose patterns match it, then hands those to the
dispatcher at once; the stream's message is acknowledged only after that is committed, so an
event is never lost, and an event kept already queues nothing again."""

from __future__ import annotations

from faststream.nats import NatsBroker

from services.common.bus import subscribe_events
from services.common.db import Database
from services.common.events import CloudEvent
from services.notifier.delivery import Dispatcher
from services.notifier.domain import Webhooks

DURABLE = "notifier"


def subscribe(broker: NatsBroker, database: Database, webhooks: Webhooks, dispatcher: Dispatcher) -> None:
    async def deliver(event: CloudEvent) -> None:
        for outgoing in await database.run_short(webhooks.take_event, event, event.to_json()):
            dispatcher.submit(outgoing)

    # take_event keeps each event once, in the transaction that queues its deliveries.
    subscribe_events(broker, database, durable=DURABLE, handler=deliver, max_deliver=10, handler_is_idempotent=True)

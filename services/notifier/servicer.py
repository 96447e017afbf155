"""gRPC servicer of mlmesh.v1.NotifierService: proto in, domain call, proto out. Nothing else."""

from __future__ import annotations

import math
from typing import Any

import grpc

from services._proto.mlmesh.v1 import notifier_pb2, notifier_pb2_grpc
from services.common.convert import seconds, timestamp
from services.notifier import domain
from services.notifier.delivery import Dispatcher

STATUSES = {
    domain.PENDING: notifier_pb2.DELIVERY_STATUS_PENDING,
    domain.DELIVERED: notifier_pb2.DELIVERY_STATUS_DELIVERED,
    domain.FAILED: notifier_pb2.DELIVERY_STATUS_FAILED,
}
STATUS_NAMES = {code: name for name, code in STATUSES.items()}


def webhook_to_proto(view: domain.WebhookView) -> notifier_pb2.Webhook:
    expires = view.previous_secret_expires_at
    return notifier_pb2.Webhook(
        name=f"webhooks/{view.id}",
        id=view.id,
        url=view.url,
        events=view.events,
        description=view.description,
        enabled=view.enabled,
        disabled_reason=view.disabled_reason,
        created_at=timestamp(view.created_at),
        updated_at=timestamp(view.updated_at),
        previous_secret_expires_at=timestamp(expires) if expires else None,
    )


def delivery_to_proto(view: domain.DeliveryView) -> notifier_pb2.Delivery:
    return notifier_pb2.Delivery(
        id=view.id,
        webhook_id=view.webhook_id,
        event_id=view.event_id,
        event_kind=view.event_kind,
        status=STATUSES[view.status],
        origin=view.origin,
        attempts=view.attempts,
        next_attempt_at=timestamp(view.next_attempt_at) if view.next_attempt_at else None,
        created_at=timestamp(view.created_at),
        delivered_at=timestamp(view.delivered_at) if view.delivered_at else None,
        attempt_log=[
            notifier_pb2.Attempt(
                attempted_at=timestamp(attempt.attempted_at),
                status_code=attempt.status_code,
                latency_ms=attempt.latency_ms,
                response_snippet=attempt.response_snippet,
                error=attempt.error,
            )
            for attempt in view.attempt_log
        ],
    )


class NotifierServicer(notifier_pb2_grpc.NotifierServiceServicer):
    def __init__(self, webhooks: domain.Webhooks, dispatcher: Dispatcher) -> None:
        self.webhooks = webhooks
        self.dispatcher = dispatcher

    async def CreateWebhook(self, request: Any, context: grpc.aio.ServicerContext) -> Any:
        # Checks the URL's destination: a DNS lookup, on a thread.
        view, secret = await self.webhooks.database.run(
            self.webhooks.create, request.url, list(request.events), request.description
        )
        return notifier_pb2.CreateWebhookResponse(webhook=webhook_to_proto(view), secret=secret)

    async def GetWebhook(self, request: Any, context: grpc.aio.ServicerContext) -> Any:
        view = await self.webhooks.database.run(self.webhooks.get, request.name)
        return notifier_pb2.GetWebhookResponse(webhook=webhook_to_proto(view))

    async def ListWebhooks(self, request: Any, context: grpc.aio.ServicerContext) -> Any:
        views, token = await self.webhooks.database.run(self.webhooks.list, request.page_size, request.page_token)
        return notifier_pb2.ListWebhooksResponse(webhooks=[webhook_to_proto(v) for v in views], next_page_token=token)

    async def UpdateWebhook(self, request: Any, context: grpc.aio.ServicerContext) -> Any:
        view = await self.webhooks.database.run(
            self.webhooks.update,
            request.name,
            request.url if request.HasField("url") else None,
            list(request.events) if request.set_events else None,
            request.description if request.HasField("description") else None,
            request.enabled if request.HasField("enabled") else None,
        )
        if not view.enabled:
            self.dispatcher.drop(view.id)
        return notifier_pb2.UpdateWebhookResponse(webhook=webhook_to_proto(view))

    async def DeleteWebhook(self, request: Any, context: grpc.aio.ServicerContext) -> Any:
        await self.webhooks.database.run(self.webhooks.delete, request.name)
        self.dispatcher.drop(request.name.removeprefix("webhooks/"))
        return notifier_pb2.DeleteWebhookResponse()

    async def RotateWebhookSecret(self, request: Any, context: grpc.aio.ServicerContext) -> Any:
        view, secret = await self.webhooks.database.run(self.webhooks.rotate, request.name)
        return notifier_pb2.RotateWebhookSecretResponse(webhook=webhook_to_proto(view), secret=secret)

    async def SendTestEvent(self, request: Any, context: grpc.aio.ServicerContext) -> Any:
        delivery_id = await self.webhooks.database.run(self.webhooks.test_delivery, request.name)
        await self.dispatcher.deliver_now(delivery_id)
        view = await self.webhooks.database.run(self.webhooks.delivery, delivery_id)
        return notifier_pb2.SendTestEventResponse(delivery=delivery_to_proto(view))

    async def ListDeliveries(self, request: Any, context: grpc.aio.ServicerContext) -> Any:
        views, token = await self.webhooks.database.run(
            self.webhooks.deliveries,
            request.name,
            request.event_id,
            STATUS_NAMES.get(request.status, ""),
            request.page_size,
            request.page_token,
        )
        return notifier_pb2.ListDeliveriesResponse(
            deliveries=[delivery_to_proto(v) for v in views], next_page_token=token
        )

    async def RedeliverEvent(self, request: Any, context: grpc.aio.ServicerContext) -> Any:
        view, outgoing = await self.webhooks.database.run(self.webhooks.redeliver, request.name, request.event_id)
        self.dispatcher.submit(outgoing)
        return notifier_pb2.RedeliverEventResponse(delivery=delivery_to_proto(view))

    async def ReplayEvents(self, request: Any, context: grpc.aio.ServicerContext) -> Any:
        start = seconds(request.start, request.HasField("start"))
        end = seconds(request.end, request.HasField("end"))
        queued = await self.webhooks.database.run(
            self.webhooks.replay,
            request.name,
            math.nan if start is None else start,
            math.nan if end is None else end,
        )
        for outgoing in queued:
            self.dispatcher.submit(outgoing)
        return notifier_pb2.ReplayEventsResponse(queued=len(queued))

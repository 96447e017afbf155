"""OpenTelemetry for every service: one TracerProvider, W3C traceparent through gRPC and NATS."""

from __future__ import annotations

import functools
from collections.abc import Mapping
from typing import Any

from opentelemetry import context, propagate, trace
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.sampling import ALWAYS_OFF, ParentBased

_configured = False


def setup(service_name: str) -> None:
    """Install the process's TracerProvider once (one process runs one service).

    A call whose caller sent a sampled `traceparent` gets recorded spans that continue it; the
    server interceptor starts no span for a call without one, and spans that start a trace of
    their own (a consumer's, say) are not recorded. Recording every span costs each call tens of
    microseconds, and no one would read those spans: no exporter is configured.
    """
    global _configured
    if _configured:
        return
    provider = TracerProvider(
        resource=Resource.create({"service.name": service_name}), sampler=ParentBased(root=ALWAYS_OFF)
    )
    trace.set_tracer_provider(provider)
    _configured = True


@functools.cache
def tracer(name: str) -> trace.Tracer:
    return trace.get_tracer(name)


def inject_headers() -> dict[str, str]:
    """The current trace context as `traceparent`/`tracestate` headers (empty when none)."""
    carrier: dict[str, str] = {}
    propagate.inject(carrier)
    return carrier


def extract_context(carrier: Mapping[str, str]) -> context.Context:
    """The trace context carried by headers or gRPC metadata."""
    return propagate.extract(dict(carrier))


def messaging_span(operation: str, subject: str, headers: Mapping[str, str] | None = None) -> Any:
    """A span for sending, receiving or processing a NATS message, continuing `headers`' trace."""
    kind = trace.SpanKind.PRODUCER if operation == "send" else trace.SpanKind.CONSUMER
    return tracer("mlmesh.messaging").start_as_current_span(
        f"{operation} {subject}",
        context=extract_context(headers or {}),
        kind=kind,
        attributes={
            "messaging.system": "nats",
            "messaging.destination.name": subject,
            "messaging.operation.type": operation,
        },
    )

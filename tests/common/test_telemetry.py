"""Trace context travels from a gRPC call through the outbox to the NATS message."""

from __future__ import annotations

import asyncio

import nats
import nats.js.errors

from services.common import telemetry
from tests.registry.uploads import model_upload

TRACE_ID = "4bf92f3577b34da6a3ce929d0e0e4736"


async def test_traceparent_flows_from_grpc_metadata_to_the_event_headers(registry_with_events, nats_server):
    caller = f"00-{TRACE_ID}-00f067aa0ba902b7-01"
    await registry_with_events.stub.RegisterModelVersion(
        model_upload("traced", [("m", b"x")]), metadata=[("traceparent", caller)]
    )
    connection = await nats.connect(nats_server.url)
    jetstream = connection.jetstream()
    # The relay creates MLMESH_EVENTS when it first connects, which on a busy machine may come
    # after the registration has answered.
    deadline = asyncio.get_running_loop().time() + 20
    while True:
        try:
            await jetstream.stream_info("MLMESH_EVENTS")
            break
        except nats.js.errors.NotFoundError:
            assert asyncio.get_running_loop().time() < deadline, "the relay did not create MLMESH_EVENTS"
            await asyncio.sleep(0.05)
    subscription = await jetstream.subscribe("mlmesh.events.model.registered", ordered_consumer=True)
    message = await subscription.next_msg(timeout=20)
    await connection.close()
    version, trace_id, span_id, flags = message.headers["traceparent"].split("-")
    assert (version, trace_id, flags) == ("00", TRACE_ID, "01")
    assert span_id != "00f067aa0ba902b7"  # the registry's own span, a child of the caller's


def test_spans_are_recorded_when_the_caller_samples_its_trace_and_not_otherwise():
    telemetry.setup("test")
    tracer = telemetry.tracer("test")
    sampled = telemetry.extract_context({"traceparent": f"00-{TRACE_ID}-00f067aa0ba902b7-01"})
    with tracer.start_as_current_span("continued", context=sampled) as continued:
        assert continued.is_recording()
        assert telemetry.inject_headers()["traceparent"].startswith(f"00-{TRACE_ID}-")
    with tracer.start_as_current_span("own trace", context=telemetry.extract_context({})) as own:
        assert not own.is_recording()
        assert own.get_span_context().trace_id != 0  # its context still travels on

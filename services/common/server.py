"""The gRPC server every service runs: health, reflection, telemetry, errors, size limits.

`ErrorInterceptor` is the one place where mlmesh errors become gRPC statuses.
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import logging
import multiprocessing
import signal
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, Generic, TypeVar

import grpc
from google.protobuf import any_pb2
from google.rpc import error_details_pb2, status_pb2
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection
from grpc_status import rpc_status
from opentelemetry import trace
from pydantic import ValidationError

from services.common import telemetry
from services.common.db import Database
from services.common.errors import InvalidArgument, MlmeshError
from services.common.memory import reuse_large_blocks
from services.common.outbox import Outbox, Relay
from services.common.settings import ServiceSettings

P = TypeVar("P")
R = TypeVar("R")

log = logging.getLogger(__name__)

ERROR_DOMAIN = "mlmesh.dev"
ACTOR_METADATA = "x-mlmesh-actor"


def actor_of(context: grpc.aio.ServicerContext) -> str:
    """Who is calling: the `x-mlmesh-actor` metadata, else "anonymous"."""
    for key, value in context.invocation_metadata() or ():
        if key == ACTOR_METADATA and isinstance(value, str):
            return value[:200] or "anonymous"
    return "anonymous"


@dataclass(frozen=True)
class Finished(Generic[R]):
    """The last item of `reports_of`: what the work returned."""

    result: R


async def reports_of(work: Callable[[Callable[[P], None]], R]) -> AsyncIterator[P | Finished[R]]:
    """Run `work(report)` on a thread and yield each thing it reports as it comes, then
    Finished(what it returned); its exception is raised after the reports before it. For
    server-streaming calls that show the progress of long work. A caller that goes away does
    not stop the work half-way: it finishes (and a failure is not reported as unretrieved)."""
    loop = asyncio.get_running_loop()
    reports: asyncio.Queue[P] = asyncio.Queue()

    def report(item: P) -> None:
        loop.call_soon_threadsafe(reports.put_nowait, item)

    run = asyncio.ensure_future(asyncio.to_thread(work, report))
    try:
        while not run.done() or not reports.empty():
            waiter = asyncio.ensure_future(reports.get())
            await asyncio.wait({waiter, run}, return_when=asyncio.FIRST_COMPLETED)
            if waiter.done():
                yield waiter.result()
            else:
                waiter.cancel()
        yield Finished(run.result())
    finally:
        run.add_done_callback(lambda done: done.cancelled() or done.exception())


def _status_of(error: MlmeshError) -> status_pb2.Status:
    code = grpc.StatusCode[error.code]
    info = error_details_pb2.ErrorInfo(reason=error.reason, domain=ERROR_DOMAIN, metadata=error.metadata)
    details = [any_pb2.Any()]
    details[0].Pack(info)
    if error.field:
        bad_request = error_details_pb2.BadRequest(
            field_violations=[error_details_pb2.BadRequest.FieldViolation(field=error.field, description=error.message)]
        )
        packed = any_pb2.Any()
        packed.Pack(bad_request)
        details.append(packed)
    return status_pb2.Status(code=code.value[0], message=error.message, details=details)


def _translate(error: Exception) -> MlmeshError:
    if isinstance(error, MlmeshError):
        return error
    if isinstance(error, ValidationError):
        first = error.errors()[0]
        field = ".".join(str(part) for part in first.get("loc", ()))
        return InvalidArgument(f"{field}: {first.get('msg')}", field=field or None)
    incident = uuid.uuid4().hex[:12]
    log.exception("unexpected error (incident %s)", incident)
    return MlmeshError(f"internal error (incident {incident}); the service log has the details")


async def _abort(context: grpc.aio.ServicerContext, error: Exception) -> None:
    status = rpc_status.to_status(_status_of(_translate(error)))
    await context.abort(status.code, status.details, status.trailing_metadata)


class _Undecodable:
    """Stands in for a request message whose bytes did not parse."""

    def __init__(self, error: Exception) -> None:
        self.error = error


def _tolerant(deserializer: Callable[[bytes], Any] | None) -> Callable[[bytes], Any] | None:
    """A deserializer that hands bad bytes on as _Undecodable instead of failing inside grpc."""
    if deserializer is None:
        return None

    def deserialize(payload: bytes) -> Any:
        try:
            return deserializer(payload)
        except Exception as error:
            return _Undecodable(error)

    return deserialize


def _decoded(request: Any) -> Any:
    if isinstance(request, _Undecodable):
        raise InvalidArgument(f"the request is not a valid protobuf message for this method: {request.error}")
    return request


async def _decoded_stream(requests: AsyncIterator[Any]) -> AsyncIterator[Any]:
    async for request in requests:
        yield _decoded(request)


def _wrap(
    handler: grpc.RpcMethodHandler,
    wrap_unary: Callable,
    wrap_stream: Callable,
    request_deserializer: Callable[[bytes], Any] | None = None,
) -> grpc.RpcMethodHandler:
    """Rebuild `handler` with its behaviour wrapped: unary-response and streaming-response alike.

    The wrappers are called as wrap(behaviour, request_streaming).
    """
    kwargs = {
        "request_deserializer": request_deserializer or handler.request_deserializer,
        "response_serializer": handler.response_serializer,
    }
    if handler.unary_unary:
        return grpc.unary_unary_rpc_method_handler(wrap_unary(handler.unary_unary, False), **kwargs)
    if handler.stream_unary:
        return grpc.stream_unary_rpc_method_handler(wrap_unary(handler.stream_unary, True), **kwargs)
    if handler.unary_stream:
        return grpc.unary_stream_rpc_method_handler(wrap_stream(handler.unary_stream, False), **kwargs)
    return grpc.stream_stream_rpc_method_handler(wrap_stream(handler.stream_stream, True), **kwargs)


class ServiceInterceptor(grpc.aio.ServerInterceptor):
    """The one interceptor of every mlmesh server.

    - Maps MlmeshError (and stray exceptions) to gRPC statuses with google.rpc.Status details;
      requests whose bytes do not parse answer INVALID_ARGUMENT too, rather than grpc's UNKNOWN.
    - With `traced`, continues the caller's trace (W3C traceparent in metadata) with a server span
      per call.

    One layer rather than one per concern, and each method's handler is wrapped once and kept:
    every call pays for the interceptor chain, which is a measurable part of a small call.
    """

    def __init__(self, service: str, traced: bool = True) -> None:
        self._tracer = telemetry.tracer(f"mlmesh.{service}") if traced else None
        self._wrapped: dict[str, tuple[grpc.RpcMethodHandler, grpc.RpcMethodHandler]] = {}

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler]],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler:
        handler = await continuation(handler_call_details)
        if handler is None:
            return handler
        method = handler_call_details.method
        known = self._wrapped.get(method)
        if known is not None and known[0] is handler:
            return known[1]
        wrapped = self._wrap(method, handler)
        self._wrapped[method] = (handler, wrapped)
        return wrapped

    def _span(self, method: str, context: grpc.aio.ServicerContext) -> Any:
        """A server span continuing the caller's trace; none for a caller that sent no trace
        context. Such a call would get a span that is not recorded (the sampler records only
        what the caller samples) and a trace that nobody records, at a cost measured at a sixth
        of a small inference call's throughput."""
        if self._tracer is None:
            return contextlib.nullcontext()
        received = context.invocation_metadata() or ()
        if not any(key == "traceparent" for key, _ in received):
            return contextlib.nullcontext()
        metadata = {key: value for key, value in received if isinstance(value, str)}
        return self._tracer.start_as_current_span(
            method.lstrip("/"),
            context=telemetry.extract_context(metadata),
            kind=trace.SpanKind.SERVER,
            attributes={"rpc.system": "grpc", "rpc.method": method},
        )

    def _wrap(self, method: str, handler: grpc.RpcMethodHandler) -> grpc.RpcMethodHandler:
        span = self._span

        def checked(request: Any, request_streaming: bool) -> Any:
            return _decoded_stream(request) if request_streaming else _decoded(request)

        def wrap_unary(behaviour: Callable, request_streaming: bool) -> Callable:
            async def call(request: Any, context: grpc.aio.ServicerContext) -> Any:
                with span(method, context):
                    try:
                        return await behaviour(checked(request, request_streaming), context)
                    except grpc.aio.AbortError:
                        raise
                    except Exception as error:
                        await _abort(context, error)

            return call

        def wrap_stream(behaviour: Callable, request_streaming: bool) -> Callable:
            async def call(request: Any, context: grpc.aio.ServicerContext) -> AsyncIterator[Any]:
                with span(method, context):
                    try:
                        async for response in behaviour(checked(request, request_streaming), context):
                            yield response
                    except grpc.aio.AbortError:
                        raise
                    except Exception as error:
                        await _abort(context, error)

            return call

        return _wrap(handler, wrap_unary, wrap_stream, _tolerant(handler.request_deserializer))


def build_server(
    service: str,
    registrations: Sequence[tuple[Callable[[Any, grpc.aio.Server], None], Any, str]],
    *,
    host: str,
    port: int,
    max_message_bytes: int,
    share_port: bool = False,
    traced: bool = True,
) -> tuple[grpc.aio.Server, int, health.aio.HealthServicer]:
    """An unstarted grpc.aio server with the given servicers, health and reflection.

    `registrations` holds (add_XServicer_to_server, servicer, full service name) triples.
    `share_port` lets the worker processes of one service listen on the same port; otherwise a
    taken port is an error. `traced=False` leaves out the server span of every call, for a proxy
    that passes the caller's trace context on and must not pay for a span per call. Returns the
    server, the bound port and the health servicer (set SERVING once ready).
    """
    telemetry.setup(service)
    server = grpc.aio.server(
        interceptors=[ServiceInterceptor(service, traced)],
        options=[
            ("grpc.max_receive_message_length", max_message_bytes),
            ("grpc.max_send_message_length", max_message_bytes),
            ("grpc.so_reuseport", 1 if share_port else 0),
        ],
    )
    health_servicer = health.aio.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    names = [health_pb2.DESCRIPTOR.services_by_name["Health"].full_name, reflection.SERVICE_NAME]
    for add, servicer, name in registrations:
        add(servicer, server)
        names.append(name)
    reflection.enable_server_reflection(names, server)
    bound = server.add_insecure_port(f"{host}:{port}")
    if bound == 0:
        raise OSError(f"cannot listen on {host}:{port}: the port is taken or the address is wrong")
    return server, bound, health_servicer


async def set_serving(health_servicer: health.aio.HealthServicer, names: Sequence[str], serving: bool) -> None:
    status = health_pb2.HealthCheckResponse.SERVING if serving else health_pb2.HealthCheckResponse.NOT_SERVING
    for name in ["", *names]:
        await health_servicer.set(name, status)


async def serve_until_stopped(
    server: grpc.aio.Server,
    health_servicer: health.aio.HealthServicer,
    service_names: Sequence[str],
    background: Sequence[Callable[[], Awaitable[None]]] = (),
    grace_seconds: float = 5.0,
    stop: asyncio.Event | None = None,
) -> None:
    """Start the server and background tasks; on SIGTERM/SIGINT (or `stop`) drain and stop cleanly."""
    await server.start()
    await set_serving(health_servicer, service_names, True)
    tasks = [asyncio.create_task(job()) for job in background]
    stop = stop or asyncio.Event()
    loop = asyncio.get_running_loop()
    for number in (signal.SIGTERM, signal.SIGINT):
        with contextlib.suppress(NotImplementedError, RuntimeError):
            loop.add_signal_handler(number, stop.set)
    waiter = asyncio.create_task(stop.wait())
    done_tasks = asyncio.create_task(server.wait_for_termination())
    await asyncio.wait([waiter, done_tasks, *tasks], return_when=asyncio.FIRST_COMPLETED)
    for task in tasks:
        if task.done() and not task.cancelled() and task.exception():
            log.error("background task failed", exc_info=task.exception())
    await set_serving(health_servicer, service_names, False)
    await server.stop(grace_seconds)
    for task in [*tasks, waiter, done_tasks]:
        task.cancel()
    await asyncio.gather(*tasks, waiter, done_tasks, return_exceptions=True)


@dataclass
class ServiceRuntime:
    """A built service: its unstarted gRPC server and what runs beside it.

    `background` runs in every worker process; `leader_background` (housekeeping such as sweeps)
    only in the first.
    """

    name: str
    server: grpc.aio.Server
    port: int
    health: health.aio.HealthServicer
    service_names: list[str]
    settings: ServiceSettings
    database: Database | None = None
    outbox: Outbox | None = None
    background: list[Callable[[], Awaitable[None]]] = field(default_factory=list)
    leader_background: list[Callable[[], Awaitable[None]]] = field(default_factory=list)
    relay: Relay | None = None

    def __post_init__(self) -> None:
        if self.settings.nats_url and self.database and self.outbox:
            self.relay = Relay(
                self.database,
                self.outbox,
                self.settings.nats_url,
                batch_size=self.settings.outbox_batch_size,
                poll_seconds=self.settings.outbox_poll_seconds,
                retention_seconds=self.settings.outbox_retention_seconds,
            )
            self.background.append(self.relay.run)

    @property
    def address(self) -> str:
        return f"{self.settings.host}:{self.port}"

    async def run(self, *, leader: bool = True, stop: asyncio.Event | None = None) -> None:
        """Serve until SIGTERM/SIGINT (or `stop`), with the outbox relay and other background work."""
        log.info("%s serving on %s", self.name, self.address)
        # What start-up made (modules, models, settings) lives as long as the process: out of the
        # collector's sight, a full collection no longer walks it, which pauses calls otherwise.
        gc.collect()
        gc.freeze()
        jobs = [*self.background, *(self.leader_background if leader else [])]
        try:
            await serve_until_stopped(self.server, self.health, self.service_names, jobs, stop=stop)
        finally:
            if self.database:
                self.database.dispose()


def service_runtime(
    name: str,
    settings: ServiceSettings,
    registrations: Sequence[tuple[Callable[[Any, grpc.aio.Server], None], Any, str]],
    *,
    traced: bool = True,
    **parts: Any,
) -> ServiceRuntime:
    """A service's gRPC server, configured from its settings (host, port, message size, workers),
    with what runs beside it (`parts`: database, outbox, background, leader_background);
    `traced` as in build_server."""
    server, port, health_servicer = build_server(
        name,
        registrations,
        host=settings.host,
        port=settings.port,
        max_message_bytes=settings.max_message_bytes,
        share_port=settings.workers > 1,
        traced=traced,
    )
    return ServiceRuntime(
        name=name,
        server=server,
        port=port,
        health=health_servicer,
        service_names=[service for _, _, service in registrations],
        settings=settings,
        **parts,
    )


Build = Callable[[Any], ServiceRuntime]
"""A service's `build(settings)`: a module-level function, so that worker processes can import it
(`service_runtime` makes what it returns)."""


async def run_service(settings: ServiceSettings, build: Build) -> None:
    """Run a service in this process and, when `settings.workers` > 1, in as many worker
    processes in all, listening on the same port; the workers stop when this process stops."""
    prepare_process(settings)
    if settings.workers == 1:
        await build(settings).run()
        return
    runtime = build(settings)  # binds first: with port 0 the workers learn the port chosen
    context = multiprocessing.get_context("spawn")
    worker_settings = settings.model_copy(update={"port": runtime.port})
    workers = [
        context.Process(target=_worker, args=(build, worker_settings), name=f"{runtime.name}-worker-{number}")
        for number in range(1, settings.workers)
    ]
    for worker in workers:
        worker.start()
    try:
        await runtime.run()
    finally:
        for worker in workers:
            worker.terminate()  # SIGTERM: each drains its calls and stops
        for worker in workers:
            await asyncio.to_thread(worker.join, 10)
            if worker.is_alive():
                worker.kill()


def prepare_process(settings: ServiceSettings) -> None:
    """What every service process sets up first: logging, and malloc (`reuse_large_blocks`)."""
    logging.basicConfig(level=settings.log_level, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    reuse_large_blocks()


def _worker(build: Build, settings: ServiceSettings) -> None:
    prepare_process(settings)
    asyncio.run(_serve_as_worker(build, settings))


async def _serve_as_worker(build: Build, settings: ServiceSettings) -> None:
    stop = asyncio.Event()
    parent = multiprocessing.parent_process()
    if parent is not None:  # the first process died without stopping us: stop too
        asyncio.get_running_loop().add_reader(parent.sentinel, stop.set)
    await build(settings).run(leader=False, stop=stop)

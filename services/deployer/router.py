"""The endpoint router: the stable Open Inference Protocol address (gRPC and REST) of one endpoint.

The deployer starts one router per endpoint (`python -m services.deployer.router`) and tells it
where the endpoint's replicas are through a routes file, which it replaces atomically whenever
they change:

    {"generation": 7, "endpoint": "fraud", "deployments": [
        {"name": "blue", "model_version": "1", "weight": 90, "mirror_percent": 0,
         "replicas": [{"grpc": "127.0.0.1:41001", "http": "127.0.0.1:41002"}]}, ...]}

The router polls the file, and once it routes by generation N it writes N to
`<routes file>.loaded`: the deployer stops replicas that left the routes only after that, so a
blue/green shift drops no request.

Requests name the endpoint as their model. Without a model version they go to a deployment
chosen by the weights (smooth weighted round-robin, so a 90/10 split is exact and spread out);
with one, to the deployment serving that version, whatever its weight. Replicas of a deployment
take turns. A replica that is unreachable (UNAVAILABLE) hands the request to the deployment's
next replica, then, unless the version was pinned, to the other deployments taking traffic:
inference is idempotent. Every other answer, error or not, goes back to the caller as the
replica gave it. A deployment with `mirror_percent` p receives, in the background, a copy of p%
of the requests that went elsewhere; its answers are discarded.

gRPC requests are forwarded as the bytes they arrived as: only the model name and version are
read from them (fields 1 and 2 of ModelInferRequest, ModelMetadataRequest and ModelReadyRequest
alike), and answers are returned as the replica's bytes, so tensors are never decoded here.
"""

from __future__ import annotations

import asyncio
import contextlib
import importlib
import json
import logging
import os
import time
from collections.abc import Callable, Coroutine, Iterable, Iterator, Sequence
from dataclasses import dataclass
from functools import cache
from importlib import metadata as package_metadata
from typing import Any, Generic, TypeVar

import aiohttp
import grpc
from aiohttp import web
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, generate_latest
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator
from yarl import URL

from services.common.errors import (
    InvalidArgument,
    MlmeshError,
    NotFound,
    Unavailable,
    http_error_middleware,
)
from services.common.server import ServiceRuntime, run_service, service_runtime
from services.deployer.settings import RouterSettings

log = logging.getLogger("services.deployer.router")  # not __name__, which is "__main__" under -m

SERVICE_NAME = "inference.GRPCInferenceService"
MODEL_METHODS = ("ModelInfer", "ModelMetadata", "ModelReady")
"""The methods forwarded to a replica; the server's own (live, ready, metadata) answer here."""
SERVER_NAME = "mlmesh-router"
REST_EXTENSIONS = ("binary_tensor_data",)

HEADER_LENGTH = "Inference-Header-Content-Length"
# What a REST request and its answer carry through the router besides the body.
FORWARDED_REQUEST_HEADERS = ("Content-Type", "Content-Encoding", HEADER_LENGTH, "traceparent", "tracestate")
FORWARDED_RESPONSE_HEADERS = ("Content-Type", "Content-Encoding", HEADER_LENGTH)
FORWARDED_METADATA = ("traceparent", "tracestate")

REPLICA_SET_ASIDE_SECONDS = 1.0
"""After a replica fails to answer, it is tried after the others for this long, so that a dead
replica costs requests no round trip while the deployer replaces it."""

CHANNEL_DRAIN_SECONDS = 60.0
"""A replica that left the routes may still be answering requests sent to it before; its channel
closes once they are done, or after this long."""

STREAM_ABOVE_BYTES = 1024 * 1024
"""REST answers larger than this (or of unknown length) are streamed to the caller as they arrive."""

ENDPOINT_NAME = r"^[A-Za-z0-9][A-Za-z0-9._-]{0,99}$"
ADDRESS = r"^\S+:[0-9]{1,5}$"

# HTTP status -> the gRPC status name it stands for, so both protocols count under one set of codes.
CODE_OF_HTTP_STATUS = {
    200: "OK",
    400: "INVALID_ARGUMENT",
    404: "NOT_FOUND",
    409: "ABORTED",
    413: "RESOURCE_EXHAUSTED",
    500: "INTERNAL",
    503: "UNAVAILABLE",
}


# ---------------------------------------------------------------- the routes file


class ReplicaRoute(BaseModel):
    model_config = ConfigDict(frozen=True, extra="ignore")

    grpc: str = Field(pattern=ADDRESS)
    """host:port of the replica's Open Inference Protocol gRPC API."""

    http: str = Field(pattern=ADDRESS)
    """host:port of the replica's Open Inference Protocol REST API."""


class DeploymentRoute(BaseModel):
    model_config = ConfigDict(frozen=True, extra="ignore")

    name: str = Field(min_length=1, max_length=100)
    model_version: str = Field(min_length=1, max_length=100)
    """The registry version its replicas serve, as they answer it in `model_version`."""

    weight: int = Field(ge=0, le=100, strict=True)
    """Percent of the requests without a model version that it takes."""

    mirror_percent: int = Field(default=0, ge=0, le=100, strict=True)
    """Percent of the requests that went to other deployments that it receives a copy of."""

    replicas: list[ReplicaRoute] = Field(default_factory=list)
    """Its replicas that are ready."""


class Routes(BaseModel):
    """The routes file: where the endpoint's requests go."""

    model_config = ConfigDict(frozen=True, extra="ignore")

    generation: int = Field(ge=0, strict=True)
    """Counts up with every change; confirmed in `<routes file>.loaded` once in force."""

    endpoint: str = Field(pattern=ENDPOINT_NAME)
    deployments: list[DeploymentRoute]

    @model_validator(mode="after")
    def _consistent(self) -> Routes:
        names = [deployment.name for deployment in self.deployments]
        repeated = sorted({name for name in names if names.count(name) > 1})
        if repeated:
            raise ValueError(f"deployment names must be unique; repeated: {', '.join(repeated)}")
        total = sum(deployment.weight for deployment in self.deployments)
        if total not in (0, 100):
            raise ValueError(f"the weights must sum to 100 (or all be 0 while nothing takes traffic), not {total}")
        return self


class RoutesError(ValueError):
    """The routes file cannot be used; the message says why."""


def parse_routes(text: str | bytes) -> Routes:
    """The routes in `text` (the routes file's JSON), checked; RoutesError names what is wrong."""
    try:
        return Routes.model_validate_json(text)
    except ValidationError as error:
        problems = []
        for problem in error.errors()[:5]:
            where = ".".join(str(part) for part in problem["loc"])
            message = str(problem["msg"]).removeprefix("Value error, ")
            problems.append(f"{where}: {message}" if where else message)
        raise RoutesError("; ".join(problems)) from None


def version_order(version: str) -> tuple[int, int, str]:
    """Sort key of model versions: numbers in numeric order, before any other name."""
    return (0, int(version), "") if version.isdigit() else (1, 0, version)


# ---------------------------------------------------------------- choosing where a request goes

Item = TypeVar("Item")


class SmoothWeightedChooser(Generic[Item]):
    """nginx's smooth weighted round-robin: deterministic, exact over every cycle of the weights'
    sum, and spread out (90/10 sends one in ten to the second, not ten in a row). Items of weight
    0 are never chosen."""

    def __init__(self, weighted: Iterable[tuple[Item, int]]) -> None:
        eligible = [(item, weight) for item, weight in weighted if weight > 0]
        self._items = [item for item, _ in eligible]
        self._weights = [weight for _, weight in eligible]
        self._current = [0] * len(self._items)
        self._total = sum(self._weights)

    def choose(self) -> Item | None:
        """The next item; None when none has a weight."""
        if not self._items:
            return None
        current, best = self._current, 0
        for index, weight in enumerate(self._weights):
            current[index] += weight
            if current[index] > current[best]:
                best = index
        current[best] -= self._total
        return self._items[best]


class Replica:
    """One replica as the router sees it: its addresses and whether it failed a moment ago."""

    __slots__ = ("grpc", "http", "set_aside_until")

    def __init__(self, route: ReplicaRoute) -> None:
        self.grpc = route.grpc
        self.http = route.http
        self.set_aside_until = 0.0

    def failed(self) -> None:
        self.set_aside_until = time.monotonic() + REPLICA_SET_ASIDE_SECONDS


class Deployment:
    """One deployment of the routes in force: its replicas take turns."""

    def __init__(self, route: DeploymentRoute) -> None:
        self.name = route.name
        self.model_version = route.model_version
        self.weight = route.weight
        self.mirror_percent = route.mirror_percent
        self.replicas = [Replica(replica) for replica in route.replicas]
        self._turn = 0
        self._requests_elsewhere = 0

    def replica_order(self) -> list[Replica]:
        """Its replicas in the order to try them: round-robin, those that just failed last."""
        replicas = self.replicas
        if len(replicas) > 1:
            start = self._turn % len(replicas)
            self._turn += 1
            replicas = replicas[start:] + replicas[:start]
        now = time.monotonic()
        if any(replica.set_aside_until > now for replica in replicas):
            replicas = sorted(replicas, key=lambda replica: replica.set_aside_until > now)  # stable
        return replicas

    def takes_copy(self) -> bool:
        """Whether the request that just went to another deployment is copied here: exactly
        `mirror_percent` of them, counted rather than drawn at random."""
        self._requests_elsewhere += 1
        seen, percent = self._requests_elsewhere, self.mirror_percent
        return seen * percent // 100 > (seen - 1) * percent // 100


class RouteTable:
    """The routes in force, with the state of the round-robins over them."""

    def __init__(self, routes: Routes) -> None:
        self.routes = routes
        self.endpoint = routes.endpoint
        self.generation = routes.generation
        self.deployments = [Deployment(route) for route in routes.deployments]
        heaviest_first = sorted(self.deployments, key=lambda deployment: -deployment.weight)
        taking_traffic = [deployment for deployment in heaviest_first if deployment.weight and deployment.replicas]
        self._chooser = SmoothWeightedChooser((deployment, deployment.weight) for deployment in taking_traffic)
        self._by_weight = taking_traffic
        self.mirrors = [
            deployment for deployment in self.deployments if deployment.mirror_percent and deployment.replicas
        ]
        self.versions = sorted({deployment.model_version for deployment in self.deployments}, key=version_order)
        self._by_version: dict[str, list[Deployment]] = {}
        for deployment in heaviest_first:
            self._by_version.setdefault(deployment.model_version, []).append(deployment)
        self.ready = bool(taking_traffic)

    def plan(self, version: str, *, by_weight: bool = True) -> list[Deployment]:
        """The deployments to try for a request, in order.

        Pinned to `version`: the deployments serving it. Otherwise the one the weights choose
        (with `by_weight`; metadata and readiness take the heaviest, and leave the choice of
        inference requests alone), then the others taking traffic.
        """
        if version:
            pinned = self._by_version.get(version)
            if pinned is None:
                raise NotFound(
                    f"endpoint {self.endpoint!r} does not serve version {version[:40]!r}; it serves "
                    f"{', '.join(self.versions) or 'no version yet'}",
                    reason="VERSION_NOT_FOUND",
                )
            return pinned
        chosen = self._chooser.choose() if by_weight else None
        if chosen is None or len(self._by_weight) == 1:
            return self._by_weight
        return [chosen, *(deployment for deployment in self._by_weight if deployment is not chosen)]

    def replica_addresses(self) -> set[str]:
        return {replica.grpc for deployment in self.deployments for replica in deployment.replicas}

    def describe(self) -> str:
        parts = [
            f"{deployment.name} (version {deployment.model_version}, weight {deployment.weight}"
            + (f", mirror {deployment.mirror_percent}%" if deployment.mirror_percent else "")
            + f", {len(deployment.replicas)} replica{'s' if len(deployment.replicas) != 1 else ''})"
            for deployment in self.deployments
        ]
        return ", ".join(parts) or "no deployment"


# ---------------------------------------------------------------- reading requests without decoding them


@dataclass(frozen=True)
class RequestTarget:
    """The model name and version a request names, read from its raw bytes."""

    name: str
    version: str
    version_spans: tuple[tuple[int, int], ...] = ()
    """Where the version field sits in the message (to send a copy without it)."""

    def without_version(self, message: bytes) -> bytes:
        """`message` with its model version cut out: still a valid message of its type."""
        if not self.version_spans:
            return message
        kept, position = [], 0
        for start, end in self.version_spans:
            kept.append(message[position:start])
            position = end
        kept.append(message[position:])
        return b"".join(kept)


def _read_varint(message: bytes, position: int) -> tuple[int, int]:
    value = shift = 0
    while True:
        if position >= len(message):
            raise ValueError("it ends inside a number")
        byte = message[position]
        position += 1
        value |= (byte & 0x7F) << shift
        if not byte & 0x80:
            return value, position
        shift += 7
        if shift >= 64:
            raise ValueError("a number in it is longer than 10 bytes")


def _fields(message: bytes) -> Iterator[tuple[int, int, int, int, int]]:
    """The top-level fields of a protobuf message as (number, wire type, start of the field, start
    and end of its value); a field's contents are skipped, not read."""
    position, end = 0, len(message)
    while position < end:
        field_start = position
        key, position = _read_varint(message, position)
        number, wire_type = key >> 3, key & 7
        if number == 0:
            raise ValueError(f"field number 0 at byte {field_start}")
        value_start = position
        if wire_type == 0:
            _, position = _read_varint(message, position)
        elif wire_type == 1:
            position += 8
        elif wire_type == 2:
            length, value_start = _read_varint(message, position)
            position = value_start + length
        elif wire_type == 5:
            position += 4
        else:
            raise ValueError(f"wire type {wire_type} at byte {field_start} (groups are not used by this protocol)")
        if position > end:
            raise ValueError(f"field {number} at byte {field_start} runs past the end of the message")
        yield number, wire_type, field_start, value_start, position


def request_target(message: bytes) -> RequestTarget:
    """The model name (field 1) and version (field 2) of a ModelInferRequest, ModelMetadataRequest
    or ModelReadyRequest (the three number them alike); INVALID_ARGUMENT when the bytes are no
    protobuf message."""
    name = version = b""
    spans = []
    try:
        for number, wire_type, field_start, value_start, value_end in _fields(message):
            if wire_type != 2:
                continue
            if number == 1:
                name = message[value_start:value_end]
            elif number == 2:
                version = message[value_start:value_end]
                spans.append((field_start, value_end))
        return RequestTarget(name.decode(), version.decode(), tuple(spans))
    except (ValueError, UnicodeDecodeError) as error:
        raise InvalidArgument(f"the request is not a valid protobuf message for this method: {error}") from None


# The router's own answers are a few scalar fields, encoded here by hand: the generated messages
# are not imported by this module (see build()).


def _varint(value: int) -> bytes:
    encoded = bytearray()
    while value > 0x7F:
        encoded.append((value & 0x7F) | 0x80)
        value >>= 7
    encoded.append(value)
    return bytes(encoded)


def _string_field(number: int, text: str) -> bytes:
    data = text.encode()
    return _varint(number << 3 | 2) + _varint(len(data)) + data


def _bool_message(value: bool) -> bytes:
    """A message whose only field, number 1, is a bool (ServerLiveResponse, ServerReadyResponse)."""
    return b"\x08\x01" if value else b""


def with_versions(metadata_answer: bytes, versions: Sequence[str]) -> bytes:
    """A ModelMetadataResponse with its `versions` (field 2) replaced: the endpoint's, not only the
    one of the replica that answered. Unchanged if it does not parse."""
    try:
        fields = list(_fields(metadata_answer))
    except ValueError:
        return metadata_answer
    kept = [metadata_answer[start:end] for number, _, start, _, end in fields if number != 2]
    return b"".join([*kept, *(_string_field(2, version) for version in versions)])


@cache
def server_version() -> str:
    """mlmesh's version, as the router reports it in server metadata."""
    try:
        return package_metadata.version("mlmesh")
    except package_metadata.PackageNotFoundError:
        return "0+unknown"


# ---------------------------------------------------------------- metrics


class RouterMetrics:
    """Prometheus metrics of the router, in a registry of its own (served at REST `/metrics`)."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        self.requests = Counter(
            "mlmesh_router_requests",
            "Inference requests, by the deployment that answered (empty when none did) and outcome "
            "(a gRPC status code name).",
            ["endpoint", "deployment", "code"],
            registry=self.registry,
        )
        self.mirrored = Counter(
            "mlmesh_router_mirrored",
            "Copies of requests sent to mirror deployments, by outcome (their answers are discarded).",
            ["endpoint", "deployment", "code"],
            registry=self.registry,
        )
        self.mirror_dropped = Counter(
            "mlmesh_router_mirror_dropped",
            "Copies not sent because mirror_max_in_flight copies were already in flight.",
            ["endpoint"],
            registry=self.registry,
        )
        self._request_series: dict[tuple[str, str, str], Any] = {}

    def count(self, endpoint: str, deployment: str, code: str) -> None:
        key = (endpoint, deployment, code)
        series = self._request_series.get(key)
        if series is None:  # labels() takes a lock and builds a key each time: keep the series
            series = self._request_series[key] = self.requests.labels(*key)
        series.inc()

    def exposition(self) -> bytes:
        return generate_latest(self.registry)


# ---------------------------------------------------------------- upstream connections


class ReplicaChannels:
    """One gRPC channel per replica, kept open and reused; calls carry bytes, not messages."""

    def __init__(self, max_message_bytes: int) -> None:
        self._options = [
            ("grpc.max_receive_message_length", max_message_bytes),
            ("grpc.max_send_message_length", max_message_bytes),
            # A replica restarted on its port is found again within a second, not grpc's minutes.
            ("grpc.initial_reconnect_backoff_ms", 100),
            ("grpc.min_reconnect_backoff_ms", 100),
            ("grpc.max_reconnect_backoff_ms", 1000),
        ]
        self._channels: dict[str, grpc.aio.Channel] = {}
        self._methods: dict[tuple[str, str], grpc.aio.UnaryUnaryMultiCallable] = {}
        self._closing: set[asyncio.Task[None]] = set()

    def method(self, address: str, path: str) -> grpc.aio.UnaryUnaryMultiCallable:
        callable_method = self._methods.get((address, path))
        if callable_method is None:
            channel = self._channels.get(address)
            if channel is None:
                channel = self._channels[address] = grpc.aio.insecure_channel(address, options=self._options)
            # No serializers: the request's bytes go out as they came, the answer's come back.
            callable_method = self._methods[(address, path)] = channel.unary_unary(path)
        return callable_method

    def keep_only(self, addresses: set[str]) -> None:
        """Close the channels of replicas that left the routes, once their calls are done."""
        for address in [address for address in self._channels if address not in addresses]:
            channel = self._channels.pop(address)
            for key in [key for key in self._methods if key[0] == address]:
                del self._methods[key]
            task = asyncio.get_running_loop().create_task(channel.close(CHANNEL_DRAIN_SECONDS))
            self._closing.add(task)
            task.add_done_callback(self._closing.discard)

    async def close(self) -> None:
        channels, self._channels = list(self._channels.values()), {}
        self._methods.clear()
        await asyncio.gather(*(channel.close() for channel in channels), return_exceptions=True)
        for task in list(self._closing):
            task.cancel()


# ---------------------------------------------------------------- the router


class Router:
    """The routes in force, kept in step with the routes file, and the forwarding of requests."""

    def __init__(self, settings: RouterSettings, metrics: RouterMetrics) -> None:
        self.settings = settings
        self.metrics = metrics
        self.routes_file = settings.routes_file
        self.loaded_file = self.routes_file.with_name(self.routes_file.name + ".loaded")
        self.table: RouteTable | None = None
        self.channels = ReplicaChannels(settings.max_message_bytes)
        self.http: aiohttp.ClientSession | None = None
        self._file_seen: tuple[int, int, int] | None = None
        self._routes_problem = f"waiting for the routes file {self.routes_file}"
        self._copies_in_flight = 0
        self._copies: set[asyncio.Task[None]] = set()

    # ------------------------------------------------------------ the routes file

    def check_routes(self) -> None:
        """Load the routes file if it changed since last seen; an unusable one keeps the routes
        in force."""
        try:
            seen = os.stat(self.routes_file)
        except OSError as error:
            if self._file_seen != (0, 0, 0):
                self._file_seen = (0, 0, 0)
                kept = "keeping the routes in force" if self.table else "waiting for it"
                log.warning("routes file %s cannot be read (%s); %s", self.routes_file, error.strerror, kept)
            return
        if (seen.st_mtime_ns, seen.st_size, seen.st_ino) == self._file_seen:
            return
        try:
            with self.routes_file.open("rb") as routes_file:
                opened = os.fstat(routes_file.fileno())
                text = routes_file.read()
        except OSError as error:
            log.error("routes file %s cannot be read: %s", self.routes_file, error)
            return
        # What was read is what the open file held: a file replaced meanwhile is seen next time.
        self._file_seen = (opened.st_mtime_ns, opened.st_size, opened.st_ino)
        try:
            routes = parse_routes(text)
        except RoutesError as error:
            self._refuse(str(error))
            return
        if self.table is not None and routes.endpoint != self.table.endpoint:
            self._refuse(f"it names endpoint {routes.endpoint!r}, but this router serves {self.table.endpoint!r}")
            return
        self.apply(routes)

    def _refuse(self, problem: str) -> None:
        if self.table is None:
            self._routes_problem = f"the routes file {self.routes_file} is invalid: {problem}"
        kept = f"generation {self.table.generation} stays in force" if self.table else "no routes yet"
        log.error("routes file %s is invalid, %s: %s", self.routes_file, kept, problem)

    def apply(self, routes: Routes) -> None:
        """Route by `routes` from now on, and confirm it in the `.loaded` file."""
        if self.table is not None and routes.generation < self.table.generation:
            log.warning(
                "routes generation %d follows %d: applied all the same", routes.generation, self.table.generation
            )
        self.table = RouteTable(routes)
        self.channels.keep_only(self.table.replica_addresses())
        self.metrics.mirror_dropped.labels(routes.endpoint)  # shown as 0 before the first drop
        log.info("endpoint %s: routes generation %d: %s", routes.endpoint, routes.generation, self.table.describe())
        scratch = self.loaded_file.with_name(f".{self.loaded_file.name}.{os.getpid()}")
        try:
            scratch.write_text(str(routes.generation))
            os.replace(scratch, self.loaded_file)
        except OSError as error:
            log.error("cannot confirm routes generation %d in %s: %s", routes.generation, self.loaded_file, error)

    async def watch(self) -> None:
        """Check the routes file every `poll_seconds` until cancelled."""
        while True:
            try:
                self.check_routes()
            except Exception:  # the next check may succeed; the routes in force stay meanwhile
                log.exception("checking the routes file failed")
            await asyncio.sleep(self.settings.poll_seconds)

    # ------------------------------------------------------------ shared by both protocols

    def table_for(self, model_name: str) -> RouteTable:
        """The routes, when `model_name` is the endpoint's name."""
        table = self.table
        if table is None:
            raise Unavailable(f"this router has no routes yet: {self._routes_problem}")
        if model_name != table.endpoint:
            raise NotFound(
                f"model {model_name[:200]!r} is not served here: this is the address of endpoint "
                f"{table.endpoint!r}; name it as the model",
                reason="MODEL_NOT_FOUND",
            )
        return table

    @property
    def endpoint(self) -> str:
        return self.table.endpoint if self.table else ""

    def ready(self) -> bool:
        return self.table is not None and self.table.ready

    def _nothing_answered(self, table: RouteTable, version: str, tried: list[str], last_error: str) -> Unavailable:
        if not tried:
            if version:
                return Unavailable(f"endpoint {table.endpoint!r}: no replica of version {version!r} is ready")
            return Unavailable(
                f"endpoint {table.endpoint!r} has no deployment taking traffic with a ready replica "
                f"({table.describe()})"
            )
        return Unavailable(
            f"endpoint {table.endpoint!r}: no replica answered; tried {', '.join(tried)} "
            f"(last error: {last_error[:300]})"
        )

    def _send_copies(
        self, table: RouteTable, chosen: Deployment, send: Callable[[Replica], Coroutine[Any, Any, str]]
    ) -> None:
        """Copy the request to the mirror deployments whose turn it is, in the background; when
        `mirror_max_in_flight` copies are out already, the copy is dropped (and counted)."""
        for mirror in table.mirrors:
            if mirror is chosen or not mirror.takes_copy():
                continue
            if self._copies_in_flight >= self.settings.mirror_max_in_flight:
                self.metrics.mirror_dropped.labels(table.endpoint).inc()
                continue
            self._copies_in_flight += 1
            task = asyncio.get_running_loop().create_task(
                self._copy(table.endpoint, mirror.name, send(mirror.replica_order()[0]))
            )
            self._copies.add(task)
            task.add_done_callback(self._copy_done)

    async def _copy(self, endpoint: str, deployment: str, sending: Coroutine[Any, Any, str]) -> None:
        try:
            code = await asyncio.wait_for(sending, self.settings.mirror_timeout_seconds)
        except TimeoutError:
            code = "DEADLINE_EXCEEDED"
        except Exception as error:  # a copy must never trouble the router
            log.debug("mirror copy to %s failed: %s", deployment, error)
            code = "UNAVAILABLE"
        self.metrics.mirrored.labels(endpoint, deployment, code).inc()

    def _copy_done(self, task: asyncio.Task[None]) -> None:
        self._copies_in_flight -= 1
        self._copies.discard(task)

    # ------------------------------------------------------------ gRPC

    async def forward_grpc(
        self, path: str, request: bytes, context: grpc.aio.ServicerContext, *, inference: bool
    ) -> bytes:
        """Send `request` (as its bytes) to a replica and give back its answer's bytes."""
        target = request_target(request)
        table = self.table_for(target.name)
        plan = table.plan(target.version, by_weight=inference)
        metadata = tuple(
            (key, value) for key, value in context.invocation_metadata() or () if key in FORWARDED_METADATA
        )
        if inference and table.mirrors and plan:
            copy = target.without_version(request)  # a mirror serves another version than the one pinned

            async def send_copy(replica: Replica) -> str:
                try:
                    await self.channels.method(replica.grpc, path)(
                        copy, metadata=metadata, timeout=self.settings.mirror_timeout_seconds
                    )
                except grpc.aio.AioRpcError as error:
                    return error.code().name
                return "OK"

            self._send_copies(table, plan[0], send_copy)
        tried: list[str] = []
        last_error = ""
        for deployment in plan:
            for replica in deployment.replica_order():
                call = self.channels.method(replica.grpc, path)
                try:
                    answer = await call(request, metadata=metadata, timeout=context.time_remaining())
                except grpc.aio.AioRpcError as error:
                    if error.code() == grpc.StatusCode.UNAVAILABLE:
                        replica.failed()
                        tried.append(f"{deployment.name} at {replica.grpc}")
                        last_error = error.details() or ""
                        continue
                    if inference:
                        self.metrics.count(table.endpoint, deployment.name, error.code().name)
                    await context.abort(error.code(), error.details() or "", _passed_trailers(error))
                if inference:
                    self.metrics.count(table.endpoint, deployment.name, "OK")
                return answer
        raise self._nothing_answered(table, target.version, tried, last_error)

    # ------------------------------------------------------------ REST

    async def forward_http(
        self, request: web.Request, body: bytes, model: str, version: str, *, inference: bool
    ) -> tuple[web.StreamResponse, RouteTable]:
        """Send the REST request to a replica and relay its answer."""
        assert self.http is not None, "the HTTP client starts with the REST server"
        table = self.table_for(model)
        plan = table.plan(version, by_weight=inference)
        headers = {name: value for name in FORWARDED_REQUEST_HEADERS if (value := request.headers.get(name))}
        if inference and table.mirrors and plan:
            copy_path = f"/v2/models/{model}/infer"  # a mirror serves another version than the one pinned
            session = self.http

            async def send_copy(replica: Replica) -> str:
                async with session.post(
                    URL(f"http://{replica.http}{copy_path}", encoded=True), data=body, headers=headers
                ) as answer:
                    await answer.read()
                    return _code_of(answer.status)

            self._send_copies(table, plan[0], send_copy)
        tried: list[str] = []
        last_error = ""
        for deployment in plan:
            for replica in deployment.replica_order():
                url = URL(f"http://{replica.http}{request.raw_path}", encoded=True)
                try:
                    upstream = await self.http.request(request.method, url, data=body, headers=headers)
                except (aiohttp.ClientConnectionError, TimeoutError) as error:
                    replica.failed()
                    tried.append(f"{deployment.name} at {replica.http}")
                    last_error = str(error) or type(error).__name__
                    continue
                if upstream.status == 503:  # the replica cannot serve now (stopping, or not ready)
                    last_error = (await _text_of(upstream))[:300]
                    replica.failed()
                    tried.append(f"{deployment.name} at {replica.http}")
                    continue
                try:
                    response = await _relayed(request, upstream)
                except _ReplicaLost as error:
                    replica.failed()
                    tried.append(f"{deployment.name} at {replica.http}")
                    last_error = str(error)
                    continue
                if inference:
                    self.metrics.count(table.endpoint, deployment.name, _code_of(response.status))
                return response, table
        raise self._nothing_answered(table, version, tried, last_error)

    async def close(self) -> None:
        for task in list(self._copies):
            task.cancel()
        await self.channels.close()


def _passed_trailers(error: grpc.aio.AioRpcError) -> tuple[tuple[str, str | bytes], ...]:
    """The replica's trailing metadata worth passing on: google.rpc.Status details and the
    application's own, not grpc's."""
    return tuple(
        (key, value)
        for key, value in error.trailing_metadata() or ()
        if not key.startswith("grpc-") or key == "grpc-status-details-bin"
    )


def _code_of(status: int) -> str:
    return CODE_OF_HTTP_STATUS.get(status, "OK" if status < 300 else "UNKNOWN")


async def _text_of(answer: aiohttp.ClientResponse) -> str:
    try:
        return (await answer.read()).decode(errors="replace")
    except aiohttp.ClientError as error:
        return str(error)
    finally:
        answer.release()


class _ReplicaLost(Exception):
    """The replica's answer broke off before any of it reached the caller: another may answer."""


async def _relayed(request: web.Request, upstream: aiohttp.ClientResponse) -> web.StreamResponse:
    """The replica's answer as the caller's: status, body and the protocol's headers. A large
    answer is streamed; if it breaks off midway, so does the caller's."""
    headers = {name: value for name in FORWARDED_RESPONSE_HEADERS if (value := upstream.headers.get(name))}
    try:
        length = upstream.content_length
        if length is not None and length <= STREAM_ABOVE_BYTES:
            try:
                body = await upstream.read()
            except aiohttp.ClientError as error:
                raise _ReplicaLost(str(error) or type(error).__name__) from error
            return web.Response(status=upstream.status, body=body, headers=headers)
        response = web.StreamResponse(status=upstream.status, headers=headers)
        if length is not None:
            response.content_length = length
        await response.prepare(request)
        async for chunk in upstream.content.iter_chunked(256 * 1024):
            await response.write(chunk)
        await response.write_eof()
        return response
    finally:
        upstream.release()


# ---------------------------------------------------------------- the gRPC API


def grpc_handler(router: Router) -> grpc.GenericRpcHandler:
    """inference.GRPCInferenceService on raw bytes: requests are not decoded, answers not encoded."""
    infer_path, metadata_path, ready_path = (f"/{SERVICE_NAME}/{method}" for method in MODEL_METHODS)
    live_answer = _bool_message(True)
    # No extensions over gRPC, as the runtime answers.
    metadata_answer = _string_field(1, SERVER_NAME) + _string_field(2, server_version())

    async def model_infer(request: bytes, context: grpc.aio.ServicerContext) -> bytes:
        try:
            return await router.forward_grpc(infer_path, request, context, inference=True)
        except MlmeshError as error:  # the router's own refusals count too; the replicas' are counted above
            router.metrics.count(router.endpoint, "", error.code)
            raise

    async def model_metadata(request: bytes, context: grpc.aio.ServicerContext) -> bytes:
        answer = await router.forward_grpc(metadata_path, request, context, inference=False)
        table = router.table
        return with_versions(answer, table.versions) if table else answer

    async def model_ready(request: bytes, context: grpc.aio.ServicerContext) -> bytes:
        return await router.forward_grpc(ready_path, request, context, inference=False)

    async def server_live(request: bytes, context: grpc.aio.ServicerContext) -> bytes:
        return live_answer

    async def server_ready(request: bytes, context: grpc.aio.ServicerContext) -> bytes:
        return _bool_message(router.ready())

    async def server_metadata(request: bytes, context: grpc.aio.ServicerContext) -> bytes:
        return metadata_answer

    behaviours = {
        "ModelInfer": model_infer,
        "ModelMetadata": model_metadata,
        "ModelReady": model_ready,
        "ServerLive": server_live,
        "ServerReady": server_ready,
        "ServerMetadata": server_metadata,
    }
    return grpc.method_handlers_generic_handler(
        SERVICE_NAME,
        {method: grpc.unary_unary_rpc_method_handler(behaviour) for method, behaviour in behaviours.items()},
    )


def _add_generic_handler(handler: grpc.GenericRpcHandler, server: grpc.aio.Server) -> None:
    server.add_generic_rpc_handlers((handler,))


# ---------------------------------------------------------------- the REST API


def build_app(router: Router, max_body_bytes: int) -> web.Application:
    """The Open Inference Protocol's REST API (`/v2/...`) of the endpoint, and `/metrics`."""
    app = web.Application(
        client_max_size=max_body_bytes,
        middlewares=[
            http_error_middleware(
                f"the request body is larger than the {max_body_bytes} bytes accepted (MLMESH_ROUTER_MAX_MESSAGE_BYTES)"
            )
        ],
    )
    routes = web.RouteTableDef()

    @routes.get("/metrics")
    async def prometheus(_: web.Request) -> web.Response:
        return web.Response(body=router.metrics.exposition(), headers={"Content-Type": CONTENT_TYPE_LATEST})

    @routes.get("/v2/health/live")
    async def live(_: web.Request) -> web.Response:
        return web.json_response({"live": True})

    @routes.get("/v2/health/ready")
    async def ready(_: web.Request) -> web.Response:
        serving = router.ready()
        return web.json_response({"ready": serving}, status=200 if serving else 503)

    @routes.get("/v2")
    async def server_metadata(_: web.Request) -> web.Response:
        return web.json_response({"name": SERVER_NAME, "version": server_version(), "extensions": REST_EXTENSIONS})

    @routes.get("/v2/models/{model}/ready")
    @routes.get("/v2/models/{model}/versions/{version}/ready")
    async def model_ready(request: web.Request) -> web.StreamResponse:
        model, version = request.match_info["model"], request.match_info.get("version", "")
        response, _ = await router.forward_http(request, b"", model, version, inference=False)
        return response

    @routes.get("/v2/models/{model}")
    @routes.get("/v2/models/{model}/versions/{version}")
    async def model_metadata(request: web.Request) -> web.StreamResponse:
        model, version = request.match_info["model"], request.match_info.get("version", "")
        response, table = await router.forward_http(request, b"", model, version, inference=False)
        if response.status != 200 or not isinstance(response, web.Response) or not response.body:
            return response
        try:
            answer = json.loads(response.body)  # type: ignore[arg-type]
        except ValueError:
            return response
        if isinstance(answer, dict):
            answer["versions"] = table.versions  # the endpoint's, not only the answering replica's
        return web.json_response(answer)

    @routes.post("/v2/models/{model}/infer")
    @routes.post("/v2/models/{model}/versions/{version}/infer")
    async def infer(request: web.Request) -> web.StreamResponse:
        model, version = request.match_info["model"], request.match_info.get("version", "")
        try:
            body = await request.read()
            response, _ = await router.forward_http(request, body, model, version, inference=True)
        except MlmeshError as error:  # the router's own refusals count too; the replicas' are counted above
            router.metrics.count(router.endpoint, "", error.code)
            raise
        except web.HTTPException as error:
            router.metrics.count(router.endpoint, "", _code_of(error.status))
            raise
        return response

    app.add_routes(routes)
    return app


# ---------------------------------------------------------------- the process


def build(settings: RouterSettings) -> ServiceRuntime:
    """The router: its gRPC server (unstarted), and beside it the REST server and the routes
    file's watch."""
    if settings.workers != 1:
        raise SystemExit("MLMESH_ROUTER_WORKERS must be 1: one process holds the routes and confirms them")
    # Server reflection describes the service from the protobuf descriptors, which only the
    # generated module puts in the pool; the router itself never decodes these messages (and
    # importing it here keeps this module importable beside tritonclient's `inference` package).
    importlib.import_module("services._proto.inference.open_inference_pb2")
    router = Router(settings, RouterMetrics())
    router.check_routes()
    app = build_app(router, settings.max_message_bytes)

    async def serve_http() -> None:
        connector = aiohttp.TCPConnector(limit=0, limit_per_host=512, keepalive_timeout=30)
        router.http = aiohttp.ClientSession(
            connector=connector,
            timeout=aiohttp.ClientTimeout(total=None, sock_connect=5),
            auto_decompress=False,  # bodies pass through as the replica sent them
        )
        runner = web.AppRunner(app, access_log=None, shutdown_timeout=10)
        await runner.setup()
        try:
            await web.TCPSite(runner, settings.host, settings.http_port).start()
            host, port = runner.addresses[0][:2]
            log.info("router REST API on http://%s:%s/v2", host, port)
            await asyncio.Event().wait()  # until cancelled
        finally:
            await runner.cleanup()
            await router.http.close()
            await router.close()

    registration = (_add_generic_handler, grpc_handler(router), SERVICE_NAME)
    # No span of its own per call: the caller's traceparent goes on to the replica, whose span is
    # the one that tells the inference; a span here would cost a tenth of the router's time.
    return service_runtime("router", settings, [registration], traced=False, background=[router.watch, serve_http])


async def main(settings: RouterSettings | None = None) -> None:
    """Serve the endpoint until SIGTERM."""
    await run_service(settings or RouterSettings(), build)


if __name__ == "__main__":
    with contextlib.suppress(KeyboardInterrupt):
        asyncio.run(main())

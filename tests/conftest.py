"""Fixtures that start real parts: nats-server, PostgreSQL databases, gRPC servers on free ports."""

from __future__ import annotations

import asyncio
import contextlib
import os
import subprocess
import sys
import time
import urllib.request
import uuid
from collections.abc import AsyncIterator, Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import grpc
import nats
import pytest
from sqlalchemy import create_engine, text

from services._proto.mlmesh.v1 import registry_pb2_grpc
from services.common import events, natsserver
from services.common.settings import MeshSettings
from services.launcher import health_status
from services.registry.main import build
from services.registry.settings import RegistrySettings

ROOT = Path(__file__).resolve().parents[1]
MESH = MeshSettings()


def missing_part(reason: str) -> None:
    """Skip for a real part that is not here, or fail when CI demands every part."""
    if MESH.require_all:
        pytest.fail(f"required part missing: {reason}")
    pytest.skip(reason)


@dataclass
class NatsServer:
    """A real nats-server with JetStream on a free port and its own store; can stop and restart."""

    port: int
    store: Path
    process: subprocess.Popen[bytes] | None = None
    host: str = "127.0.0.1"

    @property
    def url(self) -> str:
        return f"nats://{self.host}:{self.port}"

    def start(self) -> None:
        self.process = natsserver.start(self.store, self.port, self.store.parent / "nats.log", self.host)

    def stop(self) -> None:
        if self.process and self.process.poll() is None:
            self.process.terminate()
            self.process.wait(10)
        self.process = None


@pytest.fixture
def nats_server(tmp_path: Path) -> Iterator[NatsServer]:
    server = NatsServer(port=natsserver.free_port(), store=tmp_path / "nats" / "store")
    server.start()
    yield server
    server.stop()


@pytest.fixture
def postgres_url() -> Iterator[str]:
    """A fresh PostgreSQL database for one test, dropped afterwards."""
    admin_url = MESH.postgres_admin_url
    name = f"mlmesh_test_{uuid.uuid4().hex[:12]}"
    admin = create_engine(admin_url, isolation_level="AUTOCOMMIT")
    try:
        with admin.connect() as connection:
            connection.execute(text(f'CREATE DATABASE "{name}"'))
    except Exception as error:  # no server: skip (or fail in CI)
        admin.dispose()
        missing_part(f"PostgreSQL at {admin_url} is not reachable: {error}")
    base = admin_url.rsplit("/", 1)[0]
    yield f"{base}/{name}"
    with admin.connect() as connection:
        connection.execute(
            text("SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE datname = :name"), {"name": name}
        )
        connection.execute(text(f'DROP DATABASE IF EXISTS "{name}"'))
    admin.dispose()


@pytest.fixture(params=["sqlite", "postgresql"])
def database_url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    """Runs the test on SQLite and on PostgreSQL."""
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path / 'registry.db'}"
    return request.getfixturevalue("postgres_url")


@pytest.fixture
def registry_settings(tmp_path: Path, database_url: str) -> RegistrySettings:
    return RegistrySettings(
        home=tmp_path / "home",
        port=0,
        database_url=database_url,
        blob_sweep_grace_seconds=3600,
    )


@dataclass
class RunningRegistry:
    runtime: object
    address: str
    channel: grpc.aio.Channel
    stub: registry_pb2_grpc.RegistryServiceStub


@contextlib.asynccontextmanager
async def running_registry(settings: RegistrySettings) -> AsyncIterator[RunningRegistry]:
    """The registry's real gRPC server (and relay, when settings name NATS) in this process."""
    runtime = build(settings)
    task = asyncio.create_task(runtime.run())
    address = f"127.0.0.1:{runtime.port}"
    channel = grpc.aio.insecure_channel(address)
    await asyncio.wait_for(channel.channel_ready(), 10)
    try:
        yield RunningRegistry(runtime, address, channel, registry_pb2_grpc.RegistryServiceStub(channel))
    finally:
        await channel.close()
        await runtime.server.stop(0)
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task


@pytest.fixture
async def registry(registry_settings: RegistrySettings) -> AsyncIterator[RunningRegistry]:
    async with running_registry(registry_settings) as running:
        yield running


@pytest.fixture
async def registry_with_events(
    registry_settings: RegistrySettings, nats_server: NatsServer
) -> AsyncIterator[RunningRegistry]:
    settings = registry_settings.model_copy(update={"nats_url": nats_server.url})
    async with running_registry(settings) as running:
        yield running


def clean_environment() -> dict[str, str]:
    """This process's environment without MLMESH_* values that would leak into a child."""
    return {key: value for key, value in os.environ.items() if not key.startswith("MLMESH_")}


@dataclass
class RegistryProcess:
    address: str
    nats_url: str
    home: Path


@pytest.fixture(scope="module")
def registry_process(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RegistryProcess]:
    """`python -m services.registry` on a free port, publishing to its own nats-server (per module)."""
    home = tmp_path_factory.mktemp("registry-home")
    nats = NatsServer(port=natsserver.free_port(), store=home / "nats" / "store")
    nats.start()
    port = natsserver.free_port()
    service = spawn_registry(home, port, nats.url)
    try:
        yield RegistryProcess(f"127.0.0.1:{port}", nats.url, home)
    finally:
        stop_process(service)
        nats.stop()


@dataclass
class ServiceStart:
    """A mesh service started by `start_service`."""

    process: subprocess.Popen[bytes]
    address: str
    environment: dict[str, str]
    """Everything it was started with (to start it again the same way)."""


def start_service(
    service: str, home: Path, nats_url: str, settings: dict[str, str], port: int = 0, log_level: str = "INFO"
) -> ServiceStart:
    """`python -m services.<service>` as `mlmesh up` runs it: MLMESH_HOME `home`, MLMESH_NATS_URL
    `nats_url` (none when empty), gRPC on `port` (a free one when 0), `settings` as
    MLMESH_<SERVICE>_<NAME> variables and its log, at `log_level`, in `home`/<service>.log;
    returns once its gRPC health says SERVING."""
    port = port or natsserver.free_port()
    prefix = f"MLMESH_{service.upper()}_"
    environment = {
        **clean_environment(),
        "MLMESH_HOME": str(home),
        "MLMESH_NATS_URL": nats_url,
        "MLMESH_LOG_LEVEL": log_level,
        f"{prefix}PORT": str(port),
        **{prefix + name.upper(): value for name, value in settings.items()},
    }
    address = f"127.0.0.1:{port}"
    grpc_service = f"mlmesh.v1.{service.capitalize()}Service"
    process = spawn_service(f"services.{service}", environment, home / f"{service}.log", address, grpc_service)
    return ServiceStart(process, address, environment)


def spawn_registry(
    home: Path, port: int, nats_url: str | None = None, database_url: str = "", workers: int = 1
) -> subprocess.Popen[bytes]:
    """The registry as its own process, as `mlmesh up` runs it."""
    env = {
        **clean_environment(),
        "MLMESH_HOME": str(home),
        "MLMESH_REGISTRY_PORT": str(port),
        "MLMESH_REGISTRY_DATABASE_URL": database_url,
        "MLMESH_REGISTRY_WORKERS": str(workers),
    }
    if nats_url:
        env["MLMESH_NATS_URL"] = nats_url
    address = f"127.0.0.1:{port}"
    return spawn_service("services.registry", env, home / "registry.log", address, "mlmesh.v1.RegistryService")


def spawn_service(
    module: str,
    environment: dict[str, str],
    log: Path,
    address: str,
    grpc_service: str,
    *,
    also_ready: Callable[[], bool] = lambda: True,
    timeout: float = 30,
) -> subprocess.Popen[bytes]:
    """`python -m module` with `environment`, its output appended to `log`; returns once the gRPC
    health of `address` says `grpc_service` is SERVING (and `also_ready()`), else fails showing
    the log."""
    log.parent.mkdir(parents=True, exist_ok=True)
    with log.open("ab") as output:
        process = subprocess.Popen(
            [sys.executable, "-m", module], cwd=ROOT, env=environment, stdout=output, stderr=subprocess.STDOUT
        )
    deadline = time.monotonic() + timeout
    while health_status(address, grpc_service, timeout=1) != "SERVING" or not also_ready():
        if process.poll() is not None or time.monotonic() > deadline:
            process.kill()
            raise RuntimeError(f"{module} did not start:\n{log.read_text(errors='replace')[-5000:]}")
        time.sleep(0.05)
    return process


def wait_until(check: Callable[[], object], timeout: float = 15, what: str = "") -> None:
    """Poll `check` until it holds; fail after `timeout` seconds, naming `what` was awaited."""
    deadline = time.monotonic() + timeout
    while not check():
        assert time.monotonic() < deadline, f"timed out waiting for {what or 'the condition'}"
        time.sleep(0.05)


def stop_process(process: subprocess.Popen[bytes], timeout: float = 20) -> None:
    """SIGTERM (the service drains and stops), then SIGKILL if it has not stopped in `timeout`."""
    if process.poll() is None:
        process.terminate()
        try:
            process.wait(timeout)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


def answers_http(address: str, path: str) -> bool:
    """Whether GET http://address/path answers 200 (the REST side of a service is up)."""
    try:
        with urllib.request.urlopen(f"http://{address}{path}", timeout=1) as answer:
            return answer.status == 200
    except OSError:
        return False


def pytest_sessionfinish(session: pytest.Session, exitstatus: int) -> None:
    """In CI (MLMESH_REQUIRE_ALL=1) a skipped test is a failure: every part must be there."""
    reporter = session.config.pluginmanager.get_plugin("terminalreporter")
    skipped = len(reporter.stats.get("skipped", [])) if reporter else 0
    if MESH.require_all and skipped:
        reporter.write_line(f"MLMESH_REQUIRE_ALL=1: {skipped} test(s) were skipped; failing the run", red=True)
        session.exitstatus = pytest.ExitCode.TESTS_FAILED


def stream_events(nats_url: str, subject: str) -> list[events.CloudEvent]:
    """Every event on `subject` (a wildcard) in MLMESH_EVENTS so far."""

    async def read() -> list[events.CloudEvent]:
        connection = await nats.connect(nats_url)
        try:
            jetstream = connection.jetstream()
            subscription = await jetstream.subscribe(subject, ordered_consumer=True)
            found = []
            while True:
                try:
                    message = await subscription.next_msg(timeout=1)
                except TimeoutError:
                    return found
                found.append(events.CloudEvent.from_json(message.data))
        finally:
            await connection.close()

    return asyncio.run(read())

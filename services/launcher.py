"""Process management behind `mlmesh up`, `down`, `status` and `serve`.

`up` starts an embedded nats-server (unless MLMESH_NATS_URL names one) and every service in
SERVICES as its own process, waits for each to report SERVING over gRPC health, and records
what runs in `<home>/mesh.json`, which `down` and `status` read.
"""

from __future__ import annotations

import asyncio
import contextlib
import importlib
import json
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc
from pydantic_settings import BaseSettings, SettingsConfigDict

from services.common import natsserver

# name -> (module run with `python -m`, default port, full gRPC service name for health checks)
SERVICES: dict[str, tuple[str, int, str]] = {
    "registry": ("services.registry", 50051, "mlmesh.v1.RegistryService"),
    "builder": ("services.builder", 50052, "mlmesh.v1.BuilderService"),
    "profiler": ("services.profiler", 50053, "mlmesh.v1.ProfilerService"),
    "deployer": ("services.deployer", 50054, "mlmesh.v1.DeployerService"),
    "collector": ("services.collector", 50055, "mlmesh.v1.CollectorService"),
    "drift": ("services.drift", 50056, "mlmesh.v1.DriftService"),
    "notifier": ("services.notifier", 50057, "mlmesh.v1.NotifierService"),
    "automation": ("services.automation", 50058, "mlmesh.v1.AutomationService"),
}
# Settings through which a service finds another it calls: variable -> the service it names.
DEPENDENCIES: dict[str, dict[str, str]] = {
    "builder": {"MLMESH_BUILDER_REGISTRY_ADDRESS": "registry"},
    "profiler": {"MLMESH_PROFILER_REGISTRY_ADDRESS": "registry", "MLMESH_PROFILER_BUILDER_ADDRESS": "builder"},
    "deployer": {
        "MLMESH_DEPLOYER_REGISTRY_ADDRESS": "registry",
        "MLMESH_DEPLOYER_BUILDER_ADDRESS": "builder",
        "MLMESH_DEPLOYER_PROFILER_ADDRESS": "profiler",
    },
    "collector": {"MLMESH_COLLECTOR_REGISTRY_ADDRESS": "registry"},
    "automation": {
        "MLMESH_AUTOMATION_REGISTRY_ADDRESS": "registry",
        "MLMESH_AUTOMATION_DEPLOYER_ADDRESS": "deployer",
        "MLMESH_AUTOMATION_BUILDER_ADDRESS": "builder",
    },
    "drift": {
        "MLMESH_DRIFT_REGISTRY_ADDRESS": "registry",
        "MLMESH_DRIFT_COLLECTOR_ADDRESS": "collector",
        "MLMESH_DRIFT_DEPLOYER_ADDRESS": "deployer",
    },
}

# Settings of a mesh on this machine that differ from a service's own defaults, unless set:
# webhook receivers on this machine are what a laptop mesh talks to (a shared deployment keeps
# the notifier's default, which refuses them).
LOCAL_DEFAULTS: dict[str, dict[str, str]] = {
    "notifier": {"MLMESH_NOTIFIER_ALLOWED_HOSTS": "127.0.0.1,localhost,::1"},
}

STATE_FILE = "mesh.json"
NATS_DEFAULT_PORT = 4222
READY_TIMEOUT_SECONDS = 60.0
STOP_TIMEOUT_SECONDS = 10.0
LOG_TAIL_LINES = 30

Say = Callable[[str], None]


class LaunchError(Exception):
    """The mesh could not be started or stopped; the message says why and what to do."""


@dataclass
class ServiceState:
    pid: int
    address: str


@dataclass
class MeshState:
    """What `up` started: written to `<home>/mesh.json`."""

    nats_url: str
    nats_pid: int | None = None
    services: dict[str, ServiceState] = field(default_factory=dict)

    def to_json(self) -> str:
        return json.dumps(asdict(self), indent=2)

    @classmethod
    def from_json(cls, text: str) -> MeshState:
        raw = json.loads(text)
        return cls(
            nats_url=raw["nats_url"],
            nats_pid=raw.get("nats_pid"),
            services={name: ServiceState(**value) for name, value in raw.get("services", {}).items()},
        )


def endpoint_of(name: str) -> tuple[str, int]:
    """(host, port) a service listens on, from its MLMESH_<SERVICE>_HOST/PORT settings."""
    default_port = SERVICES[name][1]

    # Only the listening address is needed here; importing each service's settings would pull
    # in its whole dependency tree just to read two variables.
    class Endpoint(BaseSettings):
        model_config = SettingsConfigDict(env_prefix=f"MLMESH_{name.upper()}_", extra="ignore")
        host: str = "127.0.0.1"
        port: int = default_port

    endpoint = Endpoint()
    return endpoint.host, endpoint.port


def dialable(host: str, port: int) -> str:
    """The address a client on this machine uses to reach a server bound to host:port."""
    if host in ("0.0.0.0", "::", ""):
        host = "127.0.0.1"
    return f"{host}:{port}"


def default_address(name: str) -> str:
    return dialable(*endpoint_of(name))


def state_path(home: Path) -> Path:
    return home / STATE_FILE


def read_state(home: Path) -> MeshState | None:
    """The recorded mesh of `home`, or None when none (or an unreadable file) is there."""
    try:
        return MeshState.from_json(state_path(home).read_text())
    except (OSError, ValueError, KeyError, TypeError):
        return None


def _write_state(home: Path, state: MeshState) -> None:
    path = state_path(home)
    temporary = path.with_suffix(".json.tmp")
    temporary.write_text(state.to_json())
    os.replace(temporary, path)  # atomic, so `status` never reads half a file


def is_alive(pid: int | None, marker: str = "") -> bool:
    """Whether `pid` runs, and (where /proc tells) its command line mentions `marker`.

    The marker guards against a recycled pid: after a reboot a stale mesh.json may name pids
    that now belong to unrelated processes, which `down` must never signal.
    """
    if not pid:
        return False
    with contextlib.suppress(ChildProcessError, OSError):
        # Reap it if it is our own exited child; a zombie would otherwise look alive.
        if os.waitpid(pid, os.WNOHANG)[0] == pid:
            return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return False  # someone else's process: not one we started
    proc = Path(f"/proc/{pid}")
    if proc.exists():
        try:
            if proc.joinpath("stat").read_text().rsplit(")", 1)[1].split()[0] == "Z":
                return False
            command = proc.joinpath("cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            return False
        return marker in command
    return True


def _service_marker(name: str) -> str:
    return SERVICES[name][0]


NATS_MARKER = "nats-server"


def live_pids(state: MeshState) -> bool:
    """Whether any process named by the state still runs."""
    if is_alive(state.nats_pid, NATS_MARKER):
        return True
    return any(is_alive(service.pid, _service_marker(name)) for name, service in state.services.items())


def health_status(address: str, service: str = "", timeout: float = 2.0) -> str:
    """SERVING, NOT_SERVING or UNREACHABLE, as the server at `address` reports `service`."""
    host, _, port = address.rpartition(":")
    try:
        # A refused TCP connection answers at once, where gRPC would first back off and retry.
        socket.create_connection((host.strip("[]"), int(port)), timeout=timeout).close()
    except (OSError, ValueError):
        return "UNREACHABLE"
    with grpc.insecure_channel(address) as channel:
        try:
            response = health_pb2_grpc.HealthStub(channel).Check(
                health_pb2.HealthCheckRequest(service=service), timeout=timeout
            )
        except grpc.RpcError as error:
            if isinstance(error, grpc.Call) and error.code() == grpc.StatusCode.NOT_FOUND:
                return "NOT_SERVING"  # a server answers, but not (yet) for this service
            return "UNREACHABLE"
    if response.status == health_pb2.HealthCheckResponse.SERVING:
        return "SERVING"
    return "NOT_SERVING"


def _port_is_free(port: int, host: str = "127.0.0.1") -> bool:
    with socket.socket() as probe:
        # As the servers bind: connections of a stopped process that linger in TIME_WAIT on the
        # port do not make it taken.
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            probe.bind((host, port))
        except OSError:
            return False
    return True


def _log_tail(path: Path, offset: int) -> str:
    """The last lines `path` received after `offset` (what this start wrote)."""
    try:
        with path.open("rb") as log:
            log.seek(offset)
            lines = log.read().decode(errors="replace").splitlines()
    except OSError:
        return "(no log)"
    return "\n".join(lines[-LOG_TAIL_LINES:]) or "(the log is empty)"


def _child_environment(home: Path, nats_url: str, extra: dict[str, str]) -> dict[str, str]:
    # Children inherit the caller's environment (their own MLMESH_<SERVICE>_* settings live
    # there) plus the mesh-wide values this launcher decided.
    return {**os.environ, "MLMESH_HOME": str(home), "MLMESH_NATS_URL": nats_url, **extra}


def terminate(pids: dict[int, str], timeout: float) -> None:
    """SIGTERM each (pid -> marker), wait up to `timeout`, SIGKILL what is left."""
    running = {pid: marker for pid, marker in pids.items() if is_alive(pid, marker)}
    for pid in running:
        _signal_group(pid, signal.SIGTERM)
    deadline = time.monotonic() + timeout
    while running and time.monotonic() < deadline:
        running = {pid: marker for pid, marker in running.items() if is_alive(pid, marker)}
        if running:
            time.sleep(0.05)
    for pid in running:
        _signal_group(pid, signal.SIGKILL)
    for pid in running:
        with contextlib.suppress(ChildProcessError, OSError):
            os.waitpid(pid, 0)


def _signal_group(pid: int, number: int) -> None:
    # Each process was started as a session leader, so its group also holds anything it spawned.
    try:
        os.killpg(pid, number)
    except (ProcessLookupError, PermissionError):
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.kill(pid, number)


def record_process(home: Path, name: str, pid: int, marker: str) -> None:
    """Note a process a service started for the mesh (an endpoint's router or replica) in
    `<home>/run/<name>.pid`, so that `down` stops it too."""
    run = home / "run"
    run.mkdir(parents=True, exist_ok=True)
    (run / f"{name}.pid").write_text(f"{pid} {marker}\n")


def stop_recorded_processes(home: Path, timeout: float = STOP_TIMEOUT_SECONDS) -> None:
    """Stop every process noted by `record_process` (checked against its marker) and forget them."""
    pids = {}
    for path in sorted((home / "run").glob("*.pid")):
        pid, _, marker = path.read_text().strip().partition(" ")
        if pid.isdigit():
            pids[int(pid)] = marker
        path.unlink(missing_ok=True)
    terminate(pids, timeout)


def _stop_state(state: MeshState, timeout: float = STOP_TIMEOUT_SECONDS) -> None:
    terminate({service.pid: _service_marker(name) for name, service in state.services.items()}, timeout)
    if state.nats_pid:
        terminate({state.nats_pid: NATS_MARKER}, timeout)


def _start_nats(home: Path, say: Say) -> tuple[str, subprocess.Popen[bytes]]:
    port = NATS_DEFAULT_PORT if _port_is_free(NATS_DEFAULT_PORT) else natsserver.free_port()
    log_file = home / "logs" / "nats.log"
    try:
        process = natsserver.start(home / "nats", port, log_file)
    except (OSError, RuntimeError, TimeoutError) as error:
        raise LaunchError(f"the embedded nats-server did not start: {error}\n{_log_tail(log_file, 0)}") from error
    url = f"nats://127.0.0.1:{port}"
    say(f"nats      {url} (embedded, store {home / 'nats'})")
    return url, process


def _start_service(
    name: str, home: Path, nats_url: str, addresses: dict[str, str]
) -> tuple[subprocess.Popen[bytes], str, Path, int]:
    module = SERVICES[name][0]
    host, port = endpoint_of(name)
    extra = {variable: addresses[other] for variable, other in DEPENDENCIES.get(name, {}).items()}
    for variable, value in LOCAL_DEFAULTS.get(name, {}).items():
        extra.setdefault(variable, os.environ.get(variable, value))
    if port == 0:
        # The launcher must know the port to check health and record it, so it picks one.
        port = natsserver.free_port()
        extra[f"MLMESH_{name.upper()}_PORT"] = str(port)
    elif not _port_is_free(port, "127.0.0.1" if host in ("0.0.0.0", "::", "") else host):
        raise LaunchError(
            f"port {port} of the {name} is taken by another program; free it or choose another port "
            f"with MLMESH_{name.upper()}_PORT"
        )
    log_file = home / "logs" / f"{name}.log"
    offset = log_file.stat().st_size if log_file.exists() else 0
    # In a session of its own: it survives the terminal of `up --detach`; Ctrl-C is ours to relay.
    process = spawn_module(module, _child_environment(home, nats_url, extra), log_file)
    return process, dialable(host, port), log_file, offset


def spawn_module(module: str, environment: dict[str, str], log_file: Path) -> subprocess.Popen[bytes]:
    """`python -m module` in a session of its own (its group can be signalled as one, and it
    outlives its starter), output appended to `log_file`."""
    log_file.parent.mkdir(parents=True, exist_ok=True)
    with log_file.open("ab") as log:
        return subprocess.Popen(
            [sys.executable, "-m", module],
            stdout=log,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            env=environment,
            start_new_session=True,
        )


def _wait_serving(
    name: str, process: subprocess.Popen[bytes], address: str, log_file: Path, offset: int, timeout: float
) -> None:
    grpc_service = SERVICES[name][2]
    deadline = time.monotonic() + timeout
    while True:
        if process.poll() is not None:
            raise LaunchError(
                f"the {name} exited with code {process.returncode} while starting; the end of "
                f"{log_file}:\n{_log_tail(log_file, offset)}"
            )
        if health_status(address, grpc_service, timeout=1.0) == "SERVING":
            return
        if time.monotonic() > deadline:
            raise LaunchError(
                f"the {name} did not report SERVING at {address} within {timeout:.0f}s; the end of "
                f"{log_file}:\n{_log_tail(log_file, offset)}"
            )
        time.sleep(0.1)


def start(
    home: Path,
    *,
    nats_url: str | None = None,
    say: Say = print,
    ready_timeout: float = READY_TIMEOUT_SECONDS,
) -> MeshState:
    """Start NATS (unless `nats_url` is given) and every service; return once all are SERVING."""
    home = home.resolve()
    existing = read_state(home)
    if existing is not None:
        if live_pids(existing):
            where = ", ".join(f"{name} at {service.address}" for name, service in existing.services.items())
            raise LaunchError(f"mlmesh is already running in {home} ({where}); run `mlmesh down` first")
        state_path(home).unlink(missing_ok=True)  # left behind by a mesh that died without `down`
    (home / "logs").mkdir(parents=True, exist_ok=True)

    state = MeshState(nats_url=nats_url or "")
    try:
        if not nats_url:
            state.nats_url, nats_process = _start_nats(home, say)
            state.nats_pid = nats_process.pid
        else:
            say(f"nats      {nats_url} (MLMESH_NATS_URL)")
        started = []
        for name in SERVICES:
            addresses = {other: service.address for other, service in state.services.items()}
            process, address, log_file, offset = _start_service(name, home, state.nats_url, addresses)
            state.services[name] = ServiceState(pid=process.pid, address=address)
            started.append((name, process, address, log_file, offset))
        for name, process, address, log_file, offset in started:
            _wait_serving(name, process, address, log_file, offset, ready_timeout)
            say(f"{name:<9} {address} (log {log_file})")
    except BaseException:
        _stop_state(state)
        raise
    _write_state(home, state)
    return state


def up(
    home: Path,
    *,
    detach: bool = False,
    nats_url: str | None = None,
    say: Say = print,
    on_ready: Callable[[MeshState], None] | None = None,
) -> MeshState:
    """Start the mesh; without `detach`, keep it running until Ctrl-C or SIGTERM, then stop it."""
    state = start(home, nats_url=nats_url, say=say)
    if on_ready:
        on_ready(state)
    if detach:
        return state
    say("mlmesh is up; press Ctrl-C to stop")
    stop_requested = False

    def request_stop(*_: Any) -> None:
        nonlocal stop_requested
        stop_requested = True

    previous = signal.signal(signal.SIGTERM, request_stop)
    try:
        while not stop_requested:
            dead = [
                name for name, service in state.services.items() if not is_alive(service.pid, _service_marker(name))
            ]
            if dead or (state.nats_pid and not is_alive(state.nats_pid, NATS_MARKER)):
                say(f"stopping: {', '.join(dead) or 'nats'} exited; see {home.resolve() / 'logs'}")
                break
            time.sleep(0.5)
    except KeyboardInterrupt:
        pass
    finally:
        signal.signal(signal.SIGTERM, previous)
        say("stopping mlmesh ...")
        _stop_state(state)
        stop_recorded_processes(home.resolve())
        state_path(home.resolve()).unlink(missing_ok=True)
        say("mlmesh stopped")
    return state


def down(home: Path, say: Say = print) -> bool:
    """Stop what `up` started in `home`; False when nothing was running."""
    home = home.resolve()
    state = read_state(home)
    if state is None:
        say(f"mlmesh is not running in {home}")
        return False
    running = live_pids(state)
    _stop_state(state)
    stop_recorded_processes(home)  # after the deployer, which would restart them
    state_path(home).unlink(missing_ok=True)
    say("mlmesh stopped" if running else f"mlmesh was not running in {home}; removed its stale state file")
    return running


def status(home: Path) -> dict[str, Any]:
    """{"nats_url": ..., "services": {name: {"address", "pid", "status"}}}.

    A service's status is SERVING or NOT_SERVING as its health check says, UNREACHABLE when its
    process runs but does not answer, and STOPPED when nothing runs at its address.
    """
    home = home.resolve()
    state = read_state(home)
    services: dict[str, Any] = {}
    for name in SERVICES:
        recorded = state.services.get(name) if state else None
        address = recorded.address if recorded else default_address(name)
        pid = recorded.pid if recorded else None
        alive = is_alive(pid, _service_marker(name))
        health = health_status(address, SERVICES[name][2])
        # A service started elsewhere (`mlmesh serve`, compose) still counts when it answers.
        if health == "UNREACHABLE" and not alive:
            health = "STOPPED"
        services[name] = {"address": address, "pid": pid if alive else None, "status": health}
    nats_url = state.nats_url if state else None
    return {"home": str(home), "nats_url": nats_url, "services": services}


def serve(name: str, workers: int | None = None) -> None:
    """Run one service in this process (and `workers` - 1 more) until SIGTERM or Ctrl-C."""
    if name not in SERVICES:
        raise LaunchError(f"unknown service {name!r}; known: {', '.join(SERVICES)}")
    if workers:
        os.environ[f"MLMESH_{name.upper()}_WORKERS"] = str(workers)  # read by the service's settings
    entry = importlib.import_module(f"{SERVICES[name][0]}.main")
    with contextlib.suppress(KeyboardInterrupt):
        asyncio.run(entry.main())

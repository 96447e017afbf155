"""The `local` target: replicas and endpoint routers as child processes of this machine.

Each process starts in a session of its own, so it outlives the deployer: a restarted deployer
finds it again by its instance id (`pid:start time`), and traffic never stops. Its output goes
to a log file that `mlmesh deploy logs` reads.
"""

from __future__ import annotations

import math
import os
import subprocess
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

from services.common.memory import process_memory_mb
from services.common.natsserver import free_port
from services.launcher import is_alive, record_process, spawn_module, terminate

RUNTIME_MODULE = "services.runtime"
ROUTER_MODULE = "services.deployer.router"


@dataclass(frozen=True)
class ReplicaLaunch:
    """What one replica serves and how."""

    endpoint: str
    deployment: str
    index: int
    model: str
    """`name:version` in the registry."""
    cpus: float
    capture: bool
    memory_mb: int = 0
    image: str = ""
    """docker target: the image that serves `model`."""
    max_batch_rows: int = 0

    @property
    def name(self) -> str:
        return f"{self.endpoint}-{self.deployment}-{self.index}"


class ReplicaRunner(Protocol):
    """How a target runs replicas: the local processes here, or containers (services.deployer.containers)."""

    def start_replica(self, launch: ReplicaLaunch) -> Started: ...

    def replica_running(self, launch: ReplicaLaunch, instance: str) -> bool: ...

    def replica_reason(self, launch: ReplicaLaunch, instance: str) -> str:
        """Why the replica stopped or is not ready: the last line it logged (and how it exited)."""
        ...

    def stop_replica(self, launch: ReplicaLaunch, instance: str) -> None:
        """Stop it (draining in-flight requests first) and clean up what is left of it."""
        ...

    def replica_logs(self, launch: ReplicaLaunch, instance: str, lines: int) -> list[str]: ...


@dataclass(frozen=True)
class Started:
    instance: str
    grpc_port: int
    http_port: int


def _start_time(pid: int) -> str:
    """The process's start time in clock ticks since boot (field 22 of /proc/<pid>/stat)."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[19]
    except (OSError, IndexError):
        return ""


def instance_of(process: subprocess.Popen[bytes]) -> str:
    return f"{process.pid}:{_start_time(process.pid)}"


def running(instance: str, module: str) -> bool:
    """Whether the process named by `instance` still runs (and is the same process, not a reused pid)."""
    pid_text, _, started = instance.partition(":")
    if not pid_text.isdigit():
        return False
    pid = int(pid_text)
    return is_alive(pid, module) and (not started or _start_time(pid) == started)


def stop(instance: str, module: str, timeout: float = 10.0) -> None:
    """SIGTERM (the runtime drains in-flight requests), then SIGKILL after `timeout`."""
    if running(instance, module):
        terminate({int(instance.partition(":")[0]): module}, timeout)


class LocalProcesses:
    """Starts runtimes and routers as processes logging under `log_dir`."""

    def __init__(
        self, home: Path, registry_address: str, nats_url: str | None, log_level: str, router_host: str = "127.0.0.1"
    ) -> None:
        self.home = home
        self.router_host = router_host
        self.registry_address = registry_address
        self.nats_url = nats_url
        self.log_level = log_level
        self.log_dir = home / "deployer" / "logs"

    def replica_log(self, endpoint: str, deployment: str, index: int) -> Path:
        return self.log_dir / endpoint / f"{deployment}-{index}.log"

    def launch_log(self, launch: ReplicaLaunch) -> Path:
        return self.replica_log(launch.endpoint, launch.deployment, launch.index)

    def router_log(self, endpoint: str) -> Path:
        return self.log_dir / endpoint / "router.log"

    def start_replica(self, launch: ReplicaLaunch) -> Started:
        grpc_port, http_port = free_port(), free_port()
        threads = max(1, math.floor(launch.cpus)) if launch.cpus else 1
        environment = {
            "MLMESH_RUNTIME_PORT": str(grpc_port),
            "MLMESH_RUNTIME_HTTP_PORT": str(http_port),
            "MLMESH_RUNTIME_MODELS": launch.model,
            "MLMESH_RUNTIME_SERVED_NAME": launch.endpoint,
            "MLMESH_RUNTIME_REGISTRY_ADDRESS": self.registry_address,
            "MLMESH_RUNTIME_INTRA_OP_THREADS": str(threads),
            "MLMESH_RUNTIME_MAX_BATCH_ROWS": str(launch.max_batch_rows),
            "MLMESH_RUNTIME_CAPTURE": "true" if launch.capture and self.nats_url else "false",
            "MLMESH_RUNTIME_ENDPOINT": launch.endpoint,
            "MLMESH_RUNTIME_DEPLOYMENT": launch.deployment,
        }
        log = self.launch_log(launch)
        process = self.spawn(RUNTIME_MODULE, environment, log, launch.name)
        return Started(instance_of(process), grpc_port, http_port)

    def replica_running(self, launch: ReplicaLaunch, instance: str) -> bool:
        """Whether it runs; one found over its memory limit is killed first, as the kernel kills a
        container at its limit (checked at each of the reconciler's rounds, not continuously)."""
        if not running(instance, RUNTIME_MODULE):
            return False
        if not launch.memory_mb:
            return True
        resident = process_memory_mb(int(instance.partition(":")[0]), "VmRSS")
        if resident <= launch.memory_mb:
            return True
        stop(instance, RUNTIME_MODULE, timeout=0)
        # Its log's last line, once it is gone: the reason replica_reason and `deploy logs` give.
        reason = f"out of memory: killed at {resident:.0f} MB resident, over its limit of {launch.memory_mb} MB"
        with self.launch_log(launch).open("a") as log:
            log.write(reason + "\n")
        return False

    def replica_reason(self, launch: ReplicaLaunch, instance: str) -> str:
        return exit_reason(self.launch_log(launch))

    def stop_replica(self, launch: ReplicaLaunch, instance: str) -> None:
        stop(instance, RUNTIME_MODULE)

    def replica_logs(self, launch: ReplicaLaunch, instance: str, lines: int) -> list[str]:
        return last_lines(self.launch_log(launch), lines)

    def start_router(self, endpoint: str, routes_file: Path, grpc_port: int, http_port: int) -> str:
        environment = {
            "MLMESH_ROUTER_ROUTES_FILE": str(routes_file),
            "MLMESH_ROUTER_HOST": self.router_host,
            "MLMESH_ROUTER_PORT": str(grpc_port),
            "MLMESH_ROUTER_HTTP_PORT": str(http_port),
        }
        return instance_of(self.spawn(ROUTER_MODULE, environment, self.router_log(endpoint), f"{endpoint}-router"))

    def spawn(self, module: str, settings: dict[str, str], log: Path, name: str) -> subprocess.Popen[bytes]:
        environment = {"MLMESH_HOME": str(self.home), "MLMESH_LOG_LEVEL": self.log_level, **settings}
        if self.nats_url:
            environment["MLMESH_NATS_URL"] = self.nats_url
        # The child inherits PATH and the like; its MLMESH_* settings are the ones above. Its own
        # session lets it outlive the deployer, which adopts it again on restart.
        inherited = {name: value for name, value in os.environ.items() if not name.startswith("MLMESH_")}
        process = spawn_module(module, {**inherited, **environment}, log)
        record_process(self.home, f"endpoint-{name}", process.pid, module)
        return process


def last_lines(path: Path, lines: int) -> list[str]:
    """The last `lines` lines of a log file (empty when there is none)."""
    if not path.exists():
        return []
    size = path.stat().st_size
    with path.open("rb") as log:
        # Read back from the end only as far as needed: logs can be large.
        chunk = min(size, max(64 * 1024, lines * 400))
        log.seek(size - chunk)
        text = log.read().decode(errors="replace")
    return text.splitlines()[-lines:]


def exit_reason(path: Path) -> str:
    """Why a process probably stopped: the last line of its log."""
    lines = [line for line in last_lines(path, 20) if line.strip()]
    return lines[-1][:500] if lines else "(its log is empty)"

"""The serving runtime a profile measures, started once per size: a local process pinned to whole
CPU cores, or a container of the model's image with a CPU quota and a memory limit.

Either way the profiler reads the serving processes' CPU and peak memory from /proc (a
container's processes are the host's processes too, when the engine runs on this machine).
"""

from __future__ import annotations

import contextlib
import os
import subprocess
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

import docker.errors

from services.common import docker_engine
from services.common.errors import MlmeshError
from services.common.natsserver import free_port
from services.launcher import health_status, spawn_module
from services.profiler.load import peak_memory_mb, process_tree

RUNTIME_MODULE = "services.runtime"
RUNTIME_SERVICE = "inference.GRPCInferenceService"
LABEL_PREFIX = "io.mlmesh.profiler"


class RuntimeStopped(Exception):
    """The runtime exited or never answered; `kind` is crash or timeout, the message says why."""

    def __init__(self, kind: str, message: str) -> None:
        super().__init__(message)
        self.kind = kind
        self.message = message


@dataclass(frozen=True)
class RuntimeSize:
    cpus: float
    memory_mb: int
    threads: int
    max_batch_rows: int

    def settings(self, log_level: str) -> dict[str, str]:
        return {
            "MLMESH_LOG_LEVEL": log_level,
            "MLMESH_RUNTIME_INTRA_OP_THREADS": str(self.threads),
            "MLMESH_RUNTIME_MAX_BATCH_ROWS": str(self.max_batch_rows),
            "MLMESH_RUNTIME_CAPTURE": "false",
        }


class Runtime(Protocol):
    """One started runtime."""

    address: str

    def pids(self) -> list[int]:
        """The serving processes, for their CPU and memory."""
        ...

    def running(self) -> bool: ...

    def reason(self) -> str:
        """Why it stopped (or what it last logged)."""
        ...

    def stop(self) -> None: ...


def wait_ready(runtime: Runtime, timeout: float) -> None:
    """Until the runtime's health says SERVING; RuntimeStopped when it exits or takes too long."""
    deadline = time.monotonic() + timeout
    while health_status(runtime.address, RUNTIME_SERVICE, 1) != "SERVING":
        if not runtime.running():
            raise RuntimeStopped("crash", f"the runtime exited while loading the model: {runtime.reason()}")
        if time.monotonic() > deadline:
            raise RuntimeStopped(
                "timeout",
                f"the runtime did not serve within {timeout:g} s (MLMESH_PROFILER_START_TIMEOUT_SECONDS); "
                f"it last logged: {runtime.reason()}",
            )
        time.sleep(0.1)


def last_line(path: Path) -> str:
    with contextlib.suppress(OSError):
        lines = [line for line in path.read_text(errors="replace").splitlines()[-30:] if line.strip()]
        if lines:
            return lines[-1][:500]
    return "(nothing)"


class LocalRuntime:
    """`python -m services.runtime` pinned to `cores`, downloading the model from the registry."""

    def __init__(
        self, home: Path, registry_address: str, model: str, size: RuntimeSize, log: Path, log_level: str
    ) -> None:
        count = os.cpu_count() or 1
        cores = set(range(count - int(size.cpus), count))
        port, http_port = free_port(), free_port()
        environment = {
            **{name: value for name, value in os.environ.items() if not name.startswith("MLMESH_")},
            **size.settings(log_level),
            "MLMESH_HOME": str(home),
            "MLMESH_RUNTIME_PORT": str(port),
            "MLMESH_RUNTIME_HTTP_PORT": str(http_port),
            "MLMESH_RUNTIME_MODELS": model,
            "MLMESH_RUNTIME_REGISTRY_ADDRESS": registry_address,
        }
        self.log = log
        self.address = f"127.0.0.1:{port}"
        self.process: subprocess.Popen[bytes] = spawn_module(RUNTIME_MODULE, environment, log)
        # Set before the interpreter has started any thread: every thread it starts inherits it.
        with contextlib.suppress(OSError):
            os.sched_setaffinity(self.process.pid, cores)

    def pids(self) -> list[int]:
        return [self.process.pid]

    def running(self) -> bool:
        return self.process.poll() is None

    def reason(self) -> str:
        code = self.process.poll()
        line = last_line(self.log)
        return line if code is None else f"exit code {code}; it last logged: {line}"

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(10)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(10)


class ContainerRuntime:
    """A container of `image` (which serves the model) with the size's CPU quota and memory limit."""

    def __init__(self, docker_url: str, image: str, size: RuntimeSize, log: Path, log_level: str, mesh: str) -> None:
        self.docker_url = docker_url or None
        self.log = log
        self.memory_mb = size.memory_mb
        labels = {f"{LABEL_PREFIX}.mesh": mesh}
        name = f"mlmesh-profile-{uuid.uuid4().hex[:12]}"
        self.instance, port, _ = docker_engine.start_runtime_container(
            self.docker_url, image, name, size.settings(log_level), labels, size.cpus, size.memory_mb
        )
        self.address = f"127.0.0.1:{port}"
        self._root = 0

    def _state(self) -> dict[str, object]:
        with docker_engine.engine(self.docker_url) as engine:
            try:
                return dict(engine.inspect_container(self.instance)["State"])
            except docker.errors.NotFound:
                return {}

    def pids(self) -> list[int]:
        if not self._root:
            pid = self._state().get("Pid")
            self._root = pid if isinstance(pid, int) else 0
        return process_tree(self._root) if self._root else []

    def running(self) -> bool:
        try:
            return self._state().get("Status") == "running"
        except MlmeshError:
            return False

    def reason(self) -> str:
        try:
            state = self._state()
            with docker_engine.engine(self.docker_url) as engine:
                line = docker_engine.last_logged(engine, self.instance, tail=200)
        except MlmeshError as error:
            return error.message
        if state.get("OOMKilled"):
            return f"out of memory: killed at its limit of {self.memory_mb} MiB; it last logged: {line}"
        if state and state.get("Status") != "running":
            return f"its container exited with code {state.get('ExitCode')}; it last logged: {line}"
        return line

    def stop(self) -> None:
        """Stop and remove the container, keeping its output in the log file."""
        with contextlib.suppress(MlmeshError), docker_engine.engine(self.docker_url, timeout=60) as engine:
            with contextlib.suppress(docker.errors.APIError):
                engine.stop(self.instance, timeout=10)
                self.log.parent.mkdir(parents=True, exist_ok=True)
                self.log.write_bytes(engine.logs(self.instance, stdout=True, stderr=True, tail=2000))
            with contextlib.suppress(docker.errors.APIError):
                engine.remove_container(self.instance, force=True)


class Runtimes:
    """Starts the runtime of one size for a profile; `builder_image` asks the builder for an image."""

    def __init__(
        self,
        home: Path,
        registry_address: str,
        docker_url: str,
        log_level: str,
        builder_image: Callable[[str], str],
    ) -> None:
        self.home = home
        self.registry_address = registry_address
        self.docker_url = docker_url
        self.log_level = log_level
        self.builder_image = builder_image
        self.log_dir = home / "profiler" / "logs"

    def image_for(self, model: str) -> str:
        return self.builder_image(model)

    def start(self, target: str, model: str, image: str, size: RuntimeSize, log_name: str) -> Runtime:
        log = self.log_dir / f"{log_name}.log"
        if target == "docker":
            return ContainerRuntime(self.docker_url, image, size, log, self.log_level, str(self.home))
        return LocalRuntime(self.home, self.registry_address, model, size, log, self.log_level)


def memory_of(runtime: Runtime) -> float:
    return peak_memory_mb(runtime.pids())

"""The `docker` target: each replica is a container of the deployment's image on a Docker engine.

The image (the builder's, or one given at deploy time) runs mlmesh's runtime on ports 8001 (gRPC)
and 8000 (REST); those are published on 127.0.0.1 of the engine's host, on free ports, so the
endpoint's router reaches them as it reaches local replicas. `--cpus` and `--memory` become the
container's CPU quota and memory limit. Containers do not belong to the deployer's process: a
restarted deployer finds each one again by its id and traffic never stops.

Captured requests go to NATS from inside the container, where 127.0.0.1 is the container itself:
`container_nats_url` says how containers reach NATS (the name host.docker.internal resolves to
the engine's host there).
"""

from __future__ import annotations

import contextlib
import math
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

import docker.errors

from services.common import docker_engine
from services.common.errors import MlmeshError
from services.deployer.local import ReplicaLaunch, Started, last_lines

LABEL_PREFIX = "io.mlmesh.deployer"
STOP_TIMEOUT_SECONDS = 10
KEPT_LOG_LINES = 2000


class DockerContainers:
    """Starts, checks and stops replica containers on the engine at `docker_url` (empty: DOCKER_HOST
    or the local socket). Containers carry labels naming the endpoint, deployment and replica, and
    `mesh`, the deployer's home, so that meshes sharing an engine tell theirs apart."""

    def __init__(
        self,
        docker_url: str,
        mesh: str,
        nats_url: str | None,
        log_level: str,
        log_file: Callable[[ReplicaLaunch], Path],
    ) -> None:
        self.docker_url = docker_url or None
        self.mesh = mesh
        self.nats_url = nats_url
        self.log_level = log_level
        self.log_file = log_file
        """Where a replica's output is kept once its container is removed (`deploy logs` reads it)."""

    def environment(self, launch: ReplicaLaunch) -> dict[str, str]:
        threads = max(1, math.floor(launch.cpus)) if launch.cpus else 1
        environment = {
            "MLMESH_LOG_LEVEL": self.log_level,
            "MLMESH_RUNTIME_SERVED_NAME": launch.endpoint,
            "MLMESH_RUNTIME_INTRA_OP_THREADS": str(threads),
            "MLMESH_RUNTIME_MAX_BATCH_ROWS": str(launch.max_batch_rows),
            "MLMESH_RUNTIME_CAPTURE": "true" if launch.capture and self.nats_url else "false",
            "MLMESH_RUNTIME_ENDPOINT": launch.endpoint,
            "MLMESH_RUNTIME_DEPLOYMENT": launch.deployment,
        }
        if launch.capture and self.nats_url:
            environment["MLMESH_NATS_URL"] = self.nats_url
        return environment

    def start_replica(self, launch: ReplicaLaunch) -> Started:
        name = f"mlmesh-{launch.name}-{uuid.uuid4().hex[:8]}"
        labels = {
            f"{LABEL_PREFIX}.mesh": self.mesh,
            f"{LABEL_PREFIX}.endpoint": launch.endpoint,
            f"{LABEL_PREFIX}.deployment": launch.deployment,
            f"{LABEL_PREFIX}.replica": str(launch.index),
            f"{LABEL_PREFIX}.model": launch.model,
        }
        instance, grpc_port, http_port = docker_engine.start_runtime_container(
            self.docker_url, launch.image, name, self.environment(launch), labels, launch.cpus, launch.memory_mb
        )
        return Started(instance, grpc_port, http_port)

    def _state(self, instance: str) -> dict[str, Any] | None:
        with docker_engine.engine(self.docker_url) as engine:
            try:
                return engine.inspect_container(instance)["State"]
            except docker.errors.NotFound:
                return None

    def replica_running(self, launch: ReplicaLaunch, instance: str) -> bool:
        state = self._state(instance)
        return state is not None and state.get("Status") == "running"

    def replica_reason(self, launch: ReplicaLaunch, instance: str) -> str:
        try:
            state = self._state(instance)
        except MlmeshError as error:
            return error.message
        if state is None:
            return f"its container {instance[:12]} is gone"
        lines = [line for line in self.replica_logs(launch, instance, 20) if line.strip()]
        last = lines[-1][:500] if lines else "(it logged nothing)"
        if state.get("Status") == "running":
            return last
        if state.get("OOMKilled"):
            return f"out of memory: killed at its limit of {launch.memory_mb} MB; it last logged: {last}"
        return f"its container exited with code {state.get('ExitCode')}: {state.get('Error') or last}"

    def stop_replica(self, launch: ReplicaLaunch, instance: str) -> None:
        """SIGTERM (the runtime drains), SIGKILL after 10 s; its output is kept in its log file and
        the container removed."""
        with docker_engine.engine(self.docker_url, timeout=STOP_TIMEOUT_SECONDS + 30) as engine:
            try:
                engine.stop(instance, timeout=STOP_TIMEOUT_SECONDS)
                output = engine.logs(instance, stdout=True, stderr=True, tail=KEPT_LOG_LINES)
            except docker.errors.NotFound:
                return
            log = self.log_file(launch)
            log.parent.mkdir(parents=True, exist_ok=True)
            with log.open("ab") as kept:
                kept.write(f"--- container {instance[:12]} ---\n".encode() + output)
            with contextlib.suppress(docker.errors.NotFound):
                engine.remove_container(instance, force=True)

    def replica_logs(self, launch: ReplicaLaunch, instance: str, lines: int) -> list[str]:
        """The running container's last lines, else what was kept of its predecessors."""
        if instance:
            with docker_engine.engine(self.docker_url) as engine:
                with contextlib.suppress(docker.errors.NotFound):
                    output = engine.logs(instance, stdout=True, stderr=True, tail=lines)
                    return output.decode(errors="replace").splitlines()[-lines:]
        return last_lines(self.log_file(launch), lines)

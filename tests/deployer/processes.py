"""The deployer as its own process, as `mlmesh up` runs it, for the deployer's tests."""

from __future__ import annotations

import contextlib
import subprocess
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from services.client import DeployerClient
from services.common import natsserver
from tests.conftest import RegistryProcess, start_service, stop_process

SERVICE = "mlmesh.v1.DeployerService"


@dataclass
class DeployerProcess:
    address: str
    home: Path
    process: subprocess.Popen[bytes]

    def client(self) -> DeployerClient:
        return DeployerClient(self.address)


def start_deployer(
    home: Path, registry: RegistryProcess, port: int, nats_url: str = "", **settings: str
) -> DeployerProcess:
    """`python -m services.deployer` (publishing to the registry's NATS unless `nats_url` is given);
    `settings` become MLMESH_DEPLOYER_<NAME> variables."""
    options = {
        "registry_address": registry.address,
        "reconcile_seconds": "0.2",
        # No builder unless a test starts one: nothing answers on this port.
        "builder_address": f"127.0.0.1:{natsserver.free_port()}",
        **settings,
    }
    started = start_service("deployer", home, nats_url or registry.nats_url, options, port)
    return DeployerProcess(started.address, home, started.process)


def stop_deployer(deployer: DeployerProcess) -> None:
    stop_process(deployer.process)


@contextlib.contextmanager
def running_deployer(home: Path, registry: RegistryProcess, **settings: str) -> Iterator[DeployerProcess]:
    """A deployer; on the way out, its endpoints are deleted (their processes stopped) and it stops."""
    deployer = start_deployer(home, registry, natsserver.free_port(), **settings)
    try:
        yield deployer
    finally:
        with contextlib.suppress(Exception), deployer.client() as client:
            for endpoint in client.list():
                client.delete(endpoint.name)
        stop_deployer(deployer)

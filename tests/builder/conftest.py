"""The builder as its own process, as `mlmesh up` runs it, beside a real registry and nats-server."""

from __future__ import annotations

import json
import subprocess
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from services.client import BuilderClient
from tests.conftest import RegistryProcess, start_service, stop_process

SERVICE = "mlmesh.v1.BuilderService"


@dataclass
class BuilderProcess:
    address: str
    home: Path
    wheels: Path
    """The folder pip resolves environments from (--find-links, --no-index): no network in tests."""
    registry: RegistryProcess
    process: subprocess.Popen[bytes]

    def client(self) -> BuilderClient:
        return BuilderClient(self.address)


def start_builder(home: Path, registry: RegistryProcess, **settings: str) -> BuilderProcess:
    """`python -m services.builder`; `settings` become MLMESH_BUILDER_<NAME> variables."""
    wheels = home / "wheels"
    wheels.mkdir(parents=True, exist_ok=True)
    options = {
        "registry_address": registry.address,
        "find_links": json.dumps([str(wheels)]),
        "no_index": "true",
        **settings,
    }
    started = start_service("builder", home, registry.nats_url, options)
    return BuilderProcess(started.address, home, wheels, registry, started.process)


@pytest.fixture(scope="module")
def builder_process(
    registry_process: RegistryProcess, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[BuilderProcess]:
    """One builder per test module, with small conversion limits so that hostile models fail fast."""
    home = tmp_path_factory.mktemp("builder-home")
    builder = start_builder(home, registry_process, convert_wall_seconds="20", convert_memory_mb="1536")
    try:
        yield builder
    finally:
        stop_process(builder.process)

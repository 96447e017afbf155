"""The collector as its own process, as `mlmesh up` runs it, and capture messages published as the
runtime publishes them, for the collector's tests (and other services' tests that read captures)."""

from __future__ import annotations

import asyncio
import json
import subprocess
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import nats
import numpy as np

from services.client import CollectorClient, MeshError
from services.common import bus, capture, natsserver
from services.runtime import domain as runtime
from tests.conftest import RegistryProcess, spawn_service, start_service, stop_process

SERVICE = "mlmesh.v1.CollectorService"
# Flushes every 0.2 s; messages unacknowledged by a killed collector come again after 3 s.
FAST = {"flush_seconds": "0.2", "ack_wait_seconds": "3"}


@dataclass
class CollectorProcess:
    address: str
    home: Path
    nats_url: str
    environment: dict[str, str]
    process: subprocess.Popen[bytes]

    @property
    def data_dir(self) -> Path:
        return self.home / "collector" / "captures"

    def client(self) -> CollectorClient:
        return CollectorClient(self.address)

    def captured_rows(self, endpoint: str) -> int:
        """Rows committed for `endpoint` so far (0 before the first)."""
        try:
            with self.client() as client:
                return client.stats(endpoint).total.rows
        except MeshError as error:
            if error.code == "NOT_FOUND":
                return 0
            raise

    def wait_for_rows(self, endpoint: str, rows: int, timeout: float = 30) -> None:
        deadline = time.monotonic() + timeout
        while (found := self.captured_rows(endpoint)) < rows:
            assert time.monotonic() < deadline, f"the collector has {found} of {rows} rows of {endpoint}"
            time.sleep(0.1)

    def restart(self) -> None:
        """Start the process again (after a kill) with the same home, port and settings."""
        self.process = spawn_service(
            "services.collector", self.environment, self.home / "collector.log", self.address, SERVICE
        )


def start_collector(
    home: Path, registry: RegistryProcess | None, nats_url: str = "", **settings: str
) -> CollectorProcess:
    """`python -m services.collector` consuming the registry's NATS (unless `nats_url` is given);
    `settings` become MLMESH_COLLECTOR_<NAME> variables (after FAST)."""
    options = {
        "registry_address": registry.address if registry else f"127.0.0.1:{natsserver.free_port()}",
        **FAST,
        **settings,
    }
    started = start_service("collector", home, nats_url or (registry.nats_url if registry else ""), options)
    return CollectorProcess(
        started.address, home, started.environment["MLMESH_NATS_URL"], started.environment, started.process
    )


def stop_collector(collector: CollectorProcess) -> None:
    stop_process(collector.process)


def request(
    request_id: str,
    inputs: dict[str, np.ndarray],
    outputs: dict[str, np.ndarray],
    *,
    moment: float | None = None,
    version: str = "1",
) -> runtime.Captured:
    """One captured request, as the runtime's CaptureQueue holds it (numeric tensors only)."""
    tensors = [
        runtime.Tensor(name, datatype_of(array), tuple(array.shape), array)
        for name, array in [*inputs.items(), *outputs.items()]
    ]
    at = time.time() if moment is None else moment
    return runtime.Captured(request_id, "model", version, tensors, len(inputs), at)


def datatype_of(array: np.ndarray) -> str:
    if array.dtype == object:
        return "BYTES"
    return next(datatype for datatype, dtype in runtime.DTYPES.items() if dtype == array.dtype.newbyteorder("<"))


def payloads(requests: Sequence[runtime.Captured], max_bytes: int = 1024 * 1024 - 4096) -> list[bytes]:
    """Capture messages of `requests`, packed (and split) by the runtime's own encoder."""
    return runtime.capture_messages(list(requests), max_bytes).payloads


def records_of(payload: bytes) -> list[tuple[dict[str, Any], bytes]]:
    """The records of a capture message, each with its part of the body."""
    header, body = capture.split(payload)
    parts, at = [], 0
    for record in json.loads(header)["records"]:
        parts.append((record, bytes(body[at : at + record["bytes"]])))
        at += record["bytes"]
    assert at == len(body), f"the records cover {at} of the body's {len(body)} bytes"
    return parts


def message_of(records: Sequence[tuple[Any, bytes]]) -> bytes:
    """A capture message of records (as they are: their `bytes` are not corrected) and their parts of the body."""
    header = json.dumps({"records": [record for record, _ in records]}).encode()
    return capture.frame(header, [part for _, part in records])


def publish(nats_url: str, subject: str, messages: Sequence[bytes], pause: float = 0.0) -> None:
    """Publish to the capture stream (made as the runtime makes it when missing), waiting for each ack."""

    async def send() -> None:
        connection = await nats.connect(nats_url)
        try:
            jetstream = connection.jetstream()
            await bus.ensure_stream(jetstream, bus.capture_stream_config(7 * 86_400, 1024**3))
            for message in messages:
                await jetstream.publish(subject, message)
                if pause:
                    await asyncio.sleep(pause)
        finally:
            await connection.close()

    asyncio.run(send())

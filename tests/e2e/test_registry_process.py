"""The registry as its own process with a real nats-server: outages, kills, and the event format."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal
import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import grpc
import nats
import pytest
from cloudevents.core.formats.json import JSONFormat
from cloudevents.core.v1.event import CloudEvent as SdkCloudEvent
from faststream.nats import NatsBroker
from nats.js.errors import NotFoundError

from services._proto.mlmesh.v1 import common_pb2, registry_pb2, registry_pb2_grpc
from services.common import bus, events, natsserver
from services.common.bus import ParkedEvent, ProcessedEvent
from services.common.db import Database
from services.common.outbox import OutboxEvent, pending_count
from tests.common.test_outbox import wait_until
from tests.conftest import spawn_registry
from tests.registry.uploads import model_upload


def stub_for(port: int) -> tuple[grpc.Channel, registry_pb2_grpc.RegistryServiceStub]:
    channel = grpc.insecure_channel(f"127.0.0.1:{port}")
    grpc.channel_ready_future(channel).result(timeout=20)
    return channel, registry_pb2_grpc.RegistryServiceStub(channel)


def stop(process) -> None:
    if process.poll() is None:
        process.send_signal(signal.SIGTERM)
        process.wait(20)


async def stream_made_again(nats_url: str, timeout: float = 60) -> None:
    connection = await nats.connect(nats_url)
    try:
        jetstream = connection.jetstream()
        deadline = time.monotonic() + timeout
        while True:
            try:
                await jetstream.stream_info(events.STREAM)
                return
            except NotFoundError:
                assert time.monotonic() < deadline, "the relay did not make the event stream again"
                await asyncio.sleep(0.1)
    finally:
        await connection.close()


async def outage_report(home: Path, nats_url: str, received: Counter[int]) -> str:
    """Where the events that did not arrive are: still in the outbox, in the stream, or with the consumer."""
    registry = Database(f"sqlite:///{home / 'registry.db'}", [OutboxEvent])
    connection = await nats.connect(nats_url)
    try:
        jetstream = connection.jetstream()
        stream = await jetstream.stream_info(events.STREAM)
        consumer = await jetstream.consumer_info(events.STREAM, "outage-test")
    finally:
        await connection.close()
    missing = sorted(set(range(1, 1001)) - set(received))
    log_lines = (home / "registry.log").read_text(errors="replace").splitlines()
    warnings = [line for line in log_lines if "WARNING" in line or "ERROR" in line][-20:]
    return (
        f"{len(received)} of 1000 events arrived (missing {missing[:10]}...); "
        f"outbox pending: {pending_count(registry)}; stream messages: {stream.state.messages}; "
        f"consumer pending {consumer.num_pending}, ack pending {consumer.num_ack_pending}, "
        f"redelivered {consumer.num_redelivered}\nregistry log:\n" + "\n".join(warnings)
    )


async def test_events_registered_while_nats_is_down_all_arrive_once_after_it_returns(tmp_path, nats_server):
    port = natsserver.free_port()
    process = spawn_registry(tmp_path / "home", port, nats_server.url)
    channel, stub = stub_for(port)
    try:
        nats_server.stop()
        for _ in range(1000):
            stub.RegisterModelVersion(model_upload("fraud", [("m.bin", b"weights")]))
        nats_server.start()

        database = Database(f"sqlite:///{tmp_path / 'consumer.db'}", [ProcessedEvent, ParkedEvent])
        database.create_tables()
        received: Counter[int] = Counter()

        async def on_registered(event: events.CloudEvent) -> None:
            received[event.data["version"]] += 1

        await stream_made_again(nats_server.url)  # by the registry's relay, once NATS is back
        broker = NatsBroker(nats_server.url)
        bus.subscribe_events(
            broker, database, durable="outage-test", handler=on_registered, subject="mlmesh.events.model.registered"
        )
        await broker.start()
        try:
            try:
                await wait_until(lambda: len(received) == 1000, timeout=90)
            except TimeoutError:
                pytest.fail(await outage_report(tmp_path / "home", nats_server.url, received))
            await asyncio.sleep(1)
        finally:
            await broker.stop()
        assert sorted(received) == list(range(1, 1001))
        assert set(received.values()) == {1}
    finally:
        channel.close()
        stop(process)


def test_a_registry_killed_mid_upload_leaves_no_version_and_keeps_numbering(tmp_path):
    home = tmp_path / "home"
    port = natsserver.free_port()
    process = spawn_registry(home, port)
    channel, stub = stub_for(port)
    stub.RegisterModelVersion(model_upload("fraud", [("m.bin", b"v1")]))

    def slow_upload():
        yield registry_pb2.RegisterModelVersionRequest(metadata=registry_pb2.ModelVersionMetadata(name="fraud"))
        yield registry_pb2.RegisterModelVersionRequest(
            file=common_pb2.FileChunk(header=common_pb2.FileHeader(path="big.bin"))
        )
        for _ in range(200):
            yield registry_pb2.RegisterModelVersionRequest(file=common_pb2.FileChunk(data=b"x" * 65536))
            time.sleep(0.02)

    upload = stub.RegisterModelVersion.future(slow_upload())
    deadline = time.monotonic() + 20
    while not list((home / "blobs" / "registry" / "tmp").glob("upload-*")):
        assert time.monotonic() < deadline, "the upload never started writing"
        time.sleep(0.05)
    os.kill(process.pid, signal.SIGKILL)
    process.wait(10)
    try:
        upload.result(timeout=10)
        raise AssertionError("the upload cannot have succeeded")
    except grpc.RpcError as error:
        assert error.code() == grpc.StatusCode.UNAVAILABLE
    channel.close()

    process = spawn_registry(home, port)
    channel, stub = stub_for(port)
    try:
        versions = stub.SearchModelVersions(
            registry_pb2.SearchModelVersionsRequest(name_prefix="fraud", include_archived=True)
        )
        assert [v.version for v in versions.model_versions] == [1]
        assert stub.RegisterModelVersion(model_upload("fraud", [("m.bin", b"v2")])).model_version.version == 2
    finally:
        channel.close()
        stop(process)


async def test_events_on_the_stream_are_cloudevents_the_sdk_reads(tmp_path, nats_server):
    port = natsserver.free_port()
    process = spawn_registry(tmp_path / "home", port, nats_server.url)
    channel, stub = stub_for(port)
    try:
        stub.RegisterModelVersion(model_upload("fraud", [("m.bin", b"w")], tags={"team": "risk"}))
        connection = await nats.connect(nats_server.url)
        subscription = await connection.jetstream().subscribe("mlmesh.events.model.registered", ordered_consumer=True)
        message = await subscription.next_msg(timeout=20)
        await connection.close()
    finally:
        channel.close()
        stop(process)
    assert message.headers["Content-Type"] == "application/cloudevents+json"
    event = JSONFormat().read(SdkCloudEvent, message.data)
    attributes = event.get_attributes()
    assert attributes["specversion"] == "1.0"
    assert attributes["type"] == "io.mlmesh.model.registered.v1"
    assert attributes["source"] == "/mlmesh/registry"
    assert attributes["subject"] == "models/fraud/versions/1"
    assert attributes["id"] == message.headers["Nats-Msg-Id"]
    assert attributes["id"][14] == "7"  # UUIDv7
    data = event.get_data()
    assert (data["name"], data["version"], data["tags"]) == ("fraud", 1, {"team": "risk"})


def worker_pids(parent: int) -> list[int]:
    """The worker processes `run_service` started for `parent` (not multiprocessing's tracker)."""
    pids = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        with contextlib.suppress(OSError):
            fields = stat.read_text().rsplit(")", 1)[1].split()
            command = (stat.parent / "cmdline").read_bytes()
            if int(fields[1]) == parent and b"spawn_main" in command:
                pids.append(int(stat.parent.name))
    return pids


def cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


@pytest.mark.parametrize("database_url", ["sqlite", "postgresql"], indirect=True)
async def test_two_worker_processes_share_the_port_the_numbering_and_the_stream(tmp_path, nats_server, database_url):
    port = natsserver.free_port()
    process = spawn_registry(tmp_path / "home", port, nats_server.url, database_url, workers=2)
    try:
        await wait_until(lambda: len(worker_pids(process.pid)) == 1)
        (worker,) = worker_pids(process.pid)
        worker_cpu = cpu_seconds(worker)

        def register_many(_: int) -> list[int]:
            channel, stub = stub_for(port)  # a connection of its own: the kernel picks a process
            with channel:
                return [
                    stub.RegisterModelVersion(model_upload("shared", [("m.bin", os.urandom(64))])).model_version.version
                    for _ in range(25)
                ]

        with ThreadPoolExecutor(16) as pool:
            versions = [version for batch in pool.map(register_many, range(16)) for version in batch]
        assert sorted(versions) == list(range(1, 401))
        assert cpu_seconds(worker) - worker_cpu > 0.1, "the second process served no calls"

        connection = await nats.connect(nats_server.url)
        try:
            jetstream = connection.jetstream()
            subscription = await jetstream.subscribe("mlmesh.events.model.registered", ordered_consumer=True)
            seen: list[int] = []
            async with asyncio.timeout(30):
                while len(seen) < 400:
                    message = await subscription.next_msg(timeout=10)
                    seen.append(json.loads(message.data)["data"]["version"])
            await asyncio.sleep(1.5)  # a duplicate would come now; JetStream drops it by Nats-Msg-Id
            info = await jetstream.stream_info(events.STREAM)
        finally:
            await connection.close()
        assert sorted(seen) == list(range(1, 401))
        assert info.state.messages == 400
    finally:
        stop(process)
    assert not worker_pids(process.pid)
    with pytest.raises(ProcessLookupError):
        os.kill(worker, 0)


def test_a_worker_stops_when_the_first_process_is_killed(tmp_path):
    port = natsserver.free_port()
    process = spawn_registry(tmp_path / "home", port, workers=2)
    deadline = time.monotonic() + 20
    while not worker_pids(process.pid):
        assert time.monotonic() < deadline, "no worker process started"
        time.sleep(0.1)
    (worker,) = worker_pids(process.pid)
    process.kill()
    process.wait(10)
    deadline = time.monotonic() + 20
    while Path(f"/proc/{worker}").exists() and b"spawn_main" in Path(f"/proc/{worker}/cmdline").read_bytes():
        assert time.monotonic() < deadline, "the worker outlived the process that started it"
        time.sleep(0.1)

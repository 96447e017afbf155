"""The collector as its own process beside a real nats-server, registry and runtime: captured
traffic reaches Parquet with the values sent; rows are stored exactly once across SIGKILL and
redelivery; retention, queries, labels and exports work through the API and the CLI; bad input
is refused with the right status and leaves nothing behind."""

from __future__ import annotations

import asyncio
import csv
import json
import os
import signal
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import grpc
import nats
import numpy as np
import pyarrow.dataset as pads
import pyarrow.parquet as pq
import pytest
from nats.js.errors import NotFoundError
from tritonclient.grpc import service_pb2 as oip
from tritonclient.grpc import service_pb2_grpc as oip_grpc
from typer.testing import CliRunner

from services._proto.mlmesh.v1 import collector_pb2, collector_pb2_grpc
from services.cli import app
from services.client import MeshError, RegistryClient
from services.collector.consumer import DURABLE
from services.common import bus
from services.launcher import health_status
from tests.collector.processes import (
    SERVICE,
    CollectorProcess,
    message_of,
    payloads,
    publish,
    records_of,
    request,
    start_collector,
    stop_collector,
)
from tests.conftest import NatsServer, RegistryProcess, wait_until
from tests.runtime.conftest import register_adder, spawn_runtime

runner = CliRunner()
HOUR = 3600.0


@pytest.fixture(scope="module")
def collector(
    registry_process: RegistryProcess, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[CollectorProcess]:
    """A collector on the registry's NATS, exporting to the registry."""
    process = start_collector(
        tmp_path_factory.mktemp("collector"), registry_process, max_labels_per_call="1000", max_export_bytes="5000000"
    )
    try:
        yield process
    finally:
        stop_collector(process)


def subject(endpoint: str) -> str:
    return f"mlmesh.capture.{endpoint}.blue"


def features(seed: int, rows: int) -> np.ndarray:
    return np.random.default_rng(seed).random((rows, 3), dtype=np.float32)


def send_rows(
    nats_url: str,
    endpoint: str,
    count: int,
    *,
    moment: float | None = None,
    prefix: str = "r",
    pause: float = 0,
    per_message: int = 25,
) -> None:
    """`count` single-row requests x (3 floats) -> y = x + 1, `per_message` to a message, `pause` seconds apart."""
    requests = []
    for number in range(count):
        x = features(number, 1)
        requests.append(request(f"{prefix}{number}", {"x": x}, {"y": x + 1}, moment=moment))
    publish(
        nats_url,
        subject(endpoint),
        [message for i in range(0, count, per_message) for message in payloads(requests[i : i + per_message])],
        pause,
    )


# ---------------------------------------------------------------- capture into Parquet


def test_runtime_traffic_reaches_parquet_with_the_values_sent(
    collector: CollectorProcess, registry_process: RegistryProcess, tmp_path: Path
) -> None:
    ref = register_adder(registry_process, tmp_path)
    settings = {"capture": "true", "nats_url": registry_process.nats_url, "endpoint": "shop", "deployment": "blue"}
    singles = {f"g{number}": features(number, 1) for number in range(20)}
    batch = features(99, 50)
    with spawn_runtime(tmp_path, registry_process, ref, **settings, capture_flush_seconds="0.05") as runtime:
        with grpc.insecure_channel(runtime.grpc) as channel:
            stub = oip_grpc.GRPCInferenceServiceStub(channel)
            for request_id, x in singles.items():
                call = oip.ModelInferRequest(model_name="adder", id=request_id)
                call.inputs.add(name="x", datatype="FP32", shape=[1, 3]).contents.fp32_contents.extend(x[0].tolist())
                stub.ModelInfer(call, timeout=10)
            raw = oip.ModelInferRequest(model_name="adder", id="batch")
            raw.inputs.add(name="x", datatype="FP32", shape=[50, 3])
            raw.raw_input_contents.append(batch.tobytes())
            stub.ModelInfer(raw, timeout=10)
        collector.wait_for_rows("shop", 70)

    # The tree reads as a Hive-partitioned dataset, with the values the runtime received and answered.
    dataset = pads.dataset(collector.data_dir, partitioning="hive")
    table = dataset.to_table(filter=pads.field("endpoint") == "shop").sort_by(
        [("request_id", "ascending"), ("row", "ascending")]
    )
    assert table.num_rows == 70
    version = ref.split(":")[1]
    assert set(table.column("deployment").to_pylist()) == {"blue"}
    assert {str(value) for value in table.column("model_version").to_pylist()} == {version}
    today = time.strftime("%Y-%m-%d", time.gmtime())
    assert set(table.column("date").to_pylist()) <= {today, time.strftime("%Y-%m-%d", time.gmtime(time.time() - 60))}
    sent = {request_id: x for request_id, x in singles.items()} | {"batch": batch}
    for row in table.to_pylist():
        x = sent[row["request_id"]][row["row"]]
        assert [row["x.0"], row["x.1"], row["x.2"]] == x.tolist()
        assert [row["y.0"], row["y.1"], row["y.2"]] == (x + 1).tolist()
        assert abs(row["time"].timestamp() - time.time()) < 300
    assert [row["row"] for row in table.to_pylist() if row["request_id"] == "batch"] == list(range(50))

    with collector.client() as client:
        queried = client.query("shop")
        stats = client.stats("shop")
    assert queried.num_rows == 70
    assert queried.column_names == [
        *("request_id", "time", "row", "deployment", "model_version"),
        *("x.0", "x.1", "x.2", "y.0", "y.1", "y.2"),
    ]
    assert (stats.total.rows, stats.partitions[0].deployment, stats.partitions[0].model_version) == (
        70,
        "blue",
        version,
    )
    assert stats.total.files >= 1 and stats.total.bytes == sum(
        path.stat().st_size for path in collector.data_dir.glob("endpoint=shop/**/*.parquet")
    )


# ---------------------------------------------------------------- exactly once


@pytest.mark.parametrize("database_url", ["sqlite", "postgresql"], indirect=True)
def test_sigkill_mid_stream_leaves_every_row_exactly_once(
    nats_server: NatsServer, tmp_path: Path, database_url: str
) -> None:
    # Small pulls and flushes: at any moment some messages are decoded, some being flushed, some acked.
    options = {"flush_rows": "100", "fetch_messages": "8", "database_url": database_url}
    collector = start_collector(tmp_path / "home", None, nats_server.url, **options)
    total = 6000
    publisher = threading.Thread(
        target=send_rows, args=(nats_server.url, "steady", total), kwargs={"prefix": "k", "pause": 0.01}
    )
    try:
        publisher.start()
        deadline = time.monotonic() + 30
        while collector.captured_rows("steady") < 1000:
            assert time.monotonic() < deadline
            time.sleep(0.02)
        collector.process.send_signal(signal.SIGKILL)
        collector.process.wait()
        assert publisher.is_alive(), "the publisher finished before the kill: nothing was mid-stream"
        publisher.join(60)
        collector.restart()
        collector.wait_for_rows("steady", total, timeout=60)
        time.sleep(1.5)  # anything delivered twice would have landed by now
        with collector.client() as client:
            table = client.query("steady", columns=["request_id", "row", "x.0"])
            stats = client.stats("steady")
    finally:
        stop_collector(collector)
    assert 0 < stats.ingest.rows_written < total  # the restarted process took over mid-stream
    keys = list(zip(table.column("request_id").to_pylist(), table.column("row").to_pylist(), strict=True))
    assert len(keys) == len(set(keys)) == total == stats.total.rows
    assert set(keys) == {(f"k{number}", 0) for number in range(total)}
    by_id = dict(zip(table.column("request_id").to_pylist(), table.column("x.0").to_pylist(), strict=True))
    assert by_id["k4321"] == features(4321, 1)[0, 0]


def test_the_end_of_a_backlog_is_flushed_at_once(nats_server: NatsServer, tmp_path: Path) -> None:
    send_rows(nats_server.url, "burst", 1000)  # 40 messages waiting before the collector starts
    # Pulls of 4 messages, and a timer that alone would hold the last rows for a minute.
    options = {"fetch_messages": "4", "flush_seconds": "60", "ack_wait_seconds": "120"}
    started = time.monotonic()
    collector = start_collector(tmp_path / "home", None, nats_server.url, **options)
    try:
        collector.wait_for_rows("burst", 1000, timeout=30)
        assert time.monotonic() - started < 30
        send_rows(nats_server.url, "burst", 10, prefix="late")  # a trickle: it waits for the timer
        time.sleep(2)
        assert collector.captured_rows("burst") == 1000
    finally:
        stop_collector(collector)


def test_messages_delivered_again_after_their_commit_are_acked_and_not_stored_twice(
    nats_server: NatsServer, tmp_path: Path
) -> None:
    collector = start_collector(tmp_path / "home", None, nats_server.url)
    try:
        send_rows(nats_server.url, "again", 500)
        collector.wait_for_rows("again", 500)
        stop_collector(collector)
        # Forget every ack: the consumer made afresh delivers the whole stream again, as after a
        # crash between the commit and the acks.
        asyncio.run(delete_consumer(nats_server.url))
        collector.restart()
        deadline = time.monotonic() + 30
        with collector.client() as client:
            while client.stats("again").ingest.duplicates_skipped < 20:
                assert time.monotonic() < deadline, client.stats("again").ingest
                time.sleep(0.1)
            stats = client.stats("again")
    finally:
        stop_collector(collector)
    assert (stats.total.rows, stats.ingest.rows_written, stats.ingest.duplicates_skipped) == (500, 0, 20)


async def unacknowledged(nats_url: str) -> int:
    """Messages delivered to the collector's consumer and not yet acknowledged (-1: no consumer yet)."""
    connection = await nats.connect(nats_url)
    try:
        info = await connection.jetstream().consumer_info(bus.CAPTURE_STREAM, DURABLE)
        return info.num_ack_pending if not info.num_pending else -1
    except NotFoundError:
        return -1
    finally:
        await connection.close()


async def delete_consumer(nats_url: str) -> None:
    connection = await nats.connect(nats_url)
    try:
        await connection.jetstream().delete_consumer(bus.CAPTURE_STREAM, DURABLE)
    finally:
        await connection.close()


def test_a_malformed_capture_message_is_counted_and_skipped_and_the_stream_flows_on(
    collector: CollectorProcess,
) -> None:
    send_rows(collector.nats_url, "flow", 10, prefix="before")
    collector.wait_for_rows("flow", 10)
    with collector.client() as client:
        before = client.stats("flow").ingest
    ((good, part),) = records_of(payloads([request("fine", {"x": features(1, 1)}, {})])[0])
    broken = {**good, "ids": ["broken"], "inputs": [{**good["inputs"][0], "shape": [1, 7]}]}
    publish(collector.nats_url, subject("flow"), [b"\x00 not json\n", message_of([(broken, part), (good, part)])])
    publish(collector.nats_url, "mlmesh.capture.flow.blue.extra", [message_of([(good, part)])])
    send_rows(collector.nats_url, "flow", 10, prefix="after")
    collector.wait_for_rows("flow", 21)
    with collector.client() as client:
        after = client.stats("flow").ingest
        request_ids = set(client.query("flow", columns=["request_id"]).column("request_id").to_pylist())
    assert request_ids == {f"before{n}" for n in range(10)} | {f"after{n}" for n in range(10)} | {"fine"}
    assert after.malformed_messages - before.malformed_messages == 2  # not JSON; a subject with a token too many
    assert after.malformed_records - before.malformed_records == 1  # 7 columns in a shape whose data holds 3
    assert health_status(collector.address, SERVICE) == "SERVING"


# ---------------------------------------------------------------- retention


def test_retention_by_age_and_by_size_deletes_the_oldest_files_and_their_rows(collector: CollectorProcess) -> None:
    now = time.time()
    send_rows(collector.nats_url, "aging", 50, moment=now - 3 * 86_400, prefix="old")
    send_rows(collector.nats_url, "aging", 30, prefix="new")
    collector.wait_for_rows("aging", 80)
    with collector.client() as client:
        policy = client.set_retention("aging", max_age_seconds=86_400)
        assert (policy.max_age_seconds, policy.max_age_is_default, policy.max_bytes_is_default) == (86_400, False, True)
        wait_until(lambda: collector.captured_rows("aging") == 30)
        assert set(client.query("aging", columns=["request_id"]).column("request_id").to_pylist()) == {
            f"new{n}" for n in range(30)
        }
        assert not list(
            collector.data_dir.glob(
                "endpoint=aging/**/date=" + time.strftime("%Y-%m-%d", time.gmtime(now - 3 * 86_400))
            )
        )

        for batch in range(3):  # one message each: three flushes, three files
            send_rows(collector.nats_url, "sized", 40, prefix=f"b{batch}-", per_message=40)
            collector.wait_for_rows("sized", 40 * (batch + 1))
        files = sorted(collector.data_dir.glob("endpoint=sized/**/*.parquet"), key=lambda path: path.stat().st_mtime)
        assert len(files) == 3
        client.set_retention("sized", max_bytes=files[-1].stat().st_size + 10)
        wait_until(lambda: collector.captured_rows("sized") == 40)
        assert [path.exists() for path in files] == [False, False, True]
        assert set(client.query("sized", columns=["request_id"]).column("request_id").to_pylist()) == {
            f"b2-{n}" for n in range(40)
        }
        assert client.get_retention("sized").max_bytes == files[-1].stat().st_size + 10


# ---------------------------------------------------------------- query, labels, export


@pytest.fixture(scope="module")
def windowed(collector: CollectorProcess) -> float:
    """Endpoint `window`: 20 rows two hours ago, 20 one hour ago, 20 now; returns now."""
    now = time.time()
    for hours_ago in (2, 1, 0):
        send_rows(collector.nats_url, "window", 20, moment=now - hours_ago * HOUR, prefix=f"h{hours_ago}-")
    collector.wait_for_rows("window", 60)
    return now


def test_query_filters_by_time_window_and_columns(collector: CollectorProcess, windowed: float) -> None:
    now = windowed
    with collector.client() as client:
        middle = client.query("window", start=now - 1.5 * HOUR, end=now - 0.5 * HOUR)
        assert set(middle.column("request_id").to_pylist()) == {f"h1-{n}" for n in range(20)}
        recent = client.query("window", start=now - 1.5 * HOUR)
        assert recent.num_rows == 40
        # start is included, end is not
        assert client.query("window", start=now - HOUR, end=now).num_rows == 20
        picked = client.query("window", columns=["y.2", "request_id"], deployment="blue")
        assert picked.column_names == ["y.2", "request_id"] and picked.num_rows == 60
        empty = client.query("window", start=now + HOUR, end=now + 2 * HOUR)
        assert empty.num_rows == 0 and "x.0" in empty.column_names
        batches = list(client.query_reader("window"))
        assert sum(batch.num_rows for batch in batches) == 60


def test_labels_join_by_request_and_row_and_replace_on_ingest_again(
    collector: CollectorProcess, windowed: float
) -> None:
    with collector.client() as client:
        answer = client.ingest_labels("window", [("h0-1", 0, 1), ("h0-2", 0, 0), ("h0-3", 5, 1)])
        assert (answer.ingested, answer.replaced) == (3, 0)
        again = client.ingest_labels("window", [("h0-1", 0, 0.5)])
        assert (again.ingested, again.replaced) == (1, 1)
        table = client.query("window", include_labels=True, columns=["request_id", "row"])
        assert table.column_names == ["request_id", "row", "label"]
        labels = {row["request_id"]: row["label"] for row in table.to_pylist()}
        assert str(table.schema.field("label").type) == "double"
        assert (labels["h0-1"], labels["h0-2"], labels["h0-3"], labels["h0-4"]) == (0.5, 0.0, None, None)
        client.ingest_labels("window", [("h1-7", 0, "cat")])  # a class name: the column becomes text
        texts = {row["request_id"]: row["label"] for row in client.query("window", include_labels=True).to_pylist()}
        assert (texts["h1-7"], texts["h0-1"], texts["h0-2"]) == ("cat", "0.5", "0")
        assert client.stats("window").labels == 4


def test_export_registers_the_window_as_a_dataset_version(
    collector: CollectorProcess, registry_process: RegistryProcess, windowed: float, tmp_path: Path
) -> None:
    now = windowed
    with collector.client() as client:
        exported = client.export(
            "window", "live-window", start=now - 1.5 * HOUR, columns=["x.0", "x.1", "x.2", "request_id"]
        )
    assert exported.dataset_ref == f"live-window:{exported.version}" and exported.rows == 40
    with RegistryClient(registry_process.address) as registry:
        dataset = registry.get_dataset(exported.dataset_ref)
        path = registry.download_dataset(exported.dataset_ref, tmp_path)
    assert dataset.row_count == 40 and dataset.tags["endpoint"] == "window"
    table = pq.read_table(path)
    assert table.column_names == ["x.0", "x.1", "x.2", "request_id"]
    assert {value for value in table.column("request_id").to_pylist()} == {
        f"h{hours}-{n}" for hours in (0, 1) for n in range(20)
    }
    assert not list((collector.data_dir / ".exports").glob("*"))


# ---------------------------------------------------------------- bad input


def raw_call(collector: CollectorProcess, method: str, request: object) -> grpc.RpcError:
    """Call `method` with `request` expecting a failure; the failure."""
    with grpc.insecure_channel(collector.address) as channel:
        stub = collector_pb2_grpc.CollectorServiceStub(channel)
        try:
            answer = getattr(stub, method)(request, timeout=10)
            if method == "QueryCaptures":
                list(answer)
        except grpc.RpcError as error:
            return error
    raise AssertionError(f"{method} accepted {request}")


@pytest.mark.parametrize(
    ("method", "request_message", "code", "words"),
    [
        ("QueryCaptures", collector_pb2.QueryCapturesRequest(endpoint="../x"), "INVALID_ARGUMENT", "not a valid name"),
        ("QueryCaptures", collector_pb2.QueryCapturesRequest(endpoint=""), "INVALID_ARGUMENT", "not a valid name"),
        ("QueryCaptures", collector_pb2.QueryCapturesRequest(endpoint="a" * 5000), "INVALID_ARGUMENT", "valid name"),
        (
            "QueryCaptures",
            collector_pb2.QueryCapturesRequest(endpoint="window", deployment="../../etc"),
            "INVALID_ARGUMENT",
            "deployment",
        ),
        ("QueryCaptures", collector_pb2.QueryCapturesRequest(endpoint="nothing"), "NOT_FOUND", "has no captures"),
        (
            "QueryCaptures",
            collector_pb2.QueryCapturesRequest(endpoint="window", deployment="green"),
            "NOT_FOUND",
            "captures of blue",
        ),
        (
            "QueryCaptures",
            collector_pb2.QueryCapturesRequest(endpoint="window", columns=["x.0", "nope", "../etc"]),
            "INVALID_ARGUMENT",
            "unknown column(s) 'nope', '../etc'",
        ),
        (
            "QueryCaptures",
            collector_pb2.QueryCapturesRequest(endpoint="window", columns=["x.0", "x.0"]),
            "INVALID_ARGUMENT",
            "named twice",
        ),
        (
            "QueryCaptures",
            collector_pb2.QueryCapturesRequest(endpoint="window", columns=["label"]),
            "INVALID_ARGUMENT",
            "include_labels",
        ),
        (
            "QueryCaptures",
            collector_pb2.QueryCapturesRequest(
                endpoint="window", start_time={"seconds": 2_000_000_000}, end_time={"seconds": 1_000_000_000}
            ),
            "INVALID_ARGUMENT",
            "must be before end_time",
        ),
        ("GetCaptureStats", collector_pb2.GetCaptureStatsRequest(endpoint="nothing"), "NOT_FOUND", "no captures"),
        ("GetCaptureStats", collector_pb2.GetCaptureStatsRequest(endpoint="a/b"), "INVALID_ARGUMENT", "valid name"),
        (
            "ExportCaptures",
            collector_pb2.ExportCapturesRequest(endpoint="window", dataset="../evil"),
            "INVALID_ARGUMENT",
            "dataset",
        ),
        (
            "ExportCaptures",
            collector_pb2.ExportCapturesRequest(endpoint="nothing", dataset="fine"),
            "NOT_FOUND",
            "no captures",
        ),
        (
            "ExportCaptures",
            collector_pb2.ExportCapturesRequest(
                endpoint="window", dataset="fine", start_time={"seconds": 4_000_000_000}
            ),
            "FAILED_PRECONDITION",
            "nothing to export",
        ),
        (
            "SetRetention",
            collector_pb2.SetRetentionRequest(endpoint="window", max_bytes=-1),
            "INVALID_ARGUMENT",
            "max_bytes",
        ),
        (
            "SetRetention",
            collector_pb2.SetRetentionRequest(endpoint="window", max_age_seconds=float("nan")),
            "INVALID_ARGUMENT",
            "max_age_seconds",
        ),
        ("SetRetention", collector_pb2.SetRetentionRequest(endpoint=".."), "INVALID_ARGUMENT", "valid name"),
        ("GetRetention", collector_pb2.GetRetentionRequest(endpoint="x\x00"), "INVALID_ARGUMENT", "valid name"),
        ("IngestLabels", collector_pb2.IngestLabelsRequest(endpoint="window"), "INVALID_ARGUMENT", "no labels"),
        (
            "IngestLabels",
            collector_pb2.IngestLabelsRequest(
                endpoint="window", labels=[collector_pb2.Label(request_id=f"r{n}", number=1) for n in range(1001)]
            ),
            "INVALID_ARGUMENT",
            "1001 labels in one call; at most 1000",
        ),
        (
            "IngestLabels",
            collector_pb2.IngestLabelsRequest(
                endpoint="window",
                labels=[
                    collector_pb2.Label(request_id="ok", number=1),
                    collector_pb2.Label(request_id="r", row=-1, number=1),
                ],
            ),
            "INVALID_ARGUMENT",
            "labels[1]: row must be between 0",
        ),
        (
            "IngestLabels",
            collector_pb2.IngestLabelsRequest(endpoint="window", labels=[collector_pb2.Label(request_id="r")]),
            "INVALID_ARGUMENT",
            "no value",
        ),
        (
            "IngestLabels",
            collector_pb2.IngestLabelsRequest(
                endpoint="window", labels=[collector_pb2.Label(request_id="r", number=float("inf"))]
            ),
            "INVALID_ARGUMENT",
            "finite",
        ),
        (
            "IngestLabels",
            collector_pb2.IngestLabelsRequest(endpoint="window", labels=[collector_pb2.Label(number=1)]),
            "INVALID_ARGUMENT",
            "request_id",
        ),
    ],
)
def test_bad_requests_are_refused_with_the_right_status_and_change_nothing(
    collector: CollectorProcess, windowed: float, method: str, request_message: object, code: str, words: str
) -> None:
    with collector.client() as client:
        labels_before = client.stats("window").labels
        retention_before = client.get_retention("window")
    error = raw_call(collector, method, request_message)
    assert error.code().name == code, error.details()
    assert words in error.details()
    assert health_status(collector.address, SERVICE) == "SERVING"
    with collector.client() as client:
        assert client.stats("window").labels == labels_before
        assert client.get_retention("window") == retention_before
        assert client.stats("window").total.rows == 60
    assert not list((collector.data_dir / ".exports").glob("*"))


def test_a_request_that_is_not_a_valid_message_is_refused(collector: CollectorProcess) -> None:
    with grpc.insecure_channel(collector.address) as channel:
        call = channel.unary_unary("/mlmesh.v1.CollectorService/GetCaptureStats")
        with pytest.raises(grpc.RpcError) as raised:
            call(b"\xff\xff\xff garbage", timeout=5)
    assert raised.value.code() == grpc.StatusCode.INVALID_ARGUMENT


def test_an_export_too_large_is_refused_and_leaves_no_file(collector: CollectorProcess, registry_process) -> None:
    rows = [request(f"w{n}", {"x": np.random.default_rng(n).random((500, 64))}, {}) for n in range(40)]
    publish(collector.nats_url, subject("wide"), payloads(rows))
    collector.wait_for_rows("wide", 20_000)
    with collector.client() as client, pytest.raises(MeshError) as raised:
        client.export("wide", "too-big")
    assert raised.value.code == "RESOURCE_EXHAUSTED" and "MLMESH_COLLECTOR_MAX_EXPORT_BYTES" in raised.value.message
    assert not list((collector.data_dir / ".exports").glob("*"))
    with RegistryClient(registry_process.address) as registry, pytest.raises(MeshError):
        registry.get_dataset("too-big")


# ---------------------------------------------------------------- the CLI


def cli(collector: CollectorProcess, *arguments: str):  # type: ignore[no-untyped-def]
    return runner.invoke(app, ["captures", *arguments, "--address", collector.address])


def test_cli_queries_writes_files_shows_stats_ingests_labels_sets_retention_and_exports(
    collector: CollectorProcess, windowed: float, tmp_path: Path
) -> None:
    shown = cli(collector, "query", "window", "--last", "90m", "--columns", "request_id,x.0", "--limit", "5")
    assert shown.exit_code == 0, shown.output
    assert "40 rows (the first 5 shown" in shown.stdout
    rows = json.loads(cli(collector, "query", "window", "--since", "30m", "--json").stdout)
    assert len(rows) == 20 and {row["request_id"][:3] for row in rows} == {"h0-"} and "T" in rows[0]["time"]

    parquet_file, csv_file = tmp_path / "w.parquet", tmp_path / "w.csv"
    written = json.loads(cli(collector, "query", "window", "-o", str(parquet_file), "--json").stdout)
    assert written["rows"] == 60 and pq.read_table(parquet_file).num_rows == 60
    assert cli(collector, "query", "window", "--columns", "request_id,row", "-o", str(csv_file)).exit_code == 0
    with csv_file.open() as source:
        assert len(list(csv.DictReader(source))) == 60
    both = cli(collector, "query", "window", "--since", "1h", "--last", "1h")
    assert both.exit_code == 2 and "not both" in both.output
    unknown = cli(collector, "query", "window", "--columns", "nope")
    assert unknown.exit_code == 1 and "unknown column" in unknown.stderr

    labels_file = tmp_path / "labels.csv"
    labels_file.write_text("request_id,row,label\nh2-1,0,dog\nh2-2,0,cat\nh2-3,,1\n")
    stored = json.loads(cli(collector, "labels", "window", str(labels_file), "--json").stdout)
    assert stored["ingested"] == 3
    labelled = json.loads(
        cli(collector, "query", "window", "--labels", "--columns", "request_id,label", "--json").stdout
    )
    assert {row["request_id"]: row["label"] for row in labelled}["h2-1"] == "dog"
    bad_labels = tmp_path / "bad.csv"
    bad_labels.write_text("request_id,row,label\nx,minus one,1\n")
    refused = cli(collector, "labels", "window", str(bad_labels))
    assert refused.exit_code == 2 and "not a row number" in refused.stderr

    stats = json.loads(cli(collector, "stats", "window", "--json").stdout)
    assert stats["total"]["rows"] == 60 and stats["partitions"][0]["deployment"] == "blue"
    assert "60 rows" in cli(collector, "stats", "window").stdout

    retention = json.loads(
        cli(collector, "retention", "window", "--max-age", "400d", "--max-bytes", "2GiB", "--json").stdout
    )
    assert (retention["max_age_seconds"], retention["max_bytes"]) == (400 * 86_400, 2 * 1024**3)
    assert "max age 400d" in cli(collector, "retention", "window").stdout
    assert json.loads(cli(collector, "retention", "window", "--default", "--json").stdout)["max_age_is_default"]
    assert cli(collector, "retention", "window", "--max-bytes", "lots").exit_code == 2

    exported = json.loads(cli(collector, "export", "window", "cli-export", "--last", "30m", "--json").stdout)
    assert exported["rows"] == 20 and exported["dataset_ref"].startswith("cli-export:")
    missing = cli(collector, "stats", "nothing")
    assert missing.exit_code == 1 and "no captures" in missing.stderr


def test_cli_says_when_the_collector_is_away() -> None:
    from services.common import natsserver

    away = runner.invoke(
        app, ["captures", "stats", "x"], env={"MLMESH_COLLECTOR_ADDRESS": f"127.0.0.1:{natsserver.free_port()}"}
    )
    assert away.exit_code == 2 and "cannot reach the collector" in away.stderr


def test_the_consumer_outlasts_a_collector_stopped_cleanly(nats_server: NatsServer, tmp_path: Path) -> None:
    """SIGTERM flushes what was decoded: nothing waits for redelivery at the next start."""
    collector = start_collector(tmp_path / "home", None, nats_server.url, flush_seconds="30", ack_wait_seconds="60")
    try:
        send_rows(nats_server.url, "calm", 100)
        # Delivered (4 messages), not acknowledged: decoded, waiting for a flush 30 s away.
        wait_until(lambda: asyncio.run(unacknowledged(nats_server.url)) == 4)
        assert collector.captured_rows("calm") == 0
        os.kill(collector.process.pid, signal.SIGTERM)
        collector.process.wait(20)
        collector.restart()
        assert collector.captured_rows("calm") == 100  # at once: not after ack_wait
    finally:
        stop_collector(collector)

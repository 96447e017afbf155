"""Capture: every request and answer reaches stream MLMESH_CAPTURE in batches, and capture never
holds up or fails a request, even with NATS away."""

from __future__ import annotations

import asyncio
import contextlib
import json
import math
import time

import grpc
import nats
import numpy as np
import pytest
from tritonclient.grpc import service_pb2 as oip
from tritonclient.grpc import service_pb2_grpc as oip_grpc

from services.common import bus, capture, natsserver
from services.runtime import domain
from tests.collector.processes import records_of
from tests.registry.test_models import tiny_onnx
from tests.runtime.conftest import register_adder, spawn_runtime
from tests.runtime.test_rest import call, metric, x


def adder_request(request_id: str, values: list[float]) -> oip.ModelInferRequest:
    request = oip.ModelInferRequest(model_name="adder", id=request_id)
    request.inputs.add(name="x", datatype="FP32", shape=[1, 3]).contents.fp32_contents.extend(values)
    return request


def raw_adder_request(request_id: str, batch: np.ndarray) -> oip.ModelInferRequest:
    request = oip.ModelInferRequest(model_name="adder", id=request_id)
    request.inputs.add(name="x", datatype="FP32", shape=list(batch.shape))
    request.raw_input_contents.append(batch.astype("<f4").tobytes())
    return request


def captured_requests(payload: bytes) -> list[dict]:
    """The requests of one capture message taken apart again: each as a record of its own (`id`,
    `time`, and `offset` for a piece), its tensors' values decoded into `data`."""
    requests = []
    for record, part in records_of(payload):
        times = np.frombuffer(part[: 8 * len(record["ids"])], "<f8").tolist()
        values, cursor = [], 8 * len(record["ids"])
        for tensor in record["inputs"] + record["outputs"]:
            if "data" in tensor:
                values.append(tensor["data"])
                continue
            dtype = domain.DTYPES[tensor["datatype"]]
            size = math.prod(tensor["shape"]) * dtype.itemsize
            values.append(np.frombuffer(part[cursor : cursor + size], dtype).tolist())
            cursor += size
        assert cursor == len(part)
        start = 0
        for request_id, moment, count in zip(record["ids"], times, record["counts"], strict=True):
            tensors = []
            for tensor, data in zip(record["inputs"] + record["outputs"], values, strict=True):
                width = math.prod(tensor["shape"][1:])
                tensors.append(
                    {
                        "name": tensor["name"],
                        "datatype": tensor["datatype"],
                        "shape": [count, *tensor["shape"][1:]],
                        "data": data[start * width : (start + count) * width],
                    }
                )
            request = {"id": request_id, "model": record["model"], "version": record["version"], "time": moment}
            request |= {"inputs": tensors[: len(record["inputs"])], "outputs": tensors[len(record["inputs"]) :]}
            if "offset" in record:
                request["offset"] = record["offset"]
            requests.append(request)
            start += count
    return requests


async def test_requests_and_answers_arrive_in_batches_on_the_capture_subject(registry_process, tmp_path):
    ref = register_adder(registry_process, tmp_path)
    settings = {"capture": "true", "endpoint": "fraud-ep", "deployment": "blue", "nats_url": registry_process.nats_url}
    with spawn_runtime(tmp_path, registry_process, ref, **settings) as runtime:
        with grpc.insecure_channel(runtime.grpc) as channel:
            stub = oip_grpc.GRPCInferenceServiceStub(channel)
            for number in range(20):
                stub.ModelInfer(adder_request(f"g{number}", [number, 1.0, 2.0]))
        for number in range(5):
            call(runtime, "/v2/models/adder/infer", {"id": f"r{number}", **x(data=(number, 0, 0))})
        rows = await captured_rows("mlmesh.capture.fraud-ep.blue", registry_process.nats_url, 25)
    by_id = {row["id"]: row for row in rows}
    assert len(rows) == 25
    assert sorted(by_id) == sorted([f"g{n}" for n in range(20)] + [f"r{n}" for n in range(5)])
    row = by_id["g7"]
    assert (row["model"], row["version"]) == ("adder", ref.split(":")[1])
    assert row["inputs"] == [{"name": "x", "datatype": "FP32", "shape": [1, 3], "data": [7, 1, 2]}]
    assert row["outputs"] == [{"name": "y", "datatype": "FP32", "shape": [1, 3], "data": [8, 2, 3]}]
    assert abs(row["time"] - time.time()) < 120


async def test_large_requests_are_packed_below_the_message_limit_and_split_when_one_is_too_large(
    registry_process, tmp_path
):
    ref = register_adder(registry_process, tmp_path)
    settings = {"capture": "true", "endpoint": "big", "deployment": "blue", "nats_url": registry_process.nats_url}
    random = np.random.default_rng(7)
    # 40 requests of 1,000 rows (16 KB of base64 each, 256 of them would be 4 MB), and one of
    # 100,000 rows (1.6 MB) that no NATS message of the default 1 MB limit holds whole.
    batches = {f"k{n}": random.random((1000, 3), dtype=np.float32) for n in range(40)}
    batches["huge"] = random.random((100_000, 3), dtype=np.float32)
    with spawn_runtime(tmp_path, registry_process, ref, **settings) as runtime:
        with grpc.insecure_channel(runtime.grpc, options=[("grpc.max_send_message_length", 64 << 20)]) as channel:
            stub = oip_grpc.GRPCInferenceServiceStub(channel)
            for request_id, batch in batches.items():
                stub.ModelInfer(raw_adder_request(request_id, batch))
        rows = await captured_rows("mlmesh.capture.big.blue", registry_process.nats_url, len(batches) + 1)
        deadline = time.monotonic() + 10
        while metric(runtime, "mlmesh_runtime_capture_rows_total", outcome="published") < len(batches):
            assert time.monotonic() < deadline, "the published count never reached every request"
            await asyncio.sleep(0.2)
        assert metric(runtime, "mlmesh_runtime_capture_rows_total", outcome="dropped") in (None, 0)
    pieces = sorted((row for row in rows if row["id"] == "huge"), key=lambda row: row["offset"])
    whole = {row["id"]: row for row in rows if row["id"] != "huge"}
    assert sorted(whole) == sorted(set(batches) - {"huge"}) and len(whole) == len(rows) - len(pieces)
    for request_id, row in whole.items():
        assert "offset" not in row
        assert np.array_equal(np.array(row["inputs"][0]["data"]).reshape(1000, 3), batches[request_id])
    assert len(pieces) >= 2
    joined = np.concatenate([np.array(p["outputs"][0]["data"]).reshape(p["outputs"][0]["shape"]) for p in pieces])
    assert np.allclose(joined, batches["huge"] + 1)
    assert [p["offset"] for p in pieces] == [
        sum(p["inputs"][0]["shape"][0] for p in pieces[:i]) for i in range(len(pieces))
    ]


async def captured_rows(subject: str, url: str, count: int) -> list[dict]:
    """The captured requests on `subject`, waiting until at least `count` have come."""
    connection = await nats.connect(url)
    try:
        subscription = await connection.jetstream().subscribe(subject, ordered_consumer=True)
        rows: list[dict] = []
        messages = 0
        async with asyncio.timeout(30):
            while len(rows) < count:
                message = await subscription.next_msg(timeout=10)
                assert len(message.data) <= connection.max_payload
                rows += captured_requests(message.data)
                messages += 1
        with contextlib.suppress(nats.errors.TimeoutError):
            while True:  # and whatever else comes, so that callers see duplicates and extra pieces
                rows += captured_requests((await subscription.next_msg(timeout=0.5)).data)
        assert messages < count, "every row came in a message of its own: no batching"
        info = await connection.jetstream().stream_info(bus.CAPTURE_STREAM)
        assert info.config.max_bytes > 0 and info.config.max_age > 0
        return rows
    finally:
        await connection.close()


def test_with_nats_away_requests_still_succeed_and_dropped_rows_are_counted(registry_process, tmp_path):
    ref = register_adder(registry_process, tmp_path)
    dead = f"nats://127.0.0.1:{natsserver.free_port()}"
    settings = {"capture": "true", "capture_queue_rows": "5", "nats_url": dead}
    with spawn_runtime(tmp_path, registry_process, ref, **settings) as runtime:
        for number in range(20):
            status, answer = call(runtime, "/v2/models/adder/infer", x(data=(number, 0, 0)))
            assert status == 200 and answer["outputs"][0]["data"] == [number + 1, 1, 1]
        assert metric(runtime, "mlmesh_runtime_capture_rows_total", outcome="dropped") == 15


async def test_the_queue_never_waits_drops_beyond_its_capacity_and_batches(tmp_path):
    model, metrics = adder_model(tmp_path)
    queue = domain.CaptureQueue(capacity=10, batch_rows=4, metrics=metrics)
    tensor = domain.Tensor("x", "FP32", (1, 3), np.zeros((1, 3), np.float32))
    for number in range(12):
        queue.offer(model, f"q{number}", [tensor], [tensor])
    assert metrics.registry.get_sample_value("mlmesh_runtime_capture_rows_total", {"outcome": "dropped"}) == 2
    batches = [await queue.next_batch(0.01) for _ in range(3)]
    assert [len(batch) for batch in batches] == [4, 4, 2]
    assert [row.id for batch in batches for row in batch] == [f"q{n}" for n in range(10)]
    with pytest.raises(TimeoutError):
        await asyncio.wait_for(queue.next_batch(0.01), 0.2)  # nothing left: it waits for rows
    messages = domain.capture_messages(batches[0], 1 << 20)
    assert (messages.requests, messages.too_large) == ([4], 0)
    (record,) = json.loads(capture.split(messages.payloads[0])[0])["records"]  # four requests alike: one record
    assert (record["ids"], record["counts"]) == ([f"q{n}" for n in range(4)], [1] * 4)
    assert captured_requests(messages.payloads[0])[0]["inputs"][0] == {
        "name": "x",
        "datatype": "FP32",
        "shape": [1, 3],
        "data": [0] * 3,
    }


async def test_the_queue_is_bounded_by_tensor_bytes_too(tmp_path):
    model, metrics = adder_model(tmp_path)
    queue = domain.CaptureQueue(capacity=100, batch_rows=100, metrics=metrics, capacity_bytes=30_000)
    big = domain.Tensor("x", "FP32", (1000, 3), np.zeros((1000, 3), np.float32))  # 12,000 bytes
    for number in range(4):
        queue.offer(model, f"b{number}", [big], [])
    assert metrics.registry.get_sample_value("mlmesh_runtime_capture_rows_total", {"outcome": "dropped"}) == 2
    assert len(await queue.next_batch(0.01)) == 2
    queue.offer(model, "after", [big], [])  # sent rows free their room
    assert [row.id for row in await queue.next_batch(0.01)] == ["after"]


def test_messages_stay_below_the_limit_split_along_rows_and_leave_out_what_cannot_fit():
    def row(request_id: str, *tensors: domain.Tensor) -> domain.Captured:
        return domain.Captured(request_id, "adder", "1", list(tensors), len(tensors), 0.0)

    def floats(name: str, rows: int, columns: int = 3) -> domain.Tensor:
        values = np.arange(rows * columns, dtype=np.float32).reshape(rows, columns)
        return domain.Tensor(name, "FP32", (rows, columns), values)

    limit = 10_000
    rows = [row(f"small{n}", floats("x", 10)) for n in range(30)]  # about 300 bytes each
    rows.append(row("split", floats("x", 2000)))  # 24 KB raw: split along its rows
    rows.append(row("one-wide-row", floats("x", 1, 5000)))  # one row bigger than a message
    rows.append(row("mismatched", floats("x", 2000), floats("z", 10)))  # no common first dimension
    messages = domain.capture_messages(rows, limit)
    assert messages.too_large == 2
    assert all(len(payload) <= limit for payload in messages.payloads)
    assert sum(messages.requests) == 31
    # The small requests are alike: they travel stacked in a few records, not one record each.
    assert sum(len(json.loads(capture.split(payload)[0])["records"]) for payload in messages.payloads) < 30
    records = [record for payload in messages.payloads for record in captured_requests(payload)]
    assert [r["id"] for r in records if r["id"].startswith("small")] == [f"small{n}" for n in range(30)]
    pieces = [r for r in records if r["id"] == "split"]
    assert len(pieces) > 2 and [p["offset"] for p in pieces] == sorted(p["offset"] for p in pieces)
    values = np.concatenate([np.array(p["inputs"][0]["data"]).reshape(-1, 3) for p in pieces])
    assert np.array_equal(values, floats("x", 2000).array)


def adder_model(tmp_path) -> tuple[domain.LoadedModel, domain.Metrics]:
    (tmp_path / "m.onnx").write_bytes(tiny_onnx())
    model = domain.load_model("adder", "1", tmp_path / "m.onnx", None, (1, 1))
    store = domain.ModelStore()
    store.add(model)
    return model, domain.Metrics(store)


def test_large_requests_travel_in_records_of_their_own_with_their_values_intact():
    def row(request_id: str, array: np.ndarray) -> domain.Captured:
        return domain.Captured(request_id, "adder", "1", [domain.Tensor("x", "FP32", array.shape, array)], 1, 0.0)

    big = np.arange(3 * 20_000, dtype=np.float32).reshape(20_000, 3)  # 240 KB: above STACK_BELOW_BYTES
    rows = [
        row("big0", big),
        row("big1", big + 1),
        row("strided", np.asfortranarray(big + 2)),  # not row-major in memory
        row("big-endian", (big + 3).astype(">f4")),
        row("empty", np.zeros((0, 3), np.float32)),  # no rows at all: nothing in the body
    ]
    messages = domain.capture_messages(rows, 4 << 20)
    assert (messages.requests, messages.too_large) == ([5], 0)
    header = json.loads(capture.split(messages.payloads[0])[0])
    assert [record["ids"] for record in header["records"]] == [
        ["big0"],
        ["big1"],
        ["strided"],
        ["big-endian"],
        ["empty"],
    ]
    decoded = {record["id"]: record["inputs"][0] for record in captured_requests(messages.payloads[0])}
    assert np.array_equal(np.array(decoded["big1"]["data"]).reshape(-1, 3), big + 1)
    assert np.array_equal(np.array(decoded["strided"]["data"]).reshape(-1, 3), big + 2)
    assert np.array_equal(np.array(decoded["big-endian"]["data"]).reshape(-1, 3), big + 3)
    assert decoded["empty"]["shape"] == [0, 3] and decoded["empty"]["data"] == []

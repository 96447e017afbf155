"""Capture: every request and answer reaches stream MLMESH_CAPTURE in batches, and capture never
holds up or fails a request, even with NATS away."""

from __future__ import annotations

import asyncio
import json
import time

import grpc
import nats
import numpy as np
import pytest
from tritonclient.grpc import service_pb2 as oip
from tritonclient.grpc import service_pb2_grpc as oip_grpc

from services.common import bus, natsserver
from services.runtime import domain
from tests.registry.test_models import tiny_onnx
from tests.runtime.conftest import register_adder, spawn_runtime
from tests.runtime.test_rest import call, metric, x


def adder_request(request_id: str, values: list[float]) -> oip.ModelInferRequest:
    request = oip.ModelInferRequest(model_name="adder", id=request_id)
    request.inputs.add(name="x", datatype="FP32", shape=[1, 3]).contents.fp32_contents.extend(values)
    return request


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
    assert sorted(by_id) == sorted([f"g{n}" for n in range(20)] + [f"r{n}" for n in range(5)])
    row = by_id["g7"]
    assert (row["model"], row["version"]) == ("adder", ref.split(":")[1])
    assert row["inputs"] == [{"name": "x", "datatype": "FP32", "shape": [1, 3], "data": [7.0, 1.0, 2.0]}]
    assert row["outputs"] == [{"name": "y", "datatype": "FP32", "shape": [1, 3], "data": [8.0, 2.0, 3.0]}]
    assert abs(row["time"] - time.time()) < 120


async def captured_rows(subject: str, url: str, count: int) -> list[dict]:
    connection = await nats.connect(url)
    try:
        subscription = await connection.jetstream().subscribe(subject, ordered_consumer=True)
        rows: list[dict] = []
        messages = 0
        async with asyncio.timeout(30):
            while len(rows) < count:
                message = await subscription.next_msg(timeout=10)
                rows += json.loads(message.data)["rows"]
                messages += 1
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
    (tmp_path / "m.onnx").write_bytes(tiny_onnx())
    model = domain.load_model("adder", "1", tmp_path / "m.onnx", None, (1, 1))
    store = domain.ModelStore()
    store.add(model)
    metrics = domain.Metrics(store)
    queue = domain.CaptureQueue(capacity=10, batch_rows=4, metrics=metrics)
    tensor = domain.Tensor("x", "FP32", (1, 3), np.zeros((1, 3), np.float32))
    for number in range(12):
        queue.offer(model, f"q{number}", [tensor], [tensor])
    assert metrics.registry.get_sample_value("mlmesh_runtime_capture_rows_total", {"outcome": "dropped"}) == 2
    batches = [await queue.next_batch(0.01) for _ in range(3)]
    assert [len(batch) for batch in batches] == [4, 4, 2]
    assert [row["id"] for batch in batches for row in batch] == [f"q{n}" for n in range(10)]
    with pytest.raises(TimeoutError):
        await asyncio.wait_for(queue.next_batch(0.01), 0.2)  # nothing left: it waits for rows
    message = json.loads(domain.capture_message(batches[0]))
    assert message["rows"][0]["inputs"][0] == {"name": "x", "datatype": "FP32", "shape": [1, 3], "data": [0.0] * 3}

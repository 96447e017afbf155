"""The runtime as its own process, serving an ONNX model from a real registry, called by Triton's
client (tritonclient) and by OIP messages built by hand, well-formed and hostile."""

from __future__ import annotations

import signal
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor

import grpc
import numpy as np
import pytest
import tritonclient.grpc as triton

# Triton's own messages: the same protocol on the wire (its generated code and mlmesh's cannot
# share one process, since both define the `inference` package).
from tritonclient.grpc import service_pb2 as oip
from tritonclient.grpc import service_pb2_grpc as oip_grpc
from tritonclient.utils import InferenceServerException

from tests.runtime.conftest import RuntimeProcess, register_adder, spawn_runtime

SERVICE = "inference.GRPCInferenceService"


@pytest.fixture
def stub(runtime: RuntimeProcess) -> Iterator[oip_grpc.GRPCInferenceServiceStub]:
    with grpc.insecure_channel(runtime.grpc) as channel:
        yield oip_grpc.GRPCInferenceServiceStub(channel)


def test_triton_client_reads_health_and_metadata(runtime):
    client = triton.InferenceServerClient(url=runtime.grpc)
    assert client.is_server_live() and client.is_server_ready() and client.is_model_ready("adder")
    metadata = client.get_model_metadata("adder")
    assert metadata.platform == "onnx_onnxv1" and list(metadata.versions) == ["1"]
    assert [(t.name, t.datatype, list(t.shape)) for t in metadata.inputs] == [("x", "FP32", [-1, 3])]
    assert [(t.name, t.datatype, list(t.shape)) for t in metadata.outputs] == [("y", "FP32", [-1, 3])]
    with pytest.raises(InferenceServerException, match="not served"):
        client.is_model_ready("nope")


def test_triton_client_infers_with_raw_tensors_like_onnxruntime(runtime):
    client = triton.InferenceServerClient(url=runtime.grpc)
    values = np.random.default_rng(3).normal(size=(4, 3)).astype(np.float32)
    tensor = triton.InferInput("x", [4, 3], "FP32")
    tensor.set_data_from_numpy(values)
    result = client.infer("adder", [tensor], request_id="r-1", outputs=[triton.InferRequestedOutput("y")])
    np.testing.assert_allclose(result.as_numpy("y"), values + 1, rtol=1e-6)
    answer = result.get_response()
    assert (answer.model_name, answer.model_version, answer.id) == ("adder", "1", "r-1")


def test_typed_contents_are_answered_typed(stub):
    request = oip.ModelInferRequest(model_name="adder", model_version="1")
    request.inputs.add(name="x", datatype="FP32", shape=[1, 3]).contents.fp32_contents.extend([1.0, 2.0, 3.5])
    answer = stub.ModelInfer(request)
    assert not answer.raw_output_contents
    assert list(answer.outputs[0].contents.fp32_contents) == [2.0, 3.0, 4.5]
    assert list(answer.outputs[0].shape) == [1, 3]


def typed(name="x", datatype="FP32", shape=(1, 3), values=(1.0, 2.0, 3.0), model="adder", version=""):
    request = oip.ModelInferRequest(model_name=model, model_version=version)
    tensor = request.inputs.add(name=name, datatype=datatype, shape=list(shape))
    if datatype == "FP32":
        tensor.contents.fp32_contents.extend(values)
    elif datatype == "INT64":
        tensor.contents.int64_contents.extend(int(value) for value in values)
    return request


def raw(shape=(1, 3), payload=b"\0" * 12, extra=()):
    request = oip.ModelInferRequest(model_name="adder")
    request.inputs.add(name="x", datatype="FP32", shape=list(shape))
    request.raw_input_contents.extend([payload, *extra])
    return request


HOSTILE = {
    "unknown input": (typed(name="z"), grpc.StatusCode.INVALID_ARGUMENT, "no input 'z'"),
    "wrong datatype": (typed(datatype="INT64"), grpc.StatusCode.INVALID_ARGUMENT, "must be FP32"),
    "wrong shape": (typed(shape=(1, 4), values=(1, 2, 3, 4)), grpc.StatusCode.INVALID_ARGUMENT, "[-1, 3]"),
    "too few values": (typed(values=(1.0,)), grpc.StatusCode.INVALID_ARGUMENT, "3 elements"),
    "truncated raw": (raw(payload=b"\0" * 11), grpc.StatusCode.INVALID_ARGUMENT, "12 raw bytes"),
    "raw for no input": (raw(extra=[b"\0"]), grpc.StatusCode.INVALID_ARGUMENT, "one per input"),
    "huge shape": (raw(shape=(2**31, 2**31)), grpc.StatusCode.RESOURCE_EXHAUSTED, "at most"),
    "negative shape": (raw(shape=(-1, 3)), grpc.StatusCode.INVALID_ARGUMENT, "negative"),
    "unknown datatype": (typed(datatype="COMPLEX64"), grpc.StatusCode.INVALID_ARGUMENT, "not one of"),
    "unknown model": (typed(model="nope"), grpc.StatusCode.NOT_FOUND, "not served"),
    "unknown version": (typed(version="7"), grpc.StatusCode.NOT_FOUND, "no version '7'"),
    "odd characters in the name": (
        typed(model="m\u0000\u202e/../\U0001f600" * 40),
        grpc.StatusCode.NOT_FOUND,
        "not served",
    ),
}


@pytest.mark.parametrize("case", list(HOSTILE))
def test_hostile_requests_get_a_clear_status_and_the_server_keeps_serving(stub, case):
    request, code, words = HOSTILE[case]
    with pytest.raises(grpc.RpcError) as caught:
        stub.ModelInfer(request)
    assert caught.value.code() == code and words in caught.value.details(), caught.value.details()
    assert stub.ServerLive(oip.ServerLiveRequest()).live
    assert stub.ModelInfer(typed()).outputs[0].contents.fp32_contents == [2.0, 3.0, 4.0]


def test_bytes_that_are_not_a_request_are_refused(runtime):
    with grpc.insecure_channel(runtime.grpc) as channel:
        call = channel.unary_unary("/inference.GRPCInferenceService/ModelInfer")
        with pytest.raises(grpc.RpcError) as caught:
            call(b"\xff\xff\xff\xff")
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT


def test_with_adaptive_batching_concurrent_callers_each_get_their_own_answer(registry_process, tmp_path):
    ref = register_adder(registry_process, tmp_path)
    with spawn_runtime(tmp_path, registry_process, ref, max_batch_rows="8", max_batch_wait_ms="5") as running:

        def infer(number: int) -> None:
            client = triton.InferenceServerClient(url=running.grpc)
            values = np.full((1 + number % 3, 3), number, dtype=np.float32)
            tensor = triton.InferInput("x", list(values.shape), "FP32")
            tensor.set_data_from_numpy(values)
            np.testing.assert_array_equal(client.infer("adder", [tensor]).as_numpy("y"), values + 1)

        with ThreadPoolExecutor(16) as pool:
            list(pool.map(infer, range(64)))


def test_sigterm_drains_requests_in_flight_before_the_runtime_exits(registry_process, tmp_path):
    ref = register_adder(registry_process, tmp_path)
    # Requests wait in the batcher for 1.5 s, so they are surely in flight when SIGTERM arrives.
    with spawn_runtime(tmp_path, registry_process, ref, max_batch_rows="1000", max_batch_wait_ms="1500") as running:

        def infer(number: int) -> float:
            client = triton.InferenceServerClient(url=running.grpc)
            tensor = triton.InferInput("x", [1, 3], "FP32")
            tensor.set_data_from_numpy(np.full((1, 3), number, dtype=np.float32))
            return float(client.infer("adder", [tensor]).as_numpy("y")[0, 0])

        with ThreadPoolExecutor(8) as pool:
            answers = [pool.submit(infer, number) for number in range(8)]
            time.sleep(0.5)
            running.process.send_signal(signal.SIGTERM)
            assert [answer.result(timeout=30) for answer in answers] == [number + 1 for number in range(8)]
        assert running.process.wait(20) == 0

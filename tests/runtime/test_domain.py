"""Tensor decoding and checking against a signature, with real onnxruntime sessions."""

from __future__ import annotations

import asyncio
import struct
import threading

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from services.common.errors import InvalidArgument, NotFound, ResourceExhausted
from services.runtime import domain
from tests.registry.test_models import tiny_onnx

LIMIT = 1_000_000


@pytest.fixture
def adder(tmp_path):
    path = tmp_path / "model.onnx"
    path.write_bytes(tiny_onnx())
    return domain.load_model("adder", "1", path, None, (1, 1))


def test_the_graph_gives_the_signature_when_the_registry_has_none(adder):
    assert adder.signature.inputs == [domain.TensorSpec("x", "FP32", (-1, 3))]
    assert adder.signature.outputs == [domain.TensorSpec("y", "FP32", (-1, 3))]


def test_typed_and_raw_inputs_give_the_same_answer_as_onnxruntime(adder):
    values = np.arange(6, dtype=np.float32).reshape(2, 3)
    typed = domain.tensor_from_values("x", "FP32", [2, 3], values.reshape(-1).tolist(), LIMIT)
    raw = domain.tensor_from_raw("x", "FP32", [2, 3], values.tobytes(), LIMIT)
    for tensor in (typed, raw):
        (output,) = adder.infer(adder.check([tensor]))
        assert output.name == "y" and output.datatype == "FP32" and output.shape == (2, 3)
        np.testing.assert_array_equal(output.array, values + 1)


@pytest.mark.parametrize(
    ("tensor", "words"),
    [
        (lambda: domain.tensor_from_values("z", "FP32", [1, 3], [1, 2, 3], LIMIT), ["no input 'z'", "x"]),
        (lambda: domain.tensor_from_values("x", "FP64", [1, 3], [1, 2, 3], LIMIT), ["must be FP32", "FP64"]),
        (lambda: domain.tensor_from_values("x", "FP32", [1, 4], [1, 2, 3, 4], LIMIT), ["[1, 4]", "[-1, 3]"]),
        (lambda: domain.tensor_from_values("x", "FP32", [3], [1, 2, 3], LIMIT), ["[3]", "[-1, 3]"]),
    ],
)
def test_inputs_that_do_not_match_the_signature_name_the_tensor_and_what_was_expected(adder, tensor, words):
    with pytest.raises(InvalidArgument) as caught:
        adder.check([tensor()])
    assert all(word in str(caught.value) for word in words), str(caught.value)


def test_missing_and_repeated_inputs_are_refused(adder):
    x = domain.tensor_from_values("x", "FP32", [1, 3], [1, 2, 3], LIMIT)
    with pytest.raises(InvalidArgument, match="missing"):
        adder.check([])
    with pytest.raises(InvalidArgument, match="twice"):
        adder.check([x, x])


def test_an_unknown_output_is_refused(adder):
    x = domain.tensor_from_values("x", "FP32", [1, 3], [1, 2, 3], LIMIT)
    with pytest.raises(InvalidArgument, match="no output 'nope'"):
        adder.infer(adder.check([x]), ["nope"])


@pytest.mark.parametrize(
    ("make", "error", "words"),
    [
        (lambda: domain.tensor_from_raw("x", "FP32", [2, 3], b"\0" * 23, LIMIT), InvalidArgument, "24 raw bytes"),
        (lambda: domain.tensor_from_values("x", "FP32", [2, 3], [1.0] * 5, LIMIT), InvalidArgument, "6 elements"),
        (lambda: domain.tensor_from_values("x", "FP32", [-1, 3], [], LIMIT), InvalidArgument, "negative"),
        (lambda: domain.tensor_from_raw("x", "FP32", [2**40, 2**40], b"", LIMIT), ResourceExhausted, "at most"),
        (lambda: domain.tensor_from_values("x", "COMPLEX", [1], [1], LIMIT), InvalidArgument, "not one of"),
        (lambda: domain.tensor_from_values("x", "FP16", [1], [1], LIMIT), InvalidArgument, "only as raw"),
        (lambda: domain.tensor_from_raw("s", "BYTES", [1], b"\x05\0\0\0ab", LIMIT), InvalidArgument, "past the end"),
        (lambda: domain.tensor_from_raw("s", "BYTES", [2], b"\x01\0\0\0a", LIMIT), InvalidArgument, "2 BYTES"),
        (lambda: domain.tensor_from_raw("s", "BYTES", [1], b"\x01\0", LIMIT), InvalidArgument, "length prefix"),
    ],
)
def test_malformed_tensors_are_refused_with_a_reason(make, error, words):
    with pytest.raises(error) as caught:
        make()
    assert words in str(caught.value)


@given(st.lists(st.binary(max_size=20), max_size=10))
def test_bytes_tensors_survive_raw_encoding(elements):
    raw = b"".join(struct.pack("<I", len(element)) + element for element in elements)
    tensor = domain.tensor_from_raw("s", "BYTES", [len(elements)], raw, LIMIT)
    assert list(tensor.array) == elements
    assert domain.raw_bytes(tensor) == raw


@given(
    st.sampled_from(
        ["BOOL", "UINT8", "UINT16", "UINT32", "UINT64", "INT8", "INT16", "INT32", "INT64", "FP16", "FP32", "FP64"]
    ),
    st.lists(st.integers(0, 1), min_size=0, max_size=12),
)
def test_numeric_tensors_survive_raw_encoding(datatype, values):
    array = np.asarray(values, dtype=domain.DTYPES[datatype])
    tensor = domain.tensor_from_raw("t", datatype, [len(values)], array.tobytes(), LIMIT)
    assert domain.raw_bytes(tensor) == array.tobytes()
    assert domain.output_tensor("t", tensor.array).datatype == datatype


def test_the_store_picks_the_newest_version_and_names_what_it_serves(adder, tmp_path):
    store = domain.ModelStore()
    store.add(adder)
    newer = domain.LoadedModel("adder", "10", adder.signature, adder.session, adder.onnx_outputs)
    store.add(newer)
    assert store.get("adder") is newer and store.get("adder", "1") is adder
    assert store.versions("adder") == ["1", "10"]
    with pytest.raises(NotFound, match="served: adder"):
        store.get("other")
    with pytest.raises(NotFound, match="served: 1, 10"):
        store.get("adder", "2")


async def test_a_model_quick_for_inputs_of_a_size_runs_them_on_the_event_loop_and_larger_ones_off_it(adder):
    threads: list[threading.Thread] = []
    session = adder.session

    class Recording:
        """The real session, noting the thread of each call."""

        def run(self, names, feeds):
            threads.append(threading.current_thread())
            return session.run(names, feeds)

    adder.session = Recording()
    loop_thread = threading.current_thread()

    def rows(count: int) -> dict[str, domain.Tensor]:
        values = np.ones((count, 3), dtype=np.float32)
        return adder.check([domain.tensor_from_raw("x", "FP32", [count, 3], values.tobytes(), 10**7)])

    for _ in range(50):
        (output,) = await domain.run(adder, rows(1))
        assert output.array.tolist() == [[2, 2, 2]]
    assert threads[0] is not loop_thread  # nothing measured yet: off the loop
    # Once the average settles (the first call also warms onnxruntime up): on it.
    assert threads[-10:] == [loop_thread] * 10, adder.seconds_per_element
    (output,) = await domain.run(adder, rows(1_000_000))
    assert output.shape == (1_000_000, 3) and threads[-1] is not loop_thread
    assert adder.seconds_per_element > 0


async def test_batching_merges_concurrent_requests_and_gives_each_its_own_rows(adder):
    adder.batcher = domain.Batcher(adder, max_rows=8, max_wait_seconds=0.05)

    async def one(number: int, rows: int) -> None:
        values = np.full((rows, 3), number, dtype=np.float32)
        inputs = adder.check([domain.tensor_from_raw("x", "FP32", [rows, 3], values.tobytes(), LIMIT)])
        (output,) = await domain.run(adder, inputs)
        assert output.shape == (rows, 3)
        np.testing.assert_array_equal(output.array, values + 1)

    await asyncio.gather(*(one(number, 1 + number % 3) for number in range(20)))  # 39 rows in all
    assert adder.batcher.calls <= 8, adder.batcher.calls
    calls = adder.batcher.calls
    await asyncio.gather(one(100, 20))  # more rows than a batch: runs alone
    assert adder.batcher.calls == calls + 1


async def test_batching_keeps_requests_for_different_outputs_apart(adder):
    adder.batcher = domain.Batcher(adder, max_rows=8, max_wait_seconds=0.02)
    x = adder.check([domain.tensor_from_values("x", "FP32", [1, 3], [1, 2, 3], LIMIT)])
    every, named = await asyncio.gather(domain.run(adder, x), domain.run(adder, x, ["y"]))
    assert every[0].array.tolist() == named[0].array.tolist() == [[2, 3, 4]]
    assert adder.batcher.calls == 2
    with pytest.raises(InvalidArgument, match="no output 'nope'"):
        await domain.run(adder, x, ["nope"])

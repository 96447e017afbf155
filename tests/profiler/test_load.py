"""The load generator against a real runtime: both generators time every call, count gRPC errors
(which HTTP/2 answers with status 200) as errors, and measure their own CPU."""

from __future__ import annotations

import shutil

import pytest

from services.profiler.load import LoadGenerator, RequestRefused, answer_bytes
from tests.profiler.processes import adder_request
from tests.runtime.conftest import RuntimeProcess, runtime

__all__ = ["runtime"]  # a fixture, used by name
GOOD = adder_request("adder", rows=2)
UNKNOWN_MODEL = adder_request("nobody", rows=2)
KINDS = ["python", pytest.param("h2load", marks=pytest.mark.skipif(not shutil.which("h2load"), reason="no h2load"))]


@pytest.mark.parametrize("kind", KINDS)
def test_each_generator_times_every_call_and_measures_itself(runtime: RuntimeProcess, kind: str) -> None:
    size = answer_bytes(runtime.grpc, GOOD)
    load = LoadGenerator(kind)
    assert load.kind == kind
    measured = load.run(runtime.grpc, GOOD, size, 4, 0.5)
    assert measured.errors == 0 and len(measured.latencies) > 20
    assert all(0 < latency < 5 for latency in measured.latencies)
    assert measured.cpu_seconds > 0 and 0.4 < measured.seconds < 2


@pytest.mark.parametrize("kind", KINDS)
def test_answers_that_are_grpc_errors_count_as_errors(runtime: RuntimeProcess, kind: str) -> None:
    size = answer_bytes(runtime.grpc, GOOD)
    measured = LoadGenerator(kind).run(runtime.grpc, UNKNOWN_MODEL, size, 2, 0.3)
    assert measured.errors > 10 and measured.latencies == []


def test_a_refused_sample_request_says_why(runtime: RuntimeProcess) -> None:
    with pytest.raises(RequestRefused) as refused:
        answer_bytes(runtime.grpc, UNKNOWN_MODEL)
    assert "NOT_FOUND" in str(refused.value) and "nobody" in str(refused.value)

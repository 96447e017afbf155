"""The profiler as a real process beside a real registry and NATS: it starts the real runtime at
each size, loads it with the real load generator, stores what it measured with a recommendation,
announces it, and refuses bad requests with clear errors."""

from __future__ import annotations

import io
import json
from collections.abc import Iterator
from pathlib import Path

import grpc
import onnx
import pytest
from onnx import TensorProto, helper
from typer.testing import CliRunner

from services._proto.mlmesh.v1 import profiler_pb2, profiler_pb2_grpc
from services.cli import app
from services.client import MeshError, RegistryClient
from tests.conftest import RegistryProcess, stream_events
from tests.profiler.processes import ProfilerProcess, running_profiler
from tests.runtime.conftest import register_adder, tiny_onnx

QUICK = {"step_seconds": 0.4, "warmup_seconds": 0.1}
runner = CliRunner()
ONE_CORE = [{"cpus": 1}]


@pytest.fixture(scope="module")
def profiler(registry_process: RegistryProcess, tmp_path_factory: pytest.TempPathFactory) -> Iterator[ProfilerProcess]:
    with running_profiler(tmp_path_factory.mktemp("profiler"), registry_process) as running:
        yield running


@pytest.fixture(scope="module")
def adder(registry_process: RegistryProcess, tmp_path_factory: pytest.TempPathFactory) -> str:
    return register_adder(registry_process, tmp_path_factory.mktemp("adder"))


def unloadable_onnx() -> bytes:
    """A well-formed ONNX graph whose one operator no runtime knows: onnxruntime refuses to load it."""
    graph = helper.make_graph(
        [helper.make_node("Frobnicate", ["x"], ["y"], domain="com.example.unknown")],
        "unloadable",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", 3])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", 3])],
    )
    model = helper.make_model(
        graph, opset_imports=[helper.make_opsetid("", 17), helper.make_opsetid("com.example.unknown", 1)]
    )
    buffer = io.BytesIO()
    onnx.save(model, buffer)
    return buffer.getvalue()


def test_a_local_profile_measures_every_step_and_recommends_a_size(
    profiler: ProfilerProcess, adder: str, registry_process: RegistryProcess
) -> None:
    progress: list[profiler_pb2.ProfileProgress] = []
    sizes = [{"cpus": 1}, {"cpus": 1, "max_batch_rows": 8}]
    with profiler.client() as client:
        profile = client.profile(
            adder, slo_p99_ms=200, concurrency=[1, 4], sizes=sizes, on_progress=progress.append, **QUICK
        )
        assert profile.status == profiler_pb2.PROFILE_STATUS_COMPLETED, profile.reason
        assert [len(size.steps) for size in profile.sizes] == [2, 2]
        for size in profile.sizes:
            assert size.start_seconds > 0
            for step in size.steps:
                assert step.requests > 10 and step.errors == 0 and step.throughput_rps > 10
                assert 0 < step.p50_ms <= step.p90_ms <= step.p99_ms < 1000
                assert step.cpu_percent > 1 and step.memory_mb > 20
                assert step.load_generator_cpu_percent > 0
        assert [step.concurrency for step in profile.sizes[0].steps] == [1, 4]
        recommendation = profile.recommendation
        assert recommendation.met and recommendation.replicas == 1 and recommendation.cpus == 1
        assert recommendation.memory_mb >= 64 and recommendation.size_index in (0, 1)
        assert "within 200 ms with 20% headroom" in recommendation.explanation
        assert profile.samples == "generated" and profile.load_generator in ("h2load", "python")
        # Progress came while it ran: a start per size and a message per step, counted.
        steps = [update for update in progress if update.HasField("step")]
        assert len(steps) == 4 and steps[-1].done == steps[-1].total == 4
        assert client.get(profile.name) == profile
        assert client.latest("adder", profile.model_version) == profile
    completed = [
        event
        for event in stream_events(registry_process.nats_url, "mlmesh.events.profile.>")
        if event.data["profile_id"] == profile.id
    ]
    assert [event.type for event in completed] == ["io.mlmesh.profile.completed.v1"]
    assert completed[0].data["met"] is True and completed[0].data["recommendation"]["replicas"] == 1
    assert completed[0].subject == f"models/adder/versions/{profile.model_version}/profiles/{profile.id}"


def test_a_throughput_goal_asks_for_replicas_and_an_impossible_slo_says_by_how_much(
    profiler: ProfilerProcess, adder: str
) -> None:
    with profiler.client() as client:
        profile = client.profile(
            adder, slo_p99_ms=500, slo_throughput_rps=1e6, concurrency=[2], sizes=ONE_CORE, **QUICK
        )
        capacity = profile.sizes[0].capacity_rps
        assert capacity > 0 and profile.recommendation.replicas >= int(1e6 * 1.2 / capacity)
        impossible = client.profile(adder, slo_p99_ms=0.0001, concurrency=[1], sizes=ONE_CORE, **QUICK)
    assert impossible.status == profiler_pb2.PROFILE_STATUS_COMPLETED
    assert not impossible.recommendation.met and impossible.recommendation.size_index == -1
    assert "no size met p99 <= 0.0001 ms" in impossible.recommendation.explanation
    assert "x the allowed latency" in impossible.recommendation.explanation


def test_samples_come_from_the_input_example_or_a_dataset(
    profiler: ProfilerProcess, registry_process: RegistryProcess, tmp_path: Path
) -> None:
    model = tmp_path / "model.onnx"

    model.write_bytes(tiny_onnx())
    example = tmp_path / "input_example.json"
    example.write_text(json.dumps({"columns": ["a", "b", "c"], "data": [[1, 2, 3], [4, 5, 6]]}))
    data = tmp_path / "sample.csv"
    data.write_text("a,b,c,label\n1,2,3,0\n4,5,6,1\n")
    with RegistryClient(registry_process.address) as registry:
        version = registry.register_model("exampled", [model, example], framework="onnx")
        dataset = registry.register_dataset("adder-sample", data)
    with profiler.client() as client:
        from_example = client.profile(
            f"exampled:{version.version}", slo_p99_ms=200, concurrency=[1], sizes=ONE_CORE, rows_per_request=3, **QUICK
        )
        from_dataset = client.profile(
            f"exampled:{version.version}",
            slo_p99_ms=200,
            concurrency=[1],
            sizes=ONE_CORE,
            sample_dataset=f"{dataset.name}:{dataset.version}",
            **QUICK,
        )
        with pytest.raises(MeshError) as narrow:
            client.profile(f"exampled:{version.version}", slo_p99_ms=200, sample_dataset="nobody:1", **QUICK)
    assert from_example.samples == "input_example" and from_example.status == profiler_pb2.PROFILE_STATUS_COMPLETED
    assert from_dataset.samples == f"dataset:{dataset.name}:{dataset.version}"
    assert from_dataset.status == profiler_pb2.PROFILE_STATUS_COMPLETED, from_dataset.reason
    assert narrow.value.code == "NOT_FOUND"


def test_a_model_that_crashes_on_load_fails_the_profile_with_its_reason(
    profiler: ProfilerProcess, registry_process: RegistryProcess, tmp_path: Path
) -> None:
    path = tmp_path / "model.onnx"
    path.write_bytes(unloadable_onnx())
    with RegistryClient(registry_process.address) as registry:
        version = registry.register_model("unloadable", [path], framework="onnx")
    with profiler.client() as client:
        profile = client.profile(f"unloadable:{version.version}", slo_p99_ms=100, sizes=ONE_CORE, **QUICK)
        assert profile.status == profiler_pb2.PROFILE_STATUS_FAILED
        assert profile.reason.startswith("crash: the runtime exited while loading the model")
        assert "Frobnicate" in profile.reason or "exit code" in profile.reason
        assert client.latest("unloadable", version.version) is None  # only completed profiles recommend
    failed = [
        event
        for event in stream_events(registry_process.nats_url, "mlmesh.events.profile.failed")
        if event.data["profile_id"] == profile.id
    ]
    assert len(failed) == 1 and failed[0].data["reason"] == profile.reason


def test_bad_requests_are_refused_clearly_and_store_nothing(
    profiler: ProfilerProcess, adder: str, registry_process: RegistryProcess, tmp_path: Path
) -> None:
    (tmp_path / "model.pkl").write_bytes(b"not a model")
    with RegistryClient(registry_process.address) as registry:
        pickled = registry.register_model("pickled", [tmp_path / "model.pkl"], framework="sklearn")
    with profiler.client() as client:
        before = len(client.list())
        for arguments, code, words in [
            ({"model_ref": adder, "slo_p99_ms": 0}, "INVALID_ARGUMENT", "slo.p99_ms"),
            ({"model_ref": adder, "slo_p99_ms": float("nan")}, "INVALID_ARGUMENT", "slo.p99_ms"),
            ({"model_ref": adder, "slo_p99_ms": 10, "slo_throughput_rps": -1}, "INVALID_ARGUMENT", "throughput"),
            ({"model_ref": "", "slo_p99_ms": 10}, "INVALID_ARGUMENT", "model_ref"),
            ({"model_ref": "adder:999", "slo_p99_ms": 10}, "NOT_FOUND", "registry"),
            ({"model_ref": "../../etc/passwd", "slo_p99_ms": 10}, "INVALID_ARGUMENT", "registry"),
            ({"model_ref": "x" * 100_000, "slo_p99_ms": 10}, "INVALID_ARGUMENT", "registry"),
            ({"model_ref": f"pickled:{pickled.version}", "slo_p99_ms": 10}, "FAILED_PRECONDITION", "convert it"),
            ({"model_ref": adder, "slo_p99_ms": 10, "target": "mainframe"}, "INVALID_ARGUMENT", "local or docker"),
            ({"model_ref": adder, "slo_p99_ms": 10, "image": "x:1"}, "INVALID_ARGUMENT", "docker target only"),
            ({"model_ref": adder, "slo_p99_ms": 10, "concurrency": [0]}, "INVALID_ARGUMENT", "concurrency"),
            ({"model_ref": adder, "slo_p99_ms": 10, "concurrency": [100_000]}, "INVALID_ARGUMENT", "concurrency"),
            ({"model_ref": adder, "slo_p99_ms": 10, "concurrency": range(1, 10_001)}, "INVALID_ARGUMENT", "at most 32"),
            ({"model_ref": adder, "slo_p99_ms": 10, "sizes": [{"cpus": 1}] * 100}, "INVALID_ARGUMENT", "at most 16"),
            ({"model_ref": adder, "slo_p99_ms": 10, "sizes": [{"cpus": 0}]}, "INVALID_ARGUMENT", "cpus"),
            ({"model_ref": adder, "slo_p99_ms": 10, "sizes": [{"cpus": 0.5}]}, "INVALID_ARGUMENT", "whole cores"),
            ({"model_ref": adder, "slo_p99_ms": 10, "sizes": [{"cpus": 512}]}, "INVALID_ARGUMENT", "cores"),
            (
                {"model_ref": adder, "slo_p99_ms": 10, "sizes": [{"cpus": 1, "memory_mb": 256}]},
                "INVALID_ARGUMENT",
                "cannot limit",
            ),
            (
                {"model_ref": adder, "slo_p99_ms": 10, "sizes": [{"cpus": 1, "threads": -1}]},
                "INVALID_ARGUMENT",
                "threads",
            ),
            ({"model_ref": adder, "slo_p99_ms": 10, "rows_per_request": 10**8}, "INVALID_ARGUMENT", "rows_per_request"),
            ({"model_ref": adder, "slo_p99_ms": 10, "step_seconds": 0.01}, "INVALID_ARGUMENT", "step_seconds"),
            ({"model_ref": adder, "slo_p99_ms": 10, "step_seconds": 600}, "INVALID_ARGUMENT", "at most 1800 s"),
            ({"model_ref": adder, "slo_p99_ms": 10, "sample_dataset": "nobody:1"}, "NOT_FOUND", "registry"),
        ]:
            with pytest.raises(MeshError) as refused:
                client.profile(**arguments)
            assert refused.value.code == code and words in refused.value.message, (arguments, refused.value)
        for name in ("no-such-profile", "profiles/" + "x" * 10_000, ""):
            with pytest.raises(MeshError) as unknown:
                client.get(name)
            assert unknown.value.code == "NOT_FOUND"
        for arguments in ({"model_name": "../x"}, {"model_version": 3}, {"model_name": "adder", "model_version": -1}):
            with pytest.raises(MeshError) as bad_filter:
                client.list(**arguments)
            assert bad_filter.value.code == "INVALID_ARGUMENT"
        with grpc.insecure_channel(profiler.address) as channel:
            stub = profiler_pb2_grpc.ProfilerServiceStub(channel)
            for request in (
                profiler_pb2.ListProfilesRequest(page_token="not-a-token"),
                profiler_pb2.ListProfilesRequest(page_size=-1),
            ):
                with pytest.raises(grpc.RpcError) as bad_page:
                    stub.ListProfiles(request)
                assert bad_page.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert len(client.list()) == before


def test_the_cli_prints_a_table_writes_charts_and_refuses_bad_options(
    profiler: ProfilerProcess, adder: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("MLMESH_PROFILER_ADDRESS", profiler.address)
    quick = ["--size", "cpus=1", "--step-seconds", "0.3", "--warmup-seconds", "0.1"]
    png = tmp_path / "profile.png"
    done = runner.invoke(app, ["profile", adder, "--concurrency", "1,2", *quick, "--chart", str(png)])
    assert done.exit_code == 0, done.output
    assert "in flight" in done.output and "recommended:" in done.output
    assert png.read_bytes().startswith(b"\x89PNG")
    listed = json.loads(runner.invoke(app, ["profiles", "list", "adder", "--json"]).stdout)
    newest = listed[0]
    assert newest["status"] == "completed" and [step["concurrency"] for step in newest["steps"]] == [1, 2]
    page = tmp_path / "profile.html"
    shown = runner.invoke(app, ["profiles", "show", newest["id"], "--chart", str(page)])
    assert shown.exit_code == 0 and "recommended:" in shown.output
    assert "<svg" in page.read_text() and "SLO 100 ms" in page.read_text()
    for arguments, words in [
        (["--concurrency", ","], "names no level"),
        (["--concurrency", "a,b"], "whole numbers"),
        (["--size", "memory=512"], "needs cpus="),
        (["--size", "cpus=x"], "needs a number"),
        (["--size", "gpus=1"], "takes cpus="),
        (["--slo-p99-ms", "-5"], "greater than or equal to 0"),
    ]:
        refused = runner.invoke(app, ["profile", adder, *arguments])
        assert refused.exit_code == 2 and words in refused.output, (arguments, refused.output)
    unreachable = runner.invoke(app, ["profile", adder, "--address", "127.0.0.1:1"])
    assert unreachable.exit_code == 2 and "cannot reach the profiler" in unreachable.output


def test_a_runtime_that_does_not_serve_in_time_fails_the_profile_as_a_timeout(
    registry_process: RegistryProcess, adder: str, tmp_path: Path
) -> None:
    with running_profiler(tmp_path, registry_process, start_timeout_seconds="0.01") as impatient:
        with impatient.client() as client:
            profile = client.profile(adder, slo_p99_ms=100, sizes=ONE_CORE, **QUICK)
    assert profile.status == profiler_pb2.PROFILE_STATUS_FAILED
    assert profile.reason.startswith("timeout: the runtime did not serve within 0.01 s")
    assert profile.recommendation.met is False and not profile.sizes[0].steps

"""The drift service as a real process beside a real registry, collector, runtime and NATS: live
traffic captured from a runtime trips a monitor whose baseline is a registered dataset; checks
are stored and announced; bad requests are refused with clear errors and change nothing."""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import grpc
import numpy as np
import pandas as pd
import pytest
from tritonclient.grpc import service_pb2 as oip
from tritonclient.grpc import service_pb2_grpc as oip_grpc
from typer.testing import CliRunner

from services._proto.mlmesh.v1 import deployer_pb2
from services.cli import app
from services.client import DriftClient, MeshError, RegistryClient
from services.launcher import health_status
from tests.collector.processes import CollectorProcess, start_collector
from tests.conftest import RegistryProcess, start_service, stop_process, stream_events
from tests.deployer.processes import DeployerProcess, running_deployer
from tests.deployer.test_servicer import wait_for
from tests.runtime.conftest import register_adder

SERVICE = "mlmesh.v1.DriftService"
ENDPOINT = "live"
runner = CliRunner()


@dataclass
class DriftProcess:
    address: str
    home: Path
    nats_url: str
    process: object

    def client(self) -> DriftClient:
        return DriftClient(self.address)


@pytest.fixture(scope="module")
def collector(
    registry_process: RegistryProcess, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[CollectorProcess]:
    process = start_collector(tmp_path_factory.mktemp("collector"), registry_process)
    try:
        yield process
    finally:
        stop_process(process.process)


@pytest.fixture(scope="module")
def deployer(registry_process: RegistryProcess, tmp_path_factory: pytest.TempPathFactory) -> Iterator[DeployerProcess]:
    with running_deployer(tmp_path_factory.mktemp("deployer"), registry_process) as running:
        yield running


@pytest.fixture(scope="module")
def drift(
    registry_process: RegistryProcess,
    collector: CollectorProcess,
    deployer: DeployerProcess,
    tmp_path_factory: pytest.TempPathFactory,
) -> Iterator[DriftProcess]:
    home = tmp_path_factory.mktemp("drift")
    options = {
        "registry_address": registry_process.address,
        "collector_address": collector.address,
        "deployer_address": deployer.address,
        "schedule_tick_seconds": "0.5",
        "max_window_rows": "100000",
    }
    started = start_service("drift", home, registry_process.nats_url, options)
    process = started.process
    try:
        yield DriftProcess(started.address, home, registry_process.nats_url, process)
    finally:
        stop_process(process)


@pytest.fixture(scope="module")
def baseline(registry_process: RegistryProcess, tmp_path_factory: pytest.TempPathFactory) -> str:
    """Training data of the adder's three inputs, named as a training table would name them."""
    generator = np.random.default_rng(11)
    frame = pd.DataFrame(generator.normal(0, 1, (20_000, 3)), columns=["height", "weight", "age"])
    frame["label"] = generator.integers(0, 2, len(frame))
    path = tmp_path_factory.mktemp("baseline") / "train.csv"
    frame.to_csv(path, index=False)
    with RegistryClient(registry_process.address) as registry:
        dataset = registry.register_dataset("people", path)
    return f"{dataset.name}:{dataset.version}"


def send(address: str, rows: np.ndarray) -> None:
    """One request per row of 3 floats to the endpoint `live` (serving adder)."""
    with grpc.insecure_channel(address) as channel:
        stub = oip_grpc.GRPCInferenceServiceStub(channel)
        for number, row in enumerate(rows):
            request = oip.ModelInferRequest(model_name=ENDPOINT, id=f"r{number}")
            tensor = request.inputs.add(name="x", datatype="FP32", shape=[1, 3])
            tensor.contents.fp32_contents.extend(row.tolist())
            stub.ModelInfer(request, timeout=10)


def test_live_traffic_trips_a_monitor_on_the_shifted_input(
    drift: DriftProcess,
    collector: CollectorProcess,
    deployer: DeployerProcess,
    registry_process: RegistryProcess,
    baseline: str,
    tmp_path: Path,
) -> None:
    adder = register_adder(registry_process, tmp_path)
    generator = np.random.default_rng(5)
    with deployer.client() as deployments:
        deployments.create(ENDPOINT, adder, capture=True)
        endpoint = wait_for(deployments, ENDPOINT, "blue", deployer_pb2.DEPLOYMENT_STATUS_READY)
        address = deployments.get(ENDPOINT).grpc_address
        assert endpoint.capture
        arguments = ["drift", "monitor", "create", "people-inputs", "--endpoint", ENDPOINT, "--baseline", baseline]
        arguments += ["--exclude", "label", "--window-rows", "1500", "--address", drift.address, "--json"]
        created = runner.invoke(app, arguments)
        assert created.exit_code == 0, created.output
        monitor = json.loads(created.output)
        assert (monitor["baseline"], monitor["baseline_rows"]) == (baseline, 20_000)
        assert monitor["features"] == {"height": "height", "weight": "weight", "age": "age"}

        send(address, generator.normal(0, 1, (1500, 3)).astype(np.float32))
        collector.wait_for_rows(ENDPOINT, 1500, timeout=60)
        calm = runner.invoke(app, ["drift", "check", "people-inputs", "--address", drift.address, "--json"])
        assert calm.exit_code == 0, calm.output
        calm_result = json.loads(calm.output)
        assert (calm_result["rows"], calm_result["drift_detected"]) == (1500, False)
        # The training table's columns were matched, by position, with the model's input columns.
        assert sorted(calm_result["features"]) == ["x.0", "x.1", "x.2"]
        assert calm_result["features"]["x.0"]["baseline_column"] == "height"

        shifted = generator.normal(0, 1, (1500, 3)).astype(np.float32)
        shifted[:, 1] += 1.0  # weight moved by a whole standard deviation
        send(address, shifted)
        collector.wait_for_rows(ENDPOINT, 3000, timeout=60)
        moved = runner.invoke(app, ["drift", "check", "people-inputs", "--address", drift.address, "--json"])
        assert moved.exit_code == 0, moved.output
        moved_result = json.loads(moved.output)
        # A monitor of the model reads the captures of every endpoint serving it: here, this one.
        with drift.client() as client:
            client.create_monitor("adder-model", model="adder", baseline_dataset=baseline, exclude=["label"])
            by_model = client.check("adder-model")
            client.delete_monitor("adder-model")
    assert (by_model.endpoint, by_model.model, by_model.rows) == ("", "adder", 3000)
    assert by_model.drift_detected and list(by_model.drifted_features) == ["x.1"]
    assert moved_result["drift_detected"] is True and moved_result["drifted_features"] == ["x.1"]
    assert moved_result["features"]["x.1"]["drifted"] and moved_result["features"]["x.1"]["wasserstein"] > 0.5
    assert not moved_result["features"]["x.0"]["drifted"]

    checked = [e.data for e in stream_events(drift.nats_url, "mlmesh.events.drift.checked")]
    detected = [e.data for e in stream_events(drift.nats_url, "mlmesh.events.drift.detected")]
    assert [event["monitor"] for event in checked].count("people-inputs") == 2
    (event,) = [event for event in detected if event["monitor"] == "people-inputs"]
    assert event["drifted_features"] == ["x.1"] and event["baseline"] == baseline
    assert event["target"] == f"endpoints/{ENDPOINT}/captures" and event["rows"] == 1500
    assert event["features"]["x.1"]["drifted"] is True

    # A monitor on a schedule checks on its own.
    with drift.client() as client:
        client.create_monitor(
            "every-second", ENDPOINT, baseline_dataset=baseline, exclude=["label"], schedule_seconds=1
        )
        deadline = time.monotonic() + 30
        while not client.results("every-second"):
            assert time.monotonic() < deadline, "no scheduled check ran"
            time.sleep(0.3)
        client.delete_monitor("every-second")

    chart = tmp_path / "drift.html"
    history = runner.invoke(
        app, ["drift", "results", "people-inputs", "--chart", str(chart), "--address", drift.address, "--json"]
    )
    assert history.exit_code == 0, history.output
    assert [result["drift_detected"] for result in json.loads(history.output)] == [True, False]
    assert chart.read_text().count("<svg") == 3 and "threshold 0.1" in chart.read_text()


def test_monitors_refuse_bad_input_and_change_nothing(drift: DriftProcess, baseline: str) -> None:
    with drift.client() as client:
        for arguments, code, words in [
            ({"name": "Bad Name", "endpoint": ENDPOINT, "baseline_dataset": baseline}, "INVALID_ARGUMENT", "name"),
            ({"name": "../x", "endpoint": ENDPOINT, "baseline_dataset": baseline}, "INVALID_ARGUMENT", "name"),
            ({"name": "m", "endpoint": "Not/Ok", "baseline_dataset": baseline}, "INVALID_ARGUMENT", "endpoint"),
            ({"name": "m", "endpoint": ENDPOINT}, "INVALID_ARGUMENT", "exactly one baseline"),
            ({"name": "m", "baseline_dataset": baseline}, "INVALID_ARGUMENT", "exactly one of endpoint and model"),
            (
                {"name": "m", "endpoint": ENDPOINT, "model": "adder", "baseline_dataset": baseline},
                "INVALID_ARGUMENT",
                "exactly one of endpoint and model",
            ),
            ({"name": "m", "model": "../etc", "baseline_dataset": baseline}, "INVALID_ARGUMENT", "model"),
            ({"name": "m", "endpoint": ENDPOINT, "baseline_dataset": "nobody:1"}, "NOT_FOUND", "registry"),
            (
                {"name": "m", "endpoint": ENDPOINT, "baseline_dataset": baseline, "window_rows": 10**9},
                "INVALID_ARGUMENT",
                "window_rows",
            ),
            (
                {"name": "m", "endpoint": ENDPOINT, "baseline_dataset": baseline, "features": ["shoe_size"]},
                "INVALID_ARGUMENT",
                "no column 'shoe_size'",
            ),
            (
                {"name": "m", "endpoint": ENDPOINT, "baseline_dataset": baseline, "thresholds": {"alpha": 1.5}},
                "INVALID_ARGUMENT",
                "alpha",
            ),
            (
                {"name": "m", "endpoint": ENDPOINT, "baseline_dataset": baseline, "consecutive": 1000},
                "INVALID_ARGUMENT",
                "consecutive",
            ),
            (
                {"name": "m", "endpoint": ENDPOINT, "baseline_dataset": baseline, "features": ["a\x00b"]},
                "INVALID_ARGUMENT",
                "feature",
            ),
            (
                {"name": "m", "endpoint": ENDPOINT, "baseline_window": (100.0, 50.0)},
                "INVALID_ARGUMENT",
                "end after it starts",
            ),
        ]:
            with pytest.raises(MeshError) as refused:
                client.create_monitor(**arguments)
            assert refused.value.code == code and words in refused.value.message, (arguments, refused.value)
        assert [monitor.name for monitor in client.list_monitors()] in ([], ["people-inputs"])
        client.create_monitor("quiet", "nobody-sends", baseline_dataset=baseline, exclude=["label"])
        with pytest.raises(MeshError) as twice:
            client.create_monitor("quiet", "nobody-sends", baseline_dataset=baseline)
        assert twice.value.code == "ALREADY_EXISTS"
        with pytest.raises(MeshError) as empty:
            client.check("quiet")
        assert empty.value.code == "FAILED_PRECONDITION" and "--capture" in empty.value.message
        for call in (client.check, client.get_monitor, client.delete_monitor):
            with pytest.raises(MeshError) as unknown:
                call("no-such-monitor")
            assert unknown.value.code == "NOT_FOUND"
        with pytest.raises(MeshError) as backwards:
            client.backfill("quiet", 200.0, 100.0)
        assert backwards.value.code == "INVALID_ARGUMENT"
        client.delete_monitor("quiet")
        assert "quiet" not in [monitor.name for monitor in client.list_monitors()]
    assert health_status(drift.address, SERVICE, timeout=2) == "SERVING"

"""The automation service as a real process beside a real registry and NATS: retrain policies run
a real training command (scikit-learn, converted to ONNX), register what it produced with its
lineage, score challenger and champion on a holdout dataset with onnxruntime, and move the
champion alias only for a better model."""

from __future__ import annotations

import asyncio
import json
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import nats
import pytest
from typer.testing import CliRunner

from services._proto.mlmesh.v1 import automation_pb2
from services.cli import app
from services.client import MeshError, RegistryClient
from services.common import events
from tests.automation.conftest import ROOT, TRAIN, AutomationProcess, policy, running_automation
from tests.conftest import RegistryProcess, stream_events

SERVICE = "mlmesh.v1.AutomationService"
runner = CliRunner()


@pytest.fixture(scope="module")
def automation(
    registry_process: RegistryProcess, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[AutomationProcess]:
    settings = {"min_schedule_seconds": "1", "schedule_tick_seconds": "0.2"}
    with running_automation(tmp_path_factory.mktemp("automation"), registry_process, **settings) as running:
        yield running


def test_a_better_challenger_is_promoted_and_a_worse_one_is_not(
    automation: AutomationProcess, registry_process: RegistryProcess, data: dict[str, str]
) -> None:
    with automation.client() as client:
        policy(client, "cancer-weak", "cancer", "shuffled", data)
        policy(client, "cancer-good", "cancer", "logistic", data)
        # No champion yet: the first version that trains becomes it.
        first = client.wait_run(client.start_run("cancer-weak").id, timeout=120)
        assert first.status == automation_pb2.RUN_STATUS_COMPLETED, first.message
        assert first.promoted and first.champion_version == 0 and "no champion yet" in first.message
        # A better one replaces it.
        better = client.wait_run(client.start_run("cancer-good").id, timeout=120)
        assert better.status == automation_pb2.RUN_STATUS_COMPLETED, better.message
        assert better.promoted and better.champion_version == first.produced_version
        assert better.challenger_score > better.champion_score + 0.01
        assert "at least the required 0.01" in better.message
        assert better.training_metrics["train_accuracy"] > 0.9
        assert any("trained logistic" in line for line in better.log_tail)
        # A worse one is registered, judged, and kept out.
        worse = client.wait_run(client.start_run("cancer-weak").id, timeout=120)
        assert worse.status == automation_pb2.RUN_STATUS_COMPLETED and not worse.promoted
        assert worse.produced_version > better.produced_version and "the champion stays" in worse.message
        runs = client.list_runs("cancer-weak")
        assert [run.id for run in runs] == [worse.id, first.id]
    with RegistryClient(registry_process.address) as registry:
        assert registry.get("cancer@champion").version == better.produced_version
        produced = registry.get(f"cancer:{better.produced_version}")
    lineage = produced.lineage
    assert lineage.run_id == better.id and lineage.experiment == "cancer-good"
    assert lineage.parent_version == first.produced_version
    assert list(lineage.datasets) == ["cancer-train:1"]
    assert len(lineage.git.commit) == 40  # the training code's checkout
    kinds = [
        (event.kind, event.data.get("run_id"))
        for event in stream_events(registry_process.nats_url, "mlmesh.events.>")
        if event.kind in ("retrain.started", "retrain.completed", "model.promoted")
    ]
    assert ("model.promoted", better.id) in kinds and ("model.promoted", worse.id) not in kinds
    assert kinds.count(("retrain.started", worse.id)) == 1 and kinds.count(("retrain.completed", worse.id)) == 1
    promoted = [
        event
        for event in stream_events(registry_process.nats_url, "mlmesh.events.model.promoted")
        if event.data["run_id"] == better.id
    ]
    assert promoted[0].data["previous_version"] == first.produced_version and promoted[0].data["alias"] == "champion"


def test_drift_and_a_new_dataset_version_start_runs(
    automation: AutomationProcess, registry_process: RegistryProcess, data: dict[str, str]
) -> None:
    with automation.client() as client:
        policy(client, "on-drift", "drifty", "logistic", data, trigger="drift", monitor="drifty-inputs")
        policy(client, "on-data", "fresh", "logistic", data, trigger="dataset", dataset="cancer-train")
        # drift.detected as the drift service sends it, on the real stream.
        payload = events.DriftDetected(
            monitor="drifty-inputs",
            check_id="check-1",
            endpoint="drifty-api",
            baseline="cancer-train:1",
            target="endpoints/drifty-api/captures",
            window_start=0.0,
            window_end=1.0,
            rows=100,
            drifted=True,
            drift_detected=True,
            drift_coefficient=0.5,
            drifted_features=["f0"],
            features={},
        )
        event = events.make_event("drift", payload, "monitors/drifty-inputs")

        async def publish() -> None:
            connection = await nats.connect(registry_process.nats_url)
            await connection.jetstream().publish(
                events.subject_of(event.kind), event.to_json(), headers={"Nats-Msg-Id": event.id}
            )
            await connection.close()

        asyncio.run(publish())
        with RegistryClient(registry_process.address) as registry:
            new_version = registry.register_dataset("cancer-train", Path(data["dir"]) / "train.csv")
        deadline = time.monotonic() + 60
        while not (client.list_runs("on-drift") and client.list_runs("on-data")):
            assert time.monotonic() < deadline, "no runs started"
            time.sleep(0.2)
        (drift_run,) = client.list_runs("on-drift")
        (data_run,) = client.list_runs("on-data")
        assert drift_run.trigger == "drift:drifty-inputs:check-1"
        assert data_run.trigger == f"dataset:cancer-train:{new_version.version}"
        assert client.wait_run(drift_run.id, timeout=120).promoted
        assert client.wait_run(data_run.id, timeout=120).promoted


def test_a_failing_or_silent_training_fails_the_run_saying_why(
    automation: AutomationProcess, data: dict[str, str], tmp_path: Path
) -> None:
    with automation.client() as client:
        policy(client, "broken", "broken-model", "fail", data)
        failed = client.wait_run(client.start_run("broken").id, timeout=60)
        assert failed.status == automation_pb2.RUN_STATUS_FAILED
        assert (
            failed.message
            == "the training command exited with code 3: the training data is not what this script expects"
        )
        assert failed.produced_version == 0
        client.create_policy(
            "silent",
            "silent-model",
            command=[sys.executable, "-c", "print('nothing written')"],
            holdout_dataset=data["holdout"],
            label_column="label",
        )
        silent = client.wait_run(client.start_run("silent").id, timeout=60)
        assert silent.status == automation_pb2.RUN_STATUS_FAILED and "wrote no model.onnx" in silent.message
        client.create_policy(
            "slow",
            "slow-model",
            command=[sys.executable, "-c", "import time; time.sleep(30)"],
            holdout_dataset=data["holdout"],
            label_column="label",
            timeout_seconds=1,
        )
        slow = client.wait_run(client.start_run("slow").id, timeout=60)
        assert slow.status == automation_pb2.RUN_STATUS_FAILED and "ran past its 1 s" in slow.message


def test_a_schedule_starts_runs_on_its_own(automation: AutomationProcess, data: dict[str, str]) -> None:
    with automation.client() as client:
        policy(client, "nightly", "scheduled", "logistic", data, trigger="schedule", schedule_seconds=1)
        deadline = time.monotonic() + 30
        while not client.list_runs("nightly"):
            assert time.monotonic() < deadline, "the schedule started nothing"
            time.sleep(0.2)
        assert client.list_runs("nightly")[-1].trigger == "schedule"
        client.delete_policy("nightly")


def test_bad_policies_and_calls_get_clear_errors(automation: AutomationProcess, data: dict[str, str]) -> None:
    good = {
        "command": [sys.executable, TRAIN, "logistic"],
        "holdout_dataset": data["holdout"],
        "label_column": "label",
    }
    with automation.client() as client:
        before = [p.name for p in client.list_policies()]
        for name, model, extra, words in [
            ("Bad Name", "m", {}, "policy name"),
            ("ok", "../m", {}, "model"),
            ("ok", "m", {"command": []}, "training.command is required"),
            ("ok", "m", {"command": ["x"] * 500}, "at most 100 arguments"),
            ("ok", "m", {"command": ["a\x00b"]}, "no NUL"),
            ("ok", "m", {"holdout_dataset": ""}, "holdout_dataset is required"),
            ("ok", "m", {"label_column": ""}, "label_column"),
            ("ok", "m", {"metric": "vibes"}, "accuracy, f1, auc"),
            ("ok", "m", {"min_delta": float("nan")}, "min_delta"),
            ("ok", "m", {"trigger": "sometimes"}, "trigger.kind"),
            ("ok", "m", {"trigger": "drift"}, "names its monitor"),
            ("ok", "m", {"trigger": "dataset"}, "names its dataset"),
            ("ok", "m", {"trigger": "schedule", "schedule_seconds": 0.01}, "schedule_seconds"),
            ("ok", "m", {"working_dir": "/no/such/folder"}, "is not a folder"),
            ("ok", "m", {"timeout_seconds": -5}, "timeout_seconds"),
            ("ok", "m", {"training_dataset": "bad ref!"}, "training.dataset"),
            ("ok", "m", {"environment": "env:1:2"}, "training.environment"),
            ("ok", "m", {"environment": "../env"}, "training.environment"),
        ]:
            with pytest.raises(MeshError) as refused:
                client.create_policy(name, model, **{**good, **extra})
            assert refused.value.code == "INVALID_ARGUMENT" and words in refused.value.message, (extra, refused.value)
        client.create_policy("twice", "m", **good)
        with pytest.raises(MeshError) as twice:
            client.create_policy("twice", "m", **good)
        assert twice.value.code == "ALREADY_EXISTS"
        for call in (
            lambda: client.get_policy("nope"),
            lambda: client.delete_policy("nope"),
            lambda: client.start_run("nope"),
            lambda: client.get_run("nope"),
            lambda: client.get_run("x" * 10_000),
        ):
            with pytest.raises(MeshError) as unknown:
                call()
            assert unknown.value.code == "NOT_FOUND"
        client.delete_policy("twice")
        assert [p.name for p in client.list_policies()] == before


def test_the_cli_creates_runs_and_shows(
    automation: AutomationProcess, data: dict[str, str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("MLMESH_AUTOMATION_ADDRESS", automation.address)
    created = runner.invoke(
        app,
        [
            *("retrain", "policy", "create", "cli-policy", "--model", "cli-model"),
            *("--command", f"{sys.executable} {TRAIN} logistic", "--training-dataset", data["train"]),
            *("--holdout", data["holdout"], "--label", "label", "--metric", "f1", "--min-delta", "0.02"),
            *("--working-dir", str(ROOT), "--timeout", "10m", "--json"),
        ],
    )
    assert created.exit_code == 0, created.output
    assert json.loads(created.stdout)["training"]["timeout_seconds"] == 600
    ran = runner.invoke(app, ["retrain", "run", "cli-policy", "--json"])
    assert ran.exit_code == 0, ran.output
    run = json.loads(ran.stdout)
    assert run["status"] == "completed" and run["promoted"] is True and run["metric"] == "f1"
    listed = json.loads(runner.invoke(app, ["retrain", "runs", "cli-policy", "--json"]).stdout)
    assert [entry["id"] for entry in listed] == [run["id"]]
    shown = runner.invoke(app, ["retrain", "show", run["id"]])
    assert shown.exit_code == 0 and "promoted" in shown.output and "trained logistic" in shown.output
    policies = runner.invoke(app, ["retrain", "policy", "list"])
    assert "cli-policy" in policies.output and "f1 +0.02" in policies.output
    bad = runner.invoke(
        app,
        [
            "retrain",
            "policy",
            "create",
            "x",
            "--model",
            "m",
            "--command",
            "'unclosed",
            "--holdout",
            "h",
            "--label",
            "l",
        ],
    )
    assert bad.exit_code == 2 and "cannot be split" in bad.output
    assert runner.invoke(app, ["retrain", "run", "no-such-policy"]).exit_code == 1

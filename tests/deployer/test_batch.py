"""Batch scoring through a real deployer, NATS work queue and worker processes."""

from __future__ import annotations

import json
import os
import signal
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from typer.testing import CliRunner

from services._proto.mlmesh.v1 import deployer_pb2
from services.cli import app
from services.client import DeployerClient, MeshError, RegistryClient
from tests.conftest import RegistryProcess
from tests.deployer.processes import DeployerProcess, running_deployer
from tests.deployer.test_servicer import stream_events
from tests.runtime.conftest import register_adder

ENDED = (deployer_pb2.BATCH_JOB_STATUS_COMPLETED, deployer_pb2.BATCH_JOB_STATUS_FAILED)


@pytest.fixture(scope="module")
def deployer(registry_process: RegistryProcess, tmp_path_factory: pytest.TempPathFactory) -> Iterator[DeployerProcess]:
    home = tmp_path_factory.mktemp("batch-deployer")
    with running_deployer(home, registry_process, batch_ack_wait_seconds="2") as running:
        yield running


@pytest.fixture(scope="module")
def adder(registry_process: RegistryProcess, tmp_path_factory: pytest.TempPathFactory) -> str:
    return register_adder(registry_process, tmp_path_factory.mktemp("batch-adder"))


def features(path: Path, rows: int) -> np.ndarray:
    values = np.arange(rows * 3, dtype=np.float32).reshape(rows, 3)
    pq.write_table(pa.table({"x0": values[:, 0], "x1": values[:, 1], "x2": values[:, 2], "tag": ["a"] * rows}), path)
    return values


def wait_for_job(client: DeployerClient, job_id: str, timeout: float = 120) -> deployer_pb2.BatchJob:
    deadline = time.monotonic() + timeout
    while True:
        job = client.get_batch(job_id)
        if job.status in ENDED:
            return job
        assert time.monotonic() < deadline, job
        time.sleep(0.2)


def output_rows(folder: Path) -> pa.Table:
    return pa.concat_tables([pq.read_table(part) for part in sorted(folder.glob("part-*.parquet"))])


def batch_events(nats_url: str, job_id: str) -> list[str]:
    found = stream_events(nats_url, "mlmesh.events.batch.>")
    return [event.kind for event in found if event.data["job_id"] == job_id]


def test_a_job_scores_every_row_once_into_parts_and_announces_it(deployer, registry_process, adder, tmp_path):
    values = features(tmp_path / "input.parquet", 5_000)
    with deployer.client() as client:
        job = client.create_batch([tmp_path / "input.parquet"], tmp_path / "out", model_ref=adder, mini_batch_rows=400)
        assert job.status == deployer_pb2.BATCH_JOB_STATUS_QUEUED
        job = wait_for_job(client, job.id)
    assert job.status == deployer_pb2.BATCH_JOB_STATUS_COMPLETED, job.message
    assert (job.parts_total, job.parts_done, job.rows_total) == (13, 13, 5_000)
    table = output_rows(tmp_path / "out").sort_by("row")
    assert table.column("row").to_pylist() == list(range(5_000))
    scored = np.column_stack([table.column(f"y_{k}").to_numpy() for k in range(3)])
    np.testing.assert_allclose(scored, values + 1)
    assert sorted(path.name for path in (tmp_path / "out").iterdir())[0] == "part-00000.parquet"
    assert batch_events(registry_process.nats_url, job.id) == ["batch.completed"]
    with RegistryClient(registry_process.address) as registry:
        assert not [user for user in registry.get(adder).used_by if user.startswith("batch/")]


def test_a_registered_dataset_is_scored(deployer, registry_process, adder, tmp_path):
    (tmp_path / "train.csv").write_text("x0,x1,x2\n1,1,1\n2,2,2\n")
    with RegistryClient(registry_process.address) as registry:
        dataset = registry.register_dataset("batch-rows", tmp_path / "train.csv")
    with deployer.client() as client:
        job = client.create_batch([], tmp_path / "out", model_ref=adder, dataset=f"batch-rows:{dataset.version}")
        job = wait_for_job(client, job.id)
    assert job.status == deployer_pb2.BATCH_JOB_STATUS_COMPLETED, job.message
    assert job.dataset == f"batch-rows:{dataset.version}"
    assert output_rows(tmp_path / "out").column("y_0").to_pylist() == [2.0, 3.0]


def test_a_killed_worker_loses_no_row_and_duplicates_none(deployer, adder, tmp_path):
    features(tmp_path / "input.parquet", 60_000)
    with deployer.client() as client:
        job = client.create_batch(
            [tmp_path / "input.parquet"], tmp_path / "out", model_ref=adder, mini_batch_rows=100, workers=2
        )
        deadline = time.monotonic() + 60
        while client.get_batch(job.id).parts_done < 20:
            assert time.monotonic() < deadline
            time.sleep(0.05)
        victim = _worker_pids(deployer.home, job.id)[0]
        os.kill(victim, signal.SIGKILL)
        job = wait_for_job(client, job.id)
    assert job.status == deployer_pb2.BATCH_JOB_STATUS_COMPLETED, job.message
    rows = output_rows(tmp_path / "out").column("row").to_pylist()
    assert len(rows) == 60_000 and sorted(rows) == list(range(60_000))
    assert not list((tmp_path / "out").glob(".part-*"))


def _worker_pids(home: Path, job_id: str) -> list[int]:
    pids = []
    for pid_file in sorted((home / "run").glob(f"endpoint-batch-{job_id}-*.pid")):
        pids.append(int(pid_file.read_text().split()[0]))
    assert pids, list((home / "run").iterdir())
    return pids


def test_a_job_whose_rows_do_not_fit_the_model_fails_with_the_reason(deployer, registry_process, adder, tmp_path):
    pq.write_table(pa.table({"a": [1.0, 2.0]}), tmp_path / "narrow.parquet")
    with deployer.client() as client:
        job = client.create_batch([tmp_path / "narrow.parquet"], tmp_path / "out", model_ref=adder, columns=["a", "b"])
        job = wait_for_job(client, job.id)
    assert job.status == deployer_pb2.BATCH_JOB_STATUS_FAILED
    assert "no column b" in job.message
    assert batch_events(registry_process.nats_url, job.id) == ["batch.failed"]


def test_the_cli_scores_a_csv_with_a_progress_bar_and_json(deployer, adder, tmp_path):
    (tmp_path / "rows.csv").write_text("x0,x1,x2\n1,2,3\n4,5,6\n7,8,9\n")
    result = CliRunner().invoke(
        app,
        ["batch", "run", str(tmp_path / "rows.csv"), "-o", str(tmp_path / "out"), "--model", adder, "--json"],
        env={"MLMESH_DEPLOYER_ADDRESS": deployer.address},
    )
    assert result.exit_code == 0, result.output
    job = json.loads(result.stdout)
    assert (job["status"], job["rows_total"]) == ("COMPLETED", 3)
    table = output_rows(tmp_path / "out")
    assert table.column("y_2").to_pylist() == [4.0, 7.0, 10.0]
    shown = CliRunner().invoke(app, ["batch", "show", job["id"]], env={"MLMESH_DEPLOYER_ADDRESS": deployer.address})
    assert "COMPLETED" in shown.stdout


@pytest.mark.parametrize(
    ("fields", "code", "words"),
    [
        ({"endpoint": "also"}, "INVALID_ARGUMENT", "exactly one of model_ref and endpoint"),
        ({"model_ref": "", "endpoint": ""}, "INVALID_ARGUMENT", "exactly one"),
        ({"inputs": []}, "INVALID_ARGUMENT", "exactly one of inputs"),
        ({"inputs": ["relative.parquet"]}, "INVALID_ARGUMENT", "absolute path"),
        ({"inputs": ["/etc/passwd"]}, "INVALID_ARGUMENT", ".parquet or .csv"),
        ({"inputs": ["/nowhere/x.csv"]}, "NOT_FOUND", "does not exist"),
        ({"output_dir": "relative"}, "INVALID_ARGUMENT", "absolute folder"),
        ({"mini_batch_rows": -1}, "INVALID_ARGUMENT", "mini_batch_rows"),
        ({"workers": 1000}, "INVALID_ARGUMENT", "workers"),
        ({"model_ref": "missing-model:1"}, "NOT_FOUND", "missing-model"),
        ({"endpoint": "no-such-endpoint", "model_ref": ""}, "NOT_FOUND", "no-such-endpoint"),
        ({"dataset": "iris:1"}, "INVALID_ARGUMENT", "exactly one of inputs (files) and dataset"),
        ({"inputs": [], "dataset": "no-such-dataset:1"}, "NOT_FOUND", "no-such-dataset"),
    ],
)
def test_bad_batch_requests_are_refused_and_record_nothing(deployer, adder, tmp_path, fields, code, words):
    features(tmp_path / "input.parquet", 10)
    request = deployer_pb2.CreateBatchJobRequest(
        model_ref=adder, inputs=[str(tmp_path / "input.parquet")], output_dir=str(tmp_path / "out")
    )
    for name, value in fields.items():
        if name == "inputs":
            del request.inputs[:]
            request.inputs.extend(value)
        else:
            setattr(request, name, value)
    with deployer.client() as client:
        before = len(client.list_batches())
        with pytest.raises(MeshError) as refused:
            client._call(client._stub.CreateBatchJob, request)
        assert refused.value.code == code, refused.value
        assert words in refused.value.message
        assert len(client.list_batches()) == before


def test_an_output_folder_that_holds_files_is_refused(deployer, adder, tmp_path):
    features(tmp_path / "input.parquet", 10)
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "keep.txt").write_text("precious")
    with deployer.client() as client, pytest.raises(MeshError) as refused:
        client.create_batch([tmp_path / "input.parquet"], tmp_path / "out", model_ref=adder)
    assert refused.value.code == "FAILED_PRECONDITION"
    assert (tmp_path / "out" / "keep.txt").read_text() == "precious"

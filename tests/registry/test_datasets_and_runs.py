"""Datasets (CSV, Parquet) and training runs over real gRPC."""

from __future__ import annotations

import hashlib
import io
import json

import pyarrow as pa
import pyarrow.parquet as pq

from services._proto.mlmesh.v1 import registry_pb2
from tests.registry.uploads import dataset_upload, model_upload

CSV = b"age,income,city\n30,1000.5,paris\n40,2000.5,rome\n50,,paris\n"


async def test_csv_dataset_gets_a_version_schema_and_statistics(registry):
    first = (await registry.stub.RegisterDataset(dataset_upload("customers", "customers.csv", CSV))).dataset
    second = (
        await registry.stub.RegisterDataset(dataset_upload("customers", "customers.csv", CSV + b"60,10.0,oslo\n"))
    ).dataset
    assert (first.name, first.version, second.version) == ("customers", 1, 2)
    assert first.format == "csv" and first.row_count == 3 and second.row_count == 4
    columns = {column.name: column for column in first.columns}
    assert columns["age"].min == 30 and columns["age"].max == 50 and columns["age"].mean == 40
    assert columns["income"].null_count == 1 and columns["income"].count == 2
    assert len(columns["age"].quantiles) == 9
    assert columns["city"].distinct_count == 2 and dict(columns["city"].top_values) == {"paris": 2, "rome": 1}
    assert first.fingerprint != second.fingerprint
    assert (first.file.path, first.file.size) == ("customers.csv", len(CSV))
    assert first.file.sha256 == hashlib.sha256(CSV).hexdigest()
    fetched = (await registry.stub.GetDataset(registry_pb2.GetDatasetRequest(ref="customers:1"))).dataset
    assert fetched == first
    latest = (await registry.stub.GetDataset(registry_pb2.GetDatasetRequest(ref="customers"))).dataset
    assert latest.version == 2


async def test_parquet_dataset_and_listing(registry):
    buffer = io.BytesIO()
    pq.write_table(pa.table({"x": [1.0, 2.0, 3.0], "label": ["a", "b", "a"]}), buffer)
    dataset = (await registry.stub.RegisterDataset(dataset_upload("train", "train.parquet", buffer.getvalue()))).dataset
    assert dataset.format == "parquet" and dataset.row_count == 3
    await registry.stub.RegisterDataset(dataset_upload("customers", "c.csv", CSV))
    listed = (await registry.stub.ListDatasets(registry_pb2.ListDatasetsRequest())).datasets
    assert [(d.name, d.version) for d in listed] == [("customers", 1), ("train", 1)]


async def test_a_run_is_recorded_once_and_models_point_at_it(registry):
    run = registry_pb2.Run(
        id="run-42",
        experiment="fraud",
        params={"lr": "0.1"},
        metrics={"auc": 0.91},
        git=registry_pb2.GitInfo(repo="r", branch="main", commit="abc"),
        datasets=["customers:1"],
    )
    recorded = (await registry.stub.RecordRun(registry_pb2.RecordRunRequest(run=run))).run
    assert recorded.status == "FINISHED" and recorded.metrics["auc"] == 0.91
    fetched = (await registry.stub.GetRun(registry_pb2.GetRunRequest(id="run-42"))).run
    assert fetched == recorded
    version = (
        await registry.stub.RegisterModelVersion(
            model_upload("fraud", [("m", b"x")], lineage=registry_pb2.Lineage(run_id="run-42"))
        )
    ).model_version
    assert version.lineage.run_id == "run-42"
    generated = (await registry.stub.RecordRun(registry_pb2.RecordRunRequest(run=registry_pb2.Run(experiment="e")))).run
    assert generated.id


async def test_mlflow_directory_import_maps_flavor_signature_and_run(registry):
    mlmodel = {
        "run_id": "abc123",
        "flavors": {"python_function": {"loader_module": "mlflow.sklearn"}, "sklearn": {"pickled_model": "model.pkl"}},
        "signature": {
            "inputs": json.dumps([{"type": "double", "name": "age"}, {"type": "string", "name": "city"}]),
            "outputs": json.dumps([{"type": "tensor", "tensor-spec": {"dtype": "int64", "shape": [-1]}}]),
        },
    }
    import yaml

    files = [
        ("MLmodel", yaml.safe_dump(mlmodel).encode()),
        ("model.pkl", b"pickle-bytes"),
        ("requirements.txt", b"scikit-learn\n"),
    ]
    version = (
        await registry.stub.RegisterModelVersion(model_upload("churn", files, format=registry_pb2.UPLOAD_FORMAT_MLFLOW))
    ).model_version
    assert version.framework == "sklearn" and version.lineage.run_id == "abc123"
    assert [(t.name, t.datatype, list(t.shape)) for t in version.signature.inputs] == [
        ("age", "FP64", [-1]),
        ("city", "BYTES", [-1]),
    ]
    assert [(t.datatype, list(t.shape)) for t in version.signature.outputs] == [("INT64", [-1])]
    assert sorted(f.path for f in version.files) == ["MLmodel", "model.pkl", "requirements.txt"]

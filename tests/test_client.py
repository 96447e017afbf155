"""The Python SDK against a real registry process and a real nats-server."""

from __future__ import annotations

import hashlib
import os
import time
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest

from services.client import MeshError, RegistryClient, collect_files, safe_target
from services.common import natsserver
from tests.conftest import RegistryProcess

REGISTRY_GRPC_SERVICE = "mlmesh.v1.RegistryService"


@pytest.fixture
def client(registry_process: RegistryProcess) -> Iterator[RegistryClient]:
    with RegistryClient(registry_process.address, actor="alice") as registry:
        yield registry


@pytest.fixture
def model_directory(tmp_path: Path) -> Path:
    """A model folder with a nested file and one file larger than an upload chunk."""
    directory = tmp_path / "model"
    (directory / "assets").mkdir(parents=True)
    (directory / "weights.bin").write_bytes(os.urandom(1024 * 1024 * 2 + 17))
    (directory / "assets" / "vocab.txt").write_text("a\nb\nc\n")
    return directory


def sha256_of(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_register_directory_uploads_every_file_with_relative_paths(
    client: RegistryClient, model_directory: Path
) -> None:
    reports: list[tuple[int, int]] = []

    version = client.register_model(
        "sdk-upload",
        [model_directory],
        framework="other",
        tags={"team": "risk"},
        progress=lambda done, total: reports.append((done, total)),
    )

    assert (version.name, version.version) == ("sdk-upload", 1)
    stored = {file.path: (file.size, file.sha256) for file in version.files}
    assert stored == {
        "assets/vocab.txt": (6, sha256_of(model_directory / "assets" / "vocab.txt")),
        "weights.bin": (2 * 1024 * 1024 + 17, sha256_of(model_directory / "weights.bin")),
    }
    assert version.created_by == "alice"
    assert dict(version.tags) == {"team": "risk"}
    total = 2 * 1024 * 1024 + 17 + 6
    assert reports[-1] == (total, total)
    assert len(reports) > 2  # progress advanced chunk by chunk, not once at the end


def test_download_writes_identical_files_and_reports_progress(
    client: RegistryClient, model_directory: Path, tmp_path: Path
) -> None:
    client.register_model("sdk-download", [model_directory], framework="other")
    reports: list[tuple[int, int]] = []

    version = client.download("sdk-download", tmp_path / "out", progress=lambda *report: reports.append(report))

    assert version.version == 1
    for relative in ("weights.bin", "assets/vocab.txt"):
        assert (tmp_path / "out" / relative).read_bytes() == (model_directory / relative).read_bytes()
    assert reports[-1][0] == reports[-1][1] == sum(file.size for file in version.files)
    assert not list((tmp_path / "out").rglob("*.part"))  # no temporary files left behind


def test_safe_target_refuses_paths_that_leave_the_directory(tmp_path: Path) -> None:
    outside = tmp_path / "outside"
    outside.mkdir()
    root = tmp_path / "root"
    root.mkdir()
    (root / "link").symlink_to(outside)

    assert safe_target(root, "a/b.txt") == (root / "a" / "b.txt").resolve()
    for hostile in ("../x", "/etc/passwd", "a/../../x", "a//b", "link/x", "", "a\\..\\x"):
        with pytest.raises(MeshError, match="leaves the download directory"):
            safe_target(root, hostile)


def test_collect_files_rejects_clashing_names_and_missing_paths(tmp_path: Path) -> None:
    (tmp_path / "one").mkdir()
    (tmp_path / "two").mkdir()
    (tmp_path / "one" / "model.bin").write_bytes(b"1")
    (tmp_path / "two" / "model.bin").write_bytes(b"2")

    with pytest.raises(ValueError, match=r"both be uploaded as .model\.bin."):
        collect_files([tmp_path / "one" / "model.bin", tmp_path / "two" / "model.bin"])
    with pytest.raises(ValueError, match="does not exist"):
        collect_files([tmp_path / "missing"])


def test_errors_carry_status_code_reason_and_message(client: RegistryClient) -> None:
    with pytest.raises(MeshError) as missing:
        client.get("sdk-no-such-model:1")
    assert missing.value.code == "NOT_FOUND"
    assert "sdk-no-such-model" in missing.value.message
    assert missing.value.reason  # the ErrorInfo detail arrived
    assert not missing.value.unreachable

    with pytest.raises(MeshError) as invalid:
        client.get("not a name")
    assert invalid.value.code == "INVALID_ARGUMENT"


def test_an_absent_server_is_reported_as_unreachable() -> None:
    with RegistryClient(f"127.0.0.1:{natsserver.free_port()}", timeout=5) as absent, pytest.raises(MeshError) as error:
        absent.list_models()
    assert error.value.unreachable


def test_list_models_pages_through_every_model(client: RegistryClient, tmp_path: Path) -> None:
    weights = tmp_path / "weights.bin"
    weights.write_bytes(b"weights")
    for index in range(3):
        client.register_model(f"sdk-paged-{index}", [weights])

    first = client.list_models("sdk-paged-", page_size=2)
    every = [model.name for model in client.iter_models("sdk-paged-", page_size=1)]

    assert len(first.models) == 2 and first.next_page_token
    assert every == ["sdk-paged-0", "sdk-paged-1", "sdk-paged-2"]


def test_alias_history_and_lookup_at_a_past_time(client: RegistryClient, tmp_path: Path) -> None:
    weights = tmp_path / "weights.bin"
    weights.write_bytes(b"v1")
    client.register_model("sdk-alias", [weights])
    weights.write_bytes(b"v2")
    client.register_model("sdk-alias", [weights])

    first = client.set_alias("sdk-alias", "champion", 1, reason="first")
    time.sleep(0.05)
    between = datetime.now(UTC)
    time.sleep(0.05)
    second = client.set_alias("sdk-alias", "champion", 2, reason="better")

    assert (first.previous_version, second.previous_version) == (0, 1)
    assert client.get("sdk-alias@champion").version == 2
    assert client.get("sdk-alias@champion", at=between).version == 1
    history = client.alias_history("sdk-alias", "champion")
    assert [(change.version, change.reason, change.actor) for change in history] == [
        (1, "first", "alice"),
        (2, "better", "alice"),
    ]
    assert client.remove_alias("sdk-alias", "champion", reason="retired") == 2
    with pytest.raises(MeshError):
        client.get("sdk-alias@champion")


def test_update_archive_usage_and_delete(client: RegistryClient, tmp_path: Path) -> None:
    weights = tmp_path / "weights.bin"
    weights.write_bytes(b"weights")
    client.register_model("sdk-life", [weights], tags={"stage": "dev", "owner": "bob"})

    updated = client.update("sdk-life:1", set_tags={"stage": "prod"}, remove_tags=["owner"], description="ok")
    assert dict(updated.tags) == {"stage": "prod"} and updated.description == "ok"
    assert [v.version for v in client.search(name_prefix="sdk-life", tags=["stage=prod"]).model_versions] == [1]

    client.acquire_usage("sdk-life:1", "deployment-7")
    with pytest.raises(MeshError) as refused:
        client.delete("sdk-life:1", reason="cleanup")
    assert refused.value.code == "FAILED_PRECONDITION"
    client.release_usage("sdk-life:1", "deployment-7")

    archived = client.archive("sdk-life:1", reason="old")
    assert archived.status == 2  # MODEL_VERSION_STATUS_ARCHIVED
    assert not client.search(name_prefix="sdk-life").model_versions
    assert len(client.search(name_prefix="sdk-life", include_archived=True).model_versions) == 1
    client.delete("sdk-life:1", reason="cleanup")
    with pytest.raises(MeshError) as gone:
        client.get("sdk-life:1")
    assert gone.value.code == "NOT_FOUND"


def test_import_mlflow_reads_the_mlmodel_file(client: RegistryClient, tmp_path: Path) -> None:
    directory = tmp_path / "mlflow-model"
    directory.mkdir()
    (directory / "model.pkl").write_bytes(b"pickled")
    (directory / "MLmodel").write_text(
        "run_id: abc123\n"
        "flavors:\n  sklearn:\n    pickled_model: model.pkl\n"
        "signature:\n"
        '  inputs: \'[{"name": "x", "type": "double"}]\'\n'
        '  outputs: \'[{"name": "y", "type": "long"}]\'\n'
    )

    version = client.import_mlflow(directory, "sdk-mlflow")

    assert version.framework == "sklearn"
    assert version.lineage.run_id == "abc123"
    assert [tensor.name for tensor in version.signature.inputs] == ["x"]
    assert sorted(file.path for file in version.files) == ["MLmodel", "model.pkl"]


def test_datasets_runs_and_audit(client: RegistryClient, tmp_path: Path) -> None:
    table = tmp_path / "train.csv"
    table.write_text("x,label\n1.0,a\n2.0,b\n3.0,a\n")
    started = datetime.now(UTC) - timedelta(seconds=1)

    dataset = client.register_dataset("sdk-data", table, tags={"source": "test"})
    run = client.record_run(run_id="sdk-run-1", experiment="exp", params={"lr": "0.1"}, metrics={"auc": 0.9})

    assert (dataset.name, dataset.version, dataset.format, dataset.row_count) == ("sdk-data", 1, "csv", 3)
    assert client.get_dataset("sdk-data").fingerprint == dataset.fingerprint
    assert [d.name for d in client.iter_datasets("sdk-data")] == ["sdk-data"]
    assert client.get_run(run.id).metrics["auc"] == pytest.approx(0.9)
    actions = {entry.action for entry in client.iter_audit(actor="alice", since=started)}
    assert {"dataset.register", "run.record"} <= actions


def test_a_dataset_downloads_verified_and_a_missing_one_is_not_found(client: RegistryClient, tmp_path: Path) -> None:
    table = tmp_path / "rows.csv"
    table.write_text("x0,x1\n1,2\n3,4\n")
    client.register_dataset("sdk-download", table)

    path = client.download_dataset("sdk-download:1", tmp_path / "out")

    assert path.read_bytes() == table.read_bytes()
    assert [p.name for p in (tmp_path / "out").iterdir()] == [path.name]  # no temporary file left
    for ref, code in [("sdk-download:99", "NOT_FOUND"), ("../etc:1", "INVALID_ARGUMENT")]:
        with pytest.raises(MeshError) as refused:
            client.download_dataset(ref, tmp_path / "nothing")
        assert refused.value.code == code

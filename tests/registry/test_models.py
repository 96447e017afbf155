"""Model versions over real gRPC, on SQLite and PostgreSQL."""

from __future__ import annotations

import asyncio
import hashlib
import io
from pathlib import Path

import grpc
import onnx
import pytest
from onnx import TensorProto, helper
from sqlalchemy import event

from services._proto.mlmesh.v1 import registry_pb2
from tests.conftest import running_registry
from tests.registry.uploads import model_upload


def tiny_onnx() -> bytes:
    """A real ONNX graph: y = x + 1 over [batch, 3] floats."""
    one = helper.make_tensor("one", TensorProto.FLOAT, [1], [1.0])
    graph = helper.make_graph(
        [helper.make_node("Add", ["x", "one"], ["y"])],
        "add_one",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", 3])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", 3])],
        initializer=[one],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    buffer = io.BytesIO()
    onnx.save(model, buffer)
    return buffer.getvalue()


async def register(stub, name: str, files=(("model.bin", b"weights"),), **metadata):
    response = await stub.RegisterModelVersion(model_upload(name, list(files), **metadata))
    return response.model_version


async def test_versions_count_up_per_name_with_files_and_hashes(registry):
    first = await register(registry.stub, "fraud", [("model.bin", b"one"), ("conf/params.json", b"{}")])
    second = await register(registry.stub, "fraud", [("model.bin", b"two")])
    other = await register(registry.stub, "churn")
    assert (first.version, second.version, other.version) == (1, 2, 1)
    assert {f.path: f.sha256 for f in first.files} == {
        "model.bin": hashlib.sha256(b"one").hexdigest(),
        "conf/params.json": hashlib.sha256(b"{}").hexdigest(),
    }
    assert first.status == registry_pb2.MODEL_VERSION_STATUS_READY


async def test_metadata_lineage_and_actor_are_kept(registry):
    lineage = registry_pb2.Lineage(
        run_id="run-7",
        experiment="exp",
        git=registry_pb2.GitInfo(repo="https://example.org/r.git", branch="main", commit="abc123"),
        datasets=["train:1"],
        environment="sklearn-env:2",
    )
    version = (
        await registry.stub.RegisterModelVersion(
            model_upload(
                "fraud", [("m.pkl", b"x")], framework="sklearn", description="d", tags={"team": "risk"}, lineage=lineage
            ),
            metadata=[("x-mlmesh-actor", "alice")],
        )
    ).model_version
    fetched = (await registry.stub.GetModelVersion(registry_pb2.GetModelVersionRequest(ref="fraud:1"))).model_version
    assert fetched == version
    assert fetched.framework == "sklearn" and fetched.tags == {"team": "risk"} and fetched.created_by == "alice"
    assert fetched.lineage.git.commit == "abc123" and list(fetched.lineage.datasets) == ["train:1"]


async def test_onnx_signature_is_read_from_the_graph(registry):
    version = await register(registry.stub, "adder", [("model.onnx", tiny_onnx())])
    assert version.framework == "onnx"
    assert [(t.name, t.datatype, list(t.shape)) for t in version.signature.inputs] == [("x", "FP32", [-1, 3])]
    assert [(t.name, t.datatype, list(t.shape)) for t in version.signature.outputs] == [("y", "FP32", [-1, 3])]


async def test_download_returns_the_exact_files(registry):
    content = bytes(range(256)) * 9000  # > 2 MiB, several chunks
    await register(registry.stub, "big", [("weights.bin", content), ("a/b.txt", b"hello")])
    files: dict[str, bytearray] = {}
    current = None
    async for message in registry.stub.DownloadModelVersion(registry_pb2.DownloadModelVersionRequest(ref="big:1")):
        if message.file.WhichOneof("part") == "header":
            current = message.file.header.path
            files[current] = bytearray()
        else:
            files[current] += message.file.data
    assert files == {"a/b.txt": b"hello", "weights.bin": content}


async def test_aliases_move_and_history_answers_for_any_time(registry):
    for _ in range(3):
        await register(registry.stub, "fraud")
    stub = registry.stub
    await stub.SetAlias(registry_pb2.SetAliasRequest(name="fraud", alias="champion", version=1, reason="first"))
    moved = await stub.SetAlias(
        registry_pb2.SetAliasRequest(name="fraud", alias="champion", version=3, reason="better")
    )
    assert moved.previous_version == 1 and list(moved.model_version.aliases) == ["champion"]
    history = (await stub.ListAliasHistory(registry_pb2.ListAliasHistoryRequest(name="fraud"))).changes
    assert [(c.version, c.reason) for c in history] == [(1, "first"), (3, "better")]
    between = history[0].at
    at_first = await stub.GetModelVersion(registry_pb2.GetModelVersionRequest(ref="fraud@champion", at=between))
    now = await stub.GetModelVersion(registry_pb2.GetModelVersionRequest(ref="fraud@champion"))
    assert (at_first.model_version.version, now.model_version.version) == (1, 3)
    removed = await stub.RemoveAlias(registry_pb2.RemoveAliasRequest(name="fraud", alias="champion", reason="retired"))
    assert removed.previous_version == 3
    with pytest.raises(grpc.aio.AioRpcError) as error:
        await stub.GetModelVersion(registry_pb2.GetModelVersionRequest(ref="fraud@champion"))
    assert error.value.code() == grpc.StatusCode.NOT_FOUND


async def test_a_version_read_once_is_answered_from_memory_until_any_process_changes_it(registry_settings, tmp_path):
    """Two registries on one database stand for two processes: what one changes, the other's
    memory drops (on SQLite before the next read, on PostgreSQL once the notification is in)."""
    other_settings = registry_settings.model_copy(update={"home": tmp_path / "other-home"})
    async with running_registry(registry_settings) as reader, running_registry(other_settings) as writer:
        for _ in range(3):
            await register(writer.stub, "cached", tags={"stage": "new"})
        await writer.stub.SetAlias(registry_pb2.SetAliasRequest(name="cached", alias="champion", version=1, reason="a"))
        statements: list[str] = []
        engine = reader.runtime.database.engine
        event.listen(engine, "before_cursor_execute", lambda *call: statements.append(call[2]))

        async def get(ref: str):
            return (await reader.stub.GetModelVersion(registry_pb2.GetModelVersionRequest(ref=ref))).model_version

        async def eventually(ref: str, check):
            """The reader's answer for `ref` once `check` holds (at once on SQLite)."""
            for _ in range(1 if "sqlite" in str(engine.url) else 500):
                if check(found := await get(ref)):
                    return found
                await asyncio.sleep(0.01)
            raise AssertionError(f"still {found}")

        first = await get("cached@champion")
        read = len(statements)
        assert read > 0 and first.version == 1
        for _ in range(3):
            assert await get("cached@champion") == first
        assert len(statements) == read, statements[read:]  # answered from memory

        await writer.stub.SetAlias(registry_pb2.SetAliasRequest(name="cached", alias="champion", version=2, reason="b"))
        await eventually("cached@champion", lambda found: found.version == 2)
        await get("cached:1")
        await writer.stub.UpdateModelVersion(
            registry_pb2.UpdateModelVersionRequest(ref="cached:1", set_tags={"stage": "old"}, description="kept")
        )
        await eventually("cached:1", lambda found: found.tags["stage"] == "old" and found.description == "kept")
        assert (await get("cached")).version == 3
        await writer.stub.ArchiveModelVersion(registry_pb2.ArchiveModelVersionRequest(ref="cached:3", reason="x"))
        await eventually("cached", lambda found: found.version == 2)
        await reader.stub.AcquireUsage(registry_pb2.AcquireUsageRequest(ref="cached:1", deployment_id="endpoints/a/b"))
        assert list((await get("cached:1")).used_by) == ["endpoints/a/b"]  # its own change: at once


async def test_setting_an_alias_needs_a_reason(registry):
    await register(registry.stub, "fraud")
    with pytest.raises(grpc.aio.AioRpcError) as error:
        await registry.stub.SetAlias(registry_pb2.SetAliasRequest(name="fraud", alias="champion", version=1))
    assert error.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "reason" in error.value.details()


async def test_search_filters_by_tags_framework_alias_and_time(registry):
    stub = registry.stub
    a = await register(stub, "fraud-a", tags={"team": "risk", "stage": "prod"}, framework="sklearn")
    await register(stub, "fraud-b", tags={"team": "risk"}, framework="xgboost")
    await register(stub, "churn", tags={"team": "growth", "stage": "prod"}, framework="sklearn")
    await stub.SetAlias(registry_pb2.SetAliasRequest(name="churn", alias="champion", version=1, reason="r"))

    async def names(**query) -> list[str]:
        response = await stub.SearchModelVersions(registry_pb2.SearchModelVersionsRequest(order_by="name", **query))
        return [v.name for v in response.model_versions]

    assert await names(tags=["team=risk"]) == ["fraud-a", "fraud-b"]
    assert await names(tags=["team=risk", "stage"]) == ["fraud-a"]
    assert await names(tags=["stage=prod"], framework="sklearn") == ["churn", "fraud-a"]
    assert await names(name_prefix="fraud") == ["fraud-a", "fraud-b"]
    assert await names(alias="champion") == ["churn"]
    assert await names(created_before=a.created_at) == []
    assert await names(created_after=a.created_at) == ["churn", "fraud-a", "fraud-b"]


async def test_a_search_answers_each_version_with_its_own_files_tags_aliases_and_users(registry):
    stub = registry.stub
    await register(stub, "fraud", files=[("model.bin", b"one"), ("conf/a.json", b"{}")], tags={"team": "risk"})
    await register(stub, "fraud", files=[("model.bin", b"two")], tags={"team": "risk", "stage": "prod"})
    await register(stub, "churn", files=[("weights.pt", b"three")], tags={"team": "risk"})
    await stub.SetAlias(registry_pb2.SetAliasRequest(name="fraud", alias="champion", version=2, reason="r"))
    await stub.SetAlias(registry_pb2.SetAliasRequest(name="fraud", alias="challenger", version=2, reason="r"))
    await stub.SetAlias(registry_pb2.SetAliasRequest(name="churn", alias="champion", version=1, reason="r"))
    await stub.AcquireUsage(registry_pb2.AcquireUsageRequest(ref="fraud:1", deployment_id="endpoints/web/blue"))
    await stub.AcquireUsage(registry_pb2.AcquireUsageRequest(ref="fraud:1", deployment_id="endpoints/web/green"))

    response = await stub.SearchModelVersions(registry_pb2.SearchModelVersionsRequest(tags=["team=risk"]))

    def digest(data: bytes) -> str:
        return hashlib.sha256(data).hexdigest()

    assert {
        (version.name, version.version): (
            [(file.path, file.size, file.sha256) for file in version.files],
            dict(version.tags),
            list(version.aliases),
            list(version.used_by),
        )
        for version in response.model_versions
    } == {
        ("fraud", 1): (
            [("conf/a.json", 2, digest(b"{}")), ("model.bin", 3, digest(b"one"))],
            {"team": "risk"},
            [],
            ["endpoints/web/blue", "endpoints/web/green"],
        ),
        ("fraud", 2): (
            [("model.bin", 3, digest(b"two"))],
            {"team": "risk", "stage": "prod"},
            ["challenger", "champion"],
            [],
        ),
        ("churn", 1): ([("weights.pt", 5, digest(b"three"))], {"team": "risk"}, ["champion"], []),
    }


async def test_search_pages_through_everything_once(registry):
    for index in range(7):
        await register(registry.stub, f"m{index}")
    seen, token = [], ""
    while True:
        page = await registry.stub.SearchModelVersions(
            registry_pb2.SearchModelVersionsRequest(order_by="name", page_size=3, page_token=token)
        )
        seen += [v.name for v in page.model_versions]
        token = page.next_page_token
        if not token:
            break
    assert seen == [f"m{index}" for index in range(7)]


async def test_list_models_summarises_each_name(registry):
    await register(registry.stub, "fraud")
    await register(registry.stub, "fraud")
    await registry.stub.SetAlias(registry_pb2.SetAliasRequest(name="fraud", alias="champion", version=2, reason="r"))
    models = (await registry.stub.ListModels(registry_pb2.ListModelsRequest())).models
    assert [(m.name, m.latest_version, m.version_count, dict(m.aliases)) for m in models] == [
        ("fraud", 2, 2, {"champion": 2})
    ]


async def test_update_tags_and_description(registry):
    await register(registry.stub, "fraud", tags={"a": "1", "b": "2"})
    updated = await registry.stub.UpdateModelVersion(
        registry_pb2.UpdateModelVersionRequest(
            ref="fraud:1", set_tags={"a": "9", "c": "3"}, remove_tags=["b"], description="new"
        )
    )
    assert dict(updated.model_version.tags) == {"a": "9", "c": "3"}
    assert updated.model_version.description == "new"


async def test_used_version_cannot_be_archived_or_deleted(registry):
    stub = registry.stub
    await register(stub, "fraud")
    await stub.AcquireUsage(registry_pb2.AcquireUsageRequest(ref="fraud:1", deployment_id="endpoints/web/blue"))
    for call, request in (
        (stub.ArchiveModelVersion, registry_pb2.ArchiveModelVersionRequest(ref="fraud:1")),
        (stub.DeleteModelVersion, registry_pb2.DeleteModelVersionRequest(ref="fraud:1")),
    ):
        with pytest.raises(grpc.aio.AioRpcError) as error:
            await call(request)
        assert error.value.code() == grpc.StatusCode.FAILED_PRECONDITION
        assert "endpoints/web/blue" in error.value.details()
    await stub.ReleaseUsage(registry_pb2.ReleaseUsageRequest(ref="fraud:1", deployment_id="endpoints/web/blue"))
    archived = await stub.ArchiveModelVersion(registry_pb2.ArchiveModelVersionRequest(ref="fraud:1", reason="old"))
    assert archived.model_version.status == registry_pb2.MODEL_VERSION_STATUS_ARCHIVED


async def test_delete_removes_blobs_no_other_version_references(registry, registry_settings):
    stub = registry.stub
    shared, own = b"shared-bytes", b"own-bytes"
    await register(stub, "fraud", [("shared.bin", shared), ("own.bin", own)])
    await register(stub, "fraud", [("shared.bin", shared)])
    blobs = Path(registry_settings.home) / "blobs" / "registry" / "sha256"

    def stored(content: bytes) -> bool:
        digest = hashlib.sha256(content).hexdigest()
        return (blobs / digest[:2] / digest[2:4] / digest).exists()

    await stub.DeleteModelVersion(registry_pb2.DeleteModelVersionRequest(ref="fraud:1", reason="cleanup"))
    assert stored(shared) and not stored(own)
    with pytest.raises(grpc.aio.AioRpcError) as error:
        await stub.GetModelVersion(registry_pb2.GetModelVersionRequest(ref="fraud:1"))
    assert error.value.code() == grpc.StatusCode.NOT_FOUND
    third = await register(stub, "fraud")
    assert third.version == 3  # numbers are never reused


async def test_audit_log_records_every_mutation_with_actor_and_reason(registry):
    stub = registry.stub
    actor = [("x-mlmesh-actor", "bob")]
    await stub.RegisterModelVersion(model_upload("fraud", [("m", b"x")]), metadata=actor)
    await stub.SetAlias(
        registry_pb2.SetAliasRequest(name="fraud", alias="champion", version=1, reason="best"), metadata=actor
    )
    entries = (
        await stub.ListAuditEntries(registry_pb2.ListAuditEntriesRequest(resource_prefix="models/fraud"))
    ).entries
    assert [(e.action, e.actor, e.reason) for e in entries] == [
        ("model.alias.set", "bob", "best"),
        ("model.register", "bob", ""),
    ]
    only_alias = await stub.ListAuditEntries(registry_pb2.ListAuditEntriesRequest(action="model.alias.set"))
    assert len(only_alias.entries) == 1


def test_the_database_refuses_to_change_the_audit_log(database_url):
    from sqlalchemy import text
    from sqlalchemy.exc import DatabaseError

    from services.common.db import Database
    from services.registry.models import TABLES, create_tables

    database = Database(database_url, TABLES)
    create_tables(database)
    with database.engine.begin() as connection:
        connection.execute(
            text(
                "INSERT INTO audit_log (at, actor, action, resource, reason, details) "
                "VALUES (1, 'a', 'x', 'r', '', '{}')"
            )
        )
    for statement in ("UPDATE audit_log SET actor = 'mallory'", "DELETE FROM audit_log"):
        with pytest.raises(DatabaseError, match="append-only"), database.engine.begin() as connection:
            connection.execute(text(statement))
    with database.engine.connect() as connection:
        assert connection.execute(text("SELECT actor FROM audit_log")).scalars().all() == ["a"]
    database.dispose()

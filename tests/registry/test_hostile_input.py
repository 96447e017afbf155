"""Malformed, oversized and hostile input to every RegistryService RPC, on SQLite and PostgreSQL.

Every case checks the status code and that the message names what is wrong; afterwards the
server must still answer and nothing may be half-written: no rows, no audit entries, no outbox
events and no partial blobs under <home>/blobs/registry/tmp.

Cases are grouped per topic and checked in a loop that collects every mismatch, so one failing
run lists all inputs the service mishandles instead of stopping at the first.
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import io
import json
import time
from collections.abc import Awaitable, Callable, Iterable
from pathlib import Path
from typing import Any

import grpc
import pyarrow as pa
import pyarrow.parquet as pq
import yaml
from sqlalchemy import func, text
from sqlmodel import select

from services._proto.mlmesh.v1 import common_pb2, registry_pb2
from services.common.bus import ParkedEvent, ProcessedEvent
from services.registry.models import (
    TABLES,
)
from tests.conftest import running_registry
from tests.registry.uploads import dataset_upload, model_upload

Code = grpc.StatusCode
SERVICE = "/mlmesh.v1.RegistryService"
# Every table a call could leave half-written (the consumer bookkeeping tables are not touched by RPCs).
STATE_TABLES = tuple(table for table in TABLES if table not in (ProcessedEvent, ParkedEvent))
CSV = b"age,city\n30,paris\n40,rome\n"
BAD_NAMES = [
    "",
    "-lead",
    ".lead",
    "_lead",
    " lead",
    "with space",
    "a/b",
    "a\\b",
    "../x",
    "emoji-\U0001f642",
    "名前",
    "x" * 129,
    "a:b",
    "a@b",
    "tab\tname",
    "nul\x00name",
]


# ---------------------------------------------------------------- checking outcomes


async def outcome(call: Awaitable[Any]) -> tuple[grpc.StatusCode, str]:
    """The status code and message a call ends with (OK and "" when it succeeds)."""
    try:
        await call
    except grpc.aio.AioRpcError as error:
        return error.code(), error.details() or ""
    return Code.OK, ""


async def check(label: str, call: Awaitable[Any], code: grpc.StatusCode, *words: str) -> list[str]:
    """Problems with one call: a wrong code, or a message that names none of `words`."""
    got, details = await outcome(call)
    if got != code:
        return [f"{label}: expected {code.name}, got {got.name} {details[:300]!r}"]
    if words and not any(word.lower() in details.lower() for word in words):
        return [f"{label}: {code.name} as expected, but {details[:300]!r} names none of {words}"]
    return []


def report(problems: list[str]) -> str:
    return f"{len(problems)} case(s) mishandled:\n" + "\n".join(problems)


def row_counts(registry: Any) -> dict[str, int]:
    with registry.runtime.database.session() as session:
        return {
            table.__tablename__: session.exec(select(func.count()).select_from(table)).one() for table in STATE_TABLES
        }


def temporary_files(registry: Any) -> list[str]:
    folder = Path(registry.runtime.settings.home) / "blobs" / "registry" / "tmp"
    return sorted(path.name for path in folder.iterdir()) if folder.exists() else []


async def leftovers(registry: Any, before: dict[str, int]) -> list[str]:
    """What refused calls left behind: rows, audit entries or outbox events beyond `before`, partial uploads."""
    deadline = time.monotonic() + 5
    # A cancelled upload cleans up after the client has gone; there is nothing to wait on but the folder.
    while temporary_files(registry) and time.monotonic() < deadline:  # noqa: ASYNC110
        await asyncio.sleep(0.05)
    problems = []
    if temporary_files(registry):
        problems.append(f"partial uploads left in blobs/registry/tmp: {temporary_files(registry)}")
    after = row_counts(registry)
    changed = [f"{table} {before[table]} -> {after[table]}" for table in before if after[table] != before[table]]
    if changed:
        problems.append("refused calls changed the database: " + ", ".join(changed))
    return problems


async def assert_serving(registry: Any) -> None:
    """The server still answers ordinary calls."""
    await registry.stub.ListModels(registry_pb2.ListModelsRequest())
    await registry.stub.ListAuditEntries(registry_pb2.ListAuditEntriesRequest(page_size=1))


# ---------------------------------------------------------------- building requests


def meta(name: str = "fraud", **fields: Any) -> registry_pb2.RegisterModelVersionRequest:
    return registry_pb2.RegisterModelVersionRequest(metadata=registry_pb2.ModelVersionMetadata(name=name, **fields))


def header(path: str) -> registry_pb2.RegisterModelVersionRequest:
    return registry_pb2.RegisterModelVersionRequest(file=common_pb2.FileChunk(header=common_pb2.FileHeader(path=path)))


def chunk(content: bytes) -> registry_pb2.RegisterModelVersionRequest:
    return registry_pb2.RegisterModelVersionRequest(file=common_pb2.FileChunk(data=content))


def dataset_meta(name: str = "customers", **fields: Any) -> registry_pb2.RegisterDatasetRequest:
    return registry_pb2.RegisterDatasetRequest(metadata=registry_pb2.DatasetMetadata(name=name, **fields))


def dataset_header(path: str) -> registry_pb2.RegisterDatasetRequest:
    return registry_pb2.RegisterDatasetRequest(file=common_pb2.FileChunk(header=common_pb2.FileHeader(path=path)))


def dataset_chunk(content: bytes) -> registry_pb2.RegisterDatasetRequest:
    return registry_pb2.RegisterDatasetRequest(file=common_pb2.FileChunk(data=content))


def upload(*parts: Any) -> Iterable[Any]:
    return iter(parts)


async def register(stub: Any, name: str = "fraud", files=(("model.bin", b"weights"),), **metadata: Any) -> Any:
    return (await stub.RegisterModelVersion(model_upload(name, list(files), **metadata))).model_version


async def download(stub: Any, ref: str) -> dict[str, bytes]:
    files: dict[str, bytearray] = {}
    current = ""
    async for message in stub.DownloadModelVersion(registry_pb2.DownloadModelVersionRequest(ref=ref)):
        if message.file.WhichOneof("part") == "header":
            current = message.file.header.path
            files[current] = bytearray()
        else:
            files[current] += message.file.data
    return {path: bytes(content) for path, content in files.items()}


def ref_calls(stub: Any) -> dict[str, Callable[[str], Awaitable[Any]]]:
    """Every RPC that takes a model reference, with otherwise valid arguments."""
    return {
        "GetModelVersion": lambda ref: stub.GetModelVersion(registry_pb2.GetModelVersionRequest(ref=ref)),
        "DownloadModelVersion": lambda ref: download(stub, ref),
        "UpdateModelVersion": lambda ref: stub.UpdateModelVersion(
            registry_pb2.UpdateModelVersionRequest(ref=ref, set_tags={"k": "v"})
        ),
        "ArchiveModelVersion": lambda ref: stub.ArchiveModelVersion(
            registry_pb2.ArchiveModelVersionRequest(ref=ref, reason="r")
        ),
        "DeleteModelVersion": lambda ref: stub.DeleteModelVersion(
            registry_pb2.DeleteModelVersionRequest(ref=ref, reason="r")
        ),
        "AcquireUsage": lambda ref: stub.AcquireUsage(
            registry_pb2.AcquireUsageRequest(ref=ref, deployment_id="endpoints/web/blue")
        ),
        "ReleaseUsage": lambda ref: stub.ReleaseUsage(
            registry_pb2.ReleaseUsageRequest(ref=ref, deployment_id="endpoints/web/blue")
        ),
    }


def list_calls(stub: Any) -> dict[str, Callable[..., Awaitable[Any]]]:
    """Every paged list RPC; keyword arguments go into its request."""
    return {
        "ListModels": lambda **fields: stub.ListModels(registry_pb2.ListModelsRequest(**fields)),
        "SearchModelVersions": lambda **fields: stub.SearchModelVersions(
            registry_pb2.SearchModelVersionsRequest(**fields)
        ),
        "ListDatasets": lambda **fields: stub.ListDatasets(registry_pb2.ListDatasetsRequest(**fields)),
        "ListAuditEntries": lambda **fields: stub.ListAuditEntries(registry_pb2.ListAuditEntriesRequest(**fields)),
    }


def token(value: Any) -> str:
    return base64.urlsafe_b64encode(json.dumps(value).encode()).decode()


def mlmodel(document: Any) -> bytes:
    return yaml.safe_dump(document).encode()


def sklearn_mlmodel(**extra: Any) -> bytes:
    return mlmodel({"flavors": {"sklearn": {"pickled_model": "model.pkl"}}, **extra})


def tensor_inputs(*columns: Any) -> bytes:
    return sklearn_mlmodel(signature={"inputs": json.dumps(list(columns))})


def parquet(table: pa.Table) -> bytes:
    buffer = io.BytesIO()
    pq.write_table(table, buffer)
    return buffer.getvalue()


async def cancel_running_queries(registry: Any, quiet_seconds: float = 1.5, limit_seconds: float = 30) -> None:
    """Cancel queries that timed-out calls left running on PostgreSQL, until none has run for a while.

    The server keeps working on a call after its client gave up; a query still planning when the
    test ends would hold the test's database (and its teardown) for minutes.
    """
    database = registry.runtime.database
    if database.is_sqlite:
        return
    started = quiet_since = time.monotonic()
    while time.monotonic() - quiet_since < quiet_seconds and time.monotonic() - started < limit_seconds:
        with database.engine.connect() as connection:
            cancelled = connection.execute(
                text(
                    "SELECT pg_cancel_backend(pid) FROM pg_stat_activity "
                    "WHERE datname = current_database() AND pid <> pg_backend_pid() AND state = 'active'"
                )
            ).all()
        if cancelled:
            quiet_since = time.monotonic()
        await asyncio.sleep(0.1)


# ---------------------------------------------------------------- file paths in uploads

BAD_PATHS = [
    "../x",
    "a/../../x",
    "..",
    "/etc/passwd",
    "C:\\x",
    "C:x",
    "a\\b",
    "./x",
    "a/./b",
    "a//b",
    "a/",
    "a\x00b",
    "a\nb",
    "",
    "p" * 2000,
]


CLASHING_FILES = [("a", "a"), ("a", "a/b"), ("a/b", "a"), ("d/x", "d/x"), ("d/x", "d")]


async def test_file_paths_that_escape_clash_or_are_malformed_are_refused(registry):
    stub = registry.stub
    before = row_counts(registry)
    problems: list[str] = []
    for first, second in CLASHING_FILES:
        stream = upload(meta(), header(first), chunk(b"1"), header(second), chunk(b"2"))
        problems += await check(
            f"{first!r} then {second!r}", stub.RegisterModelVersion(stream), Code.INVALID_ARGUMENT, "twice", "clash"
        )
    for path in BAD_PATHS:
        alone = upload(meta(), header(path), chunk(b"w"))
        problems += await check(f"path {path[:40]!r}", stub.RegisterModelVersion(alone), Code.INVALID_ARGUMENT, "path")
        # After a good file, so a blob was already stored when the bad header arrives.
        after_good = upload(meta(), header("ok.bin"), chunk(b"good"), header(path), chunk(b"w"))
        problems += await check(
            f"path {path[:40]!r} after a good file",
            stub.RegisterModelVersion(after_good),
            Code.INVALID_ARGUMENT,
            "path",
        )
    problems += await leftovers(registry, before)
    assert not problems, report(problems)
    # Client paths name nothing on the server's disk: no file of those names appeared anywhere.
    home = Path(registry.runtime.settings.home)
    assert not [path for path in home.parent.rglob("*") if path.name in ("x", "passwd", "b")]
    assert (await outcome(stub.GetModelVersion(registry_pb2.GetModelVersionRequest(ref="fraud:1"))))[0] == (
        Code.NOT_FOUND
    )
    # Unusual but legal paths stay allowed, and the first good version is still number 1.
    legal = {"dir/sub dir/ü.bin": b"a", "model.v2.bin": b"b", ".hidden": b"c", "v1:weights": b"d"}
    version = await register(stub, files=legal.items())
    assert version.version == 1
    assert await download(stub, "fraud:1") == legal
    await assert_serving(registry)


# ---------------------------------------------------------------- the shape of upload streams


async def test_malformed_upload_streams_are_refused(registry):
    stub = registry.stub
    empty = registry_pb2.RegisterModelVersionRequest()
    cases = [
        ("empty stream", [], ("empty",)),
        ("an empty message first", [empty], ("metadata",)),
        ("data before any file header", [meta(), chunk(b"x")], ("header",)),
        ("a file before the metadata", [header("a"), chunk(b"x"), meta()], ("metadata",)),
        ("metadata sent twice", [meta(), meta(), header("a"), chunk(b"x")], ("once",)),
        ("metadata after the files", [meta(), header("a"), chunk(b"x"), meta()], ("once",)),
        ("zero files", [meta()], ("at least one file",)),
        ("one 0-byte file", [meta(), header("a")], ("empty",)),
        ("one 0-byte data chunk", [meta(), header("a"), chunk(b"")], ("empty",)),
        ("only 0-byte files", [meta(), header("a"), header("b"), chunk(b"")], ("empty",)),
        ("an empty message among the files", [meta(), header("a"), chunk(b"x"), empty], ()),
    ]
    before = row_counts(registry)
    problems: list[str] = []
    for label, parts, words in cases:
        problems += await check(label, stub.RegisterModelVersion(upload(*parts)), Code.INVALID_ARGUMENT, *words)
    problems += await leftovers(registry, before)
    assert not problems, report(problems)
    # An empty file beside real content (an __init__.py) is fine.
    version = await register(stub, files=[("pkg/__init__.py", b""), ("model.bin", b"w")])
    assert version.version == 1 and {f.path: f.size for f in version.files} == {"pkg/__init__.py": 0, "model.bin": 1}
    await assert_serving(registry)


async def test_an_unknown_upload_format_is_refused(registry):
    """UploadFormat 7 does not exist; treating it as plain files would silently skip an import."""
    before = row_counts(registry)
    stream = upload(meta(format=7), header("MLmodel"), chunk(b"flavors: {}"))
    problems = await check("format 7", registry.stub.RegisterModelVersion(stream), Code.INVALID_ARGUMENT, "format")
    problems += await leftovers(registry, before)
    assert not problems, report(problems)
    await assert_serving(registry)


# ---------------------------------------------------------------- oversized uploads


async def test_oversized_uploads_answer_resource_exhausted_and_leave_nothing(registry_settings):
    settings = registry_settings.model_copy(
        update={
            "max_version_bytes": 1000,
            "max_files_per_version": 3,
            "max_dataset_bytes": 1000,
            "max_message_bytes": 64 * 1024,
        }
    )
    async with running_registry(settings) as small:
        stub = small.stub
        before = row_counts(small)
        limit = ("exceed", "limit", "at most")
        cases = [
            ("one file of 1001 bytes", model_upload("fraud", [("m.bin", b"x" * 1001)]), limit),
            ("two files of 600 bytes", model_upload("fraud", [("a", b"x" * 600), ("b", b"y" * 600)]), limit),
            ("1001 one-byte chunks", model_upload("fraud", [("m.bin", b"x" * 1001)], chunk_bytes=1), limit),
            ("four files, three allowed", model_upload("fraud", [(f"f{i}", b"x") for i in range(4)]), ("files",)),
            (
                "one message over max_message_bytes",
                model_upload("fraud", [("m.bin", b"x" * 100_000)], chunk_bytes=100_000),
                ("larger than max", "message"),
            ),
        ]
        problems: list[str] = []
        for label, stream, words in cases:
            problems += await check(label, stub.RegisterModelVersion(stream), Code.RESOURCE_EXHAUSTED, *words)
        big_csv = b"a\n" + b"1\n" * 500
        problems += await check(
            "a dataset of 1002 bytes",
            stub.RegisterDataset(dataset_upload("customers", "c.csv", big_csv)),
            Code.RESOURCE_EXHAUSTED,
            "exceed",
            "dataset",
        )
        problems += await leftovers(small, before)
        assert not problems, report(problems)
        for ref in ("fraud", "fraud:1"):
            assert (await outcome(stub.GetModelVersion(registry_pb2.GetModelVersionRequest(ref=ref))))[0] == (
                Code.NOT_FOUND
            )
        # Exactly at the limits is fine, and numbering starts at 1.
        at_limit = await register(stub, files=[("a", b"x" * 500), ("b", b"y" * 400), ("c", b"z" * 100)])
        assert at_limit.version == 1
        dataset = await stub.RegisterDataset(dataset_upload("customers", "c.csv", big_csv[:1000]))
        assert dataset.dataset.version == 1
        await assert_serving(small)


# ---------------------------------------------------------------- names and metadata


async def test_bad_names_and_aliases_are_refused_by_every_rpc_that_takes_one(registry):
    stub = registry.stub
    await register(stub)
    before = row_counts(registry)
    problems: list[str] = []
    for bad in BAD_NAMES:
        label = repr(bad[:40])
        calls: list[tuple[str, Awaitable[Any], str]] = [
            ("RegisterModelVersion", stub.RegisterModelVersion(model_upload(bad, [("m", b"x")])), "name"),
            ("RegisterDataset", stub.RegisterDataset(dataset_upload(bad, "c.csv", CSV)), "name"),
            (
                "SetAlias name",
                stub.SetAlias(registry_pb2.SetAliasRequest(name=bad, alias="champion", version=1, reason="r")),
                "name",
            ),
            (
                "SetAlias alias",
                stub.SetAlias(registry_pb2.SetAliasRequest(name="fraud", alias=bad, version=1, reason="r")),
                "alias",
            ),
            ("RemoveAlias name", stub.RemoveAlias(registry_pb2.RemoveAliasRequest(name=bad, alias="champion")), "name"),
            ("RemoveAlias alias", stub.RemoveAlias(registry_pb2.RemoveAliasRequest(name="fraud", alias=bad)), "alias"),
            ("ListAliasHistory name", stub.ListAliasHistory(registry_pb2.ListAliasHistoryRequest(name=bad)), "name"),
        ]
        if bad:  # an empty alias means "no filter" in these two
            calls += [
                (
                    "ListAliasHistory alias",
                    stub.ListAliasHistory(registry_pb2.ListAliasHistoryRequest(name="fraud", alias=bad)),
                    "alias",
                ),
                (
                    "SearchModelVersions alias",
                    stub.SearchModelVersions(registry_pb2.SearchModelVersionsRequest(alias=bad)),
                    "alias",
                ),
            ]
        for rpc, call, word in calls:
            problems += await check(f"{rpc} {label}", call, Code.INVALID_ARGUMENT, word)
    problems += await leftovers(registry, before)
    assert not problems, report(problems)
    longest = "n" * 128
    assert (await register(stub, longest)).name == longest
    await assert_serving(registry)


def tensor(name: str = "x", datatype: str = "FP32", shape: Iterable[int] = (-1, 3)) -> common_pb2.TensorSpec:
    return common_pb2.TensorSpec(name=name, datatype=datatype, shape=list(shape))


BAD_METADATA: list[tuple[str, dict[str, Any], tuple[str, ...]]] = [
    ("unknown framework", {"framework": "tensorflow"}, ("framework",)),
    ("framework in capitals", {"framework": "ONNX"}, ("framework",)),
    ("description of 10001 chars", {"description": "d" * 10_001}, ("description",)),
    ("NUL in the description", {"description": "a\x00b"}, ("description",)),
    ("tag key with a space", {"tags": {"bad key": "v"}}, ("tag",)),
    ("empty tag key", {"tags": {"": "v"}}, ("tag",)),
    ("tag key starting with '-'", {"tags": {"-x": "v"}}, ("tag",)),
    ("tag key with '='", {"tags": {"k=v": "v"}}, ("tag",)),
    ("NUL in a tag key", {"tags": {"k\x00": "v"}}, ("tag",)),
    ("NUL in a tag value", {"tags": {"k": "a\x00b"}}, ("tag",)),
    ("tag value of 2000 chars", {"tags": {"k": "v" * 2000}}, ("tag",)),
    ("300 tags", {"tags": {f"k{index}": "v" for index in range(300)}}, ("tag",)),
    ("datatype FLOAT32", {"signature": common_pb2.Signature(inputs=[tensor(datatype="FLOAT32")])}, ("datatype",)),
    ("empty datatype", {"signature": common_pb2.Signature(outputs=[tensor(datatype="")])}, ("datatype",)),
    ("shape with -2", {"signature": common_pb2.Signature(inputs=[tensor(shape=[-2, 3])])}, ("dimension", "-1")),
    ("shape of 33 dimensions", {"signature": common_pb2.Signature(inputs=[tensor(shape=[1] * 33)])}, ("shape",)),
    ("tensor without a name", {"signature": common_pb2.Signature(inputs=[tensor(name="")])}, ("name",)),
    ("1025 inputs", {"signature": common_pb2.Signature(inputs=[tensor(f"x{i}") for i in range(1025)])}, ("inputs",)),
    ("run id of 201 chars", {"lineage": registry_pb2.Lineage(run_id="r" * 201)}, ("run_id",)),
    ("NUL in the experiment", {"lineage": registry_pb2.Lineage(experiment="e\x00")}, ("experiment",)),
    ("101 datasets", {"lineage": registry_pb2.Lineage(datasets=[f"d:{i}" for i in range(101)])}, ("datasets",)),
    (
        "git commit of 65 chars",
        {"lineage": registry_pb2.Lineage(git=registry_pb2.GitInfo(commit="c" * 65))},
        ("commit",),
    ),
    ("parent version of a first version", {"lineage": registry_pb2.Lineage(parent_version=5)}, ("parent_version",)),
]


async def test_malformed_metadata_is_refused(registry):
    stub = registry.stub
    before = row_counts(registry)
    problems: list[str] = []
    for label, fields, words in BAD_METADATA:
        stream = upload(meta(**fields), header("model.bin"), chunk(b"weights"))
        problems += await check(label, stub.RegisterModelVersion(stream), Code.INVALID_ARGUMENT, *words)
    problems += await leftovers(registry, before)
    assert not problems, report(problems)
    assert (await register(stub)).version == 1
    await assert_serving(registry)


# ---------------------------------------------------------------- ONNX and MLflow contents


async def test_model_files_that_do_not_match_their_claimed_format_are_refused(registry):
    stub = registry.stub
    pkl = ("model.pkl", b"pickle")
    mlflow = registry_pb2.UPLOAD_FORMAT_MLFLOW
    cases: list[tuple[str, list[tuple[str, bytes]], dict[str, Any], tuple[str, ...]]] = [
        ("garbage .onnx, framework onnx", [("model.onnx", b"not an onnx graph")], {"framework": "onnx"}, ("ONNX",)),
        ("garbage .onnx, framework guessed", [("model.onnx", b"not an onnx graph")], {}, ("ONNX",)),
        ("framework onnx without a .onnx file", [("model.bin", b"w")], {"framework": "onnx"}, ("onnx",)),
        ("MLflow without MLmodel", [pkl], {"format": mlflow}, ("MLmodel",)),
        (
            "MLflow with MLmodel in a subfolder",
            [("sub/MLmodel", sklearn_mlmodel()), pkl],
            {"format": mlflow},
            ("MLmodel",),
        ),
        (
            "MLflow with an unsupported flavor",
            [("MLmodel", mlmodel({"flavors": {"tensorflow": {"saved_model_dir": "tf"}}})), pkl],
            {"format": mlflow},
            ("flavor",),
        ),
        ("MLflow with garbage YAML", [("MLmodel", b"flavors: [\n  :: {\n\t"), pkl], {"format": mlflow}, ("YAML",)),
        ("MLflow with binary MLmodel", [("MLmodel", b"\xff\xfe\x00\x01"), pkl], {"format": mlflow}, ("MLmodel",)),
        ("MLflow with a YAML list", [("MLmodel", b"- a\n- b\n"), pkl], {"format": mlflow}, ("flavors",)),
        ("MLflow with flavors a string", [("MLmodel", b"flavors: sklearn\n"), pkl], {"format": mlflow}, ("flavors",)),
        ("MLflow main file missing", [("MLmodel", sklearn_mlmodel())], {"format": mlflow}, ("not uploaded",)),
        (
            "MLflow main file outside the directory",
            [("MLmodel", mlmodel({"flavors": {"sklearn": {"pickled_model": "../../etc/passwd"}}})), pkl],
            {"format": mlflow},
            ("not uploaded",),
        ),
        (
            "MLflow signature that is not JSON",
            [("MLmodel", sklearn_mlmodel(signature={"inputs": "[{"})), pkl],
            {"format": mlflow},
            ("JSON",),
        ),
        (
            "MLflow signature that is not a list",
            [("MLmodel", sklearn_mlmodel(signature={"inputs": '{"a": 1}'})), pkl],
            {"format": mlflow},
            ("list",),
        ),
        (
            "MLflow column of an unknown type",
            [("MLmodel", tensor_inputs({"name": "a", "type": "complex"})), pkl],
            {"format": mlflow},
            ("type",),
        ),
        (
            "MLflow tensor of an unknown dtype",
            [("MLmodel", tensor_inputs({"type": "tensor", "tensor-spec": {"dtype": "complex64", "shape": [-1]}})), pkl],
            {"format": mlflow},
            ("type",),
        ),
        (
            "MLflow tensor with shape -5",
            [("MLmodel", tensor_inputs({"type": "tensor", "tensor-spec": {"dtype": "int64", "shape": [-5]}})), pkl],
            {"format": mlflow},
            ("dimension",),
        ),
    ]
    before = row_counts(registry)
    problems: list[str] = []
    for label, files, fields, words in cases:
        problems += await check(
            label, stub.RegisterModelVersion(model_upload("fraud", files, **fields)), Code.INVALID_ARGUMENT, *words
        )
    problems += await leftovers(registry, before)
    assert not problems, report(problems)
    assert (await register(stub)).version == 1
    await assert_serving(registry)


async def test_mlflow_tensor_specs_of_the_wrong_shape_are_invalid_argument(registry):
    """A hostile MLmodel must not turn into an internal error."""
    stub = registry.stub
    mlflow = registry_pb2.UPLOAD_FORMAT_MLFLOW
    specs = {
        "shape ['abc']": {"type": "tensor", "tensor-spec": {"dtype": "int64", "shape": ["abc"]}},
        "shape 5": {"type": "tensor", "tensor-spec": {"dtype": "int64", "shape": 5}},
        "shape [null]": {"type": "tensor", "tensor-spec": {"dtype": "int64", "shape": [None]}},
        "tensor-spec a string": {"type": "tensor", "tensor-spec": "x"},
    }
    before = row_counts(registry)
    problems: list[str] = []
    for label, spec in specs.items():
        files = [("MLmodel", tensor_inputs(spec)), ("model.pkl", b"pickle")]
        problems += await check(
            label,
            stub.RegisterModelVersion(model_upload("fraud", files, format=mlflow)),
            Code.INVALID_ARGUMENT,
            "MLmodel",
            "shape",
            "tensor",
        )
    problems += await leftovers(registry, before)
    assert not problems, report(problems)
    await assert_serving(registry)


async def test_mlflow_run_id_is_checked_like_a_run_id_given_in_the_request(registry):
    stub = registry.stub
    mlflow = registry_pb2.UPLOAD_FORMAT_MLFLOW
    before = row_counts(registry)
    problems: list[str] = []
    for label, run_id in [("NUL in the run id", "a\x00b"), ("run id of 5000 chars", "r" * 5000)]:
        document = sklearn_mlmodel(run_id=run_id)
        assert yaml.safe_load(document)["run_id"] == run_id
        files = [("MLmodel", document), ("model.pkl", b"pickle")]
        problems += await check(
            label, stub.RegisterModelVersion(model_upload("fraud", files, format=mlflow)), Code.INVALID_ARGUMENT, "run"
        )
    problems += await leftovers(registry, before)
    assert not problems, report(problems)
    await assert_serving(registry)


async def test_errors_about_uploaded_files_name_the_file_and_hide_server_paths(registry):
    stub = registry.stub
    home = str(registry.runtime.settings.home)
    cases = [
        (
            "garbage model.onnx",
            stub.RegisterModelVersion(model_upload("fraud", [("model.onnx", b"not onnx")], framework="onnx")),
            "model.onnx",
        ),
        (
            "CSV bytes in train.parquet",
            stub.RegisterDataset(dataset_upload("train", "train.parquet", CSV)),
            "train.parquet",
        ),
    ]
    problems: list[str] = []
    for label, call, file_name in cases:
        code, details = await outcome(call)
        if code != Code.INVALID_ARGUMENT:
            problems.append(f"{label}: expected INVALID_ARGUMENT, got {code.name} {details[:300]!r}")
        if file_name not in details:
            problems.append(f"{label}: the message does not name {file_name!r}: {details[:300]!r}")
        if home in details or "/blobs/" in details:
            problems.append(f"{label}: the message reveals the server's blob store path: {details[:300]!r}")
    assert not problems, report(problems)
    await assert_serving(registry)


# ---------------------------------------------------------------- bytes that are not a valid request

INVALID_UTF8 = b"\x0a\x03\xff\xfe\xfd"  # field 1 (a string) holding bytes that are not UTF-8
NESTED_INVALID_UTF8 = b"\x0a\x05" + INVALID_UTF8  # field 1 (a message) whose field 1 is such a string
CORRUPT = b"\xff\xff\xff\xff\xff"  # not protobuf at all
UNARY_METHODS = [
    "GetModelVersion",
    "ListModels",
    "SearchModelVersions",
    "UpdateModelVersion",
    "SetAlias",
    "RemoveAlias",
    "ListAliasHistory",
    "ArchiveModelVersion",
    "DeleteModelVersion",
    "AcquireUsage",
    "ReleaseUsage",
    "GetDataset",
    "ListDatasets",
    "GetRun",
    "ListAuditEntries",
]
DECODE_WORDS = ("utf-8", "utf8", "parse", "decode", "corrupt", "malformed", "not a valid")


async def test_bytes_that_are_not_utf8_or_not_protobuf_are_refused_and_the_server_survives(registry):
    """Python protobuf will not build such messages, so they go out over a raw channel."""
    await register(registry.stub)
    before = row_counts(registry)
    channel = registry.channel
    expected = (Code.INVALID_ARGUMENT, Code.INTERNAL)

    async def drain(call: Any) -> None:
        async for _ in call:
            pass

    calls: list[tuple[str, Awaitable[Any]]] = []
    for method in UNARY_METHODS:
        raw = channel.unary_unary(f"{SERVICE}/{method}")
        calls += [(f"{method} non-UTF-8", raw(INVALID_UTF8)), (f"{method} corrupt", raw(CORRUPT))]
    record_run = channel.unary_unary(f"{SERVICE}/RecordRun")
    calls += [("RecordRun non-UTF-8", record_run(NESTED_INVALID_UTF8)), ("RecordRun corrupt", record_run(CORRUPT))]
    download_raw = channel.unary_stream(f"{SERVICE}/DownloadModelVersion")
    calls += [
        ("DownloadModelVersion non-UTF-8", drain(download_raw(INVALID_UTF8))),
        ("DownloadModelVersion corrupt", drain(download_raw(CORRUPT))),
    ]
    for method in ("RegisterModelVersion", "RegisterDataset"):
        raw_stream = channel.stream_unary(f"{SERVICE}/{method}")
        calls += [
            (f"{method} non-UTF-8 metadata", raw_stream(iter([NESTED_INVALID_UTF8]))),
            (f"{method} corrupt first message", raw_stream(iter([CORRUPT]))),
        ]
    problems: list[str] = []
    for label, call in calls:
        code, details = await outcome(call)
        if code not in expected:
            problems.append(f"{label}: expected INVALID_ARGUMENT or INTERNAL, got {code.name} {details[:200]!r}")
        elif not any(word in details.lower() for word in DECODE_WORDS):
            problems.append(f"{label}: {code.name}, but {details[:200]!r} does not say the request was malformed")
    await assert_serving(registry)
    assert (await registry.stub.GetModelVersion(registry_pb2.GetModelVersionRequest(ref="fraud:1"))).model_version
    problems += await leftovers(registry, before)
    assert not problems, report(problems)


# ---------------------------------------------------------------- model references

MALFORMED_REFS = [
    "",
    "a:",
    ":1",
    "a@",
    "a:b:c",
    "a@b@c",
    "@",
    ":",
    "@x",
    "fraud:0",
    "fraud:-1",
    "fraud:99999999999999999999",
    "fraud:abc",
    "fraud: 1",
    "fraud:1 ",
    "fraud:+1",
    "fraud:1.0",
    "fraud:0x1",
    "fraud@bad alias",
    "fraud@" + "a" * 129,
    "../fraud",
    "fraud/1",
    "fraud\x00",
    "x" * 129 + ":1",
]


async def test_malformed_refs_are_invalid_argument_on_every_rpc_that_takes_one(registry):
    stub = registry.stub
    await register(stub)
    before = row_counts(registry)
    problems: list[str] = []
    for rpc, call in ref_calls(stub).items():
        for ref in MALFORMED_REFS:
            problems += await check(
                f"{rpc} {ref[:40]!r}", call(ref), Code.INVALID_ARGUMENT, "ref", "version", "name", "alias"
            )
    problems += await leftovers(registry, before)
    assert not problems, report(problems)
    await assert_serving(registry)


async def test_versions_written_with_non_ascii_digits_are_invalid_argument(registry):
    """str.isdigit() accepts superscripts, Arabic-Indic and fullwidth digits; int() fails or reads them as 1."""
    stub = registry.stub
    await register(stub)
    await stub.RegisterDataset(dataset_upload("customers", "c.csv", CSV))
    before = row_counts(registry)
    problems: list[str] = []
    for digits in ("\u00b2", "\u00b9", "\u0661", "\uff11"):
        for rpc, call in ref_calls(stub).items():
            problems += await check(
                f"{rpc} 'fraud:{digits}'", call(f"fraud:{digits}"), Code.INVALID_ARGUMENT, "version"
            )
        problems += await check(
            f"GetDataset 'customers:{digits}'",
            stub.GetDataset(registry_pb2.GetDatasetRequest(ref=f"customers:{digits}")),
            Code.INVALID_ARGUMENT,
            "version",
        )
    await assert_serving(registry)
    problems += await leftovers(registry, before)
    assert not problems, report(problems)


async def test_unknown_models_versions_and_aliases_are_not_found(registry):
    stub = registry.stub
    await register(stub)
    await stub.SetAlias(registry_pb2.SetAliasRequest(name="fraud", alias="champion", version=1, reason="first"))
    before = row_counts(registry)
    missing = ("does not exist", "no version", "no alias", "pointed at no version")
    problems: list[str] = []
    for rpc, call in ref_calls(stub).items():
        refs = ["ghost:1", "fraud:2", "fraud:999999999999999999"]
        if rpc != "DeleteModelVersion":  # delete takes exact versions only (checked below)
            refs += ["ghost", "ghost@champion", "fraud@ghost"]
        for ref in refs:
            problems += await check(f"{rpc} {ref!r}", call(ref), Code.NOT_FOUND, *missing)
    for ref in ("fraud@champion", "fraud"):
        problems += await check(
            f"DeleteModelVersion {ref!r}",
            stub.DeleteModelVersion(registry_pb2.DeleteModelVersionRequest(ref=ref, reason="r")),
            Code.INVALID_ARGUMENT,
            "exact version",
        )
    long_ago = registry_pb2.GetModelVersionRequest(ref="fraud@champion")
    long_ago.at.FromSeconds(1)
    problems += await check("alias before it existed", stub.GetModelVersion(long_ago), Code.NOT_FOUND, *missing)
    alias_calls = [
        (
            "SetAlias unknown model",
            stub.SetAlias(registry_pb2.SetAliasRequest(name="ghost", alias="c", version=1, reason="r")),
        ),
        (
            "SetAlias unknown version",
            stub.SetAlias(registry_pb2.SetAliasRequest(name="fraud", alias="c", version=2, reason="r")),
        ),
        (
            "SetAlias version 2**63-1",
            stub.SetAlias(registry_pb2.SetAliasRequest(name="fraud", alias="c", version=2**63 - 1, reason="r")),
        ),
        ("RemoveAlias unknown alias", stub.RemoveAlias(registry_pb2.RemoveAliasRequest(name="fraud", alias="ghost"))),
        (
            "RemoveAlias unknown model",
            stub.RemoveAlias(registry_pb2.RemoveAliasRequest(name="ghost", alias="champion")),
        ),
        ("ListAliasHistory unknown model", stub.ListAliasHistory(registry_pb2.ListAliasHistoryRequest(name="ghost"))),
        ("GetDataset unknown", stub.GetDataset(registry_pb2.GetDatasetRequest(ref="ghost"))),
        ("GetDataset unknown version", stub.GetDataset(registry_pb2.GetDatasetRequest(ref="ghost:1"))),
        ("GetRun unknown", stub.GetRun(registry_pb2.GetRunRequest(id="ghost-run"))),
    ]
    for label, call in alias_calls:
        problems += await check(label, call, Code.NOT_FOUND, *missing)
    problems += await leftovers(registry, before)
    assert not problems, report(problems)
    await assert_serving(registry)


# ---------------------------------------------------------------- aliases, updates, usages, archive, delete


async def test_alias_calls_refuse_bad_versions_reasons_and_archived_targets(registry):
    stub = registry.stub
    await register(stub)
    await register(stub)
    await stub.ArchiveModelVersion(registry_pb2.ArchiveModelVersionRequest(ref="fraud:2", reason="old"))
    before = row_counts(registry)

    def set_alias(version: int = 1, reason: str = "why") -> Awaitable[Any]:
        return stub.SetAlias(
            registry_pb2.SetAliasRequest(name="fraud", alias="champion", version=version, reason=reason)
        )

    cases = [
        ("version 0", set_alias(0), Code.INVALID_ARGUMENT, "version"),
        ("version -1", set_alias(-1), Code.INVALID_ARGUMENT, "version"),
        ("version -2**63", set_alias(-(2**63)), Code.INVALID_ARGUMENT, "version"),
        ("no reason", set_alias(reason=""), Code.INVALID_ARGUMENT, "reason"),
        ("a blank reason", set_alias(reason=" \t\n"), Code.INVALID_ARGUMENT, "reason"),
        ("NUL in the reason", set_alias(reason="a\x00b"), Code.INVALID_ARGUMENT, "reason"),
        ("a reason of 2001 chars", set_alias(reason="r" * 2001), Code.INVALID_ARGUMENT, "reason"),
        ("an archived version", set_alias(2), Code.FAILED_PRECONDITION, "archived"),
        (
            "RemoveAlias NUL in the reason",
            stub.RemoveAlias(registry_pb2.RemoveAliasRequest(name="fraud", alias="champion", reason="\x00")),
            Code.INVALID_ARGUMENT,
            "reason",
        ),
    ]
    problems: list[str] = []
    for label, call, code, word in cases:
        problems += await check(label, call, code, word)
    problems += await leftovers(registry, before)
    assert not problems, report(problems)
    history = await stub.ListAliasHistory(registry_pb2.ListAliasHistoryRequest(name="fraud"))
    assert list(history.changes) == []
    await assert_serving(registry)


async def test_update_refuses_malformed_tags_and_text_and_changes_nothing(registry):
    stub = registry.stub
    await register(stub, tags={"team": "risk"})
    before = row_counts(registry)

    def update(**fields: Any) -> Awaitable[Any]:
        return stub.UpdateModelVersion(registry_pb2.UpdateModelVersionRequest(ref="fraud:1", **fields))

    cases = [
        ("set tag key with a space", update(set_tags={"bad key": "v"}), "tag"),
        ("set tag key empty", update(set_tags={"": "v"}), "tag"),
        ("set tag key non-ASCII", update(set_tags={"ä": "v"}), "tag"),
        ("set tag value with NUL", update(set_tags={"k": "a\x00b"}), "tag"),
        ("set tag value of 2000 chars", update(set_tags={"k": "v" * 2000}), "tag"),
        ("set 300 tags", update(set_tags={f"k{index}": "v" for index in range(300)}), "tag"),
        ("256 new tags on top of one", update(set_tags={f"k{index}": "v" for index in range(256)}), "256"),
        ("remove tag key with a space", update(remove_tags=["bad key"]), "tag"),
        ("remove tag key empty", update(remove_tags=[""]), "tag"),
        ("description with NUL", update(description="a\x00b"), "description"),
        ("description of 10001 chars", update(description="d" * 10_001), "description"),
        ("reason of 2001 chars", update(description="d", reason="r" * 2001), "reason"),
        ("reason with NUL", update(description="d", reason="\x00"), "reason"),
        ("nothing to change", update(), "nothing"),
    ]
    problems: list[str] = []
    for label, call, word in cases:
        problems += await check(label, call, Code.INVALID_ARGUMENT, word)
    problems += await leftovers(registry, before)
    assert not problems, report(problems)
    version = (await stub.GetModelVersion(registry_pb2.GetModelVersionRequest(ref="fraud:1"))).model_version
    assert dict(version.tags) == {"team": "risk"} and version.description == ""
    await assert_serving(registry)


async def test_usage_archive_and_delete_refuse_bad_ids_reasons_and_protected_versions(registry):
    stub = registry.stub
    await register(stub)
    await register(stub)
    await stub.ArchiveModelVersion(registry_pb2.ArchiveModelVersionRequest(ref="fraud:2", reason="old"))
    await stub.SetAlias(registry_pb2.SetAliasRequest(name="fraud", alias="champion", version=1, reason="best"))
    before = row_counts(registry)
    problems: list[str] = []
    for deployment_id in ["", "../x", "/abs", "-x", "a b", "x" * 201, "a\x00b", "é", "a\nb"]:
        for rpc, request_type, call in (
            ("AcquireUsage", registry_pb2.AcquireUsageRequest, stub.AcquireUsage),
            ("ReleaseUsage", registry_pb2.ReleaseUsageRequest, stub.ReleaseUsage),
        ):
            problems += await check(
                f"{rpc} {deployment_id[:40]!r}",
                call(request_type(ref="fraud:1", deployment_id=deployment_id)),
                Code.INVALID_ARGUMENT,
                "deployment_id",
            )
    problems += await check(
        "AcquireUsage on an archived version",
        stub.AcquireUsage(registry_pb2.AcquireUsageRequest(ref="fraud:2", deployment_id="endpoints/web/blue")),
        Code.FAILED_PRECONDITION,
        "archived",
    )

    def archive(ref: str = "fraud:1", reason: str = "r") -> Awaitable[Any]:
        return stub.ArchiveModelVersion(registry_pb2.ArchiveModelVersionRequest(ref=ref, reason=reason))

    def delete(ref: str = "fraud:1", reason: str = "r") -> Awaitable[Any]:
        return stub.DeleteModelVersion(registry_pb2.DeleteModelVersionRequest(ref=ref, reason=reason))

    cases = [
        ("archive, NUL in the reason", archive(reason="\x00"), Code.INVALID_ARGUMENT, "reason"),
        ("archive, reason of 2001 chars", archive(reason="r" * 2001), Code.INVALID_ARGUMENT, "reason"),
        ("delete, NUL in the reason", delete(reason="\x00"), Code.INVALID_ARGUMENT, "reason"),
        ("delete, reason of 2001 chars", delete(reason="r" * 2001), Code.INVALID_ARGUMENT, "reason"),
        ("delete by alias", delete("fraud@champion"), Code.INVALID_ARGUMENT, "exact version"),
        ("delete the latest", delete("fraud"), Code.INVALID_ARGUMENT, "exact version"),
        ("archive an aliased version", archive(), Code.FAILED_PRECONDITION, "champion"),
        ("delete an aliased version", delete(), Code.FAILED_PRECONDITION, "champion"),
    ]
    for label, call, code, word in cases:
        problems += await check(label, call, code, word)
    problems += await leftovers(registry, before)
    assert not problems, report(problems)
    version = (await stub.GetModelVersion(registry_pb2.GetModelVersionRequest(ref="fraud:1"))).model_version
    assert version.status == registry_pb2.MODEL_VERSION_STATUS_READY
    await assert_serving(registry)


# ---------------------------------------------------------------- searching and paging


async def test_search_refuses_malformed_filters_and_treats_wildcards_literally(registry):
    stub = registry.stub
    await register(stub, tags={"team": "risk"}, framework="sklearn")
    await stub.RegisterDataset(dataset_upload("customers", "c.csv", CSV))
    before = row_counts(registry)

    def search(**fields: Any) -> Awaitable[Any]:
        return stub.SearchModelVersions(registry_pb2.SearchModelVersionsRequest(**fields))

    refused = [
        ("tag filter key with a space", search(tags=["bad key=1"]), "tag"),
        ("tag filter without a key", search(tags=["=x"]), "tag"),
        ("empty tag filter", search(tags=[""]), "tag"),
        ("tag filter value of 2000 chars", search(tags=["k=" + "v" * 2000]), "tag"),
        ("tag filter value with NUL", search(tags=["k=a\x00b"]), "tag"),
        ("tag filter key with NUL", search(tags=["k\x00"]), "tag"),
        ("tag filter with a quote", search(tags=["team' OR '1'='1"]), "tag"),
        ("unknown framework", search(framework="tensorflow"), "framework"),
        ("order_by with SQL", search(order_by="created_at; DROP TABLE model_versions"), "order_by"),
        ("order_by in capitals", search(order_by="Name"), "order_by"),
        ("name_prefix with NUL", search(name_prefix="a\x00"), "name_prefix"),
        ("name_prefix of 129 chars", search(name_prefix="x" * 129), "name_prefix"),
        ("negative page_size", search(page_size=-1), "page_size"),
        (
            "ListModels name_prefix with NUL",
            stub.ListModels(registry_pb2.ListModelsRequest(name_prefix="\x00")),
            "name_prefix",
        ),
        (
            "ListDatasets name_prefix of 129 chars",
            stub.ListDatasets(registry_pb2.ListDatasetsRequest(name_prefix="x" * 129)),
            "name_prefix",
        ),
        (
            "ListAuditEntries resource_prefix with NUL",
            stub.ListAuditEntries(registry_pb2.ListAuditEntriesRequest(resource_prefix="models/\x00")),
            "resource_prefix",
        ),
        (
            "ListAuditEntries resource_prefix of 513 chars",
            stub.ListAuditEntries(registry_pb2.ListAuditEntriesRequest(resource_prefix="m" * 513)),
            "resource_prefix",
        ),
        (
            "ListAuditEntries actor with NUL",
            stub.ListAuditEntries(registry_pb2.ListAuditEntriesRequest(actor="\x00")),
            "actor",
        ),
        (
            "ListAuditEntries action of 513 chars",
            stub.ListAuditEntries(registry_pb2.ListAuditEntriesRequest(action="a" * 513)),
            "action",
        ),
    ]
    problems: list[str] = []
    for label, call, word in refused:
        problems += await check(label, call, Code.INVALID_ARGUMENT, word)
    # LIKE wildcards and quotes are plain characters: they must match nothing here.
    for prefix in ("%", "_", "f%", "fr_ud", "' OR '1'='1"):
        found = await search(name_prefix=prefix, include_archived=True)
        models = await stub.ListModels(registry_pb2.ListModelsRequest(name_prefix=prefix))
        datasets = await stub.ListDatasets(registry_pb2.ListDatasetsRequest(name_prefix=prefix))
        audit = await stub.ListAuditEntries(registry_pb2.ListAuditEntriesRequest(resource_prefix=prefix))
        hits = len(found.model_versions) + len(models.models) + len(datasets.datasets) + len(audit.entries)
        if hits:
            problems.append(f"prefix {prefix!r} matched {hits} items; wildcards must be literal")
    injected = await search(tags=["team=risk' OR '1'='1"])
    if injected.model_versions:
        problems.append("a tag value with SQL matched a version")
    problems += await leftovers(registry, before)
    assert not problems, report(problems)
    assert [v.name for v in (await search(tags=["team=risk"])).model_versions] == ["fraud"]
    await assert_serving(registry)


async def test_search_with_hundreds_of_tag_filters_answers_promptly(registry):
    """Each filter is a sub-query; unbounded, a few hundred tie up the database for minutes."""
    await register(registry.stub, tags={"team": "risk"})
    problems: list[str] = []
    try:
        for count in (300, 2000):
            request = registry_pb2.SearchModelVersionsRequest(tags=[f"k{index}" for index in range(count)])
            code, details = await outcome(registry.stub.SearchModelVersions(request, timeout=2))
            await cancel_running_queries(registry)
            if code == Code.OK:
                continue
            if code != Code.INVALID_ARGUMENT or "tag" not in details.lower():
                problems.append(f"{count} tag filters: expected OK or INVALID_ARGUMENT, got {code.name} {details!r}")
            if code == Code.DEADLINE_EXCEEDED:
                break  # more filters can only take longer
    finally:
        await cancel_running_queries(registry)
    await assert_serving(registry)
    assert not problems, report(problems)


NEVER_ISSUED_TOKENS = [
    base64.urlsafe_b64encode(bytes(range(200, 236))).decode(),  # random bytes
    "not base64!!",
    "%%%%",
    "é",
    token({"page": 2}),
    token({"offset": -1}),
    token({"offset": "10"}),
    token({"offset": 1.5}),
    token([1]),
    token(None),
    token("offset"),
]


async def test_page_tokens_and_sizes_that_were_never_issued_are_refused(registry):
    stub = registry.stub
    for _ in range(3):
        await register(stub)
    before = row_counts(registry)
    problems: list[str] = []
    for rpc, call in list_calls(stub).items():
        for page_token in NEVER_ISSUED_TOKENS:
            problems += await check(
                f"{rpc} token {page_token[:30]!r}", call(page_token=page_token), Code.INVALID_ARGUMENT, "page_token"
            )
        for size in (-1, -(2**31)):
            problems += await check(f"{rpc} page_size {size}", call(page_size=size), Code.INVALID_ARGUMENT, "page_size")
    problems += await leftovers(registry, before)
    assert not problems, report(problems)
    # A token the service did issue still works.
    first = await stub.SearchModelVersions(registry_pb2.SearchModelVersionsRequest(page_size=2))
    second = await stub.SearchModelVersions(
        registry_pb2.SearchModelVersionsRequest(page_size=2, page_token=first.next_page_token)
    )
    assert len(first.model_versions) == 2 and len(second.model_versions) == 1
    await assert_serving(registry)


async def test_page_tokens_with_offsets_beyond_any_database_integer_are_refused(registry):
    stub = registry.stub
    await register(stub)
    problems: list[str] = []
    for rpc, call in list_calls(stub).items():
        for offset in (2**63, 10**30):
            problems += await check(
                f"{rpc} offset {offset}",
                call(page_token=token({"offset": offset})),
                Code.INVALID_ARGUMENT,
                "page_token",
            )
    await assert_serving(registry)
    assert not problems, report(problems)


# ---------------------------------------------------------------- datasets


async def test_dataset_calls_refuse_bad_files_names_streams_and_refs(registry):
    stub = registry.stub
    empty = registry_pb2.RegisterDatasetRequest()
    cases: list[tuple[str, list[Any], tuple[str, ...]]] = [
        (
            "CSV rows of the wrong width",
            [dataset_meta(), dataset_header("c.csv"), dataset_chunk(b"a,b\n1,2,3\n")],
            ("csv",),
        ),
        ("CSV of one garbage word", [dataset_meta(), dataset_header("c.csv"), dataset_chunk(b"garbage")], ("csv",)),
        ("CSV bytes named .parquet", [dataset_meta(), dataset_header("c.parquet"), dataset_chunk(CSV)], ("parquet",)),
        (
            "CSV bytes with format parquet",
            [dataset_meta(format="parquet"), dataset_header("c.csv"), dataset_chunk(CSV)],
            ("parquet",),
        ),
        ("unknown extension, no format", [dataset_meta(), dataset_header("c.txt"), dataset_chunk(CSV)], ("format",)),
        ("no extension, no format", [dataset_meta(), dataset_header("data"), dataset_chunk(CSV)], ("format",)),
        ("format json", [dataset_meta(format="json"), dataset_header("c.json"), dataset_chunk(b"{}")], ("format",)),
        (
            "two files",
            [dataset_meta(), dataset_header("a.csv"), dataset_chunk(CSV), dataset_header("b.csv"), dataset_chunk(CSV)],
            ("one file",),
        ),
        ("no file", [dataset_meta()], ("file",)),
        ("a 0-byte file", [dataset_meta(), dataset_header("c.csv")], ("empty",)),
        ("data before the header", [dataset_meta(), dataset_chunk(CSV)], ("header",)),
        ("metadata twice", [dataset_meta(), dataset_meta(), dataset_header("c.csv"), dataset_chunk(CSV)], ("once",)),
        ("a file before the metadata", [dataset_header("c.csv"), dataset_chunk(CSV), dataset_meta()], ("metadata",)),
        ("empty stream", [], ("empty",)),
        ("an empty message first", [empty], ("metadata",)),
        ("path ../c.csv", [dataset_meta(), dataset_header("../c.csv"), dataset_chunk(CSV)], ("path",)),
        ("path /etc/passwd.csv", [dataset_meta(), dataset_header("/etc/passwd.csv"), dataset_chunk(CSV)], ("path",)),
        ("path a\\b.csv", [dataset_meta(), dataset_header("a\\b.csv"), dataset_chunk(CSV)], ("path",)),
        ("path with NUL", [dataset_meta(), dataset_header("c\x00.csv"), dataset_chunk(CSV)], ("path",)),
        ("name ../x", [dataset_meta("../x"), dataset_header("c.csv"), dataset_chunk(CSV)], ("name",)),
        ("bad tag key", [dataset_meta(tags={"bad key": "v"}), dataset_header("c.csv"), dataset_chunk(CSV)], ("tag",)),
        (
            "NUL in the description",
            [dataset_meta(description="\x00"), dataset_header("c.csv"), dataset_chunk(CSV)],
            ("description",),
        ),
    ]
    before = row_counts(registry)
    problems: list[str] = []
    for label, parts, words in cases:
        problems += await check(label, stub.RegisterDataset(upload(*parts)), Code.INVALID_ARGUMENT, *words)
    for ref in ["", ":1", "a@b", "a:abc", "a:-1", "a:1:2", "a:99999999999999999999", "../a", "a b", "a\x00", "x" * 129]:
        problems += await check(
            f"GetDataset {ref[:40]!r}",
            stub.GetDataset(registry_pb2.GetDatasetRequest(ref=ref)),
            Code.INVALID_ARGUMENT,
            "name",
            "version",
            "ref",
        )
    for ref in ("ghost", "ghost:1", "customers:1"):
        problems += await check(
            f"GetDataset {ref!r}", stub.GetDataset(registry_pb2.GetDatasetRequest(ref=ref)), Code.NOT_FOUND, "exist"
        )
    for label, request in [
        ("name_prefix with NUL", registry_pb2.ListDatasetsRequest(name_prefix="a\x00")),
        ("name_prefix of 129 chars", registry_pb2.ListDatasetsRequest(name_prefix="x" * 129)),
        ("negative page_size", registry_pb2.ListDatasetsRequest(page_size=-1)),
    ]:
        problems += await check(
            f"ListDatasets {label}", stub.ListDatasets(request), Code.INVALID_ARGUMENT, "name_prefix", "page_size"
        )
    problems += await leftovers(registry, before)
    assert not problems, report(problems)
    dataset = (await stub.RegisterDataset(dataset_upload("customers", "c.csv", CSV))).dataset
    assert dataset.version == 1 and dataset.row_count == 2
    await assert_serving(registry)


async def test_tables_pyarrow_reads_but_cannot_summarise_are_not_internal_errors(registry):
    """Non-UTF-8 text and nested columns: accept them, or refuse them with a reason; never crash."""
    stub = registry.stub
    cases = {
        "CSV with non-UTF-8 text": ("c.csv", b"name\n\xff\xfe\nok\n"),
        "parquet binary column with non-UTF-8": (
            "b.parquet",
            parquet(pa.table({"x": pa.array([b"\xff", b"a"], pa.binary())})),
        ),
        "parquet list column": ("l.parquet", parquet(pa.table({"x": [[1, 2], [3]]}))),
        "parquet struct column": ("s.parquet", parquet(pa.table({"x": [{"a": 1}, {"a": 2}]}))),
    }
    problems: list[str] = []
    for label, (path, content) in cases.items():
        code, details = await outcome(stub.RegisterDataset(dataset_upload("odd", path, content)))
        if code == Code.OK:
            continue
        if code != Code.INVALID_ARGUMENT or not any(word in details.lower() for word in ("utf", "column", "type")):
            problems.append(f"{label}: expected OK or INVALID_ARGUMENT naming the column, got {code.name} {details!r}")
    await assert_serving(registry)
    assert not problems, report(problems)


async def test_dataset_refs_with_an_empty_or_zero_version_are_invalid_argument(registry):
    """Model refs refuse 'name:' and 'name:0'; dataset refs must not read them as 'latest' or 'missing'."""
    stub = registry.stub
    await stub.RegisterDataset(dataset_upload("customers", "c.csv", CSV))
    problems: list[str] = []
    for ref in ("customers:", "customers:0"):
        problems += await check(
            f"GetDataset {ref!r}",
            stub.GetDataset(registry_pb2.GetDatasetRequest(ref=ref)),
            Code.INVALID_ARGUMENT,
            "version",
        )
    for ref in ("fraud:", "fraud:0"):  # the model side, for comparison
        problems += await check(
            f"GetModelVersion {ref!r}",
            stub.GetModelVersion(registry_pb2.GetModelVersionRequest(ref=ref)),
            Code.INVALID_ARGUMENT,
            "version",
        )
    await assert_serving(registry)
    assert not problems, report(problems)


# ---------------------------------------------------------------- runs


async def test_runs_refuse_bad_ids_metrics_params_statuses_and_duplicates(registry):
    stub = registry.stub
    await stub.RecordRun(registry_pb2.RecordRunRequest(run=registry_pb2.Run(id="run-1", metrics={"auc": 0.9})))
    before = row_counts(registry)

    def record(**fields: Any) -> Awaitable[Any]:
        fields.setdefault("id", "run-2")
        return stub.RecordRun(registry_pb2.RecordRunRequest(run=registry_pb2.Run(**fields)))

    refused: list[tuple[str, Awaitable[Any], tuple[str, ...]]] = []
    for bad_id in [" ", "../x", ".x", "-x", "a b", "x" * 201, "a\x00b", "\U0001f642", "a\nb"]:
        refused.append((f"RecordRun id {bad_id[:40]!r}", record(id=bad_id), ("run id",)))
        refused.append((f"GetRun id {bad_id[:40]!r}", stub.GetRun(registry_pb2.GetRunRequest(id=bad_id)), ("run id",)))
    refused += [
        ("GetRun empty id", stub.GetRun(registry_pb2.GetRunRequest(id="")), ("run id",)),
        ("NaN metric", record(metrics={"auc": float("nan")}), ("finite",)),
        ("infinite metric", record(metrics={"auc": float("inf")}), ("finite",)),
        ("negative infinite metric", record(metrics={"loss": float("-inf")}), ("finite",)),
        ("metric key with a space", record(metrics={"bad key": 1.0}), ("key", "metric")),
        ("param key with a space", record(params={"bad key": "1"}), ("key", "param")),
        ("param value with NUL", record(params={"lr": "0.1\x00"}), ("param",)),
        ("param value of 6001 chars", record(params={"lr": "1" * 6001}), ("param",)),
        ("1001 params", record(params={f"p{index}": "1" for index in range(1001)}), ("1000",)),
        ("status RUNNING", record(status="RUNNING"), ("status",)),
        ("status in lower case", record(status="finished"), ("status",)),
        ("status with NUL", record(status="FINISHED\x00"), ("status",)),
        ("experiment with NUL", record(experiment="e\x00"), ("experiment",)),
        ("name of 1025 chars", record(name="n" * 1025), ("name",)),
        ("git commit with NUL", record(git=registry_pb2.GitInfo(commit="\x00")), ("git_commit",)),
    ]
    problems: list[str] = []
    for label, call, words in refused:
        problems += await check(label, call, Code.INVALID_ARGUMENT, *words)
    problems += await check("the same run id twice", record(id="run-1"), Code.ALREADY_EXISTS, "already")
    problems += await leftovers(registry, before)
    assert not problems, report(problems)
    kept = (await stub.GetRun(registry_pb2.GetRunRequest(id="run-1"))).run
    assert dict(kept.metrics) == {"auc": 0.9}
    await assert_serving(registry)


async def test_run_times_outside_the_timestamp_range_are_refused_before_anything_is_recorded(registry):
    stub = registry.stub
    before = row_counts(registry)
    far_future = registry_pb2.Run(id="run-future")
    far_future.started_at.seconds = 10**12  # the year 33658
    far_past = registry_pb2.Run(id="run-past")
    far_past.ended_at.seconds = -(10**12)
    problems: list[str] = []
    for label, run, word in [
        ("started_at in 33658", far_future, "started_at"),
        ("ended_at before year 1", far_past, "ended_at"),
    ]:
        problems += await check(
            label, stub.RecordRun(registry_pb2.RecordRunRequest(run=run)), Code.INVALID_ARGUMENT, word
        )
        problems += await check(
            f"GetRun after {label}",
            stub.GetRun(registry_pb2.GetRunRequest(id=run.id)),
            Code.NOT_FOUND,
            "does not exist",
        )
    await assert_serving(registry)
    problems += await leftovers(registry, before)
    assert not problems, report(problems)


# ---------------------------------------------------------------- limits that must agree with each other


async def test_inputs_within_every_field_limit_are_not_refused_for_the_size_of_their_event(registry):
    """256 tags of 1000 chars, 100 long paths, 1000 metrics: each field is within its own limit.

    Accepting them is right; refusing them is acceptable only with a message that names the
    caller's input, not an internal event the caller never sees.
    """
    stub = registry.stub
    await register(stub, "small")
    many_tags = {f"key-{index}": "v" * 1000 for index in range(256)}
    long_paths = [(f"{index:03d}/" + "p" * 900, b"x") for index in range(100)]
    metrics = {f"{'m' * 120}{index}": float(index) for index in range(1000)}
    before = row_counts(registry)
    cases = [
        (
            "register 256 tags of 1000 chars",
            stub.RegisterModelVersion(model_upload("tagged", [("m", b"x")], tags=many_tags)),
            "tag",
        ),
        ("register 100 files with 900-char paths", stub.RegisterModelVersion(model_upload("deep", long_paths)), "path"),
        (
            "record 1000 metrics with 120-char names",
            stub.RecordRun(registry_pb2.RecordRunRequest(run=registry_pb2.Run(id="run-wide", metrics=metrics))),
            "metric",
        ),
        (
            "update with 200 tags of 1000 chars",
            stub.UpdateModelVersion(
                registry_pb2.UpdateModelVersionRequest(
                    ref="small:1", set_tags={f"key-{index}": "v" * 1000 for index in range(200)}
                )
            ),
            "tag",
        ),
    ]
    problems: list[str] = []
    refused = 0
    for label, call, word in cases:
        code, details = await outcome(call)
        if code == Code.OK:
            continue
        refused += 1
        if code not in (Code.INVALID_ARGUMENT, Code.RESOURCE_EXHAUSTED) or word not in details.lower():
            problems.append(
                f"{label}: got {code.name} {details[:200]!r}; accept it, or name the {word}s that are too big"
            )
    await assert_serving(registry)
    if refused == len(cases):
        problems += await leftovers(registry, before)
    assert not problems, report(problems)


# ---------------------------------------------------------------- abandoned uploads


async def test_an_upload_the_client_abandons_is_not_registered_and_leaves_nothing_behind(registry):
    """A client that gives up (or loses its connection) mid-upload has not registered anything.

    The server may notice the cancellation at different points, so each upload is abandoned a few times.
    """
    stub = registry.stub
    before = row_counts(registry)
    for attempt in range(3):
        for call_rpc, parts in (
            (
                stub.RegisterModelVersion,
                [meta(f"fraud-{attempt}"), header("a.bin"), chunk(b"x" * 4096), header("b.bin"), chunk(b"y" * 4096)],
            ),
            (stub.RegisterDataset, [dataset_meta(f"customers-{attempt}"), dataset_header("c.csv"), dataset_chunk(CSV)]),
        ):
            sent = asyncio.Event()
            never = asyncio.Event()

            async def stalled(parts=parts, sent=sent, never=never):
                for part in parts:
                    yield part
                sent.set()
                await never.wait()  # the client goes quiet mid-upload, then gives up

            call = call_rpc(stalled())
            await asyncio.wait_for(sent.wait(), 5)
            deadline = time.monotonic() + 5
            # The partial blob on disk is the only sign that the server is receiving the parts.
            while not temporary_files(registry) and time.monotonic() < deadline:  # noqa: ASYNC110
                await asyncio.sleep(0.02)
            await asyncio.sleep(0.05 * attempt)  # vary how much the server has taken in
            call.cancel()
            assert await call.code() == Code.CANCELLED
    await asyncio.sleep(0.3)  # a commit the server wrongly started would finish by now
    problems = [
        f"abandoned upload registered as {version.name}:{version.version} with files "
        f"{[(file.path, file.size) for file in version.files]} (a.bin and b.bin were sent)"
        for version in (await stub.SearchModelVersions(registry_pb2.SearchModelVersionsRequest())).model_versions
    ]
    problems += [
        f"abandoned upload registered as dataset {dataset.name}:{dataset.version}"
        for dataset in (await stub.ListDatasets(registry_pb2.ListDatasetsRequest())).datasets
    ]
    problems += await leftovers(registry, before)
    assert not problems, report(problems)
    assert (await register(stub)).version == 1
    await assert_serving(registry)


# ---------------------------------------------------------------- concurrency


async def test_concurrent_alias_flips_leave_a_consistent_history(registry):
    stub = registry.stub
    for _ in range(3):
        await register(stub)
    before = row_counts(registry)
    requests = [
        registry_pb2.SetAliasRequest(name="fraud", alias="champion", version=index % 3 + 1, reason=f"flip {index}")
        for index in range(20)
    ]
    results = await asyncio.gather(*(stub.SetAlias(request) for request in requests), return_exceptions=True)
    lost_races = [r for r in results if isinstance(r, grpc.aio.AioRpcError) and r.code() == Code.ABORTED]
    failed = [r for r in results if isinstance(r, BaseException) and r not in lost_races]
    assert not failed, f"SetAlias failed: {failed}"
    succeeded = {
        request.reason: result
        for request, result in zip(requests, results, strict=True)
        if not isinstance(result, BaseException)
    }

    history = list(
        (await stub.ListAliasHistory(registry_pb2.ListAliasHistoryRequest(name="fraud", alias="champion"))).changes
    )
    assert len(history) == len(succeeded)
    assert sorted(change.reason for change in history) == sorted(succeeded)
    times = [change.at.ToNanoseconds() for change in history]
    assert times == sorted(times)
    problems: list[str] = []
    for index, change in enumerate(history):
        response = succeeded[change.reason]
        expected_previous = history[index - 1].version if index else 0
        if (response.model_version.version, response.previous_version) != (change.version, expected_previous):
            problems.append(
                f"{change.reason}: answered version {response.model_version.version} previous "
                f"{response.previous_version}; history says {change.version} after {expected_previous}"
            )
        at_that_time = registry_pb2.GetModelVersionRequest(ref="fraud@champion", at=change.at)
        resolved = (await stub.GetModelVersion(at_that_time)).model_version.version
        if resolved != change.version:
            problems.append(
                f"{change.reason}: at {change.at.ToJsonString()} resolves to {resolved}, not {change.version}"
            )
    assert not problems, report(problems)
    current = (await stub.GetModelVersion(registry_pb2.GetModelVersionRequest(ref="fraud@champion"))).model_version
    assert current.version == history[-1].version
    summary = (await stub.ListModels(registry_pb2.ListModelsRequest())).models[0]
    assert dict(summary.aliases) == {"champion": history[-1].version}
    after = row_counts(registry)
    for table in ("alias_changes", "audit_log", "outbox"):
        assert after[table] - before[table] == len(succeeded), table
    assert after["model_aliases"] == 1


async def test_concurrent_registrations_number_versions_without_gaps_or_duplicates(registry):
    stub = registry.stub
    # Half share one content, so concurrent uploads also race on the same blob.
    contents = [b"shared weights" if index % 2 else f"own weights {index}".encode() for index in range(30)]
    results = await asyncio.gather(*(register(stub, files=[("model.bin", content)]) for content in contents))
    assert sorted(version.version for version in results) == list(range(1, 31))
    for version, content in zip(results, contents, strict=True):
        assert [file.sha256 for file in version.files] == [hashlib.sha256(content).hexdigest()]
        assert await download(stub, f"fraud:{version.version}") == {"model.bin": content}
    summary = (await stub.ListModels(registry_pb2.ListModelsRequest())).models[0]
    assert (summary.latest_version, summary.version_count) == (30, 30)
    counts = row_counts(registry)
    assert (counts["model_versions"], counts["audit_log"], counts["outbox"]) == (30, 30, 30)
    assert temporary_files(registry) == []
    assert (await register(stub)).version == 31

"""The Python SDK of mlmesh: typed, synchronous wrappers over the registry's gRPC API.

    from services.client import RegistryClient

    with RegistryClient("127.0.0.1:50051") as registry:
        version = registry.register_model("fraud", [Path("model.onnx")], framework="onnx")
        registry.set_alias("fraud", "champion", version.version, reason="beats v1 on AUC")
        registry.download("fraud@champion", Path("out"))

Every call raises `MeshError` (with the gRPC status name and the server's message) on failure.
"""

from __future__ import annotations

import getpass
import hashlib
import io
import os
import tempfile
import time
from collections.abc import Callable, Iterable, Iterator
from datetime import UTC, datetime
from pathlib import Path, PurePosixPath
from typing import TYPE_CHECKING, Any, Self, TypeVar

import grpc
from google.protobuf.timestamp_pb2 import Timestamp
from google.rpc import error_details_pb2
from grpc_status import rpc_status

from services._proto.mlmesh.v1 import (
    automation_pb2,
    automation_pb2_grpc,
    builder_pb2,
    builder_pb2_grpc,
    collector_pb2,
    collector_pb2_grpc,
    common_pb2,
    deployer_pb2,
    deployer_pb2_grpc,
    drift_pb2,
    drift_pb2_grpc,
    notifier_pb2,
    notifier_pb2_grpc,
    profiler_pb2,
    profiler_pb2_grpc,
    registry_pb2,
    registry_pb2_grpc,
)
from services.common.convert import timestamp
from services.common.settings import MeshSettings

if TYPE_CHECKING:
    import pyarrow as pa

DEFAULT_ADDRESS = "127.0.0.1:50051"
DEFAULT_BUILDER_ADDRESS = "127.0.0.1:50052"
DEFAULT_PROFILER_ADDRESS = "127.0.0.1:50053"
DEFAULT_DEPLOYER_ADDRESS = "127.0.0.1:50054"
DEFAULT_COLLECTOR_ADDRESS = "127.0.0.1:50055"
DEFAULT_DRIFT_ADDRESS = "127.0.0.1:50056"
DEFAULT_NOTIFIER_ADDRESS = "127.0.0.1:50057"
DEFAULT_AUTOMATION_ADDRESS = "127.0.0.1:50058"
ACTOR_METADATA = "x-mlmesh-actor"
CHUNK_BYTES = 1024 * 1024
MAX_MESSAGE_BYTES = 16 * 1024 * 1024

Progress = Callable[[int, int], None]
"""Called with (bytes transferred so far, total bytes) as an upload or download advances."""

Item = TypeVar("Item")


class MeshError(Exception):
    """A failed call: the gRPC status name, the server's message and its ErrorInfo reason."""

    def __init__(self, code: str, message: str, *, reason: str = "", field: str = "") -> None:
        super().__init__(message)
        self.code = code
        self.message = message
        self.reason = reason
        self.field = field

    def __str__(self) -> str:
        return self.message

    @property
    def unreachable(self) -> bool:
        """True when no server answered (as opposed to a server reporting UNAVAILABLE itself)."""
        # A server's own errors always carry ErrorInfo details; transport failures never do.
        return self.code in ("UNAVAILABLE", "DEADLINE_EXCEEDED") and not self.reason

    @classmethod
    def from_rpc_error(cls, error: grpc.RpcError) -> MeshError:
        """Read the status code, message and google.rpc.Status details of a failed call."""
        code = error.code().name if isinstance(error, grpc.Call) and error.code() else "UNKNOWN"
        message = error.details() if isinstance(error, grpc.Call) else str(error)
        reason = field = ""
        status = rpc_status.from_call(error) if isinstance(error, grpc.Call) else None
        for detail in status.details if status else ():
            info = error_details_pb2.ErrorInfo()
            bad_request = error_details_pb2.BadRequest()
            if detail.Unpack(info):
                reason = info.reason
            elif detail.Unpack(bad_request) and bad_request.field_violations:
                field = bad_request.field_violations[0].field
        return cls(code, message or code, reason=reason, field=field)


def default_actor() -> str:
    """MLMESH_ACTOR when set, else the login name of this process."""
    configured = MeshSettings().actor
    if configured:
        return configured
    try:
        return getpass.getuser()
    except (OSError, KeyError):  # no passwd entry, e.g. an arbitrary uid in a container
        return "anonymous"


Moment = float | datetime | None
"""A point in time: Unix seconds, a datetime (naive means local time), or None for unbounded."""


def to_timestamp(moment: Moment) -> Timestamp | None:
    """Unix seconds or a datetime as a protobuf Timestamp (None stays unset); a naive datetime is
    taken as local time."""
    if moment is None:
        return None
    if not isinstance(moment, datetime):
        return timestamp(moment)
    value = Timestamp()
    value.FromDatetime(moment.astimezone(UTC))
    return value


def collect_files(paths: Iterable[Path]) -> list[tuple[str, Path]]:
    """(relative POSIX path, local path) of every file to upload, in a stable order.

    A file is sent under its own name; a directory contributes every file below it, named
    relative to the directory. Raises ValueError for missing paths or clashing names.
    """
    files: dict[str, Path] = {}

    def add(relative: str, local: Path) -> None:
        if relative in files:
            raise ValueError(f"two files would both be uploaded as {relative!r}: {files[relative]} and {local}")
        files[relative] = local

    for path in paths:
        if path.is_dir():
            for folder, subfolders, names in os.walk(path):
                subfolders.sort()
                for name in sorted(names):
                    local = Path(folder, name)
                    if local.is_file():
                        add(local.relative_to(path).as_posix(), local)
        elif path.is_file():
            add(path.name, path)
        else:
            raise ValueError(f"{path} does not exist or is not a regular file or directory")
    if not files:
        raise ValueError("nothing to upload: the given directories hold no files")
    return list(files.items())


def _upload_stream(
    request_type: Any,
    metadata: Any,
    files: list[tuple[str, Path]],
    progress: Progress | None,
) -> Iterator[Any]:
    """The client stream of an upload: metadata first, then each file as header + data chunks."""
    total = sum(local.stat().st_size for _, local in files)
    sent = 0
    if progress:
        progress(0, total)
    yield request_type(metadata=metadata)
    for relative, local in files:
        yield request_type(file=common_pb2.FileChunk(header=common_pb2.FileHeader(path=relative)))
        with local.open("rb") as source:
            while chunk := source.read(CHUNK_BYTES):
                yield request_type(file=common_pb2.FileChunk(data=chunk))
                sent += len(chunk)
                if progress:
                    progress(sent, total)


def safe_target(directory: Path, relative: str) -> Path:
    """Where `relative` lands inside `directory`; refuses paths that would escape it."""
    pure = PurePosixPath(relative)
    if (
        not relative
        or pure.is_absolute()
        or "\\" in relative
        or any(part in ("..", "") for part in relative.split("/"))
    ):
        raise MeshError("DATA_LOSS", f"refusing to write {relative!r}: the path leaves the download directory")
    root = directory.resolve()
    target = (root / Path(*pure.parts)).resolve()
    if not target.is_relative_to(root) or target == root:
        raise MeshError("DATA_LOSS", f"refusing to write {relative!r}: the path leaves the download directory")
    return target


class _FileSink:
    """Writes one downloaded file to a temporary name, then moves it into place once verified."""

    def __init__(self, target: Path, expected: common_pb2.FileInfo | None) -> None:
        target.parent.mkdir(parents=True, exist_ok=True)
        handle, name = tempfile.mkstemp(dir=target.parent, prefix=f".{target.name}.", suffix=".part")
        self.file = os.fdopen(handle, "wb")
        self.temporary = Path(name)
        self.target = target
        self.expected = expected
        self.hash = hashlib.sha256()

    def write(self, data: bytes) -> None:
        self.file.write(data)
        self.hash.update(data)

    def commit(self) -> None:
        self.file.close()
        if self.expected is not None and self.expected.sha256 and self.hash.hexdigest() != self.expected.sha256:
            self.temporary.unlink(missing_ok=True)
            raise MeshError("DATA_LOSS", f"{self.target} arrived corrupted: its sha256 differs from the registry's")
        os.replace(self.temporary, self.target)

    def discard(self) -> None:
        self.file.close()
        self.temporary.unlink(missing_ok=True)


class _ServiceClient:
    """A connection to one mlmesh service: its channel, the caller's identity, unary calls."""

    def __init__(self, address: str, actor: str | None, timeout: float) -> None:
        self.address = address
        self.actor = actor or default_actor()
        self.timeout = timeout
        self._channel = grpc.insecure_channel(
            address,
            options=[
                ("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
                ("grpc.max_send_message_length", MAX_MESSAGE_BYTES),
            ],
        )
        self._metadata = ((ACTOR_METADATA, self.actor),)

    def close(self) -> None:
        self._channel.close()

    def __enter__(self: Self) -> Self:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def _call(self, method: Callable[..., Any], request: Any) -> Any:
        try:
            return method(request, metadata=self._metadata, timeout=self.timeout)
        except grpc.RpcError as error:
            raise MeshError.from_rpc_error(error) from None

    @staticmethod
    def _all_pages(fetch: Callable[[str], Any], items: str) -> Iterator[Any]:
        token = ""
        while True:
            page = fetch(token)
            yield from getattr(page, items)
            token = page.next_page_token
            if not token:
                return


class RegistryClient(_ServiceClient):
    """A connection to the registry (mlmesh.v1.RegistryService).

    Args:
        address: host:port of the registry.
        actor: who is calling, recorded in the audit log; defaults to MLMESH_ACTOR or the login name.
        timeout: seconds a unary call may take; streams (uploads, downloads) are not limited.
    """

    def __init__(self, address: str = DEFAULT_ADDRESS, actor: str | None = None, *, timeout: float = 60.0) -> None:
        super().__init__(address, actor, timeout)
        self._stub = registry_pb2_grpc.RegistryServiceStub(self._channel)

    def _upload(self, method: Callable[..., Any], requests: Iterator[Any]) -> Any:
        local_errors: list[Exception] = []

        def remembering() -> Iterator[Any]:
            try:
                yield from requests
            except Exception as error:
                # gRPC cancels the call and reports only "Exception iterating requests!";
                # keep the real cause (say, a file that vanished mid-upload) to raise instead.
                local_errors.append(error)
                raise

        try:
            return method(remembering(), metadata=self._metadata)
        except grpc.RpcError as error:
            if local_errors:
                raise local_errors[0] from None
            raise MeshError.from_rpc_error(error) from None

    # ------------------------------------------------------------ model versions

    def register_model(
        self,
        name: str,
        paths: list[Path],
        *,
        framework: str = "",
        description: str = "",
        tags: dict[str, str] | None = None,
        signature: common_pb2.Signature | None = None,
        lineage: registry_pb2.Lineage | None = None,
        progress: Progress | None = None,
        upload_format: registry_pb2.UploadFormat.ValueType = registry_pb2.UPLOAD_FORMAT_FILES,
    ) -> registry_pb2.ModelVersion:
        """Upload files (directories recursively) as the next version of model `name`."""
        metadata = registry_pb2.ModelVersionMetadata(
            name=name,
            framework=framework,
            description=description,
            tags=tags or {},
            signature=signature,
            lineage=lineage,
            format=upload_format,
        )
        requests = _upload_stream(registry_pb2.RegisterModelVersionRequest, metadata, collect_files(paths), progress)
        return self._upload(self._stub.RegisterModelVersion, requests).model_version

    def import_mlflow(
        self,
        directory: Path,
        name: str,
        *,
        description: str = "",
        tags: dict[str, str] | None = None,
        lineage: registry_pb2.Lineage | None = None,
        progress: Progress | None = None,
    ) -> registry_pb2.ModelVersion:
        """Register an MLflow model directory; framework, signature and run id come from its MLmodel."""
        if not (directory / "MLmodel").is_file():
            raise ValueError(f"{directory} is not an MLflow model directory: it has no MLmodel file")
        return self.register_model(
            name,
            [directory],
            description=description,
            tags=tags,
            lineage=lineage,
            progress=progress,
            upload_format=registry_pb2.UPLOAD_FORMAT_MLFLOW,
        )

    def get(self, ref: str, at: datetime | None = None) -> registry_pb2.ModelVersion:
        """A model version by `name:version`, `name@alias` (at a past time with `at`) or `name`."""
        request = registry_pb2.GetModelVersionRequest(ref=ref, at=to_timestamp(at))
        return self._call(self._stub.GetModelVersion, request).model_version

    def list_models(
        self, name_prefix: str = "", page_size: int = 0, page_token: str = ""
    ) -> registry_pb2.ListModelsResponse:
        """One page of model summaries."""
        request = registry_pb2.ListModelsRequest(name_prefix=name_prefix, page_size=page_size, page_token=page_token)
        return self._call(self._stub.ListModels, request)

    def iter_models(self, name_prefix: str = "", page_size: int = 0) -> Iterator[registry_pb2.ModelSummary]:
        """Every model summary, fetching pages as needed."""
        return self._all_pages(lambda token: self.list_models(name_prefix, page_size, token), "models")

    def search(
        self,
        name_prefix: str = "",
        tags: list[str] | None = None,
        framework: str = "",
        alias: str = "",
        created_after: datetime | None = None,
        created_before: datetime | None = None,
        order_by: str = "",
        include_archived: bool = False,
        page_size: int = 0,
        page_token: str = "",
    ) -> registry_pb2.SearchModelVersionsResponse:
        """One page of model versions matching every given filter; tags are "key=value" or "key"."""
        request = registry_pb2.SearchModelVersionsRequest(
            name_prefix=name_prefix,
            tags=tags or [],
            framework=framework,
            alias=alias,
            created_after=to_timestamp(created_after),
            created_before=to_timestamp(created_before),
            order_by=order_by,
            include_archived=include_archived,
            page_size=page_size,
            page_token=page_token,
        )
        return self._call(self._stub.SearchModelVersions, request)

    def iter_search(self, **filters: Any) -> Iterator[registry_pb2.ModelVersion]:
        """Every model version matching `filters` (the arguments of `search`), across pages."""
        return self._all_pages(lambda token: self.search(**filters, page_token=token), "model_versions")

    def download(self, ref: str, directory: Path, progress: Progress | None = None) -> registry_pb2.ModelVersion:
        """Write a version's files under `directory`; each file is verified against its sha256."""
        version = self.get(ref)
        # Download the exact version just resolved, so files and expected hashes belong together
        # even if an alias moves or a newer version lands meanwhile.
        expected = {file.path: file for file in version.files}
        request = registry_pb2.DownloadModelVersionRequest(ref=f"{version.name}:{version.version}")
        stream = self._stub.DownloadModelVersion(request, metadata=self._metadata)
        self._receive_files(stream, directory, expected, progress)
        return version

    def download_dataset(self, ref: str, directory: Path, progress: Progress | None = None) -> Path:
        """Write a dataset's file under `directory`, verified against its sha256; its path."""
        dataset = self.get_dataset(ref)
        request = registry_pb2.DownloadDatasetRequest(ref=f"{dataset.name}:{dataset.version}")
        stream = self._stub.DownloadDataset(request, metadata=self._metadata)
        self._receive_files(stream, directory, {dataset.file.path: dataset.file}, progress)
        return safe_target(directory, dataset.file.path)

    def _receive_files(
        self,
        responses: Iterable[Any],
        directory: Path,
        expected: dict[str, common_pb2.FileInfo],
        progress: Progress | None,
    ) -> None:
        """Write a download stream (a header naming each file, then its chunks) under `directory`."""
        total = sum(file.size for file in expected.values())
        done = 0
        if progress:
            progress(0, total)
        directory.mkdir(parents=True, exist_ok=True)
        sink: _FileSink | None = None
        try:
            for response in responses:
                part = response.file
                if part.WhichOneof("part") == "header":
                    if sink:
                        sink.commit()
                    sink = _FileSink(safe_target(directory, part.header.path), expected.get(part.header.path))
                elif sink is None:
                    raise MeshError("DATA_LOSS", "the registry sent file data before naming the file")
                else:
                    sink.write(part.data)
                    done += len(part.data)
                    if progress:
                        progress(done, total)
            if sink:
                sink.commit()
                sink = None
        except grpc.RpcError as error:
            raise MeshError.from_rpc_error(error) from None
        finally:
            if sink:
                sink.discard()

    def fetch_onnx(self, ref: str, cache: Path) -> tuple[registry_pb2.ModelVersion, Path]:
        """A version and its main `.onnx` file (the one with the shortest path), downloaded once
        into `cache/<sha256>/model.onnx` and kept there; ValueError when it has none."""
        version = self.get(ref)
        onnx_files = sorted((file for file in version.files if file.path.endswith(".onnx")), key=lambda f: len(f.path))
        if not onnx_files:
            raise ValueError(f"{ref} ({version.name}:{version.version}) has no .onnx file")
        main_file = onnx_files[0]
        target = cache / main_file.sha256 / "model.onnx"
        if not target.exists():
            cache.mkdir(parents=True, exist_ok=True)
            with tempfile.TemporaryDirectory(dir=cache, prefix="download-") as scratch:
                self.download(f"{version.name}:{version.version}", Path(scratch))
                target.parent.mkdir(parents=True, exist_ok=True)
                os.replace(Path(scratch) / main_file.path, target)
        return version, target

    def update(
        self,
        ref: str,
        set_tags: dict[str, str] | None = None,
        remove_tags: list[str] | None = None,
        description: str | None = None,
        reason: str = "",
    ) -> registry_pb2.ModelVersion:
        """Change a version's tags and/or description."""
        request = registry_pb2.UpdateModelVersionRequest(
            ref=ref, set_tags=set_tags or {}, remove_tags=remove_tags or [], description=description, reason=reason
        )
        return self._call(self._stub.UpdateModelVersion, request).model_version

    def set_alias(self, name: str, alias: str, version: int, reason: str = "") -> registry_pb2.SetAliasResponse:
        """Point `name@alias` at `version`; the response tells the previous version (0 if new)."""
        request = registry_pb2.SetAliasRequest(name=name, alias=alias, version=version, reason=reason)
        return self._call(self._stub.SetAlias, request)

    def remove_alias(self, name: str, alias: str, reason: str = "") -> int:
        """Remove `name@alias`; returns the version it pointed at."""
        request = registry_pb2.RemoveAliasRequest(name=name, alias=alias, reason=reason)
        return self._call(self._stub.RemoveAlias, request).previous_version

    def alias_history(self, name: str, alias: str = "") -> list[registry_pb2.AliasChange]:
        """Every change of the model's aliases (or of one alias), oldest first."""
        request = registry_pb2.ListAliasHistoryRequest(name=name, alias=alias)
        return list(self._call(self._stub.ListAliasHistory, request).changes)

    def archive(self, ref: str, reason: str = "") -> registry_pb2.ModelVersion:
        """Archive a version: it stays readable but leaves default searches."""
        request = registry_pb2.ArchiveModelVersionRequest(ref=ref, reason=reason)
        return self._call(self._stub.ArchiveModelVersion, request).model_version

    def delete(self, ref: str, reason: str = "") -> None:
        """Delete a version and its files (refused while a deployment uses it)."""
        self._call(self._stub.DeleteModelVersion, registry_pb2.DeleteModelVersionRequest(ref=ref, reason=reason))

    def acquire_usage(self, ref: str, deployment_id: str) -> registry_pb2.ModelVersion:
        """Record that a deployment uses this version, which protects it from archive and delete."""
        request = registry_pb2.AcquireUsageRequest(ref=ref, deployment_id=deployment_id)
        return self._call(self._stub.AcquireUsage, request).model_version

    def release_usage(self, ref: str, deployment_id: str) -> None:
        """Forget a deployment's use of this version."""
        request = registry_pb2.ReleaseUsageRequest(ref=ref, deployment_id=deployment_id)
        self._call(self._stub.ReleaseUsage, request)

    # ------------------------------------------------------------ datasets

    def register_dataset(
        self,
        name: str,
        path: Path,
        format: str = "",  # the proto's field name, kept for symmetry
        description: str = "",
        tags: dict[str, str] | None = None,
        progress: Progress | None = None,
    ) -> registry_pb2.Dataset:
        """Upload one CSV or Parquet file as the next version of dataset `name`."""
        if not path.is_file():
            raise ValueError(f"{path} is not a file; a dataset is one CSV or Parquet file")
        metadata = registry_pb2.DatasetMetadata(name=name, format=format, description=description, tags=tags or {})
        requests = _upload_stream(registry_pb2.RegisterDatasetRequest, metadata, [(path.name, path)], progress)
        return self._upload(self._stub.RegisterDataset, requests).dataset

    def get_dataset(self, ref: str) -> registry_pb2.Dataset:
        """A dataset by `name:version`, or `name` for the latest version."""
        return self._call(self._stub.GetDataset, registry_pb2.GetDatasetRequest(ref=ref)).dataset

    def list_datasets(
        self, name_prefix: str = "", page_size: int = 0, page_token: str = ""
    ) -> registry_pb2.ListDatasetsResponse:
        """One page of datasets."""
        request = registry_pb2.ListDatasetsRequest(name_prefix=name_prefix, page_size=page_size, page_token=page_token)
        return self._call(self._stub.ListDatasets, request)

    def iter_datasets(self, name_prefix: str = "", page_size: int = 0) -> Iterator[registry_pb2.Dataset]:
        """Every dataset version, fetching pages as needed."""
        return self._all_pages(lambda token: self.list_datasets(name_prefix, page_size, token), "datasets")

    # ------------------------------------------------------------ runs

    def record_run(
        self,
        *,
        run_id: str = "",
        experiment: str = "",
        name: str = "",
        params: dict[str, str] | None = None,
        metrics: dict[str, float] | None = None,
        git: registry_pb2.GitInfo | None = None,
        datasets: list[str] | None = None,
        status: str = "",
        started_at: datetime | None = None,
        ended_at: datetime | None = None,
    ) -> registry_pb2.Run:
        """Record a finished training run; the registry generates an id when none is given."""
        run = registry_pb2.Run(
            id=run_id,
            experiment=experiment,
            name=name,
            params=params or {},
            metrics=metrics or {},
            git=git,
            datasets=datasets or [],
            status=status,
            started_at=to_timestamp(started_at),
            ended_at=to_timestamp(ended_at),
        )
        return self._call(self._stub.RecordRun, registry_pb2.RecordRunRequest(run=run)).run

    def get_run(self, run_id: str) -> registry_pb2.Run:
        return self._call(self._stub.GetRun, registry_pb2.GetRunRequest(id=run_id)).run

    # ------------------------------------------------------------ audit log

    def list_audit(
        self,
        resource_prefix: str = "",
        actor: str = "",
        action: str = "",
        since: datetime | None = None,
        until: datetime | None = None,
        page_size: int = 0,
        page_token: str = "",
    ) -> registry_pb2.ListAuditEntriesResponse:
        """One page of audit entries matching every given filter."""
        request = registry_pb2.ListAuditEntriesRequest(
            resource_prefix=resource_prefix,
            actor=actor,
            action=action,
            since=to_timestamp(since),
            until=to_timestamp(until),
            page_size=page_size,
            page_token=page_token,
        )
        return self._call(self._stub.ListAuditEntries, request)

    def iter_audit(self, **filters: Any) -> Iterator[registry_pb2.AuditEntry]:
        """Every audit entry matching `filters` (the arguments of `list_audit`), across pages."""
        return self._all_pages(lambda token: self.list_audit(**filters, page_token=token), "entries")


class DeployerClient(_ServiceClient):
    """A connection to the deployer (mlmesh.v1.DeployerService): endpoints, deployments, traffic.

    Args:
        address: host:port of the deployer.
        actor: who is calling; defaults to MLMESH_ACTOR or the login name.
        timeout: seconds a call may take (deleting waits for replicas to drain).
    """

    def __init__(
        self, address: str = DEFAULT_DEPLOYER_ADDRESS, actor: str | None = None, *, timeout: float = 90.0
    ) -> None:
        super().__init__(address, actor, timeout)
        self._stub = deployer_pb2_grpc.DeployerServiceStub(self._channel)

    def create(
        self,
        endpoint: str,
        model_ref: str,
        *,
        deployment: str = "blue",
        target: str = "local",
        cpus: float = 0,
        memory_mb: int = 0,
        replicas: int = 1,
        traffic: int | None = None,
        capture: bool = False,
        image: str = "",
        recommended_resources: bool = False,
    ) -> deployer_pb2.Deployment:
        """Add a deployment (and the endpoint when new); it starts in status CREATING.
        `recommended_resources` takes cpus, memory, batching and (with replicas=0) the replica count
        from the version's newest profile on the target."""
        request = deployer_pb2.CreateDeploymentRequest(
            endpoint=endpoint,
            deployment=deployment,
            model_ref=model_ref,
            target=target,
            resources=deployer_pb2.Resources(cpus=cpus, memory_mb=memory_mb),
            replicas=replicas,
            traffic=traffic,
            capture=capture,
            image=image,
            recommended_resources=recommended_resources,
        )
        return self._call(self._stub.CreateDeployment, request).deployment

    def get(self, endpoint: str) -> deployer_pb2.Endpoint:
        return self._call(self._stub.GetEndpoint, deployer_pb2.GetEndpointRequest(name=endpoint)).endpoint

    def list(self) -> list[deployer_pb2.Endpoint]:
        def fetch(token: str) -> Any:
            return self._call(self._stub.ListEndpoints, deployer_pb2.ListEndpointsRequest(page_token=token))

        return list(self._all_pages(fetch, "endpoints"))

    def set_traffic(
        self, endpoint: str, traffic: dict[str, int], mirror: dict[str, int] | None = None
    ) -> deployer_pb2.Endpoint:
        request = deployer_pb2.SetTrafficRequest(endpoint=endpoint, traffic=traffic, mirror=mirror or {})
        return self._call(self._stub.SetTraffic, request).endpoint

    def delete(self, endpoint: str, deployment: str | None = None) -> None:
        """Delete one deployment, or the whole endpoint when `deployment` is None; returns once
        its replicas have stopped."""
        if deployment is None:
            self._call(self._stub.DeleteEndpoint, deployer_pb2.DeleteEndpointRequest(name=endpoint))
        else:
            request = deployer_pb2.DeleteDeploymentRequest(endpoint=endpoint, deployment=deployment)
            self._call(self._stub.DeleteDeployment, request)

    def logs(self, endpoint: str, deployment: str, replica: int = 0, lines: int = 100) -> list[str]:
        request = deployer_pb2.GetDeploymentLogsRequest(
            endpoint=endpoint, deployment=deployment, replica=replica, lines=lines
        )
        return list(self._call(self._stub.GetDeploymentLogs, request).lines)

    def create_batch(
        self,
        inputs: Iterable[Path | str],
        output_dir: Path | str,
        *,
        model_ref: str = "",
        endpoint: str = "",
        mini_batch_rows: int = 1000,
        workers: int = 2,
        columns: Iterable[str] = (),
        dataset: str = "",
    ) -> deployer_pb2.BatchJob:
        """Start scoring `inputs` (Parquet or CSV files the deployer can read) or a registered
        `dataset` with a model version or an endpoint into `output_dir`; the job starts QUEUED."""
        request = deployer_pb2.CreateBatchJobRequest(
            model_ref=model_ref,
            endpoint=endpoint,
            inputs=[str(Path(path).resolve()) for path in inputs],
            dataset=dataset,
            output_dir=str(Path(output_dir).resolve()),
            mini_batch_rows=mini_batch_rows,
            workers=workers,
            columns=list(columns),
        )
        return self._call(self._stub.CreateBatchJob, request).job

    def get_batch(self, job_id: str) -> deployer_pb2.BatchJob:
        return self._call(self._stub.GetBatchJob, deployer_pb2.GetBatchJobRequest(id=job_id)).job

    def list_batches(self) -> list[deployer_pb2.BatchJob]:
        def fetch(token: str) -> Any:
            return self._call(self._stub.ListBatchJobs, deployer_pb2.ListBatchJobsRequest(page_token=token))

        return list(self._all_pages(fetch, "jobs"))


class BuilderClient(_ServiceClient):
    """A connection to the builder (mlmesh.v1.BuilderService): environments, conversions, images.

    Args:
        address: host:port of the builder.
        actor: who is calling; defaults to MLMESH_ACTOR or the login name.
        timeout: seconds a unary call may take (resolving an environment or converting a model
            can take minutes); the image build and export streams are not limited.
    """

    def __init__(
        self, address: str = DEFAULT_BUILDER_ADDRESS, actor: str | None = None, *, timeout: float = 900.0
    ) -> None:
        super().__init__(address, actor, timeout)
        self._stub = builder_pb2_grpc.BuilderServiceStub(self._channel)

    def register_environment(
        self,
        name: str,
        requirements: str,
        *,
        python_version: str = "",
        base_image: str = "",
        description: str = "",
    ) -> tuple[builder_pb2.Environment, bool]:
        """Register `requirements` (a requirements file's text) as the environment's next version,
        resolved to a lock; the bool is False when an identical spec already had a version."""
        request = builder_pb2.RegisterEnvironmentRequest(
            name=name,
            requirements=requirements,
            python_version=python_version,
            base_image=base_image,
            description=description,
        )
        response = self._call(self._stub.RegisterEnvironment, request)
        return response.environment, response.created

    def get_environment(self, ref: str) -> builder_pb2.Environment:
        request = builder_pb2.GetEnvironmentRequest(ref=ref)
        return self._call(self._stub.GetEnvironment, request).environment

    def list_environments(self, name_prefix: str = "") -> list[builder_pb2.Environment]:
        def fetch(token: str) -> Any:
            request = builder_pb2.ListEnvironmentsRequest(name_prefix=name_prefix, page_token=token)
            return self._call(self._stub.ListEnvironments, request)

        return list(self._all_pages(fetch, "environments"))

    def convert(
        self,
        ref: str,
        *,
        sample_dataset: str = "",
        quantize: bool = False,
        optimize: bool = True,
        parity_rows: int = 0,
        target_opset: int = 0,
    ) -> builder_pb2.Conversion:
        """Convert a scikit-learn, XGBoost or LightGBM version to ONNX, registered as the next version."""
        options = builder_pb2.ConvertOptions(
            skip_optimization=not optimize, quantize=quantize, parity_rows=parity_rows, target_opset=target_opset
        )
        request = builder_pb2.ConvertModelRequest(ref=ref, sample_dataset=sample_dataset, options=options)
        return self._call(self._stub.ConvertModel, request).conversion

    def list_conversions(self, name: str = "") -> list[builder_pb2.Conversion]:
        def fetch(token: str) -> Any:
            request = builder_pb2.ListConversionsRequest(name=name, page_token=token)
            return self._call(self._stub.ListConversions, request)

        return list(self._all_pages(fetch, "conversions"))

    def build_image(
        self,
        refs: Iterable[str],
        *,
        environment: str = "",
        base_image: str = "",
        runtime_settings: dict[str, str] | None = None,
        tag: str = "",
        push: bool = False,
        on_log: Callable[[str], None] | None = None,
    ) -> builder_pb2.Image:
        """Build (or reuse) a Docker image serving the versions; `on_log` sees each build-log line."""
        request = builder_pb2.BuildImageRequest(
            refs=list(refs),
            environment=environment,
            base_image=base_image,
            runtime_settings=runtime_settings or {},
            tag=tag,
            push=push,
        )
        image = None
        try:
            for response in self._stub.BuildImage(request, metadata=self._metadata):
                if response.WhichOneof("part") == "log":
                    if on_log:
                        on_log(response.log)
                else:
                    image = response.image
        except grpc.RpcError as error:
            raise MeshError.from_rpc_error(error) from None
        if image is None:
            raise MeshError("DATA_LOSS", "the builder ended the build stream without an image")
        return image

    def list_images(self, name: str = "") -> list[builder_pb2.Image]:
        def fetch(token: str) -> Any:
            return self._call(self._stub.ListImages, builder_pb2.ListImagesRequest(name=name, page_token=token))

        return list(self._all_pages(fetch, "images"))

    def export_image(self, image: str, target: Path, progress: Progress | None = None) -> int:
        """Write a `docker save` archive of `image` (a tag, or a model ref) to `target`; its size."""
        partial = target.with_name(target.name + ".partial")
        written = total = 0
        try:
            with partial.open("wb") as file:
                for response in self._stub.ExportImage(
                    builder_pb2.ExportImageRequest(image=image), metadata=self._metadata
                ):
                    total = response.size or total
                    file.write(response.data)
                    written += len(response.data)
                    if progress:
                        progress(written, total)
            if total and written != total:
                raise MeshError("DATA_LOSS", f"the archive ended after {written} of {total} bytes")
            os.replace(partial, target)
        except grpc.RpcError as error:
            raise MeshError.from_rpc_error(error) from None
        finally:
            partial.unlink(missing_ok=True)
        return written


class ProfilerClient(_ServiceClient):
    """A connection to the profiler (mlmesh.v1.ProfilerService): profiles and sizing recommendations.

    Args:
        address: host:port of the profiler.
        actor: who is calling; defaults to MLMESH_ACTOR or the login name.
        timeout: seconds a call may take (a profile runs the runtime at every size and level).
    """

    def __init__(
        self, address: str = DEFAULT_PROFILER_ADDRESS, actor: str | None = None, *, timeout: float = 3600.0
    ) -> None:
        super().__init__(address, actor, timeout)
        self._stub = profiler_pb2_grpc.ProfilerServiceStub(self._channel)

    def profile(
        self,
        model_ref: str,
        *,
        slo_p99_ms: float,
        slo_throughput_rps: float = 0,
        target: str = "",
        image: str = "",
        sample_dataset: str = "",
        rows_per_request: int = 0,
        concurrency: Iterable[int] = (),
        sizes: Iterable[dict[str, Any]] = (),
        step_seconds: float = 0,
        warmup_seconds: float = 0,
        on_progress: Callable[[profiler_pb2.ProfileProgress], None] | None = None,
    ) -> profiler_pb2.Profile:
        """Profile a model version and return the stored profile (its status says whether it
        completed); `on_progress` sees each step as it is measured. `sizes` are dicts of cpus,
        memory_mb, threads and max_batch_rows."""
        request = profiler_pb2.ProfileModelRequest(
            model_ref=model_ref,
            target=target,
            image=image,
            sample_dataset=sample_dataset,
            rows_per_request=rows_per_request,
            slo=profiler_pb2.ServiceLevel(p99_ms=slo_p99_ms, throughput_rps=slo_throughput_rps),
            concurrency=list(concurrency),
            sizes=[profiler_pb2.Size(**size) for size in sizes],
            step_seconds=step_seconds,
            warmup_seconds=warmup_seconds,
        )
        profile = None
        try:
            for response in self._stub.ProfileModel(request, metadata=self._metadata):
                if response.WhichOneof("part") == "progress":
                    if on_progress:
                        on_progress(response.progress)
                else:
                    profile = response.profile
        except grpc.RpcError as error:
            raise MeshError.from_rpc_error(error) from None
        if profile is None:
            raise MeshError("DATA_LOSS", "the profiler ended the stream without a profile")
        return profile

    def get(self, name: str) -> profiler_pb2.Profile:
        """A profile by `profiles/<id>` or id."""
        return self._call(self._stub.GetProfile, profiler_pb2.GetProfileRequest(name=name)).profile

    def list(
        self, model_name: str = "", model_version: int = 0, *, completed_only: bool = False, limit: int = 0
    ) -> list[profiler_pb2.Profile]:
        """Profiles, newest first (at most `limit`, 0: all)."""

        def fetch(token: str) -> Any:
            request = profiler_pb2.ListProfilesRequest(
                model_name=model_name, model_version=model_version, completed_only=completed_only, page_token=token
            )
            return self._call(self._stub.ListProfiles, request)

        found = []
        for profile in self._all_pages(fetch, "profiles"):
            found.append(profile)
            if limit and len(found) >= limit:
                break
        return found

    def latest(self, model_name: str, model_version: int) -> profiler_pb2.Profile | None:
        """The newest completed profile of a version, if any."""
        found = self.list(model_name, model_version, completed_only=True, limit=1)
        return found[0] if found else None


class NotifierClient(_ServiceClient):
    """A connection to the notifier (mlmesh.v1.NotifierService): webhook endpoints and deliveries.

    Args:
        address: host:port of the notifier.
        actor: who is calling; defaults to MLMESH_ACTOR or the login name.
        timeout: seconds a call may take (a test event waits for the receiver's answer).
    """

    def __init__(
        self, address: str = DEFAULT_NOTIFIER_ADDRESS, actor: str | None = None, *, timeout: float = 90.0
    ) -> None:
        super().__init__(address, actor, timeout)
        self._stub = notifier_pb2_grpc.NotifierServiceStub(self._channel)

    def create(self, url: str, events: Iterable[str], description: str = "") -> notifier_pb2.CreateWebhookResponse:
        """A new endpoint; the response's `secret` (whsec_...) is shown this once."""
        request = notifier_pb2.CreateWebhookRequest(url=url, events=list(events), description=description)
        return self._call(self._stub.CreateWebhook, request)

    def get(self, webhook: str) -> notifier_pb2.Webhook:
        return self._call(self._stub.GetWebhook, notifier_pb2.GetWebhookRequest(name=webhook)).webhook

    def list(self) -> list[notifier_pb2.Webhook]:
        def fetch(token: str) -> Any:
            return self._call(self._stub.ListWebhooks, notifier_pb2.ListWebhooksRequest(page_token=token))

        return list(self._all_pages(fetch, "webhooks"))

    def update(
        self,
        webhook: str,
        *,
        url: str | None = None,
        events: Iterable[str] | None = None,
        description: str | None = None,
        enabled: bool | None = None,
    ) -> notifier_pb2.Webhook:
        request = notifier_pb2.UpdateWebhookRequest(
            name=webhook,
            url=url,
            events=list(events or ()),
            set_events=events is not None,
            description=description,
            enabled=enabled,
        )
        return self._call(self._stub.UpdateWebhook, request).webhook

    def delete(self, webhook: str) -> None:
        self._call(self._stub.DeleteWebhook, notifier_pb2.DeleteWebhookRequest(name=webhook))

    def rotate(self, webhook: str) -> notifier_pb2.RotateWebhookSecretResponse:
        """A new secret (in the response, shown this once); the old one signs too for a while."""
        return self._call(self._stub.RotateWebhookSecret, notifier_pb2.RotateWebhookSecretRequest(name=webhook))

    def test(self, webhook: str) -> notifier_pb2.Delivery:
        """Deliver a webhook.test event now; the delivery with its attempt."""
        return self._call(self._stub.SendTestEvent, notifier_pb2.SendTestEventRequest(name=webhook)).delivery

    def deliveries(
        self, webhook: str, *, event_id: str = "", status: int = 0, limit: int = 0
    ) -> list[notifier_pb2.Delivery]:
        """Deliveries to an endpoint, newest first, with their attempts (at most `limit`, 0: all)."""

        def fetch(token: str) -> Any:
            request = notifier_pb2.ListDeliveriesRequest(
                name=webhook, event_id=event_id, status=status, page_token=token
            )
            return self._call(self._stub.ListDeliveries, request)

        found = []
        for delivery in self._all_pages(fetch, "deliveries"):
            found.append(delivery)
            if limit and len(found) >= limit:
                break
        return found

    def redeliver(self, webhook: str, event_id: str) -> notifier_pb2.Delivery:
        request = notifier_pb2.RedeliverEventRequest(name=webhook, event_id=event_id)
        return self._call(self._stub.RedeliverEvent, request).delivery

    def replay(self, webhook: str, start: datetime | float, end: datetime | float) -> int:
        """Deliver again every kept event of [start, end) matching the endpoint; how many."""
        request = notifier_pb2.ReplayEventsRequest(name=webhook, start=to_timestamp(start), end=to_timestamp(end))
        return self._call(self._stub.ReplayEvents, request).queued


class AutomationClient(_ServiceClient):
    """A connection to the automation service (mlmesh.v1.AutomationService): retrain policies and runs.

    Args:
        address: host:port of the automation service.
        actor: who is calling; defaults to MLMESH_ACTOR or the login name.
        timeout: seconds a call may take.
    """

    def __init__(
        self, address: str = DEFAULT_AUTOMATION_ADDRESS, actor: str | None = None, *, timeout: float = 60.0
    ) -> None:
        super().__init__(address, actor, timeout)
        self._stub = automation_pb2_grpc.AutomationServiceStub(self._channel)

    def create_policy(
        self,
        name: str,
        model: str,
        *,
        command: Iterable[str],
        holdout_dataset: str,
        label_column: str,
        metric: str = "accuracy",
        min_delta: float = 0.0,
        training_dataset: str = "",
        working_dir: str = "",
        environment: str = "",
        timeout_seconds: float = 0,
        trigger: str = "manual",
        monitor: str = "",
        dataset: str = "",
        schedule_seconds: float = 0,
        rollout: dict[str, Any] | None = None,
    ) -> automation_pb2.Policy:
        """A retrain policy for `model`: how it trains, how the result is judged, what starts it, and
        (`rollout`: endpoint, shadow_seconds, canary_percent, canary_seconds, max_error_rate,
        max_latency_ratio, min_requests) how a winner is rolled out before it becomes champion."""
        request = automation_pb2.CreatePolicyRequest(
            name=name,
            model=model,
            trigger=automation_pb2.Trigger(
                kind=trigger, monitor=monitor, dataset=dataset, schedule_seconds=schedule_seconds
            ),
            training=automation_pb2.Training(
                command=list(command),
                dataset=training_dataset,
                working_dir=working_dir,
                timeout_seconds=timeout_seconds,
                environment=environment,
            ),
            evaluation=automation_pb2.Evaluation(
                holdout_dataset=holdout_dataset, label_column=label_column, metric=metric, min_delta=min_delta
            ),
            rollout=automation_pb2.Rollout(**(rollout or {})),
        )
        return self._call(self._stub.CreatePolicy, request).policy

    def get_policy(self, name: str) -> automation_pb2.Policy:
        return self._call(self._stub.GetPolicy, automation_pb2.GetPolicyRequest(name=name)).policy

    def list_policies(self) -> list[automation_pb2.Policy]:
        def fetch(token: str) -> Any:
            return self._call(self._stub.ListPolicies, automation_pb2.ListPoliciesRequest(page_token=token))

        return list(self._all_pages(fetch, "policies"))

    def delete_policy(self, name: str) -> None:
        self._call(self._stub.DeletePolicy, automation_pb2.DeletePolicyRequest(name=name))

    def start_run(self, policy: str) -> automation_pb2.RetrainRun:
        """Start a run now; it goes on in the background (see get_run, wait_run)."""
        return self._call(self._stub.StartRetrainRun, automation_pb2.StartRetrainRunRequest(policy=policy)).run

    def get_run(self, run_id: str) -> automation_pb2.RetrainRun:
        return self._call(self._stub.GetRetrainRun, automation_pb2.GetRetrainRunRequest(id=run_id)).run

    def wait_run(self, run_id: str, timeout: float = 3600, poll_seconds: float = 0.5) -> automation_pb2.RetrainRun:
        """Poll a run until it is no longer running (TimeoutError after `timeout`)."""
        deadline = time.monotonic() + timeout
        while (run := self.get_run(run_id)).status == automation_pb2.RUN_STATUS_RUNNING:
            if time.monotonic() > deadline:
                raise TimeoutError(f"run {run_id} still runs after {timeout:g} s")
            time.sleep(poll_seconds)
        return run

    def list_runs(self, policy: str = "", limit: int = 0) -> list[automation_pb2.RetrainRun]:
        def fetch(token: str) -> Any:
            request = automation_pb2.ListRetrainRunsRequest(policy=policy, page_token=token)
            return self._call(self._stub.ListRetrainRuns, request)

        found = []
        for run in self._all_pages(fetch, "runs"):
            found.append(run)
            if limit and len(found) >= limit:
                break
        return found


class DriftClient(_ServiceClient):
    """A connection to the drift service (mlmesh.v1.DriftService): monitors and their checks.

    Args:
        address: host:port of the drift service.
        actor: who is calling; defaults to MLMESH_ACTOR or the login name.
        timeout: seconds a call may take (creating a monitor summarises its baseline; a backfill
            runs many checks).
    """

    def __init__(
        self, address: str = DEFAULT_DRIFT_ADDRESS, actor: str | None = None, *, timeout: float = 600.0
    ) -> None:
        super().__init__(address, actor, timeout)
        self._stub = drift_pb2_grpc.DriftServiceStub(self._channel)

    def create_monitor(
        self,
        name: str,
        endpoint: str = "",
        *,
        model: str = "",
        baseline_dataset: str = "",
        baseline_window: tuple[float, float] | None = None,
        features: Iterable[str] = (),
        exclude: Iterable[str] = (),
        window_rows: int = 0,
        window_seconds: float = 0,
        schedule_seconds: float = 0,
        thresholds: dict[str, float] | None = None,
        consecutive: int = 1,
    ) -> drift_pb2.Monitor:
        """Summarise the baseline (a dataset `name:version`, or a captured window) and keep the monitor of
        an endpoint, or of a model (the captures of every endpoint serving it)."""
        request = drift_pb2.CreateMonitorRequest(
            name=name,
            endpoint=endpoint,
            model=model,
            features=list(features),
            exclude=list(exclude),
            window_rows=window_rows,
            window_seconds=window_seconds,
            schedule_seconds=schedule_seconds,
            thresholds=drift_pb2.DriftThresholds(**(thresholds or {})),
            consecutive=consecutive,
        )
        if baseline_window is not None:
            request.baseline_window.CopyFrom(
                drift_pb2.TimeWindow(start=to_timestamp(baseline_window[0]), end=to_timestamp(baseline_window[1]))
            )
        else:
            request.baseline_dataset = baseline_dataset
        return self._call(self._stub.CreateMonitor, request).monitor

    def get_monitor(self, name: str) -> drift_pb2.Monitor:
        return self._call(self._stub.GetMonitor, drift_pb2.GetMonitorRequest(name=name)).monitor

    def list_monitors(self, endpoint: str = "") -> list[drift_pb2.Monitor]:
        def fetch(token: str) -> Any:
            request = drift_pb2.ListMonitorsRequest(endpoint=endpoint, page_token=token)
            return self._call(self._stub.ListMonitors, request)

        return list(self._all_pages(fetch, "monitors"))

    def delete_monitor(self, name: str) -> None:
        self._call(self._stub.DeleteMonitor, drift_pb2.DeleteMonitorRequest(name=name))

    def check(self, name: str, window_end: float | None = None) -> drift_pb2.DriftResult:
        """Check the monitor's latest window (or the one ending at `window_end`) now."""
        request = drift_pb2.CheckDriftRequest(name=name, window_end=to_timestamp(window_end))
        return self._call(self._stub.CheckDrift, request).result

    def results(self, name: str, limit: int = 0) -> list[drift_pb2.DriftResult]:
        """The monitor's checks, newest first (`limit` 0: all)."""
        found: list[drift_pb2.DriftResult] = []

        def fetch(token: str) -> Any:
            request = drift_pb2.ListDriftResultsRequest(name=name, page_token=token)
            return self._call(self._stub.ListDriftResults, request)

        for result in self._all_pages(fetch, "results"):
            found.append(result)
            if limit and len(found) >= limit:
                break
        return found

    def backfill(self, name: str, start: float, end: float, step_seconds: float = 0) -> list[drift_pb2.DriftResult]:
        request = drift_pb2.BackfillDriftRequest(
            name=name,
            range=drift_pb2.TimeWindow(start=to_timestamp(start), end=to_timestamp(end)),
            step_seconds=step_seconds,
        )
        return list(self._call(self._stub.BackfillDrift, request).results)


LabelValue = str | float | int


class _ArrowStream(io.RawIOBase):
    """The `arrow_ipc` bytes of a QueryCaptures answer, read as one file: an Arrow IPC stream."""

    def __init__(self, responses: Iterable[Any]) -> None:
        self._responses = iter(responses)
        self._pending = memoryview(b"")

    def readable(self) -> bool:
        return True

    def readinto(self, buffer: Any) -> int:
        while not self._pending:
            try:
                response = next(self._responses)
            except StopIteration:
                return 0
            except grpc.RpcError as error:
                raise MeshError.from_rpc_error(error) from None
            self._pending = memoryview(response.arrow_ipc)
        size = min(len(buffer), len(self._pending))
        buffer[:size] = self._pending[:size]
        self._pending = self._pending[size:]
        return size


class CollectorClient(_ServiceClient):
    """A connection to the collector (mlmesh.v1.CollectorService): captured requests and answers.

    Args:
        address: host:port of the collector.
        actor: who is calling; defaults to MLMESH_ACTOR or the login name.
        timeout: seconds a unary call may take (an export writes and registers a whole window);
            queries stream and are not limited.
    """

    def __init__(
        self, address: str = DEFAULT_COLLECTOR_ADDRESS, actor: str | None = None, *, timeout: float = 600.0
    ) -> None:
        super().__init__(address, actor, timeout)
        self._stub = collector_pb2_grpc.CollectorServiceStub(self._channel)

    def query_reader(
        self,
        endpoint: str,
        *,
        start: Moment = None,
        end: Moment = None,
        deployment: str = "",
        columns: Iterable[str] = (),
        include_labels: bool = False,
    ) -> pa.RecordBatchReader:
        """The endpoint's rows with start <= time < end as record batches, read as they arrive."""
        import pyarrow as pa  # only queries need Arrow; the SDK's other users load faster without it

        request = collector_pb2.QueryCapturesRequest(
            endpoint=endpoint,
            deployment=deployment,
            start_time=to_timestamp(start),
            end_time=to_timestamp(end),
            columns=list(columns),
            include_labels=include_labels,
        )
        responses = self._stub.QueryCaptures(request, metadata=self._metadata)
        try:
            return pa.ipc.open_stream(_ArrowStream(responses))
        except pa.ArrowInvalid as error:
            raise MeshError("DATA_LOSS", f"the collector's answer is not an Arrow stream: {error}") from None

    def query(self, endpoint: str, **window: Any) -> pa.Table:
        """The endpoint's rows as one table; `window` as in query_reader (start, end, deployment,
        columns, include_labels)."""
        return self.query_reader(endpoint, **window).read_all()

    def export(
        self,
        endpoint: str,
        dataset: str,
        *,
        start: Moment = None,
        end: Moment = None,
        deployment: str = "",
        columns: Iterable[str] = (),
        include_labels: bool = False,
        description: str = "",
    ) -> collector_pb2.ExportCapturesResponse:
        """Register the window's rows as the next version of `dataset` in the registry."""
        request = collector_pb2.ExportCapturesRequest(
            endpoint=endpoint,
            deployment=deployment,
            start_time=to_timestamp(start),
            end_time=to_timestamp(end),
            dataset=dataset,
            columns=list(columns),
            include_labels=include_labels,
            description=description,
        )
        return self._call(self._stub.ExportCaptures, request)

    def ingest_labels(
        self,
        endpoint: str,
        labels: Iterable[tuple[str, int, LabelValue]],
        *,
        batch_size: int = 10_000,
        progress: Callable[[int], None] | None = None,
    ) -> collector_pb2.IngestLabelsResponse:
        """Record ground truth as (request_id, row, label) triples, `batch_size` per call; a
        label is a class name or a number. `progress` is called with the count sent so far."""
        total = collector_pb2.IngestLabelsResponse()
        batch: list[collector_pb2.Label] = []

        def send() -> None:
            answer = self._call(
                self._stub.IngestLabels, collector_pb2.IngestLabelsRequest(endpoint=endpoint, labels=batch)
            )
            total.ingested += answer.ingested
            total.replaced += answer.replaced
            batch.clear()
            if progress:
                progress(total.ingested)

        for request_id, row, value in labels:
            label = collector_pb2.Label(request_id=request_id, row=row)
            if isinstance(value, str):
                label.text = value
            else:
                label.number = float(value)
            batch.append(label)
            if len(batch) >= batch_size:
                send()
        if batch or not total.ingested:
            send()
        return total

    def stats(self, endpoint: str) -> collector_pb2.GetCaptureStatsResponse:
        """Rows, bytes, files and time span of the endpoint's captures, per deployment and version."""
        return self._call(self._stub.GetCaptureStats, collector_pb2.GetCaptureStatsRequest(endpoint=endpoint))

    def set_retention(
        self,
        endpoint: str,
        *,
        max_age_seconds: float | None = None,
        max_bytes: int | None = None,
        use_defaults: bool = False,
    ) -> collector_pb2.RetentionPolicy:
        """Change the endpoint's limits (None: unchanged, 0: no limit); the policy now in force."""
        request = collector_pb2.SetRetentionRequest(
            endpoint=endpoint, max_age_seconds=max_age_seconds, max_bytes=max_bytes, use_defaults=use_defaults
        )
        return self._call(self._stub.SetRetention, request).retention

    def get_retention(self, endpoint: str) -> collector_pb2.RetentionPolicy:
        request = collector_pb2.GetRetentionRequest(endpoint=endpoint)
        return self._call(self._stub.GetRetention, request).retention

"""gRPC servicer of mlmesh.v1.RegistryService: proto in, domain call, proto out. Nothing else."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Awaitable, Iterator
from typing import Any, TypeVar

import grpc

from services._proto.mlmesh.v1 import common_pb2, registry_pb2, registry_pb2_grpc
from services.common.convert import seconds, set_timestamp, timestamp
from services.common.errors import InvalidArgument
from services.common.server import actor_of
from services.registry import domain

T = TypeVar("T")
CHUNK_BYTES = 1024 * 1024
_STATUS = {
    domain.READY: registry_pb2.MODEL_VERSION_STATUS_READY,
    domain.ARCHIVED: registry_pb2.MODEL_VERSION_STATUS_ARCHIVED,
}


# ---------------------------------------------------------------- proto -> domain


def signature_from_proto(message: common_pb2.Signature) -> domain.Signature:
    def specs(tensors: Any) -> list[dict[str, Any]]:
        return [{"name": t.name, "datatype": t.datatype, "shape": list(t.shape)} for t in tensors]

    return domain.Signature.model_validate({"inputs": specs(message.inputs), "outputs": specs(message.outputs)})


def metadata_from_proto(message: registry_pb2.ModelVersionMetadata) -> domain.VersionMetadata:
    lineage = message.lineage
    return domain.VersionMetadata(
        name=message.name,
        framework=message.framework,
        description=message.description,
        tags=dict(message.tags),
        signature=signature_from_proto(message.signature),
        lineage=domain.Lineage(
            run_id=lineage.run_id,
            experiment=lineage.experiment,
            git_repo=lineage.git.repo,
            git_branch=lineage.git.branch,
            git_commit=lineage.git.commit,
            datasets=list(lineage.datasets),
            environment=lineage.environment,
            parent_version=lineage.parent_version,
        ),
        format=_UPLOAD_FORMATS.get(message.format) or _unknown_format(message.format),
    )


_UPLOAD_FORMATS = {registry_pb2.UPLOAD_FORMAT_FILES: "files", registry_pb2.UPLOAD_FORMAT_MLFLOW: "mlflow"}


def _unknown_format(value: int) -> str:
    raise InvalidArgument(f"upload format {value} is not FILES or MLFLOW", field="metadata.format")


# ---------------------------------------------------------------- domain -> proto


def version_to_proto(view: domain.VersionView) -> registry_pb2.ModelVersion:
    # Nested fields are filled in place: a nested message given to a constructor is built, then
    # copied in, which costs a search of 50 versions about a millisecond more.
    message = registry_pb2.ModelVersion(
        name=view.name,
        version=view.version,
        framework=view.framework,
        description=view.description,
        tags=view.tags,
        aliases=view.aliases,
        status=_STATUS[view.status],
        created_by=view.created_by,
        used_by=view.used_by,
    )
    signature = message.signature
    signature.SetInParent()
    for spec in view.signature.inputs:
        signature.inputs.add(name=spec.name, datatype=spec.datatype, shape=spec.shape)
    for spec in view.signature.outputs:
        signature.outputs.add(name=spec.name, datatype=spec.datatype, shape=spec.shape)
    lineage, into = view.lineage, message.lineage
    into.run_id, into.experiment, into.environment = lineage.run_id, lineage.experiment, lineage.environment
    into.parent_version = lineage.parent_version
    into.datasets.extend(lineage.datasets)
    git = into.git
    git.repo, git.branch, git.commit = lineage.git_repo, lineage.git_branch, lineage.git_commit
    for file in view.files:
        fill_file(message.files.add(), file)
    set_timestamp(message.created_at, view.created_at)
    set_timestamp(message.updated_at, view.updated_at)
    return message


def fill_file(into: common_pb2.FileInfo, file: domain.FileView) -> None:
    into.path, into.size, into.sha256 = file.path, file.size, file.sha256


def dataset_to_proto(view: dict[str, Any]) -> registry_pb2.Dataset:
    message = registry_pb2.Dataset(
        name=view["name"],
        version=view["version"],
        format=view["format"],
        description=view["description"],
        tags=view["tags"],
        row_count=view["row_count"],
        columns=[registry_pb2.ColumnSummary(**column) for column in view["columns"]],
        fingerprint=view["fingerprint"],
        created_by=view["created_by"],
        created_at=timestamp(view["created_at"]),
    )
    fill_file(message.file, view["file"])
    return message


def run_to_proto(view: dict[str, Any]) -> registry_pb2.Run:
    return registry_pb2.Run(
        id=view["id"],
        experiment=view["experiment"],
        name=view["name"],
        params=view["params"],
        metrics=view["metrics"],
        git=registry_pb2.GitInfo(repo=view["git_repo"], branch=view["git_branch"], commit=view["git_commit"]),
        datasets=view["datasets"],
        status=view["status"],
        started_at=timestamp(view["started_at"]),
        ended_at=timestamp(view["ended_at"]),
        created_by=view["created_by"],
    )


async def _receive(upload: Any, requests: AsyncIterator[Any], context: grpc.aio.ServicerContext) -> Any:
    """Feed an upload stream's file parts (after its metadata) into a domain upload, then commit it.

    Whatever fails, or a caller who cancels, leaves nothing behind: the commit is all or nothing,
    and a cancellation that arrives while it runs stops it before it commits.
    """
    try:
        await _receive_files(upload, requests)
        if context.cancelled():
            raise asyncio.CancelledError
        # seal: fsync, reading ONNX or MLmodel; commit: one short transaction
        return await _uncancellable(upload, upload.registry.database.run_then_short(upload.seal, upload.commit))
    except BaseException:
        upload.abort()
        raise


async def _uncancellable(upload: Any, step: Awaitable[T]) -> T:
    """Finish `step` even if the caller goes away meanwhile, then let the cancellation through;
    the upload, told it was cancelled, refuses to commit."""
    running = asyncio.ensure_future(step)
    try:
        return await asyncio.shield(running)
    except asyncio.CancelledError:
        upload.cancel()
        await asyncio.wait([running])
        raise


async def _receive_files(upload: Any, requests: AsyncIterator[Any]) -> None:
    async for request in requests:
        part = request.WhichOneof("part")
        if part is None:
            raise InvalidArgument("an upload message carried neither metadata nor file data", field="file")
        if part != "file":
            raise InvalidArgument("metadata may be sent only once, as the first message", field="metadata")
        if request.file.WhichOneof("part") == "header":
            upload.start_file(request.file.header.path)  # in the loop: a cancel cannot outrun it
        else:
            upload.write(request.file.data)


async def _first_metadata(requests: AsyncIterator[Any]) -> Any:
    async for request in requests:
        if request.WhichOneof("part") != "metadata":
            raise InvalidArgument("the first message of an upload must carry the metadata", field="metadata")
        return request.metadata
    raise InvalidArgument("the upload stream was empty: send metadata, then the files", field="metadata")


async def _file_parts(file: domain.FileView, chunks: Iterator[bytes]) -> AsyncIterator[common_pb2.FileChunk]:
    """A downloaded file as stream parts: a header naming it, then its chunks (read off the loop)."""
    yield common_pb2.FileChunk(header=common_pb2.FileHeader(path=file.path))
    while (chunk := await asyncio.to_thread(next, chunks, None)) is not None:
        yield common_pb2.FileChunk(data=chunk)


class RegistryServicer(registry_pb2_grpc.RegistryServiceServicer):
    def __init__(self, registry: domain.Registry) -> None:
        self.registry = registry
        self._short = registry.database.run_short

    async def RegisterModelVersion(self, request_iterator: Any, context: grpc.aio.ServicerContext) -> Any:
        requests = aiter(request_iterator)
        metadata = metadata_from_proto(await _first_metadata(requests))
        upload = self.registry.begin_upload(metadata, actor_of(context))
        view = await _receive(upload, requests, context)
        return registry_pb2.RegisterModelVersionResponse(model_version=version_to_proto(view))

    async def GetModelVersion(self, request: Any, context: grpc.aio.ServicerContext) -> Any:
        at = seconds(request.at, request.HasField("at"))
        view = self.registry.cached_version(request.ref, at) or await self._short(
            self.registry.get_version, request.ref, at
        )
        return registry_pb2.GetModelVersionResponse(model_version=version_to_proto(view))

    async def ListModels(self, request: Any, context: grpc.aio.ServicerContext) -> Any:
        models, token = await self._short(
            self.registry.list_models, request.name_prefix, request.page_size, request.page_token
        )
        return registry_pb2.ListModelsResponse(
            models=[
                registry_pb2.ModelSummary(
                    name=model.name,
                    latest_version=model.latest_version,
                    version_count=model.version_count,
                    aliases=model.aliases,
                    created_at=timestamp(model.created_at),
                    updated_at=timestamp(model.updated_at),
                )
                for model in models
            ],
            next_page_token=token,
        )

    async def SearchModelVersions(self, request: Any, context: grpc.aio.ServicerContext) -> Any:
        query = domain.SearchQuery(
            name_prefix=request.name_prefix,
            tags=list(request.tags),
            framework=request.framework,
            alias=request.alias,
            created_after=seconds(request.created_after, request.HasField("created_after")),
            created_before=seconds(request.created_before, request.HasField("created_before")),
            order_by=request.order_by,
            include_archived=request.include_archived,
            page_size=request.page_size,
            page_token=request.page_token,
        )
        views, token = await self._short(self.registry.search_versions, query)
        return registry_pb2.SearchModelVersionsResponse(
            model_versions=[version_to_proto(view) for view in views], next_page_token=token
        )

    async def DownloadModelVersion(self, request: Any, context: grpc.aio.ServicerContext) -> AsyncIterator[Any]:
        files = await self._short(self.registry.download, request.ref, CHUNK_BYTES)
        for file, chunks in files:
            async for part in _file_parts(file, chunks):
                yield registry_pb2.DownloadModelVersionResponse(file=part)

    async def DownloadDataset(self, request: Any, context: grpc.aio.ServicerContext) -> AsyncIterator[Any]:
        file, chunks = await self._short(self.registry.download_dataset, request.ref, CHUNK_BYTES)
        async for part in _file_parts(file, chunks):
            yield registry_pb2.DownloadDatasetResponse(file=part)

    async def UpdateModelVersion(self, request: Any, context: grpc.aio.ServicerContext) -> Any:
        view = await self._short(
            self.registry.update_version,
            request.ref,
            actor_of(context),
            set_tags=dict(request.set_tags),
            remove_tags=list(request.remove_tags),
            description=request.description if request.HasField("description") else None,
            reason=request.reason,
        )
        return registry_pb2.UpdateModelVersionResponse(model_version=version_to_proto(view))

    async def SetAlias(self, request: Any, context: grpc.aio.ServicerContext) -> Any:
        view, previous = await self._short(
            self.registry.set_alias, request.name, request.alias, request.version, actor_of(context), request.reason
        )
        return registry_pb2.SetAliasResponse(model_version=version_to_proto(view), previous_version=previous)

    async def RemoveAlias(self, request: Any, context: grpc.aio.ServicerContext) -> Any:
        previous = await self._short(
            self.registry.remove_alias, request.name, request.alias, actor_of(context), request.reason
        )
        return registry_pb2.RemoveAliasResponse(previous_version=previous)

    async def ListAliasHistory(self, request: Any, context: grpc.aio.ServicerContext) -> Any:
        changes = await self._short(self.registry.alias_history, request.name, request.alias)
        return registry_pb2.ListAliasHistoryResponse(
            changes=[
                registry_pb2.AliasChange(
                    name=change.name,
                    alias=change.alias,
                    version=change.version,
                    at=timestamp(change.at),
                    actor=change.actor,
                    reason=change.reason,
                )
                for change in changes
            ]
        )

    async def ArchiveModelVersion(self, request: Any, context: grpc.aio.ServicerContext) -> Any:
        view = await self._short(self.registry.archive_version, request.ref, actor_of(context), request.reason)
        return registry_pb2.ArchiveModelVersionResponse(model_version=version_to_proto(view))

    async def DeleteModelVersion(self, request: Any, context: grpc.aio.ServicerContext) -> Any:
        await self._short(self.registry.delete_version, request.ref, actor_of(context), request.reason)
        return registry_pb2.DeleteModelVersionResponse()

    async def AcquireUsage(self, request: Any, context: grpc.aio.ServicerContext) -> Any:
        view = await self._short(self.registry.acquire_usage, request.ref, request.deployment_id, actor_of(context))
        return registry_pb2.AcquireUsageResponse(model_version=version_to_proto(view))

    async def ReleaseUsage(self, request: Any, context: grpc.aio.ServicerContext) -> Any:
        await self._short(self.registry.release_usage, request.ref, request.deployment_id, actor_of(context))
        return registry_pb2.ReleaseUsageResponse()

    async def RegisterDataset(self, request_iterator: Any, context: grpc.aio.ServicerContext) -> Any:
        requests = aiter(request_iterator)
        metadata = await _first_metadata(requests)
        upload = self.registry.begin_dataset_upload(
            metadata.name, metadata.format, metadata.description, dict(metadata.tags), actor_of(context)
        )
        view = await _receive(upload, requests, context)
        return registry_pb2.RegisterDatasetResponse(dataset=dataset_to_proto(view))

    async def GetDataset(self, request: Any, context: grpc.aio.ServicerContext) -> Any:
        view = await self._short(self.registry.get_dataset, request.ref)
        return registry_pb2.GetDatasetResponse(dataset=dataset_to_proto(view))

    async def ListDatasets(self, request: Any, context: grpc.aio.ServicerContext) -> Any:
        views, token = await self._short(
            self.registry.list_datasets, request.name_prefix, request.page_size, request.page_token
        )
        return registry_pb2.ListDatasetsResponse(datasets=[dataset_to_proto(v) for v in views], next_page_token=token)

    async def RecordRun(self, request: Any, context: grpc.aio.ServicerContext) -> Any:
        run = request.run
        view = await self._short(
            self.registry.record_run,
            {
                "id": run.id,
                "experiment": run.experiment,
                "name": run.name,
                "params": dict(run.params),
                "metrics": dict(run.metrics),
                "git_repo": run.git.repo,
                "git_branch": run.git.branch,
                "git_commit": run.git.commit,
                "datasets": list(run.datasets),
                "status": run.status,
                "started_at": seconds(run.started_at, run.HasField("started_at")),
                "ended_at": seconds(run.ended_at, run.HasField("ended_at")),
            },
            actor_of(context),
        )
        return registry_pb2.RecordRunResponse(run=run_to_proto(view))

    async def GetRun(self, request: Any, context: grpc.aio.ServicerContext) -> Any:
        view = await self._short(self.registry.get_run, request.id)
        return registry_pb2.GetRunResponse(run=run_to_proto(view))

    async def ListAuditEntries(self, request: Any, context: grpc.aio.ServicerContext) -> Any:
        entries, token = await self._short(
            self.registry.list_audit,
            resource_prefix=request.resource_prefix,
            actor=request.actor,
            action=request.action,
            since=seconds(request.since, request.HasField("since")),
            until=seconds(request.until, request.HasField("until")),
            page_size=request.page_size,
            page_token=request.page_token,
        )
        return registry_pb2.ListAuditEntriesResponse(
            entries=[
                registry_pb2.AuditEntry(
                    id=entry.id or 0,
                    at=timestamp(entry.at),
                    actor=entry.actor,
                    action=entry.action,
                    resource=entry.resource,
                    reason=entry.reason,
                    details_json=entry.details,
                )
                for entry in entries
            ],
            next_page_token=token,
        )

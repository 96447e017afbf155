"""Building upload streams for the registry's client-streaming RPCs."""

from __future__ import annotations

from collections.abc import Iterable, Iterator

from services._proto.mlmesh.v1 import common_pb2, registry_pb2


def model_upload(
    name: str,
    files: Iterable[tuple[str, bytes]],
    *,
    chunk_bytes: int = 1024 * 1024,
    **metadata: object,
) -> Iterator[registry_pb2.RegisterModelVersionRequest]:
    yield registry_pb2.RegisterModelVersionRequest(metadata=registry_pb2.ModelVersionMetadata(name=name, **metadata))
    for path, content in files:
        yield registry_pb2.RegisterModelVersionRequest(
            file=common_pb2.FileChunk(header=common_pb2.FileHeader(path=path))
        )
        for start in range(0, len(content), chunk_bytes):
            yield registry_pb2.RegisterModelVersionRequest(
                file=common_pb2.FileChunk(data=content[start : start + chunk_bytes])
            )


def dataset_upload(
    name: str, path: str, content: bytes, **metadata: object
) -> Iterator[registry_pb2.RegisterDatasetRequest]:
    yield registry_pb2.RegisterDatasetRequest(metadata=registry_pb2.DatasetMetadata(name=name, **metadata))
    yield registry_pb2.RegisterDatasetRequest(file=common_pb2.FileChunk(header=common_pb2.FileHeader(path=path)))
    for start in range(0, len(content), 1024 * 1024):
        yield registry_pb2.RegisterDatasetRequest(file=common_pb2.FileChunk(data=content[start : start + 1024 * 1024]))

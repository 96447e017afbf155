"""gRPC servicer of mlmesh.v1.CollectorService: proto in, domain call, proto out. Nothing else."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable
from typing import Any

import grpc

from services._proto.mlmesh.v1 import collector_pb2, collector_pb2_grpc
from services.collector import domain
from services.common.convert import seconds, timestamp


def window_from_proto(request: Any) -> domain.Window:
    return domain.Window(
        endpoint=request.endpoint,
        deployment=request.deployment,
        start=seconds(request.start_time, request.HasField("start_time")),
        end=seconds(request.end_time, request.HasField("end_time")),
        columns=tuple(request.columns),
        include_labels=request.include_labels,
    )


def label_from_proto(label: collector_pb2.Label) -> domain.LabelInput:
    which = label.WhichOneof("value")
    return domain.LabelInput(
        request_id=label.request_id,
        row=label.row,
        text=label.text if which == "text" else None,
        number=label.number if which == "number" else None,
    )


def stats_to_proto(part: domain.PartStats) -> collector_pb2.CaptureStats:
    return collector_pb2.CaptureStats(
        deployment=part.deployment,
        model_version=part.model_version,
        rows=part.rows,
        bytes=part.bytes,
        files=part.files,
        first_time=timestamp(part.first_time),
        last_time=timestamp(part.last_time),
    )


def retention_to_proto(view: domain.RetentionView) -> collector_pb2.RetentionPolicy:
    return collector_pb2.RetentionPolicy(
        endpoint=view.endpoint,
        max_age_seconds=view.max_age_seconds,
        max_bytes=view.max_bytes,
        max_age_is_default=view.max_age_is_default,
        max_bytes_is_default=view.max_bytes_is_default,
    )


def counters_to_proto(counters: domain.IngestCounters) -> collector_pb2.IngestCounters:
    return collector_pb2.IngestCounters(
        rows_written=counters.rows_written,
        files_written=counters.files_written,
        messages_consumed=counters.messages_consumed,
        duplicates_skipped=counters.duplicates_skipped,
        malformed_messages=counters.malformed_messages,
        malformed_records=counters.malformed_records,
        pending_rows=counters.pending_rows,
        last_flush_at=timestamp(counters.last_flush_at) if counters.last_flush_at else None,
    )


class CollectorServicer(collector_pb2_grpc.CollectorServiceServicer):
    def __init__(
        self, collector: domain.Collector, counters: domain.IngestCounters, retention_changed: Callable[[], None]
    ) -> None:
        self.collector = collector
        self.counters = counters
        self.retention_changed = retention_changed
        self._run = collector.database.run

    async def QueryCaptures(self, request: Any, context: grpc.aio.ServicerContext) -> AsyncIterator[Any]:
        query = await self._run(self.collector.query, window_from_proto(request))
        yield collector_pb2.QueryCapturesResponse(arrow_ipc=query.schema.serialize().to_pybytes())
        # Files are read a batch at a time, off the loop, as the client takes the answers.
        while (batch := await asyncio.to_thread(next, query.batches, None)) is not None:
            yield collector_pb2.QueryCapturesResponse(arrow_ipc=batch.serialize().to_pybytes(), rows=batch.num_rows)

    async def ExportCaptures(self, request: Any, context: grpc.aio.ServicerContext) -> Any:
        window = window_from_proto(request)
        view = await asyncio.to_thread(self.collector.export, window, request.dataset, request.description)
        return collector_pb2.ExportCapturesResponse(
            dataset_ref=view.dataset_ref, dataset=view.dataset, version=view.version, rows=view.rows, bytes=view.bytes
        )

    async def IngestLabels(self, request: Any, context: grpc.aio.ServicerContext) -> Any:
        labels = [label_from_proto(label) for label in request.labels]
        ingested, replaced = await self._run(self.collector.ingest_labels, request.endpoint, labels)
        return collector_pb2.IngestLabelsResponse(ingested=ingested, replaced=replaced)

    async def GetCaptureStats(self, request: Any, context: grpc.aio.ServicerContext) -> Any:
        view = await self._run(self.collector.stats, request.endpoint)
        return collector_pb2.GetCaptureStatsResponse(
            endpoint=view.endpoint,
            total=stats_to_proto(view.total),
            partitions=[stats_to_proto(part) for part in view.partitions],
            labels=view.labels,
            retention=retention_to_proto(view.retention),
            ingest=counters_to_proto(self.counters),
        )

    async def SetRetention(self, request: Any, context: grpc.aio.ServicerContext) -> Any:
        view = await self._run(
            self.collector.set_retention,
            request.endpoint,
            request.max_age_seconds if request.HasField("max_age_seconds") else None,
            request.max_bytes if request.HasField("max_bytes") else None,
            request.use_defaults,
        )
        self.retention_changed()
        return collector_pb2.SetRetentionResponse(retention=retention_to_proto(view))

    async def GetRetention(self, request: Any, context: grpc.aio.ServicerContext) -> Any:
        view = await self._run(self.collector.retention, request.endpoint)
        return collector_pb2.GetRetentionResponse(retention=retention_to_proto(view))

"""gRPC servicer of mlmesh.v1.ProfilerService: proto in, domain call, proto out. Nothing else."""

from __future__ import annotations

from collections.abc import AsyncIterator
from dataclasses import asdict
from typing import Any

import grpc

from services._proto.mlmesh.v1 import profiler_pb2, profiler_pb2_grpc
from services.common.convert import timestamp
from services.common.server import Finished, reports_of
from services.profiler import domain
from services.profiler.runtimes import RuntimeSize

STATUSES = {
    "running": profiler_pb2.PROFILE_STATUS_RUNNING,
    "completed": profiler_pb2.PROFILE_STATUS_COMPLETED,
    "failed": profiler_pb2.PROFILE_STATUS_FAILED,
}


def spec_from_proto(request: profiler_pb2.ProfileModelRequest) -> domain.ProfileSpec:
    return domain.ProfileSpec(
        model_ref=request.model_ref,
        target=request.target,
        image=request.image,
        sample_dataset=request.sample_dataset,
        rows_per_request=request.rows_per_request,
        p99_ms=request.slo.p99_ms,
        throughput_rps=request.slo.throughput_rps,
        concurrency=tuple(request.concurrency),
        sizes=tuple(
            RuntimeSize(size.cpus, size.memory_mb, size.threads, size.max_batch_rows) for size in request.sizes
        ),
        step_seconds=request.step_seconds,
        warmup_seconds=request.warmup_seconds,
    )


def size_to_proto(size: RuntimeSize) -> profiler_pb2.Size:
    return profiler_pb2.Size(**asdict(size))


def profile_to_proto(view: domain.ProfileView) -> profiler_pb2.Profile:
    return profiler_pb2.Profile(
        name=f"profiles/{view.id}",
        id=view.id,
        model_ref=view.model_ref,
        model_name=view.model_name,
        model_version=view.model_version,
        target=view.target,
        image=view.image,
        slo=profiler_pb2.ServiceLevel(p99_ms=view.spec.p99_ms, throughput_rps=view.spec.throughput_rps),
        rows_per_request=view.spec.rows_per_request,
        samples=view.samples,
        load_generator=view.load_generator,
        status=STATUSES[view.status],
        reason=view.reason,
        sizes=[
            profiler_pb2.SizeResult(
                size=size_to_proto(result.size),
                start_seconds=result.start_seconds,
                capacity_rps=result.capacity_rps,
                steps=[profiler_pb2.ProfileStep(**asdict(step)) for step in result.steps],
            )
            for result in view.sizes
        ],
        recommendation=profiler_pb2.Recommendation(**asdict(view.recommendation)),
        seconds=view.seconds,
        created_at=timestamp(view.created_at),
    )


def progress_to_proto(progress: domain.Progress) -> profiler_pb2.ProfileModelResponse:
    step = profiler_pb2.ProfileStep(**asdict(progress.step)) if progress.step else None
    return profiler_pb2.ProfileModelResponse(
        progress=profiler_pb2.ProfileProgress(
            message=progress.message, done=progress.done, total=progress.total, step=step
        )
    )


class ProfilerServicer(profiler_pb2_grpc.ProfilerServiceServicer):
    def __init__(self, profiles: domain.Profiles) -> None:
        self.profiles = profiles

    async def ProfileModel(self, request: Any, context: grpc.aio.ServicerContext) -> AsyncIterator[Any]:
        spec = spec_from_proto(request)
        async for item in reports_of(lambda report: self.profiles.profile(spec, report)):
            if isinstance(item, Finished):
                yield profiler_pb2.ProfileModelResponse(profile=profile_to_proto(item.result))
            else:
                yield progress_to_proto(item)

    async def GetProfile(self, request: Any, context: grpc.aio.ServicerContext) -> Any:
        view = await self.profiles.database.run(self.profiles.get, request.name)
        return profiler_pb2.GetProfileResponse(profile=profile_to_proto(view))

    async def ListProfiles(self, request: Any, context: grpc.aio.ServicerContext) -> Any:
        views, token = await self.profiles.database.run(
            self.profiles.list,
            request.model_name,
            request.model_version,
            request.completed_only,
            request.page_size,
            request.page_token,
        )
        return profiler_pb2.ListProfilesResponse(profiles=[profile_to_proto(v) for v in views], next_page_token=token)

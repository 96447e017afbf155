"""gRPC servicer of mlmesh.v1.DriftService: proto in, domain call, proto out. Nothing else."""

from __future__ import annotations

import asyncio
import math
from typing import Any

import grpc

from services._proto.mlmesh.v1 import drift_pb2, drift_pb2_grpc
from services.common.convert import seconds, timestamp
from services.drift import domain


def window_from_proto(window: drift_pb2.TimeWindow) -> tuple[float, float]:
    """(start, end) in Unix seconds; an unset bound is NaN, which the domain refuses as no time."""
    start = seconds(window.start, window.HasField("start"))
    end = seconds(window.end, window.HasField("end"))
    return (math.nan if start is None else start, math.nan if end is None else end)


def spec_from_proto(request: drift_pb2.CreateMonitorRequest) -> domain.MonitorSpec:
    window = None
    if request.HasField("baseline_window"):
        window = window_from_proto(request.baseline_window)
    return domain.MonitorSpec(
        name=request.name,
        endpoint=request.endpoint,
        model=request.model,
        baseline_dataset=request.baseline_dataset,
        baseline_window=window,
        features=tuple(request.features),
        exclude=tuple(request.exclude),
        window_rows=request.window_rows,
        window_seconds=request.window_seconds,
        schedule_seconds=request.schedule_seconds,
        thresholds=domain.thresholds_dict(request.thresholds),
        consecutive=request.consecutive or 1,
    )


def monitor_to_proto(view: domain.MonitorView) -> drift_pb2.Monitor:
    return drift_pb2.Monitor(
        name=view.name,
        endpoint=view.endpoint,
        model=view.model,
        baseline=view.baseline,
        baseline_rows=view.baseline_rows,
        features=view.features,
        kinds=view.kinds,
        window_rows=view.window_rows,
        window_seconds=view.window_seconds,
        schedule_seconds=view.schedule_seconds,
        thresholds=drift_pb2.DriftThresholds(**domain.thresholds_dict(view.thresholds)),
        consecutive=view.consecutive,
        created_at=timestamp(view.created_at),
        last_checked_at=timestamp(view.last_checked_at) if view.last_checked_at is not None else None,
    )


OPTIONAL_SCORES = (
    "wasserstein",
    "psi",
    "ks_statistic",
    "out_of_range_share",
    "chi2_statistic",
    "js_distance",
    "unseen_share",
    "p_value",
    "p_value_adjusted",
    "effect_ratio",
)


def feature_to_proto(name: str, values: dict[str, Any]) -> drift_pb2.FeatureDrift:
    scores = {key: values[key] for key in OPTIONAL_SCORES if values.get(key) is not None}
    return drift_pb2.FeatureDrift(
        name=name,
        baseline_column=values.get("baseline_column", name),
        kind=values.get("kind", ""),
        drifted=bool(values.get("drifted")),
        unseen_categories=[str(category) for category in values.get("unseen_categories") or ()],
        missing_rate=values.get("missing_rate") or 0.0,
        baseline_missing_rate=values.get("baseline_missing_rate") or 0.0,
        note=values.get("note") or "",
        **scores,
    )


def result_to_proto(view: domain.ResultView) -> drift_pb2.DriftResult:
    return drift_pb2.DriftResult(
        id=view.id,
        monitor=view.monitor,
        endpoint=view.endpoint,
        model=view.model,
        baseline=view.baseline,
        window_start=timestamp(view.window_start),
        window_end=timestamp(view.window_end),
        rows=view.rows,
        drifted=view.drifted,
        drift_detected=view.drift_detected,
        drift_coefficient=view.drift_coefficient,
        drifted_features=view.drifted_features,
        features=[feature_to_proto(name, values) for name, values in view.features.items()],
        checked_at=timestamp(view.checked_at),
    )


class DriftServicer(drift_pb2_grpc.DriftServiceServicer):
    def __init__(self, monitors: domain.DriftMonitors) -> None:
        self.monitors = monitors

    async def CreateMonitor(self, request: Any, context: grpc.aio.ServicerContext) -> Any:
        # Reads the baseline and summarises it: work for a thread, not the event loop.
        view = await asyncio.to_thread(self.monitors.create_monitor, spec_from_proto(request))
        return drift_pb2.CreateMonitorResponse(monitor=monitor_to_proto(view))

    async def GetMonitor(self, request: Any, context: grpc.aio.ServicerContext) -> Any:
        view = await self.monitors.database.run(self.monitors.get_monitor, request.name)
        return drift_pb2.GetMonitorResponse(monitor=monitor_to_proto(view))

    async def ListMonitors(self, request: Any, context: grpc.aio.ServicerContext) -> Any:
        views, token = await self.monitors.database.run(
            self.monitors.list_monitors, request.endpoint, request.page_size, request.page_token
        )
        return drift_pb2.ListMonitorsResponse(monitors=[monitor_to_proto(v) for v in views], next_page_token=token)

    async def DeleteMonitor(self, request: Any, context: grpc.aio.ServicerContext) -> Any:
        await self.monitors.database.run(self.monitors.delete_monitor, request.name)
        return drift_pb2.DeleteMonitorResponse()

    async def CheckDrift(self, request: Any, context: grpc.aio.ServicerContext) -> Any:
        end = seconds(request.window_end, request.HasField("window_end"))
        view = await asyncio.to_thread(self.monitors.check, request.name, end)
        return drift_pb2.CheckDriftResponse(result=result_to_proto(view))

    async def ListDriftResults(self, request: Any, context: grpc.aio.ServicerContext) -> Any:
        views, token = await self.monitors.database.run(
            self.monitors.list_results, request.name, request.page_size, request.page_token
        )
        return drift_pb2.ListDriftResultsResponse(results=[result_to_proto(v) for v in views], next_page_token=token)

    async def BackfillDrift(self, request: Any, context: grpc.aio.ServicerContext) -> Any:
        start, end = window_from_proto(request.range)
        views = await asyncio.to_thread(
            self.monitors.backfill,
            request.name,
            start,
            end,
            request.step_seconds,
        )
        return drift_pb2.BackfillDriftResponse(results=[result_to_proto(view) for view in views])

"""gRPC servicer of mlmesh.v1.AutomationService: proto in, domain call, proto out. Nothing else."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import grpc

from services._proto.mlmesh.v1 import automation_pb2, automation_pb2_grpc
from services.automation import domain
from services.common.convert import timestamp

STATUSES = {
    domain.RUNNING: automation_pb2.RUN_STATUS_RUNNING,
    domain.COMPLETED: automation_pb2.RUN_STATUS_COMPLETED,
    domain.FAILED: automation_pb2.RUN_STATUS_FAILED,
}


def spec_from_proto(request: automation_pb2.CreatePolicyRequest) -> domain.PolicySpec:
    trigger, train, evaluation = request.trigger, request.training, request.evaluation
    return domain.PolicySpec(
        name=request.name,
        model=request.model,
        trigger={
            "kind": trigger.kind,
            "monitor": trigger.monitor,
            "dataset": trigger.dataset,
            "schedule_seconds": trigger.schedule_seconds,
        },
        training={
            "command": list(train.command),
            "dataset": train.dataset,
            "working_dir": train.working_dir,
            "timeout_seconds": train.timeout_seconds,
            "environment": train.environment,
        },
        evaluation={
            "holdout_dataset": evaluation.holdout_dataset,
            "label_column": evaluation.label_column,
            "metric": evaluation.metric,
            "min_delta": evaluation.min_delta,
        },
        rollout={
            "endpoint": request.rollout.endpoint,
            "shadow_seconds": request.rollout.shadow_seconds,
            "canary_percent": request.rollout.canary_percent,
            "canary_seconds": request.rollout.canary_seconds,
            "max_error_rate": request.rollout.max_error_rate,
            "max_latency_ratio": request.rollout.max_latency_ratio,
            "min_requests": request.rollout.min_requests,
        },
    )


def policy_to_proto(view: domain.PolicyView) -> automation_pb2.Policy:
    return automation_pb2.Policy(
        name=view.name,
        model=view.model,
        trigger=automation_pb2.Trigger(**view.trigger),
        training=automation_pb2.Training(**view.training),
        evaluation=automation_pb2.Evaluation(**view.evaluation),
        rollout=automation_pb2.Rollout(**view.rollout) if view.rollout else None,
        created_at=timestamp(view.created_at),
        last_run_at=timestamp(view.last_run_at) if view.last_run_at else None,
    )


def run_to_proto(view: domain.RunView) -> automation_pb2.RetrainRun:
    return automation_pb2.RetrainRun(
        id=view.id,
        policy=view.policy,
        model=view.model,
        trigger=view.trigger,
        status=STATUSES[view.status],
        message=view.message,
        produced_version=view.produced_version,
        champion_version=view.champion_version,
        metric=view.metric,
        challenger_score=view.challenger_score or 0.0,
        champion_score=view.champion_score or 0.0,
        promoted=view.promoted,
        training_metrics=view.training_metrics,
        log_tail=view.log_tail,
        rollout=view.rollout,
        rollout_figures=view.rollout_figures,
        started_at=timestamp(view.started_at),
        finished_at=timestamp(view.finished_at) if view.finished_at else None,
    )


class AutomationServicer(automation_pb2_grpc.AutomationServiceServicer):
    def __init__(self, automation: domain.Automation, launch: Callable[[str], None]) -> None:
        self.automation = automation
        self.launch = launch
        """Runs a started run in the background."""

    async def CreatePolicy(self, request: Any, context: grpc.aio.ServicerContext) -> Any:
        view = await self.automation.database.run(self.automation.create_policy, spec_from_proto(request))
        return automation_pb2.CreatePolicyResponse(policy=policy_to_proto(view))

    async def GetPolicy(self, request: Any, context: grpc.aio.ServicerContext) -> Any:
        view = await self.automation.database.run(self.automation.get_policy, request.name)
        return automation_pb2.GetPolicyResponse(policy=policy_to_proto(view))

    async def ListPolicies(self, request: Any, context: grpc.aio.ServicerContext) -> Any:
        views, token = await self.automation.database.run(
            self.automation.list_policies, request.page_size, request.page_token
        )
        return automation_pb2.ListPoliciesResponse(policies=[policy_to_proto(v) for v in views], next_page_token=token)

    async def DeletePolicy(self, request: Any, context: grpc.aio.ServicerContext) -> Any:
        await self.automation.database.run(self.automation.delete_policy, request.name)
        return automation_pb2.DeletePolicyResponse()

    async def StartRetrainRun(self, request: Any, context: grpc.aio.ServicerContext) -> Any:
        view = await self.automation.database.run(self.automation.start_run, request.policy)
        self.launch(view.id)
        return automation_pb2.StartRetrainRunResponse(run=run_to_proto(view))

    async def GetRetrainRun(self, request: Any, context: grpc.aio.ServicerContext) -> Any:
        view = await self.automation.database.run(self.automation.get_run, request.id)
        return automation_pb2.GetRetrainRunResponse(run=run_to_proto(view))

    async def ListRetrainRuns(self, request: Any, context: grpc.aio.ServicerContext) -> Any:
        views, token = await self.automation.database.run(
            self.automation.list_runs, request.policy, request.page_size, request.page_token
        )
        return automation_pb2.ListRetrainRunsResponse(runs=[run_to_proto(v) for v in views], next_page_token=token)

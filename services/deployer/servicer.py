"""gRPC servicer of mlmesh.v1.DeployerService: proto in, domain call, proto out. Nothing else."""

from __future__ import annotations

import asyncio
import time
from typing import Any

import grpc

from services._proto.mlmesh.v1 import deployer_pb2, deployer_pb2_grpc
from services.common.convert import timestamp
from services.common.errors import FailedPrecondition, InvalidArgument, NotFound
from services.deployer import domain
from services.deployer.batch import BatchRunner
from services.deployer.reconciler import Reconciler

DELETE_WAIT_SECONDS = 60.0
MAX_LOG_LINES = 10_000

_DEPLOYMENT_STATUS = {
    domain.CREATING: deployer_pb2.DEPLOYMENT_STATUS_CREATING,
    domain.READY: deployer_pb2.DEPLOYMENT_STATUS_READY,
    domain.UNHEALTHY: deployer_pb2.DEPLOYMENT_STATUS_UNHEALTHY,
    domain.FAILED: deployer_pb2.DEPLOYMENT_STATUS_FAILED,
    domain.DELETING: deployer_pb2.DEPLOYMENT_STATUS_DELETING,
}
_REPLICA_STATUS = {
    domain.STARTING: deployer_pb2.REPLICA_STATUS_STARTING,
    domain.REPLICA_READY: deployer_pb2.REPLICA_STATUS_READY,
    domain.DOWN: deployer_pb2.REPLICA_STATUS_DOWN,
    domain.STOPPED: deployer_pb2.REPLICA_STATUS_STOPPED,
}


def spec_from_proto(request: deployer_pb2.CreateDeploymentRequest) -> domain.DeploymentSpec:
    return domain.DeploymentSpec(
        endpoint=request.endpoint,
        deployment=request.deployment or "blue",
        model_ref=request.model_ref,
        target=request.target or "local",
        cpus=request.resources.cpus,
        memory_mb=request.resources.memory_mb,
        max_batch_rows=request.resources.max_batch_rows,
        replicas=request.replicas or (0 if request.recommended_resources else 1),
        recommended_resources=request.recommended_resources,
        traffic=request.traffic if request.HasField("traffic") else None,
        capture=request.capture,
        image=request.image,
    )


def deployment_to_proto(view: domain.DeploymentView) -> deployer_pb2.Deployment:
    return deployer_pb2.Deployment(
        endpoint=view.endpoint,
        name=view.name,
        model_ref=view.model_ref,
        model_name=view.model_name,
        model_version=view.model_version,
        target=view.target,
        resources=deployer_pb2.Resources(
            cpus=view.cpus, memory_mb=view.memory_mb, max_batch_rows=view.max_batch_rows, profile=view.profile
        ),
        replicas=view.replicas,
        status=_DEPLOYMENT_STATUS[view.status],
        message=view.message,
        traffic=view.traffic,
        mirror=view.mirror,
        capture=view.capture,
        image=view.image,
        replica_states=[
            deployer_pb2.Replica(
                index=replica.index,
                status=_REPLICA_STATUS[replica.status],
                grpc_address=replica.grpc_address,
                http_address=replica.http_address,
                instance=replica.instance,
                restarts=replica.restarts,
                message=replica.message,
            )
            for replica in view.replica_states
        ],
        created_at=timestamp(view.created_at),
        updated_at=timestamp(view.updated_at),
    )


def endpoint_to_proto(view: domain.EndpointView) -> deployer_pb2.Endpoint:
    return deployer_pb2.Endpoint(
        name=view.name,
        grpc_address=view.grpc_address,
        http_address=view.http_address,
        traffic=view.traffic,
        mirror=view.mirror,
        deployments=[deployment_to_proto(deployment) for deployment in view.deployments],
        created_at=timestamp(view.created_at),
    )


_BATCH_STATUS = {
    domain.QUEUED: deployer_pb2.BATCH_JOB_STATUS_QUEUED,
    domain.RUNNING: deployer_pb2.BATCH_JOB_STATUS_RUNNING,
    domain.COMPLETED: deployer_pb2.BATCH_JOB_STATUS_COMPLETED,
    domain.BATCH_FAILED: deployer_pb2.BATCH_JOB_STATUS_FAILED,
}


def batch_spec_from_proto(request: deployer_pb2.CreateBatchJobRequest) -> domain.BatchSpec:
    return domain.BatchSpec(
        model_ref=request.model_ref,
        endpoint=request.endpoint,
        inputs=tuple(request.inputs),
        dataset=request.dataset,
        output_dir=request.output_dir,
        mini_batch_rows=request.mini_batch_rows or 1000,
        workers=request.workers or 2,
        columns=tuple(request.columns),
    )


def batch_job_to_proto(view: domain.BatchJobView) -> deployer_pb2.BatchJob:
    return deployer_pb2.BatchJob(
        id=view.id,
        model_ref=view.model_ref,
        model_name=view.model_name,
        model_version=view.model_version,
        endpoint=view.endpoint,
        inputs=view.inputs,
        dataset=view.dataset,
        output_dir=view.output_dir,
        mini_batch_rows=view.mini_batch_rows,
        workers=view.workers,
        status=_BATCH_STATUS[view.status],
        message=view.message,
        parts_total=view.parts_total,
        parts_done=view.parts_done,
        rows_total=view.rows_total,
        created_at=timestamp(view.created_at),
        finished_at=timestamp(view.finished_at),
    )


class DeployerServicer(deployer_pb2_grpc.DeployerServiceServicer):
    def __init__(self, deployer: domain.Deployer, reconciler: Reconciler, batches: BatchRunner) -> None:
        self.deployer = deployer
        self.reconciler = reconciler
        self.batches = batches
        self._run = deployer.database.run

    async def CreateDeployment(self, request: Any, context: grpc.aio.ServicerContext) -> Any:
        view = await self._run(self.deployer.create_deployment, spec_from_proto(request))
        self.reconciler.kick()
        return deployer_pb2.CreateDeploymentResponse(deployment=deployment_to_proto(view))

    async def GetEndpoint(self, request: Any, context: grpc.aio.ServicerContext) -> Any:
        view = await self._run(self.deployer.get_endpoint, request.name)
        return deployer_pb2.GetEndpointResponse(endpoint=endpoint_to_proto(view))

    async def ListEndpoints(self, request: Any, context: grpc.aio.ServicerContext) -> Any:
        views, token = await self._run(self.deployer.list_endpoints, request.page_size, request.page_token)
        return deployer_pb2.ListEndpointsResponse(
            endpoints=[endpoint_to_proto(view) for view in views], next_page_token=token
        )

    async def SetTraffic(self, request: Any, context: grpc.aio.ServicerContext) -> Any:
        view = await self._run(self.deployer.set_traffic, request.endpoint, dict(request.traffic), dict(request.mirror))
        self.reconciler.kick()
        return deployer_pb2.SetTrafficResponse(endpoint=endpoint_to_proto(view))

    async def DeleteDeployment(self, request: Any, context: grpc.aio.ServicerContext) -> Any:
        await self._delete(request.endpoint, request.deployment or None)
        return deployer_pb2.DeleteDeploymentResponse()

    async def DeleteEndpoint(self, request: Any, context: grpc.aio.ServicerContext) -> Any:
        await self._delete(request.name, None)
        return deployer_pb2.DeleteEndpointResponse()

    async def _delete(self, endpoint: str, deployment: str | None) -> None:
        """Mark, then wait (a while) for the reconciler to drain and stop what was marked."""
        names = await self._run(self.deployer.mark_deleting, endpoint, deployment)
        deadline = time.monotonic() + DELETE_WAIT_SECONDS
        while time.monotonic() < deadline:
            self.reconciler.kick()
            remaining = await self._run(self._remaining, endpoint, names)
            if not remaining:
                return
            await asyncio.sleep(0.1)

    def _remaining(self, endpoint: str, names: list[str]) -> list[str]:
        if self.deployer.endpoint_gone(endpoint):
            return []
        present = {row.name for row, _ in self.deployer.deployment_rows(endpoint)}
        return [name for name in names if name in present]

    async def GetDeploymentLogs(self, request: Any, context: grpc.aio.ServicerContext) -> Any:
        lines = request.lines or 100
        if not 1 <= lines <= MAX_LOG_LINES:
            raise InvalidArgument(f"lines must be between 1 and {MAX_LOG_LINES}", field="lines")
        view = await self._run(self.deployer.deployment_view, request.endpoint, request.deployment or "blue")
        if not 0 <= request.replica < max(view.replicas, len(view.replica_states)):
            raise NotFound(
                f"{view.endpoint}/{view.name} has replicas 0-{view.replicas - 1}, not {request.replica}",
                field="replica",
            )
        found = await self.reconciler.replica_logs(view.endpoint, view.name, request.replica, lines)
        return deployer_pb2.GetDeploymentLogsResponse(lines=found)

    async def CreateBatchJob(self, request: Any, context: grpc.aio.ServicerContext) -> Any:
        if not self.batches.nats_url:
            raise FailedPrecondition("batch scoring needs NATS: start the deployer with MLMESH_NATS_URL")
        view = await self._run(self.deployer.create_batch_job, batch_spec_from_proto(request))
        self.batches.kick()
        return deployer_pb2.CreateBatchJobResponse(job=batch_job_to_proto(view))

    async def GetBatchJob(self, request: Any, context: grpc.aio.ServicerContext) -> Any:
        view = await self._run(self.deployer.get_batch_job, request.id)
        return deployer_pb2.GetBatchJobResponse(job=batch_job_to_proto(view))

    async def ListBatchJobs(self, request: Any, context: grpc.aio.ServicerContext) -> Any:
        views, token = await self._run(self.deployer.list_batch_jobs, request.page_size, request.page_token)
        return deployer_pb2.ListBatchJobsResponse(
            jobs=[batch_job_to_proto(view) for view in views], next_page_token=token
        )

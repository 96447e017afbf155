"""Batch scoring: a job's rows go through a JetStream work queue to worker processes.

The runner (in the deployer) rewrites a job's inputs as Parquet with one row group per
mini-batch, queues one message per mini-batch on stream MLMESH_BATCH (work-queue retention,
`Nats-Msg-Id` = job:part), and starts the workers. A worker (`python -m services.deployer.batch`)
takes one mini-batch at a time, scores it (onnxruntime in process, or the endpoint's router),
writes `part-NNNNN.parquet` under a temporary name and renames it into place, then acks. A
worker killed mid-way leaves its mini-batch unacked; JetStream gives it to another worker after
the ack wait, which writes the same part again, so the output holds every row exactly once.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.csv
import pyarrow.parquet as pq
from nats.js.api import ConsumerConfig, RetentionPolicy, StorageType, StreamConfig

from services.common import bus
from services.common.server import prepare_process
from services.deployer import domain, local
from services.deployer.settings import BatchWorkerSettings

log = logging.getLogger(__name__)
STREAM = "MLMESH_BATCH"
SUBJECT_PREFIX = "mlmesh.batch."
WORKER_MODULE = "services.deployer.batch"
FAILED_DIR = "_failed"
ROW_COLUMN = "row"


def stream_config() -> StreamConfig:
    return StreamConfig(
        name=STREAM,
        subjects=[f"{SUBJECT_PREFIX}>"],
        retention=RetentionPolicy.WORK_QUEUE,
        storage=StorageType.FILE,
        duplicate_window=120,
    )


def part_name(index: int) -> str:
    return f"part-{index:05d}.parquet"


@dataclass(frozen=True)
class Plan:
    parts: list[dict[str, Any]]
    """One per mini-batch: index, file (the rewritten Parquet), row_group, first_row, rows."""
    rows: int


def prepare(inputs: list[str], work_dir: Path, mini_batch_rows: int) -> Plan:
    """Rewrite the inputs as Parquet files whose row groups are the mini-batches; the plan."""
    work_dir.mkdir(parents=True, exist_ok=True)
    parts: list[dict[str, Any]] = []
    first_row = 0
    for number, source in enumerate(inputs):
        path = Path(source)
        table = pyarrow.csv.read_csv(path) if path.suffix.lower() == ".csv" else pq.read_table(path)
        target = work_dir / f"input-{number:05d}.parquet"
        pq.write_table(table, target, row_group_size=mini_batch_rows)
        metadata = pq.ParquetFile(target).metadata
        for group in range(metadata.num_row_groups):
            rows = metadata.row_group(group).num_rows
            parts.append(
                {"index": len(parts), "file": str(target), "row_group": group, "first_row": first_row, "rows": rows}
            )
            first_row += rows
    return Plan(parts, first_row)


def feature_matrix(table: pa.Table, columns: list[str], dtype: np.dtype[Any]) -> np.ndarray:
    """The columns (default: every numeric one) as a [rows, columns] matrix of `dtype`."""
    if not columns:
        columns = [
            field.name for field in table.schema if pa.types.is_integer(field.type) or pa.types.is_floating(field.type)
        ]
    missing = [column for column in columns if column not in table.column_names]
    if missing:
        raise ValueError(f"input has no column {', '.join(missing)}; it has {', '.join(table.column_names)}")
    if not columns:
        raise ValueError("input has no numeric column; name the columns to score")
    return np.column_stack([table.column(column).to_numpy(zero_copy_only=False) for column in columns]).astype(dtype)


def output_table(first_row: int, outputs: dict[str, np.ndarray]) -> pa.Table:
    """Row numbers, then each output: one column per value of a row (`name` or `name_k`)."""
    rows = next(iter(outputs.values())).shape[0] if outputs else 0
    columns: dict[str, Any] = {ROW_COLUMN: np.arange(first_row, first_row + rows, dtype=np.int64)}
    for name, values in outputs.items():
        flat = values.reshape(rows, -1) if values.ndim != 1 else values.reshape(rows, 1)
        if flat.shape[1] == 1:
            columns[name] = flat[:, 0]
        else:
            for k in range(flat.shape[1]):
                columns[f"{name}_{k}"] = flat[:, k]
    return pa.table(columns)


# ---------------------------------------------------------------- the runner, in the deployer


class BatchRunner:
    """Starts queued jobs, watches running ones, and finishes them."""

    def __init__(
        self,
        deployer: domain.Deployer,
        processes: local.LocalProcesses,
        registry: Any,
        nats_url: str | None,
        *,
        ack_wait_seconds: float,
        max_deliver: int = 5,
        interval_seconds: float = 0.5,
    ) -> None:
        self.deployer = deployer
        self.processes = processes
        self.registry = registry
        self.nats_url = nats_url
        self.ack_wait_seconds = ack_wait_seconds
        self.max_deliver = max_deliver
        self.interval_seconds = interval_seconds
        self.jobs_dir = processes.home / "deployer" / "batch"
        self._wake = asyncio.Event()

    def kick(self) -> None:
        self._wake.set()

    async def run(self) -> None:
        if not self.nats_url:
            log.warning("batch scoring is off: it needs NATS (MLMESH_NATS_URL)")
            return
        connection = await bus.connect_with_retry(self.nats_url, name="deployer-batch")
        try:
            jetstream = connection.jetstream(timeout=10)
            await bus.ensure_stream(jetstream, stream_config())
            while True:
                try:
                    for job in await self._db(self.deployer.active_batch_jobs):
                        await self._advance(jetstream, job)
                except Exception:  # one bad pass must not stop batch scoring
                    log.exception("batch pass failed")
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._wake.wait(), self.interval_seconds)
                self._wake.clear()
        finally:
            await connection.close()

    async def _db(self, function: Any, *args: Any) -> Any:
        return await self.deployer.database.run(function, *args)

    async def _advance(self, jetstream: Any, job: domain.BatchJobView) -> None:
        if job.status == domain.QUEUED:
            try:
                await self._start(jetstream, job)
            except Exception as error:
                log.exception("batch job %s could not start", job.id)
                await self._db(self.deployer.finish_batch, job.id, f"could not start: {error}")
            return
        done, failure = await asyncio.to_thread(scan_output, Path(job.output_dir))
        if failure:
            await self._finish(jetstream, job, failure)
            return
        if done >= job.parts_total:
            await self._finish(jetstream, job, None)
            return
        workers = [
            instance if local.running(instance, WORKER_MODULE) else await asyncio.to_thread(self._spawn_worker, job, n)
            for n, instance in enumerate(job.worker_instances)
        ]
        if done != job.parts_done or workers != job.worker_instances:
            await self._db(self.deployer.batch_progress, job.id, done, workers)

    async def _start(self, jetstream: Any, job: domain.BatchJobView) -> None:
        work_dir = self.jobs_dir / job.id
        inputs = job.inputs
        if job.dataset:
            downloaded = await asyncio.to_thread(self.registry.download_dataset, job.dataset, work_dir / "dataset")
            inputs = [str(downloaded)]
        plan = await asyncio.to_thread(prepare, inputs, work_dir, job.mini_batch_rows)
        subject = f"{SUBJECT_PREFIX}{job.id}"
        await jetstream.add_consumer(
            STREAM,
            ConsumerConfig(
                durable_name=_consumer(job.id),
                filter_subject=subject,
                ack_wait=self.ack_wait_seconds,
                max_deliver=self.max_deliver + 1,  # the worker decides the last attempt itself
            ),
        )
        for part in plan.parts:
            await jetstream.publish(
                subject, json.dumps(part).encode(), headers={"Nats-Msg-Id": f"{job.id}:{part['index']}"}
            )
        await asyncio.to_thread(Path(job.output_dir).mkdir, parents=True, exist_ok=True)
        if job.model_name:
            _, model_file = await asyncio.to_thread(
                self.registry.fetch_onnx, f"{job.model_name}:{job.model_version}", self.processes.home / "runtime-cache"
            )
            (work_dir / "model").write_text(str(model_file))
        workers = [await asyncio.to_thread(self._spawn_worker, job, n) for n in range(job.workers)]
        await self._db(self.deployer.batch_started, job.id, len(plan.parts), plan.rows, workers)
        log.info(
            "batch job %s: %d rows in %d mini-batches, %d workers", job.id, plan.rows, len(plan.parts), job.workers
        )

    def _spawn_worker(self, job: domain.BatchJobView, number: int) -> str:
        work_dir = self.jobs_dir / job.id
        settings = {
            "MLMESH_BATCH_WORKER_JOB_ID": job.id,
            "MLMESH_BATCH_WORKER_WORK_DIR": str(work_dir),
            "MLMESH_BATCH_WORKER_OUTPUT_DIR": job.output_dir,
            "MLMESH_BATCH_WORKER_COLUMNS": ",".join(job.columns),
            "MLMESH_BATCH_WORKER_MAX_DELIVER": str(self.max_deliver),
        }
        if job.endpoint:
            settings["MLMESH_BATCH_WORKER_ENDPOINT"] = job.endpoint
            settings["MLMESH_BATCH_WORKER_ENDPOINT_ADDRESS"] = self.deployer.endpoint_address(job.endpoint)
        else:
            settings["MLMESH_BATCH_WORKER_MODEL_FILE"] = (work_dir / "model").read_text()
        log_file = self.processes.log_dir / "batch" / f"{job.id}-{number}.log"
        process = self.processes.spawn(WORKER_MODULE, settings, log_file, f"batch-{job.id}-{number}")
        return local.instance_of(process)

    async def _finish(self, jetstream: Any, job: domain.BatchJobView, failure: str | None) -> None:
        for instance in job.worker_instances:
            await asyncio.to_thread(local.stop, instance, WORKER_MODULE, 5.0)
        with contextlib.suppress(Exception):
            await jetstream.delete_consumer(STREAM, _consumer(job.id))
        with contextlib.suppress(Exception):
            await jetstream.purge_stream(STREAM, subject=f"{SUBJECT_PREFIX}{job.id}")
        await asyncio.to_thread(clean_up, Path(job.output_dir), self.jobs_dir / job.id)
        await self._db(self.deployer.finish_batch, job.id, failure)
        log.info("batch job %s %s", job.id, f"failed: {failure}" if failure else "completed")


def scan_output(output: Path) -> tuple[int, str | None]:
    """How many parts are written, and why the job failed if a mini-batch gave up."""
    failures = sorted((output / FAILED_DIR).glob("*.txt"))
    return len(list(output.glob("part-*.parquet"))), (failures[0].read_text()[:2000] if failures else None)


def clean_up(output: Path, work_dir: Path) -> None:
    """Remove the job's scratch: its rewritten inputs, failure notes, parts a killed worker left half-written."""
    shutil.rmtree(output / FAILED_DIR, ignore_errors=True)
    for scratch in output.glob(".part-*.tmp"):
        scratch.unlink(missing_ok=True)
    shutil.rmtree(work_dir, ignore_errors=True)


def _consumer(job_id: str) -> str:
    return f"batch-{job_id}"


# ---------------------------------------------------------------- the worker process


class Scorer:
    """Scores a feature matrix with an onnxruntime session, or through an endpoint's router."""

    def __init__(self, settings: BatchWorkerSettings) -> None:
        self.settings = settings
        if settings.model_file:
            import onnxruntime

            options = onnxruntime.SessionOptions()
            options.intra_op_num_threads = settings.intra_op_threads
            self.session = onnxruntime.InferenceSession(str(settings.model_file), options)
            model_input = self.session.get_inputs()[0]
            self.input_name = model_input.name
            self.dtype = np.dtype(np.float64 if "double" in model_input.type else np.float32)
        else:
            import grpc

            from services._proto.inference import open_inference_pb2_grpc

            self.channel = grpc.insecure_channel(settings.endpoint_address)
            self.input_name = ""
            self.stub = open_inference_pb2_grpc.GRPCInferenceServiceStub(self.channel)
            self.dtype = np.dtype(np.float32)

    def score(self, features: np.ndarray) -> dict[str, np.ndarray]:
        if self.settings.model_file:
            names = [output.name for output in self.session.get_outputs()]
            results = self.session.run(names, {self.input_name: features})
            return {name: np.asarray(value) for name, value in zip(names, results, strict=True) if _tensor(value)}
        return self._score_remote(features)

    def _score_remote(self, features: np.ndarray) -> dict[str, np.ndarray]:
        from services._proto.inference import open_inference_pb2 as oip
        from services.runtime import domain as runtime_domain

        if not self.input_name:  # asked once: the endpoint's input does not change during a job
            metadata = self.stub.ModelMetadata(oip.ModelMetadataRequest(name=self.settings.endpoint), timeout=30)
            self.input_name = metadata.inputs[0].name
        request = oip.ModelInferRequest(model_name=self.settings.endpoint)
        request.inputs.add(name=self.input_name, datatype="FP32", shape=list(features.shape))
        request.raw_input_contents.append(np.ascontiguousarray(features, dtype=np.float32).tobytes())
        answer = self.stub.ModelInfer(request, timeout=120)
        outputs = {}
        for number, tensor in enumerate(answer.outputs):
            decoded = runtime_domain.tensor_from_raw(
                tensor.name, tensor.datatype, list(tensor.shape), answer.raw_output_contents[number], 1 << 31
            )
            outputs[tensor.name] = decoded.array
        return outputs


def _tensor(value: Any) -> bool:
    return isinstance(value, np.ndarray)  # skl2onnx's ZipMap outputs (lists of dicts) are not columns


async def work(settings: BatchWorkerSettings) -> None:
    """Take the job's mini-batches one at a time until the deployer stops this process."""
    assert settings.nats_url
    scorer = Scorer(settings)
    columns = [column for column in settings.columns.split(",") if column]
    output = settings.output_dir
    connection = await bus.connect_with_retry(settings.nats_url, name=f"batch-worker-{os.getpid()}")
    try:
        jetstream = connection.jetstream(timeout=10)
        subscription = await jetstream.pull_subscribe_bind(_consumer(settings.job_id), STREAM)
        while True:
            try:
                messages = await subscription.fetch(1, timeout=5)
            except TimeoutError:
                continue
            for message in messages:
                part = json.loads(message.data)
                try:
                    await asyncio.to_thread(score_part, scorer, part, columns, output)
                except Exception as error:
                    attempt = message.metadata.num_delivered
                    log.warning("mini-batch %d, attempt %d: %s", part["index"], attempt, error)
                    if attempt >= settings.max_deliver:
                        failed = output / FAILED_DIR
                        failed.mkdir(parents=True, exist_ok=True)
                        reason = f"mini-batch {part['index']} failed {attempt} times: {error}"
                        (failed / f"{part['index']:05d}.txt").write_text(reason)
                        await message.term()
                    else:
                        await message.nak(delay=1)
                    continue
                await message.ack_sync()
    finally:
        await connection.close()


def score_part(scorer: Scorer, part: dict[str, Any], columns: list[str], output: Path) -> None:
    """Score one mini-batch and put its part file in place (atomically; again on redelivery)."""
    table = pq.ParquetFile(part["file"]).read_row_group(part["row_group"])
    outputs = scorer.score(feature_matrix(table, columns, scorer.dtype))
    result = output_table(part["first_row"], outputs)
    target = output / part_name(part["index"])
    scratch = output / f".{target.name}.{os.getpid()}.tmp"
    pq.write_table(result, scratch)
    os.replace(scratch, target)


def main() -> None:
    settings = BatchWorkerSettings()
    prepare_process(settings)
    with contextlib.suppress(KeyboardInterrupt):
        asyncio.run(work(settings))


if __name__ == "__main__":
    main()

"""Profiles: run the real serving runtime at each candidate size, load it at each concurrency
level, measure, and recommend the smallest size (and replica count) that meets the latency goal
with 20% headroom.

The profiler runs one profile at a time: two at once would measure each other.
"""

from __future__ import annotations

import json
import logging
import math
import os
import threading
import time
import uuid
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, replace
from typing import Any, Protocol

import numpy as np
from sqlmodel import Session, col, select

from services.common import docker_engine, events, paging
from services.common.db import Database
from services.common.errors import FailedPrecondition, InvalidArgument, MlmeshError, NotFound
from services.common.names import REGISTERED_NAME
from services.common.outbox import Outbox
from services.profiler.load import DATATYPES, SATURATED_PERCENT, RequestRefused, StepLoad, cpu_seconds, percentile
from services.profiler.models import ProfileRow
from services.profiler.runtimes import Runtime, RuntimeSize, RuntimeStopped, memory_of, wait_ready

SERVICE = "profiler"
HEADROOM = 1.2
"""A size meets the SLO when its p99 times this is within it (20% headroom)."""
DEFAULT_CONCURRENCY = (1, 2, 4, 8, 16)
DEFAULT_BATCH_ROWS = 16
MAX_CONCURRENCY = 1024
MAX_LEVELS = 32
MAX_SIZES = 16
MEMORY_STEP_MB = 64
TARGETS = ("local", "docker")
log = logging.getLogger(__name__)


@dataclass(frozen=True)
class TensorInput:
    name: str
    datatype: str
    shape: tuple[int, ...]


@dataclass(frozen=True)
class ModelInfo:
    name: str
    version: int
    framework: str
    inputs: tuple[TensorInput, ...]
    example: dict[str, np.ndarray] | None = None
    """The columns of the version's input example (input_example.json, .csv or .parquet); None when
    it has none."""


class Registry(Protocol):
    def model(self, ref: str) -> ModelInfo: ...

    def dataset(self, ref: str) -> tuple[str, dict[str, np.ndarray]]:
        """(`name:version`, the dataset's columns)."""
        ...


class Runtimes(Protocol):
    def image_for(self, model: str) -> str: ...

    def start(self, target: str, model: str, image: str, size: RuntimeSize, log_name: str) -> Runtime: ...


class Load(Protocol):
    kind: str

    def run(self, address: str, body: bytes, answer_bytes: int, concurrency: int, seconds: float) -> StepLoad: ...

    def request(self, model: str, inputs: dict[str, tuple[str, np.ndarray]]) -> bytes: ...

    def answer_bytes(self, address: str, body: bytes) -> int: ...


@dataclass(frozen=True)
class ProfileSpec:
    model_ref: str
    target: str = "local"
    image: str = ""
    sample_dataset: str = ""
    rows_per_request: int = 1
    p99_ms: float = 0.0
    throughput_rps: float = 0.0
    concurrency: tuple[int, ...] = ()
    sizes: tuple[RuntimeSize, ...] = ()
    step_seconds: float = 1.5
    warmup_seconds: float = 0.5


@dataclass
class StepResult:
    size_index: int
    concurrency: int
    requests: int
    errors: int
    error_rate: float
    throughput_rps: float
    p50_ms: float
    p90_ms: float
    p99_ms: float
    cpu_percent: float
    memory_mb: float
    load_generator_cpu_percent: float
    load_generator_saturated: bool
    seconds: float


@dataclass
class SizeResult:
    size: RuntimeSize
    start_seconds: float = 0.0
    capacity_rps: float = 0.0
    steps: list[StepResult] = field(default_factory=list)


@dataclass
class Recommendation:
    met: bool = False
    cpus: float = 0.0
    memory_mb: int = 0
    replicas: int = 0
    threads: int = 0
    max_batch_rows: int = 0
    size_index: int = -1
    explanation: str = ""


@dataclass
class ProfileView:
    id: str
    model_ref: str
    model_name: str
    model_version: int
    target: str
    image: str
    spec: ProfileSpec
    samples: str
    load_generator: str
    status: str
    reason: str
    sizes: list[SizeResult]
    recommendation: Recommendation
    seconds: float
    created_at: float


@dataclass(frozen=True)
class Progress:
    message: str
    done: int
    total: int
    step: StepResult | None = None


class ProfileFailure(Exception):
    """Ends a profile as failed; `reason` starts with crash:, timeout: or errors:."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


# ---------------------------------------------------------------- the request


def default_sizes(target: str) -> tuple[RuntimeSize, ...]:
    cores = os.cpu_count() or 1
    if target == "docker":
        cpus = [0.5, 1.0] + ([float(min(cores, 2))] if cores > 1 else [])
        return tuple(RuntimeSize(value, 1024, max(1, math.floor(value)), 0) for value in cpus)
    sizes = [RuntimeSize(1, 0, 1, 0), RuntimeSize(1, 0, 1, DEFAULT_BATCH_ROWS)]
    if cores > 1:
        sizes.append(RuntimeSize(cores, 0, cores, 0))
    return tuple(sizes)


def complete_spec(spec: ProfileSpec, *, max_rows: int, max_seconds: float) -> ProfileSpec:
    """The spec checked, with its defaults filled in; InvalidArgument naming what is wrong."""
    if not spec.model_ref:
        raise InvalidArgument("model_ref is required: name:version or name@alias", field="model_ref")
    target = spec.target or "local"
    if target not in TARGETS:
        raise InvalidArgument(f"target must be local or docker, not {spec.target[:40]!r}", field="target")
    if spec.image and target != "docker":
        raise InvalidArgument("image is for the docker target only", field="image")
    if spec.image and not docker_engine.is_reference(spec.image):
        raise InvalidArgument(f"image {spec.image[:100]!r} is not a Docker image reference", field="image")
    if not (math.isfinite(spec.p99_ms) and spec.p99_ms > 0):
        raise InvalidArgument(
            "slo.p99_ms must be a latency above 0 ms (for example 50); a profile is judged against it",
            field="slo.p99_ms",
        )
    if not (math.isfinite(spec.throughput_rps) and spec.throughput_rps >= 0):
        raise InvalidArgument("slo.throughput_rps must be 0 (no goal) or more", field="slo.throughput_rps")
    rows = spec.rows_per_request or 1
    if not 1 <= rows <= max_rows:
        raise InvalidArgument(
            f"rows_per_request must be 1 to {max_rows} (MLMESH_PROFILER_MAX_ROWS_PER_REQUEST)",
            field="rows_per_request",
        )
    levels = spec.concurrency or DEFAULT_CONCURRENCY
    if len(levels) > MAX_LEVELS or any(not 1 <= level <= MAX_CONCURRENCY for level in levels):
        raise InvalidArgument(
            f"concurrency levels must be 1 to {MAX_CONCURRENCY}, at most {MAX_LEVELS} of them", field="concurrency"
        )
    sizes = spec.sizes or default_sizes(target)
    if len(sizes) > MAX_SIZES:
        raise InvalidArgument(f"at most {MAX_SIZES} sizes", field="sizes")
    sizes = tuple(check_size(size, target, index) for index, size in enumerate(sizes))
    step = spec.step_seconds or 1.5
    warmup = spec.warmup_seconds if spec.warmup_seconds else 0.5
    if not (math.isfinite(step) and 0.2 <= step <= 600):
        raise InvalidArgument("step_seconds must be 0.2 to 600", field="step_seconds")
    if not (math.isfinite(warmup) and 0 <= warmup <= 600):
        raise InvalidArgument("warmup_seconds must be 0 to 600", field="warmup_seconds")
    planned = len(sizes) * len(levels) * (step + warmup)
    if planned > max_seconds:
        raise InvalidArgument(
            f"this profile would load the runtime for {planned:.0f} s; at most {max_seconds:.0f} s "
            "(MLMESH_PROFILER_MAX_PROFILE_SECONDS): fewer sizes, levels or shorter steps",
            field="sizes",
        )
    return replace(
        spec,
        target=target,
        rows_per_request=rows,
        concurrency=tuple(sorted(set(levels))),
        sizes=sizes,
        step_seconds=step,
        warmup_seconds=warmup,
    )


def check_size(size: RuntimeSize, target: str, index: int) -> RuntimeSize:
    where = f"sizes[{index}]"
    cores = os.cpu_count() or 1
    if not (math.isfinite(size.cpus) and 0 < size.cpus <= cores):
        raise InvalidArgument(f"{where}.cpus must be above 0 and at most this machine's {cores} cores", field=where)
    if target == "local":
        if size.cpus != int(size.cpus):
            raise InvalidArgument(
                f"{where}.cpus: the local target pins the runtime to whole cores; use the docker target for "
                f"fractions of a core ({size.cpus:g} given)",
                field=where,
            )
        if size.memory_mb:
            raise InvalidArgument(
                f"{where}.memory_mb: the local target measures memory but cannot limit it; use the docker target",
                field=where,
            )
    elif size.memory_mb and size.memory_mb < 64:
        raise InvalidArgument(f"{where}.memory_mb must be 0 (no limit) or at least 64 MiB", field=where)
    if size.memory_mb < 0 or not 0 <= size.threads <= 256 or not 0 <= size.max_batch_rows <= 65536:
        raise InvalidArgument(
            f"{where}: memory_mb must not be negative, threads must be 0 to 256 and max_batch_rows 0 to 65536",
            field=where,
        )
    return replace(size, threads=size.threads or max(1, math.floor(size.cpus)))


# ---------------------------------------------------------------- sample inputs


def sample_inputs(
    model: ModelInfo, rows: int, columns: dict[str, np.ndarray] | None
) -> dict[str, tuple[str, np.ndarray]]:
    """One request's inputs: from `columns` (a dataset or the input example) when given, else
    generated from the signature (standard normal numbers, small integers)."""
    if not model.inputs:
        raise FailedPrecondition(
            f"{model.name}:{model.version} has no signature; register it with one (mlmesh models register "
            "reads it from the ONNX file)"
        )
    generator = np.random.default_rng(0)
    inputs: dict[str, tuple[str, np.ndarray]] = {}
    for tensor in model.inputs:
        if tensor.datatype not in DATATYPES:
            raise FailedPrecondition(f"input {tensor.name} is {tensor.datatype}: the profiler sends numbers only")
        shape = [rows if position == 0 and size < 0 else max(1, size) for position, size in enumerate(tensor.shape)]
        if columns:
            values = columns_for(tensor, shape, columns, len(model.inputs) == 1)
        elif tensor.datatype.startswith("FP"):
            values = generator.standard_normal(shape)
        elif tensor.datatype == "BOOL":
            values = generator.integers(0, 2, shape).astype(bool)
        else:
            values = generator.integers(0, 10, shape)
        inputs[tensor.name] = (tensor.datatype, np.asarray(values).astype(DATATYPES[tensor.datatype]))
    return inputs


def columns_for(tensor: TensorInput, shape: list[int], columns: dict[str, np.ndarray], only: bool) -> np.ndarray:
    """The sample's values for one input: the column of its name, or (for a model's only input) the
    first numeric columns, as many as its width; rows repeat when the sample has fewer."""
    rows = shape[0]
    if tensor.name in columns:
        values = np.asarray(columns[tensor.name])
        values = values.reshape(len(values), *shape[1:]) if len(shape) > 1 else values
    elif only:
        width = int(np.prod(shape[1:])) if len(shape) > 1 else 1
        numeric = [values for values in columns.values() if np.issubdtype(np.asarray(values).dtype, np.number)]
        if len(numeric) < width:
            raise InvalidArgument(
                f"the sample has {len(numeric)} numeric columns; input {tensor.name} takes {width}",
                field="sample_dataset",
            )
        values = np.column_stack([np.asarray(column, dtype=np.float64) for column in numeric[:width]])
        values = values.reshape(len(values), *shape[1:]) if len(shape) > 1 else values[:, 0]
    else:
        raise InvalidArgument(f"the sample has no column named {tensor.name}", field="sample_dataset")
    if len(values) == 0:
        raise InvalidArgument("the sample has no rows", field="sample_dataset")
    repeats = math.ceil(rows / len(values))
    return np.concatenate([values] * repeats)[:rows] if repeats > 1 else values[:rows]


def example_columns(example: Any) -> dict[str, np.ndarray]:
    """Columns of an MLflow-style input example: {"columns", "data"}, records, a list of rows,
    {"inputs"/"instances"/"dataframe_split"/"dataframe_records": ...} or {name: values}."""
    if isinstance(example, dict):
        for key in ("dataframe_split", "dataframe_records", "inputs", "instances"):
            if key in example:
                return example_columns(example[key])
        if "data" in example:
            data = np.asarray(example["data"])
            names = example.get("columns") or [str(index) for index in range(data.shape[1] if data.ndim > 1 else 1)]
            data = data.reshape(len(data), -1)
            return {str(name): data[:, index] for index, name in enumerate(names)}
        return {str(name): np.asarray(values) for name, values in example.items()}
    if isinstance(example, list) and example and all(isinstance(row, dict) for row in example):
        return {str(name): np.asarray([row.get(name) for row in example]) for name in example[0]}
    if isinstance(example, list) and example:
        data = np.asarray(example).reshape(len(example), -1)
        return {str(index): data[:, index] for index in range(data.shape[1])}
    raise InvalidArgument("the version's input_example.json holds no rows the profiler can read", field="model_ref")


# ---------------------------------------------------------------- the recommendation


def recommend(sizes: list[SizeResult], spec: ProfileSpec) -> Recommendation:
    """The cheapest size (CPU x replicas, then memory, then without batching) whose steps met the
    SLO with headroom and without errors; replicas for the throughput goal, if any."""
    limit = spec.p99_ms / HEADROOM
    best: tuple[tuple[float, float, int, float], Recommendation] | None = None
    for index, result in enumerate(sizes):
        met = [step for step in result.steps if step.requests and not step.errors and step.p99_ms <= limit]
        result.capacity_rps = round(max((step.throughput_rps for step in met), default=0.0), 1)
        if not met:
            continue
        replicas = max(1, math.ceil(spec.throughput_rps * HEADROOM / result.capacity_rps)) if spec.throughput_rps else 1
        peak = max(step.memory_mb for step in result.steps)
        memory = math.ceil(peak * HEADROOM / MEMORY_STEP_MB) * MEMORY_STEP_MB
        if result.size.memory_mb:
            memory = min(memory, result.size.memory_mb)  # the limit it ran within was enough
        chosen = max(met, key=lambda step: step.throughput_rps)
        explanation = (
            f"{replicas} x {result.size.cpus:g} cpu, {memory} MiB"
            + (f", batching up to {result.size.max_batch_rows} rows" if result.size.max_batch_rows else "")
            + f": one replica served {chosen.throughput_rps:,.0f} requests/s at {chosen.concurrency} in flight "
            f"with p99 {chosen.p99_ms:.1f} ms, within {spec.p99_ms:g} ms with 20% headroom"
            + (f"; {spec.throughput_rps:g} requests/s need {replicas}" if spec.throughput_rps else "")
        )
        recommendation = Recommendation(
            met=True,
            cpus=result.size.cpus,
            memory_mb=memory,
            replicas=replicas,
            threads=result.size.threads,
            max_batch_rows=result.size.max_batch_rows,
            size_index=index,
            explanation=explanation,
        )
        cost = (result.size.cpus * replicas, memory * replicas, result.size.max_batch_rows, chosen.p99_ms)
        if best is None or cost < best[0]:
            best = (cost, recommendation)
    if best is not None:
        chosen = best[1]
        unbatched = sizes[chosen.size_index]
        for result in sizes:
            # A goal met without batching may still leave capacity on the table: say so.
            if (
                not chosen.max_batch_rows
                and result.size.max_batch_rows
                and result.size.cpus == unbatched.size.cpus
                and result.capacity_rps > unbatched.capacity_rps * 1.1
            ):
                chosen.explanation += (
                    f"; batching up to {result.size.max_batch_rows} rows raises one replica's capacity to "
                    f"{result.capacity_rps:,.0f} requests/s within the SLO"
                )
                break
        return chosen
    answered = [(step.p99_ms, result, step) for result in sizes for step in result.steps if step.requests]
    if not answered:
        return Recommendation(explanation="no step answered a request")
    p99, result, step = min(answered, key=lambda item: item[0])
    return Recommendation(
        met=False,
        explanation=(
            f"no size met p99 <= {spec.p99_ms:g} ms with 20% headroom (<= {limit:.2f} ms): the lowest p99 was "
            f"{p99:.2f} ms ({result.size.cpus:g} cpu at {step.concurrency} in flight), {p99 / limit:.1f}x the "
            "allowed latency; a larger size, batching or a faster model is needed"
        ),
    )


# ---------------------------------------------------------------- profiles


class Profiles:
    """Runs profiles and keeps them."""

    def __init__(
        self,
        database: Database,
        outbox: Outbox,
        registry: Registry,
        runtimes: Runtimes,
        load: Load,
        *,
        start_timeout: float,
        max_rows: int,
        max_seconds: float,
    ) -> None:
        self.database = database
        self.outbox = outbox
        self.registry = registry
        self.runtimes = runtimes
        self.load = load
        self.start_timeout = start_timeout
        self.max_rows = max_rows
        self.max_seconds = max_seconds
        self._one_at_a_time = threading.Lock()

    def profile(self, spec: ProfileSpec, progress: Callable[[Progress], None]) -> ProfileView:
        """Check the request, prepare the samples (and the image), then measure; the stored profile,
        completed or failed."""
        spec = complete_spec(spec, max_rows=self.max_rows, max_seconds=self.max_seconds)
        model = self.registry.model(spec.model_ref)
        if model.framework != "onnx":
            raise FailedPrecondition(
                f"{model.name}:{model.version} is {model.framework or 'not ONNX'}; the runtime serves ONNX: convert "
                f"it first (mlmesh build convert {model.name}:{model.version})",
                field="model_ref",
            )
        resolved = f"{model.name}:{model.version}"
        if spec.sample_dataset:
            dataset, columns = self.registry.dataset(spec.sample_dataset)
            samples = f"dataset:{dataset}"
        elif model.example is not None:
            columns, samples = model.example, "input_example"
        else:
            columns, samples = None, "generated"
        body = self.load.request(model.name, sample_inputs(model, spec.rows_per_request, columns))
        if spec.target == "docker" and not spec.image:
            progress(Progress(f"building (or reusing) the image of {resolved}", 0, 0))
            spec = replace(spec, image=self.runtimes.image_for(resolved))
        row = ProfileRow(
            id=str(uuid.uuid4()),
            model_ref=spec.model_ref,
            model_name=model.name,
            model_version=model.version,
            target=spec.target,
            image=spec.image,
            spec=json.dumps(asdict(spec)),
            samples=samples,
            load_generator=self.load.kind,
            status="running",
            created_at=time.time(),
        )
        with self.database.transaction() as session:
            session.add(row)
        if not self._one_at_a_time.acquire(blocking=False):
            progress(Progress("waiting for the profile before this one to finish", 0, 0))
            self._one_at_a_time.acquire()
        started = time.monotonic()
        sizes: list[SizeResult] = []
        try:
            try:
                self._measure(row.id, resolved, spec, body, sizes, progress)
            finally:
                self._one_at_a_time.release()
            recommendation = recommend(sizes, spec)
            return self._finish(row.id, sizes, recommendation, "", time.monotonic() - started)
        except ProfileFailure as failure:
            return self._finish(row.id, sizes, Recommendation(), failure.reason, time.monotonic() - started)
        except MlmeshError as error:
            return self._finish(row.id, sizes, Recommendation(), f"crash: {error.message}", time.monotonic() - started)
        except Exception as error:
            log.exception("profile %s failed", row.id)
            self._finish(row.id, sizes, Recommendation(), f"error: {error}", time.monotonic() - started)
            raise

    def _measure(
        self,
        profile_id: str,
        model: str,
        spec: ProfileSpec,
        body: bytes,
        sizes: list[SizeResult],
        progress: Callable[[Progress], None],
    ) -> None:
        total = len(spec.sizes) * len(spec.concurrency)
        done = 0
        for index, size in enumerate(spec.sizes):
            label = f"{size.cpus:g} cpu" + (f", {size.memory_mb} MiB" if size.memory_mb else "")
            label += f", {size.threads} threads" + (f", batching {size.max_batch_rows}" if size.max_batch_rows else "")
            progress(Progress(f"starting the runtime: {label}", done, total))
            result = SizeResult(size)
            sizes.append(result)
            clock = time.monotonic()
            runtime = self.runtimes.start(spec.target, model, spec.image, size, f"{profile_id}-{index}")
            try:
                try:
                    wait_ready(runtime, self.start_timeout)
                    answer = self.load.answer_bytes(runtime.address, body)
                except RuntimeStopped as stopped:
                    raise ProfileFailure(f"{stopped.kind}: {stopped.message}") from None
                except RequestRefused as refused:
                    raise ProfileFailure(f"errors: the runtime refused the sample request: {refused}") from None
                result.start_seconds = round(time.monotonic() - clock, 2)
                for concurrency in spec.concurrency:
                    step = self._step(runtime, index, body, answer, concurrency, spec)
                    result.steps.append(step)
                    done += 1
                    progress(
                        Progress(
                            f"{label}, {concurrency} in flight: {step.throughput_rps:,.0f}/s, p99 {step.p99_ms:.1f} ms",
                            done,
                            total,
                            step,
                        )
                    )
            finally:
                runtime.stop()

    def _step(
        self, runtime: Runtime, index: int, body: bytes, answer: int, concurrency: int, spec: ProfileSpec
    ) -> StepResult:
        if spec.warmup_seconds:
            self.load.run(runtime.address, body, answer, concurrency, spec.warmup_seconds)
        pids = runtime.pids()
        before = cpu_seconds(pids)
        measured = self.load.run(runtime.address, body, answer, concurrency, spec.step_seconds)
        used = cpu_seconds(pids) - before
        if not runtime.running():
            raise ProfileFailure(
                f"crash: the runtime stopped under load at {concurrency} in flight: {runtime.reason()}"
            )
        requests = len(measured.latencies) + measured.errors
        if requests and not measured.latencies:
            raise ProfileFailure(
                f"errors: every one of {requests} requests failed at {concurrency} in flight; the runtime last "
                f"logged: {runtime.reason()}"
            )
        ordered = sorted(measured.latencies)
        seconds = max(measured.seconds, 1e-9)
        generator = measured.cpu_seconds / seconds * 100
        return StepResult(
            size_index=index,
            concurrency=concurrency,
            requests=requests,
            errors=measured.errors,
            error_rate=round(measured.errors / requests, 4) if requests else 0.0,
            throughput_rps=round(len(ordered) / seconds, 1),
            p50_ms=round(percentile(ordered, 50) * 1000, 3),
            p90_ms=round(percentile(ordered, 90) * 1000, 3),
            p99_ms=round(percentile(ordered, 99) * 1000, 3),
            cpu_percent=round(used / seconds * 100, 1),
            memory_mb=round(memory_of(runtime), 1),
            load_generator_cpu_percent=round(generator, 1),
            load_generator_saturated=generator >= SATURATED_PERCENT,
            seconds=round(seconds, 3),
        )

    def _finish(
        self, profile_id: str, sizes: list[SizeResult], recommendation: Recommendation, reason: str, seconds: float
    ) -> ProfileView:
        with self.database.transaction() as session:
            row = session.get(ProfileRow, profile_id)
            assert row is not None
            row.status = "failed" if reason else "completed"
            row.reason = reason
            row.sizes = json.dumps([asdict(result) for result in sizes])
            row.recommendation = json.dumps(asdict(recommendation))
            row.seconds = round(seconds, 2)
            session.add(row)
            view = profile_view(row)
            self._emit(session, view)
        return view

    def _emit(self, session: Session, view: ProfileView) -> None:
        common = {
            "profile_id": view.id,
            "model_name": view.model_name,
            "model_version": view.model_version,
            "target": view.target,
            "slo_p99_ms": view.spec.p99_ms,
            "seconds": view.seconds,
        }
        payload: events.EventPayload
        if view.status == "failed":
            payload = events.ProfileFailed(**common, reason=view.reason)
        else:
            recommendation = asdict(view.recommendation)
            payload = events.ProfileCompleted(**common, met=view.recommendation.met, recommendation=recommendation)
        subject = f"models/{view.model_name}/versions/{view.model_version}/profiles/{view.id}"
        self.outbox.add(session, events.make_event(SERVICE, payload, subject))

    def get(self, name: str) -> ProfileView:
        profile_id = name.removeprefix("profiles/")
        with self.database.session() as session:
            row = session.get(ProfileRow, profile_id) if len(profile_id) <= 64 else None
            if row is None:
                raise NotFound(f"no profile {name[:100]!r}; `mlmesh profile list` shows them", field="name")
            return profile_view(row)

    def list(
        self, model_name: str, model_version: int, completed_only: bool, page_size: int, page_token: str
    ) -> tuple[list[ProfileView], str]:
        if model_name and not REGISTERED_NAME.fullmatch(model_name):
            raise InvalidArgument(f"model_name {model_name[:100]!r} is not a model name", field="model_name")
        if model_version < 0 or (model_version and not model_name):
            raise InvalidArgument("model_version must be positive and needs model_name", field="model_version")
        size, offset = paging.page_size(page_size), paging.decode(page_token)
        query = select(ProfileRow).order_by(col(ProfileRow.created_at).desc(), col(ProfileRow.id))
        if model_name:
            query = query.where(ProfileRow.model_name == model_name)
        if model_version:
            query = query.where(ProfileRow.model_version == model_version)
        if completed_only:
            query = query.where(ProfileRow.status == "completed")
        with self.database.session() as session:
            rows = session.exec(query.offset(offset).limit(size + 1)).all()
            views = [profile_view(row) for row in rows[:size]]
        return views, paging.encode(offset + size) if len(rows) > size else ""

    def interrupted(self) -> int:
        """Mark profiles left running by a profiler that stopped as failed; how many."""
        with self.database.transaction() as session:
            rows = session.exec(select(ProfileRow).where(ProfileRow.status == "running")).all()
            for row in rows:
                row.status, row.reason = "failed", "crash: the profiler stopped while it ran"
                session.add(row)
                self._emit(session, profile_view(row))
            return len(rows)


def profile_view(row: ProfileRow) -> ProfileView:
    spec_fields = json.loads(row.spec)
    spec_fields["concurrency"] = tuple(spec_fields["concurrency"])
    spec_fields["sizes"] = tuple(RuntimeSize(**size) for size in spec_fields["sizes"])
    sizes = []
    for result in json.loads(row.sizes):
        steps = [StepResult(**step) for step in result.pop("steps")]
        sizes.append(SizeResult(**{**result, "size": RuntimeSize(**result["size"]), "steps": steps}))
    return ProfileView(
        id=row.id,
        model_ref=row.model_ref,
        model_name=row.model_name,
        model_version=row.model_version,
        target=row.target,
        image=row.image,
        spec=ProfileSpec(**spec_fields),
        samples=row.samples,
        load_generator=row.load_generator,
        status=row.status,
        reason=row.reason,
        sizes=sizes,
        recommendation=Recommendation(**json.loads(row.recommendation)),
        seconds=row.seconds,
        created_at=row.created_at,
    )

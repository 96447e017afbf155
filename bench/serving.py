"""Serving benchmark: the runtime (alone, with capture, behind the endpoint router) against a bare floor server.

Prints one JSON document to stdout; progress goes to stderr. Run from the repository root:

    .venv/bin/python bench/serving.py                 # full run (about 10 min)
    .venv/bin/python bench/serving.py --quick         # short run, to check that everything works
    .venv/bin/python bench/serving.py --profile /tmp/profiles

A scikit-learn random forest, converted to ONNX, is registered in a real registry process; every
server runs as its own process and serves it over the Open Inference Protocol: the floor
(bench/floor.py: ModelInfer and nothing else), `python -m services.runtime` without and with
capture, the endpoint router of a deployment made by `python -m services.deployer`, and in front
of the same replica a bare grpc.aio proxy (bench/proxy_floor.py, the router's floor). The same
h2load load (calls in flight, request bytes) drives each of them in turn, and every figure comes
with the baseline measured in the same run and the ratio to it. What capture adds to the runtime's
own work is also counted in instructions, under valgrind's callgrind; see bench/README.md.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import importlib.metadata
import importlib.util
import json
import logging
import os
import platform
import random
import re
import resource
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
import traceback
import urllib.request
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field, replace
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import grpc
import numpy as np
import onnxruntime

# bench/registry.py, beside this file: the registry and nats-server as processes, gRPC framing,
# h2load's summary, statistics and the py-spy profiler are shared with the registry benchmark.
from registry import (
    NatsProcess,
    Profiler,
    RegistryProcess,
    _h2load_figures,
    code_version,
    cpu_seconds,
    grpc_body,
    latency_summary,
    ratio,
)

from services._proto.inference import open_inference_pb2 as oip
from services._proto.inference import open_inference_pb2_grpc as oip_grpc
from services._proto.mlmesh.v1 import deployer_pb2
from services.client import DeployerClient, RegistryClient
from services.common import natsserver
from services.launcher import health_status
from services.profiler.load import peak_memory_mb
from services.runtime.settings import RuntimeSettings

ROOT = Path(__file__).resolve().parents[1]
FLOOR = Path(__file__).resolve().parent / "floor.py"
PROXY_FLOOR = Path(__file__).resolve().parent / "proxy_floor.py"
MODEL_NAME = "bench"
"""The registry name of the model, and the endpoint's name: every server answers to it."""
ROUTER_MODULE = "services.deployer.router"
INFER_METHOD = "inference.GRPCInferenceService/ModelInfer"
RUNTIME_SERVICE = "inference.GRPCInferenceService"
DEPLOYER_SERVICE = "mlmesh.v1.DeployerService"
BATCH_ROWS = 1000
FEATURES = 30

TARGETS = {
    "runtime_single_row_throughput": (">=", 0.9, "runtime calls/s over the floor's, single-row requests"),
    "runtime_single_row_p99": ("<=", 1.2, "runtime p99 latency over the floor's, single-row requests"),
    "runtime_1000_rows_throughput": (">=", 0.9, "runtime rows/s over the floor's, 1,000-row raw requests"),
    "capture_single_row_throughput": (">=", 0.95, "runtime with capture over without, single-row calls/s"),
    "capture_1000_rows_throughput": (">=", 0.95, "runtime with capture over without, 1,000-row rows/s"),
    "router_single_row_throughput": (">=", 0.75, "through the endpoint router over the runtime direct, calls/s"),
}
INSTRUCTION_TARGETS = {
    "capture_single_row_instructions": (
        "single_row",
        0.95,
        "runtime instructions per call without capture over with, single-row",
    ),
    "capture_1000_rows_instructions": (
        "rows_1000",
        0.95,
        "runtime instructions per call without capture over with, 1,000-row",
    ),
}

log = logging.getLogger("bench.serving")


@dataclass(frozen=True)
class Plan:
    """How long each measurement runs; every h2load run is bounded by a count of calls."""

    seconds: float
    """Target length of each measured h2load run (its call count comes from the last rate seen)."""
    rounds: int
    """Each server is measured this many times per phase, in alternating order (ABC, CBA, ...)."""
    warmup_calls_single: int
    warmup_calls_batch: int
    connections: int
    streams: int
    """Calls in flight = connections x streams, the same for every server."""
    breakdown_calls: int
    """Calls per sample of the in-process breakdown (5 samples per part, the median kept)."""
    capture_pairs: int
    """Fresh pairs of runtimes (without and with capture) that judge the capture's cost."""
    instruction_calls_single: int
    instruction_calls_batch: int
    """Calls counted under callgrind per runtime (and as many to warm it up): multiples of the
    capture batch (256 requests), so that every request counted is also sent in the count."""


FULL = Plan(
    seconds=1.5,
    rounds=6,
    warmup_calls_single=400,
    warmup_calls_batch=16,
    connections=2,
    streams=8,
    breakdown_calls=2000,
    capture_pairs=4,
    instruction_calls_single=2048,
    instruction_calls_batch=256,
)
QUICK = Plan(
    seconds=1,
    rounds=1,
    warmup_calls_single=300,
    warmup_calls_batch=16,
    connections=2,
    streams=8,
    breakdown_calls=300,
    capture_pairs=1,
    instruction_calls_single=256,
    instruction_calls_batch=256,
)


# ---------------------------------------------------------------- the model


@dataclass
class Model:
    path: Path
    onnx_bytes: int
    single: np.ndarray
    """One row of the dataset, [1, 30] float32."""
    batch: np.ndarray
    """1,000 rows (the dataset repeated), [1000, 30] float32."""
    description: dict[str, Any]


def train_model(directory: Path) -> Model:
    """RandomForestClassifier(100 trees, depth 8) on the breast cancer data, as ONNX without zipmap."""
    from skl2onnx import convert_sklearn
    from skl2onnx.common.data_types import FloatTensorType
    from sklearn.datasets import load_breast_cancer
    from sklearn.ensemble import RandomForestClassifier

    features, labels = load_breast_cancer(return_X_y=True)
    features = features.astype(np.float32)
    started = time.perf_counter()
    forest = RandomForestClassifier(n_estimators=100, max_depth=8, random_state=0).fit(features, labels)
    onnx_model = convert_sklearn(
        forest, initial_types=[("x", FloatTensorType([None, FEATURES]))], options={id(forest): {"zipmap": False}}
    )
    data = onnx_model.SerializeToString()
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / "model.onnx"
    path.write_bytes(data)
    return Model(
        path=path,
        onnx_bytes=len(data),
        single=features[:1].copy(),
        batch=np.resize(features, (BATCH_ROWS, FEATURES)),
        description={
            "estimator": "sklearn RandomForestClassifier(n_estimators=100, max_depth=8, random_state=0)",
            "data": f"sklearn.datasets.load_breast_cancer ({len(features)} rows, {FEATURES} FP32 features)",
            "converted_with": "skl2onnx, zipmap off; input x FP32 [-1, 30], outputs label INT64 [-1], "
            "probabilities FP32 [-1, 2]",
            "onnx_bytes": len(data),
            "train_and_convert_seconds": round(time.perf_counter() - started, 2),
        },
    )


def in_process_inference(model: Model) -> dict[str, Any]:
    """The onnxruntime session alone, in this process, one call at a time (no server, no thread hop)."""
    options = onnxruntime.SessionOptions()
    options.intra_op_num_threads = options.inter_op_num_threads = 1
    session = onnxruntime.InferenceSession(str(model.path), options, providers=["CPUExecutionProvider"])

    def timed(rows: np.ndarray, calls: int) -> dict[str, Any]:
        for _ in range(max(10, calls // 10)):
            session.run(None, {"x": rows})
        durations = []
        for _ in range(calls):
            started = time.perf_counter()
            session.run(None, {"x": rows})
            durations.append(time.perf_counter() - started)
        summary = latency_summary(durations)
        summary["per_second_one_thread"] = round(calls / sum(durations), 1)
        return summary

    return {
        "how": "InferenceSession.run in the benchmark process, intra_op and inter_op threads 1, sequential",
        "single_row": timed(model.single, 2000),
        "rows_1000": timed(model.batch, 100),
    }


class _CallDetails:
    """What grpc.aio hands a server interceptor about a call (grpc.HandlerCallDetails)."""

    def __init__(self, method: str, invocation_metadata: tuple[tuple[str, str], ...]) -> None:
        self.method = method
        self.invocation_metadata = invocation_metadata


class _Context:
    """What a handler sees of its call (grpc.aio.ServicerContext), as far as the interceptor reads it."""

    def __init__(self, invocation_metadata: tuple[tuple[str, str], ...]) -> None:
        self._metadata = invocation_metadata

    def invocation_metadata(self) -> tuple[tuple[str, str], ...]:
        return self._metadata


def _drive(coroutine: Any) -> Any:
    """Run a coroutine that never suspends to its end, without an event loop; its result."""
    try:
        coroutine.send(None)
    except StopIteration as done:
        return done.value
    coroutine.close()
    raise RuntimeError("the coroutine suspended")


async def in_process_breakdown(model: Model, plan: Plan) -> dict[str, Any]:
    """Per-call cost of each step of one ModelInfer (single row, and 1,000 raw rows), in this process
    without gRPC: the floor's handler against the runtime's own steps (services.runtime.servicer and
    domain, the interceptors of services.common.server), one call at a time. Parts are timed in
    turn, 5 times, and the median kept, so that a noisy moment weighs on every part alike."""

    from floor import FloorServicer

    from services.common import telemetry
    from services.common.server import ServiceInterceptor
    from services.runtime import domain
    from services.runtime import servicer as runtime_servicer

    threads = (1, 1)
    loaded = domain.load_model(MODEL_NAME, "1", model.path, None, threads)
    store = domain.ModelStore()
    store.add(loaded)
    metrics = domain.Metrics(store)
    floor_inline = FloorServicer(loaded.session, "1", inline=True)
    telemetry.setup("runtime")  # what build_server does in the runtime: spans are recorded, not exported
    answer = oip.ModelInferResponse()

    async def behaviour(request: Any, context: Any) -> Any:
        return answer

    handler = grpc.unary_unary_rpc_method_handler(behaviour)

    async def found(details: Any) -> Any:
        return handler

    interceptor = ServiceInterceptor("runtime")

    details = _CallDetails(f"/{INFER_METHOD}", (("user-agent", "h2load"),))
    context = _Context(details.invocation_metadata)
    capture = domain.CaptureQueue(1_000_000, 256, metrics, capacity_bytes=1 << 62)
    max_elements = 16 * 1024 * 1024

    sizes: list[int] = []

    def steps(request: Any, batch: int) -> dict[str, Any]:
        tensors = runtime_servicer.tensors_from_request(request, max_elements)
        inputs = loaded.check(tensors)
        outputs = loaded.infer(inputs, [])
        raw = bool(request.raw_input_contents)

        def observed() -> None:
            with metrics.observed("grpc", MODEL_NAME, ""):
                pass

        def intercepted() -> None:
            wrapped = _drive(interceptor.intercept_service(found, details))
            _drive(wrapped.unary_unary(request, context))

        def captured() -> None:
            # One message of `batch` requests, as publish_captures sends them (256 at most).
            rows = []
            for _ in range(batch):
                capture.offer(loaded, "", inputs.values(), outputs)
                rows.append(capture._rows.popleft())
            sizes.append(sum(len(payload) for payload in domain.capture_messages(rows, 1 << 20).payloads))

        return {
            "floor_handler_inline": lambda: _drive(floor_inline.ModelInfer(request, None)),
            "session_run": lambda: loaded.session.run(None, {"x": inputs["x"].array}),
            "runtime_decode": lambda: runtime_servicer.tensors_from_request(request, max_elements),
            "runtime_check": lambda: loaded.check(tensors),
            "runtime_infer": lambda: loaded.infer(inputs, []),
            "runtime_encode": lambda: runtime_servicer.response_for(loaded, "", outputs, raw),
            "runtime_metrics": observed,
            "runtime_interceptors": intercepted,
            "capture": captured,
        }

    def timed(parts: dict[str, Any], calls: dict[str, int]) -> dict[str, float]:
        samples: dict[str, list[float]] = {name: [] for name in parts}
        for name, call in parts.items():
            for _ in range(max(1, calls[name] // 10)):
                call()
        for _ in range(5):
            for name, call in parts.items():
                started = time.perf_counter()
                for _ in range(calls[name]):
                    call()
                samples[name].append((time.perf_counter() - started) / calls[name] * 1e6)
        return {name: round(statistics.median(values), 2) for name, values in samples.items()}

    def summary(request: Any, calls: int, batch: int) -> dict[str, Any]:
        parts = steps(request, batch)
        # A capture message of one 1,000-row request costs about ten inferences: fewer of those.
        capture_calls = max(1, calls // batch) if batch > 1 else max(1, calls // 20)
        counts = {name: capture_calls if name == "capture" else calls for name in parts}
        sizes.clear()
        result: dict[str, Any] = timed(parts, counts)
        own = ("decode", "check", "infer", "encode", "metrics", "interceptors")
        result["runtime_sum"] = round(sum(result[f"runtime_{part}"] for part in own), 2)
        result["runtime_sum_minus_floor_handler"] = round(result["runtime_sum"] - result["floor_handler_inline"], 2)
        result["capture_per_request"] = round(result.pop("capture") / batch, 2)
        result["capture_message_bytes_per_request"] = sizes[-1] // batch
        return result

    hops = []
    for _ in range(5):
        started = time.perf_counter()
        for _ in range(plan.breakdown_calls):
            await asyncio.to_thread(int)
        hops.append((time.perf_counter() - started) / plan.breakdown_calls * 1e6)
    return {
        "how": (
            "microseconds per call, median of 5 samples, sequential, in the benchmark process (no gRPC, no "
            "event loop except thread_hop): floor_handler_inline = bench/floor.py's ModelInfer with inference "
            "inline (decode, run, encode); runtime_* = the runtime's steps of one ModelInfer: "
            "tensors_from_request, LoadedModel.check, LoadedModel.infer, response_for, Metrics.observed, and "
            "the ServiceInterceptor's wrapping of one call (span and error mapping) around a no-op handler; "
            "capture_per_request = CaptureQueue.offer + capture_messages per request (single rows in messages "
            "of 256 requests, 1,000-row requests one per message, messages below 1 MiB), and the message bytes "
            "each request adds; "
            "thread_hop = one asyncio.to_thread round trip (floor and runtime both pay it)"
        ),
        "single_row": summary(single_row_request(model), plan.breakdown_calls, 256),
        "rows_1000": summary(batch_request(model), max(10, plan.breakdown_calls // 40), 1),
        "thread_hop": round(statistics.median(hops), 2),
    }


def single_row_request(model: Model) -> Any:
    contents = oip.InferTensorContents(fp32_contents=model.single.reshape(-1).tolist())
    tensor = oip.ModelInferRequest.InferInputTensor(name="x", datatype="FP32", shape=[1, FEATURES], contents=contents)
    return oip.ModelInferRequest(model_name=MODEL_NAME, inputs=[tensor])


def batch_request(model: Model) -> Any:
    tensor = oip.ModelInferRequest.InferInputTensor(name="x", datatype="FP32", shape=[BATCH_ROWS, FEATURES])
    return oip.ModelInferRequest(model_name=MODEL_NAME, inputs=[tensor], raw_input_contents=[model.batch.tobytes()])


def decoded_outputs(response: Any) -> dict[str, np.ndarray]:
    """An answer's outputs as numpy arrays, typed or raw."""
    kinds = {"INT64": (np.dtype("<i8"), "int64_contents"), "FP32": (np.dtype("<f4"), "fp32_contents")}
    arrays = {}
    for number, output in enumerate(response.outputs):
        dtype, field_name = kinds[output.datatype]
        if response.raw_output_contents:
            array = np.frombuffer(response.raw_output_contents[number], dtype=dtype)
        else:
            array = np.asarray(getattr(output.contents, field_name), dtype=dtype)
        arrays[output.name] = array.reshape(tuple(output.shape))
    return arrays


# ---------------------------------------------------------------- servers as processes


def clean_environment() -> dict[str, str]:
    """The environment of every server: no MLMESH_ setting leaks in, and one fixed hash seed, so
    that two equal servers do not differ by the layout of their dictionaries."""
    environment = {key: value for key, value in os.environ.items() if not key.startswith("MLMESH_")}
    return {**environment, "PYTHONHASHSEED": "0"}


@dataclass
class Server:
    """One server under load: where it listens and the processes whose CPU it uses."""

    name: str
    address: str
    pids: list[int]
    description: str
    process: subprocess.Popen[bytes] | None = None
    log_path: Path | None = None
    http_address: str | None = None
    roles: dict[int, str] = field(default_factory=dict)
    """What each process is, when there are several (their CPU is then also given one by one)."""
    capture_store_pid: int | None = None
    """When it captures: the nats-server that stores what it captures, whose CPU is counted
    apart, as capture's cost to the machine (the runtime's own cost is its CPU per call)."""

    @property
    def captures(self) -> bool:
        """Whether it sends what it answers to the capture stream (the runtime's /metrics count it)."""
        return self.capture_store_pid is not None

    def cpu_seconds(self) -> dict[int, float | None]:
        """CPU seconds so far of each of its processes (with their children)."""
        return {pid: cpu_seconds(pid) for pid in self.pids}

    def log_tail(self, lines: int = 30) -> str:
        if self.log_path is None:
            return ""
        with contextlib.suppress(OSError):
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        return ""

    def stop(self) -> None:
        stop_process(self.process)


def stop_process(process: subprocess.Popen[bytes] | None, timeout: float = 20) -> None:
    if process is None or process.poll() is not None:
        return
    process.send_signal(signal.SIGTERM)
    try:
        process.wait(timeout)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait(10)


def spawn(command: list[str], environment: dict[str, str], log_path: Path) -> subprocess.Popen[bytes]:
    log_path.parent.mkdir(parents=True, exist_ok=True)
    with log_path.open("ab") as output:
        return subprocess.Popen(
            command, cwd=ROOT, env=environment, stdout=output, stderr=subprocess.STDOUT, start_new_session=True
        )


async def first_answer(server: Server, request: Any, timeout: float = 60) -> Any:
    """Call ModelInfer until the server answers (it may still be loading); the answer."""
    deadline = time.monotonic() + timeout
    last: Exception | None = None
    async with grpc.aio.insecure_channel(server.address) as channel:
        stub = oip_grpc.GRPCInferenceServiceStub(channel)
        while time.monotonic() < deadline:
            if server.process is not None and server.process.poll() is not None:
                raise RuntimeError(f"{server.name} exited with {server.process.returncode}:\n{server.log_tail()}")
            try:
                return await stub.ModelInfer(request, timeout=5)
            except grpc.aio.AioRpcError as error:
                last = error
                await asyncio.sleep(0.1)
    raise TimeoutError(f"{server.name} did not answer ModelInfer within {timeout}s ({last}):\n{server.log_tail()}")


def start_floor(workdir: Path, model: Model, version: str, inline: bool) -> Server:
    port = natsserver.free_port()
    name = "floor_inline" if inline else "floor"
    log_path = workdir / f"{name}.log"
    command = [sys.executable, str(FLOOR), str(model.path), str(port), "--version", version]
    process = spawn([*command, *(["--inline"] if inline else [])], clean_environment(), log_path)
    how = "on the event loop" if inline else "in a worker thread (asyncio.to_thread, as the runtime)"
    return Server(
        name,
        f"127.0.0.1:{port}",
        [process.pid],
        f"bench/floor.py: bare grpc.aio, ModelInfer only, decode -> onnxruntime {how} -> encode",
        process,
        log_path,
    )


def start_proxy_floor(workdir: Path, endpoint: Endpoint) -> Server:
    """bench/proxy_floor.py in front of the endpoint's replica: the router's floor."""
    port = natsserver.free_port()
    log_path = workdir / "proxy_floor.log"
    command = [sys.executable, str(PROXY_FLOOR), str(port), endpoint.replica_address]
    process = spawn(command, clean_environment(), log_path)
    return Server(
        "proxy_floor",
        f"127.0.0.1:{port}",
        [process.pid, *endpoint.replica_pids],
        "bench/proxy_floor.py: bare grpc.aio proxy passing ModelInfer bytes to the endpoint's replica (the one "
        "behind the router); CPU counts the proxy and the replica",
        process,
        log_path,
        roles={process.pid: "proxy", **dict.fromkeys(endpoint.replica_pids, "replica")},
    )


async def start_runtime(
    home: Path,
    registry_address: str,
    ref: str,
    capture_nats: NatsProcess | None,
    name: str = "",
    *,
    wrapper: Sequence[str] = (),
    settings: dict[str, str] | None = None,
    start_seconds: float = 60,
) -> Server:
    """`python -m services.runtime` serving `ref`, as tests/runtime/conftest.py starts it; with
    `capture_nats`, capturing to that nats-server; under `wrapper` (a command that runs it, such as
    valgrind), with `settings` (MLMESH_ variables) added."""
    port, http_port = natsserver.free_port(), natsserver.free_port()
    environment = {
        **clean_environment(),
        "MLMESH_HOME": str(home),
        "MLMESH_RUNTIME_PORT": str(port),
        "MLMESH_RUNTIME_HTTP_PORT": str(http_port),
        "MLMESH_RUNTIME_MODELS": ref,
        "MLMESH_RUNTIME_REGISTRY_ADDRESS": registry_address,
        **(settings or {}),
    }
    store_pid = None
    if capture_nats:
        assert capture_nats.process is not None, "start the nats-server first"
        store_pid = capture_nats.process.pid
        environment.update(MLMESH_RUNTIME_CAPTURE="true", MLMESH_NATS_URL=capture_nats.url)
    log_path = home / "runtime.log"
    process = spawn([*wrapper, sys.executable, "-m", "services.runtime"], environment, log_path)
    name = name or ("runtime_capture" if capture_nats else "runtime")
    server = Server(
        name,
        f"127.0.0.1:{port}",
        [process.pid],
        "python -m services.runtime, default settings (1 worker, intra/inter-op threads 1, no batching)"
        + (", MLMESH_RUNTIME_CAPTURE=true to the registry's nats-server" if capture_nats else ""),
        process,
        log_path,
        f"127.0.0.1:{http_port}",
        capture_store_pid=store_pid,
    )
    deadline = time.monotonic() + start_seconds
    while await asyncio.to_thread(health_status, server.address, RUNTIME_SERVICE, 1) != "SERVING":
        if process.poll() is not None or time.monotonic() > deadline:
            stop_process(process)
            raise RuntimeError(f"the runtime did not start:\n{server.log_tail()}")
        await asyncio.sleep(0.1)
    return server


def processes_of(home: Path, module: str) -> list[int]:
    """Processes running `python -m <module>` with MLMESH_HOME=<home> (the deployer's children)."""
    found = []
    marker = f"MLMESH_HOME={home}".encode()
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        with contextlib.suppress(OSError):
            arguments = (entry / "cmdline").read_bytes().split(b"\0")
            if b"-m" in arguments and module.encode() in arguments and marker in (entry / "environ").read_bytes():
                found.append(int(entry.name))
    return found


@dataclass
class Endpoint:
    """A deployer process and the endpoint it made: its router and replica are the server measured."""

    deployer: subprocess.Popen[bytes]
    address: str
    home: Path
    server: Server | None = None
    setup_seconds: float | None = None
    replica_address: str = ""
    replica_pids: list[int] = field(default_factory=list)

    def stop(self) -> None:
        with contextlib.suppress(Exception), DeployerClient(self.address, actor="bench", timeout=60) as client:
            client.delete(MODEL_NAME)
        stop_process(self.deployer)
        # Anything the deployer left running, found again by its command and MLMESH_HOME.
        for pid in processes_of(self.home, ROUTER_MODULE) + processes_of(self.home, "services.runtime"):
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGTERM)


async def start_endpoint(home: Path, registry_address: str, nats_url: str, ref: str) -> Endpoint:
    """The deployer (as tests/deployer/processes.py starts it) and one endpoint `bench` with one
    deployment of `ref` on the local target, waited for until READY."""
    started = time.perf_counter()
    port = natsserver.free_port()
    environment = {
        **clean_environment(),
        "MLMESH_HOME": str(home),
        "MLMESH_NATS_URL": nats_url,
        "MLMESH_DEPLOYER_PORT": str(port),
        "MLMESH_DEPLOYER_REGISTRY_ADDRESS": registry_address,
    }
    log_path = home / "deployer.log"
    process = spawn([sys.executable, "-m", "services.deployer"], environment, log_path)
    endpoint = Endpoint(process, f"127.0.0.1:{port}", home)
    try:
        deadline = time.monotonic() + 30
        while await asyncio.to_thread(health_status, endpoint.address, DEPLOYER_SERVICE, 1) != "SERVING":
            if process.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"the deployer did not start:\n{log_path.read_text(errors='replace')[-3000:]}")
            await asyncio.sleep(0.1)
        with DeployerClient(endpoint.address, actor="bench") as client:
            client.create(MODEL_NAME, ref)
            deadline = time.monotonic() + 120
            while True:
                found = client.get(MODEL_NAME)
                states = {deployment.name: deployment for deployment in found.deployments}
                deployment = states.get("blue")
                if deployment and deployment.status == deployer_pb2.DEPLOYMENT_STATUS_READY and found.grpc_address:
                    break
                if deployment and deployment.status == deployer_pb2.DEPLOYMENT_STATUS_FAILED:
                    raise RuntimeError(f"the deployment failed: {deployment.message}")
                if time.monotonic() > deadline:
                    raise TimeoutError(f"the deployment was not READY within 120 s: {found}")
                await asyncio.sleep(0.2)
        routers = processes_of(home, ROUTER_MODULE)
        replicas = processes_of(home, "services.runtime")
        endpoint.server = Server(
            "router",
            found.grpc_address,
            routers + replicas,
            "endpoint `bench` of python -m services.deployer (local target, 1 replica: a runtime with default "
            "settings), called at the router's grpc_address; CPU counts the router and the replica",
            None,
            home / "deployer" / "logs" / MODEL_NAME / "router.log",
            roles={**dict.fromkeys(routers, "router"), **dict.fromkeys(replicas, "replica")},
        )
        endpoint.setup_seconds = round(time.perf_counter() - started, 2)
        endpoint.replica_address = deployment.replica_states[0].grpc_address
        endpoint.replica_pids = replicas
        return endpoint
    except BaseException:
        await asyncio.to_thread(endpoint.stop)
        raise


# ---------------------------------------------------------------- h2load


H2LOAD = shutil.which("h2load")


@dataclass
class Load:
    """One request body and what the answer to it must be, per server."""

    name: str
    body_path: Path
    rows: int
    warmup_calls: int
    answer_size: dict[str, int] = field(default_factory=dict)
    """Each server's answer message size in bytes, learned from one real call."""


async def h2load(
    server: Server, load: Load, calls: int, plan: Plan, log_file: Path | None = None, timeout: float = 300
) -> dict[str, Any]:
    """One h2load process (one thread) sending `calls` copies of the body, connections x streams
    in flight; its summary, its own CPU, and whether every answer has the expected size."""
    assert H2LOAD is not None
    headers = ["-H", "content-type: application/grpc", "-H", "te: trailers"]
    command = [
        H2LOAD,
        "-n",
        str(calls),
        "-c",
        str(plan.connections),
        "-m",
        str(plan.streams),
        "-t",
        "1",
        "-d",
        str(load.body_path),
        *headers,
        *([f"--log-file={log_file}"] if log_file else []),
        f"http://{server.address}/{INFER_METHOD}",
    ]
    children_before = resource.getrusage(resource.RUSAGE_CHILDREN)
    server_before = server.cpu_seconds()
    store_before = cpu_seconds(server.capture_store_pid) if server.capture_store_pid else None
    machine_before = machine_busy_seconds()
    started = time.perf_counter()
    process = await asyncio.create_subprocess_exec(*command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    try:
        output, _ = await asyncio.wait_for(process.communicate(), timeout)
    except TimeoutError:
        process.kill()
        await process.wait()
        raise RuntimeError(f"h2load did not finish {calls} calls within {timeout} s") from None
    elapsed = time.perf_counter() - started
    machine_after = machine_busy_seconds()
    server_after = server.cpu_seconds()
    store_after = cpu_seconds(server.capture_store_pid) if server.capture_store_pid else None
    children_after = resource.getrusage(resource.RUSAGE_CHILDREN)
    text_output = output.decode(errors="replace")
    figures = _h2load_figures(text_output)
    if process.returncode != 0 or figures["succeeded"] == 0:
        raise RuntimeError(f"h2load failed (exit {process.returncode}):\n{text_output[-2000:]}")
    size = load.answer_size[server.name]
    expected_bytes = figures["succeeded"] * (size + 5)
    failures = figures["failed"] + figures["errored"] + figures["timeout"]
    h2load_cpu = (children_after.ru_utime + children_after.ru_stime) - (
        children_before.ru_utime + children_before.ru_stime
    )
    result: dict[str, Any] = {
        "calls": figures["succeeded"],
        "http_failures": failures,
        "seconds": round(elapsed, 3),
        "per_second": round(figures["succeeded"] / elapsed, 1),
        "answers_checked": failures == 0 and figures["data_bytes"] == expected_bytes,
        "data_bytes": figures["data_bytes"],
        "expected_data_bytes": expected_bytes,
        "h2load_cpu_percent": round(h2load_cpu / elapsed * 100, 1),
    }
    spent = {
        pid: after - before
        for pid, before in server_before.items()
        if before is not None and (after := server_after.get(pid)) is not None
    }
    if spent and len(spent) == len(server_before):
        result["server_cpu_percent"] = round(sum(spent.values()) / elapsed * 100, 1)
        result["server_cpu_us_per_call"] = round(sum(spent.values()) / max(1, figures["succeeded"]) * 1e6, 1)
        if server.roles:
            by_role: dict[str, float] = {}
            for pid, seconds in spent.items():
                role = server.roles.get(pid, str(pid))
                by_role[role] = by_role.get(role, 0.0) + seconds
            result["server_cpu_percent_by_process"] = {
                role: round(seconds / elapsed * 100, 1) for role, seconds in by_role.items()
            }
        store = 0.0
        if store_before is not None and store_after is not None:
            store = (store_after - store_before) / elapsed * 100
            result["capture_store_cpu_percent"] = round(store, 1)
            result["capture_store_cpu_us_per_call"] = round(
                (store_after - store_before) / max(1, figures["succeeded"]) * 1e6, 1
            )
        if machine_before is not None and machine_after is not None:
            # Everything else that ran meanwhile: this process, the idle servers, and any other load.
            machine = (machine_after - machine_before) / elapsed * 100
            result["machine_cpu_percent"] = round(machine, 1)
            other = machine - result["server_cpu_percent"] - h2load_cpu / elapsed * 100 - store
            result["other_cpu_percent"] = round(max(0.0, other), 1)  # /proc/stat counts in ticks: ~1% noise
    if not result["answers_checked"]:
        result["error"] = (
            f"DATA bytes {figures['data_bytes']} differ from {figures['succeeded']} calls x ({size} + 5) = "
            f"{expected_bytes}, or {failures} calls failed: a gRPC error hid behind HTTP 200"
        )
    return result


def machine_busy_seconds() -> float | None:
    """CPU seconds all CPUs of the machine have been busy (/proc/stat: all but idle and iowait)."""
    try:
        fields = [int(value) for value in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
    except (OSError, ValueError):
        return None
    return (sum(fields[:8]) - fields[3] - fields[4]) / os.sysconf("SC_CLK_TCK")


def read_latencies(log_file: Path) -> tuple[list[float], int]:
    """Seconds from each request's start to its response's end (h2load --log-file: start time in
    µs since the epoch, HTTP status, µs to the end of the response), for status 200; and how many
    had another status."""
    latencies, other = [], 0
    for line in log_file.read_text().splitlines():
        columns = line.split("\t")
        if len(columns) < 3:
            continue
        if columns[1] == "200":
            latencies.append(int(columns[2]) / 1e6)
        else:
            other += 1
    return latencies, other


@dataclass
class Measured:
    """One server's runs in one phase."""

    rounds: list[dict[str, Any]] = field(default_factory=list)
    latencies: list[float] = field(default_factory=list)


async def measure_once(
    server: Server, load: Load, plan: Plan, workdir: Path, round_number: int, measured: Measured, profiler: Profiler
) -> None:
    """A warm-up run (not counted), then the measured run with per-request latencies, sized by the
    rate of the server's previous measured run (of the warm-up in the first round)."""
    warmup = await h2load(server, load, load.warmup_calls, plan)
    rate = measured.rounds[-1]["per_second"] if measured.rounds else warmup["per_second"]
    # At least 8 calls per call in flight, so that work a server defers (capture flushes every
    # 0.2 s) falls inside the run even when the server is slow.
    calls = max(load.warmup_calls, 8 * plan.connections * plan.streams, int(rate * plan.seconds))
    log_file = workdir / f"{load.name}-{server.name}-{round_number}.log"
    sink: dict[str, Any] = {}
    label = f"{load.name}-{server.name}-{round_number}"
    async with profiler.record(server.pids[0], label, sink):
        result = await h2load(server, load, calls, plan, log_file, timeout=plan.seconds * 20 + 60)
    latencies, other = read_latencies(log_file)
    log_file.unlink()
    summary = latency_summary(latencies)
    result["latency"] = {key: summary[key] for key in ("p50_ms", "p99_ms") if key in summary}
    for key in ("data_bytes", "expected_data_bytes"):  # checked: the figures stay only in an error
        if result["answers_checked"]:
            result.pop(key)
    result["warmup"] = {key: warmup[key] for key in ("calls", "per_second", "answers_checked")}
    if other:
        result["log_non_200"] = other
    if sink:
        result["profile"] = sink[label]
    measured.rounds.append(result)
    measured.latencies.extend(latencies)


async def capture_pairs(
    workdir: Path, registry_address: str, ref: str, nats_server: NatsProcess, load: Load, plan: Plan, profiler: Profiler
) -> dict[str, Any]:
    """The capture's cost, judged over `plan.capture_pairs` pairs of freshly started runtimes, one
    without capture and one with, each pair measured like a phase and stopped. Two identical
    runtime processes differ here by up to ~10% for the whole of their lives (where their memory
    and threads landed), more than the effect judged; fresh pairs average that out."""
    answer_size = load.answer_size["runtime"]
    figures: dict[str, list[dict[str, Any]]] = {"runtime": [], "runtime_capture": []}  # each pair's summary
    pairs: list[dict[str, Any]] = []
    for number in range(plan.capture_pairs):
        log.info("capture pair %d of %d ...", number + 1, plan.capture_pairs)
        home = workdir / f"pair-{number}"
        servers = [
            await start_runtime(home / "runtime", registry_address, ref, None, f"runtime_{number}"),
            await start_runtime(home / "capture", registry_address, ref, nats_server, f"capture_{number}"),
        ]
        try:
            for server in servers:
                load.answer_size[server.name] = answer_size
            before = await capture_drained(servers[1])
            measured = await run_phase(servers, load, plan, workdir, profiler)
            captured = capture_report(before, await capture_drained(servers[1]))
        finally:
            for server in servers:
                server.stop()
        plain, capturing = (measured[server.name] for server in servers)
        if "error" in plain or "error" in capturing:
            raise RuntimeError(f"capture pair {number}: {plain.get('error') or capturing.get('error')}")
        figures["runtime"].append(plain)
        figures["runtime_capture"].append(capturing)
        cpu = "server_cpu_us_per_call"
        pairs.append(
            {
                "runtime_per_second": plain["per_second"],
                "capture_per_second": capturing["per_second"],
                "ratio": ratio(capturing["per_second"], plain["per_second"]),
                "cpu_per_call_ratio": ratio(plain.get(cpu), capturing.get(cpu)),
                "answers_checked": plain["answers_checked"] and capturing["answers_checked"],
                "every_request_captured": captured["every_request_captured"],
            }
        )
    return {
        "how": (
            f"{plan.capture_pairs} pair(s) of fresh `python -m services.runtime` processes, one without capture and "
            f"one with, each pair measured {plan.rounds} round(s) in alternating order and then stopped; per_second "
            "sums every pair's calls over their seconds"
        ),
        "pairs": pairs,
        **{kind: over_pairs(summaries) for kind, summaries in figures.items()},
    }


# ---------------------------------------------------------------- capture, counted in instructions


VALGRIND = shutil.which("valgrind")
CALLGRIND_CONTROL = shutil.which("callgrind_control")
CAPTURE_BATCH = RuntimeSettings.model_fields["capture_batch_rows"].default
SETTLE_SECONDS = 10
"""After the counted calls: time for the last batch to be encoded and published under callgrind."""


async def capture_instructions(
    workdir: Path, registry_address: str, ref: str, nats_server: NatsProcess, load: Load, calls: int, plan: Plan
) -> dict[str, Any]:
    """What capture adds to the runtime's own work per call, counted in instructions rather than
    timed: two runtime processes of the same code differ in calls/s by 10% or more here, while
    callgrind's count of one repeats to a fraction of a percent. A runtime without capture and one
    with run in turn under callgrind, counting off until `calls` calls have warmed them up, then on
    for `calls` more. Captures go out by count alone, as under load (every 256 requests; the flush
    interval is longer than the run), and both counts are multiples of 256, so every request
    counted is offered, encoded and published inside the count. Not counted: the kernel's work
    (socket writes to nats-server) and nats-server's own, which `capture_store_cpu_us_per_call`
    shows for the timed runs."""
    assert VALGRIND and CALLGRIND_CONTROL and calls % CAPTURE_BATCH == 0
    counted: dict[str, Any] = {}
    for name, capturing in (("runtime", False), ("runtime_capture", True)):
        home = workdir / f"instructions-{load.name}-{name}"
        output = home / "callgrind.out"
        home.mkdir(parents=True)
        log.info("  %s, %s under callgrind ...", load.name, name)
        server = await start_runtime(
            home,
            registry_address,
            ref,
            nats_server if capturing else None,
            f"{name}_callgrind",
            wrapper=[VALGRIND, "--tool=callgrind", "--instr-atstart=no", f"--callgrind-out-file={output}"],
            settings={"MLMESH_RUNTIME_CAPTURE_FLUSH_SECONDS": "3600"},
            start_seconds=600,
        )
        load.answer_size[server.name] = load.answer_size["runtime"]
        pid = server.pids[0]
        try:
            await h2load(server, load, calls, plan, timeout=1800)
            if capturing:
                await capture_drained(server, timeout=300)
            await callgrind_control(pid, "--instr=on")
            answered = await h2load(server, load, calls, plan, timeout=1800)
            await asyncio.sleep(SETTLE_SECONDS)
            await callgrind_control(pid, "--instr=off")
            captured = await asyncio.to_thread(capture_counts, server) if capturing else None
            await callgrind_control(pid, "--dump")
            total = await asyncio.to_thread(callgrind_total, output)
        finally:
            server.stop()
        entry: dict[str, Any] = {
            "instructions_per_call": round(total / answered["calls"]),
            "answers_checked": answered["answers_checked"],
        }
        if captured is not None:
            entry["every_request_captured"] = captured["published"] == captured["requests_ok"] == 2 * calls
        counted[name] = entry
    plain, capturing_entry = counted["runtime"]["instructions_per_call"], counted["runtime_capture"]
    extra = capturing_entry["instructions_per_call"] - plain
    return {
        **counted,
        "calls": calls,
        "capture_extra_percent": round(extra / plain * 100, 2),
        "answers_checked": counted["runtime"]["answers_checked"] and capturing_entry["answers_checked"],
    }


async def counted_capture(
    workdir: Path, registry_address: str, ref: str, nats_server: NatsProcess, loads: list[Load], plan: Plan
) -> dict[str, Any]:
    """`capture_instructions` for each load; a failure is recorded and the run goes on."""
    if not (VALGRIND and CALLGRIND_CONTROL):
        return {"skipped": "valgrind is not installed (apt-get install valgrind): capture was not counted"}
    log.info("capture, counted in instructions under callgrind:")
    counted: dict[str, Any] = {}
    calls = {"single_row": plan.instruction_calls_single, "rows_1000": plan.instruction_calls_batch}
    for load in loads:
        try:
            counted[load.name] = await capture_instructions(
                workdir, registry_address, ref, nats_server, load, calls[load.name], plan
            )
        except Exception as error:
            log.error("counting %s failed:\n%s", load.name, traceback.format_exc())
            counted[load.name] = {"error": f"{type(error).__name__}: {error}"}
    return counted


async def callgrind_control(pid: int, *arguments: str) -> None:
    """Tell the callgrind run `pid` to count (--instr=on), stop counting or write its counts (--dump)."""
    assert CALLGRIND_CONTROL
    process = await asyncio.create_subprocess_exec(
        CALLGRIND_CONTROL, *arguments, str(pid), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
    )
    if await process.wait() != 0:
        raise RuntimeError(f"callgrind_control {' '.join(arguments)} failed")


def callgrind_total(output: Path) -> int:
    """The instructions counted in callgrind's dump (`<output>.1`, written by `callgrind_control --dump`)."""
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        for dump in sorted(output.parent.glob(f"{output.name}.*")):
            for line in dump.read_text(errors="replace").splitlines():
                if line.startswith("totals:"):
                    return int(line.split()[1])
        time.sleep(0.2)
    raise RuntimeError(f"callgrind wrote no dump beside {output}")


def over_pairs(summaries: list[dict[str, Any]]) -> dict[str, Any]:
    """One kind of server over every pair: its calls over their seconds, its CPU per call over its
    calls, and one "round" per pair, so that the verdict gives the pairs one by one."""
    calls = sum(summary["calls"] for summary in summaries)
    seconds = sum(summary["seconds"] for summary in summaries)
    result = {
        "calls": calls,
        "per_second": round(calls / seconds, 1) if seconds else None,
        "server_cpu_us_per_call": per_call_mean(summaries, "server_cpu_us_per_call"),
        "answers_checked": all(summary["answers_checked"] for summary in summaries),
        "rounds": [{"per_second": summary["per_second"]} for summary in summaries],
    }
    if (store := per_call_mean(summaries, "capture_store_cpu_us_per_call")) is not None:
        result["capture_store_cpu_us_per_call"] = store
    return result


def per_call_mean(entries: list[dict[str, Any]], key: str) -> float | None:
    """A per-call figure over several runs, each weighed by its calls (CPU per call is less swayed
    by a busy machine than calls/s); None when a run lacks it or none made a call."""
    calls = sum(entry["calls"] for entry in entries)
    if not calls or any(entry.get(key) is None for entry in entries):
        return None
    return round(sum(entry[key] * entry["calls"] for entry in entries) / calls, 1)


def summarise(measured: Measured, rows: int) -> dict[str, Any]:
    """Every round of one server together: calls/s over the summed time, percentiles over all calls."""
    runs = measured.rounds
    calls = sum(run["calls"] for run in runs)
    seconds = sum(run["seconds"] for run in runs)
    per_second = round(calls / seconds, 1) if seconds else None
    result: dict[str, Any] = {
        "calls": calls,
        "seconds": round(seconds, 3),
        "per_second": per_second,
    }
    if rows > 1 and per_second:
        result["rows_per_second"] = round(per_second * rows, 1)
    result["latency"] = latency_summary(measured.latencies)
    result["answers_checked"] = all(run["answers_checked"] and run["warmup"]["answers_checked"] for run in runs)
    for key in (
        "server_cpu_percent",
        "h2load_cpu_percent",
        "machine_cpu_percent",
        "other_cpu_percent",
        "capture_store_cpu_percent",
    ):
        values = [run[key] for run in runs if key in run]
        if values:
            result[key] = round(sum(values) / len(values), 1)
    if (spent := per_call_mean(runs, "server_cpu_us_per_call")) is not None:
        result["server_cpu_us_per_call"] = spent
        if (stored := per_call_mean(runs, "capture_store_cpu_us_per_call")) is not None:
            result["capture_store_cpu_us_per_call"] = stored
        roles = runs[0].get("server_cpu_percent_by_process")
        if roles:
            result["server_cpu_us_per_call_by_process"] = {
                role: round(
                    sum(run["server_cpu_percent_by_process"][role] / 100 * run["seconds"] for run in runs)
                    / calls
                    * 1e6,
                    1,
                )
                for role in roles
            }
    result["rounds"] = runs
    return result


async def run_phase(servers: list[Server], load: Load, plan: Plan, workdir: Path, profiler: Profiler) -> dict[str, Any]:
    """Each server in turn, `plan.rounds` times, the order reversed every other round, so that
    drift of the machine during the phase weighs on every server alike."""
    results: dict[str, Any] = {}
    measured = {server.name: Measured() for server in servers}
    failed: dict[str, str] = {}
    for round_number in range(plan.rounds):
        order = servers if round_number % 2 == 0 else list(reversed(servers))
        for server in order:
            if server.name in failed:
                continue
            log.info("  %s, %s, round %d ...", load.name, server.name, round_number + 1)
            try:
                await measure_once(server, load, plan, workdir, round_number, measured[server.name], profiler)
                if server.captures:
                    # What it still has to encode and send must not weigh on the next server's run.
                    settled = time.perf_counter()
                    await capture_drained(server)
                    measured[server.name].rounds[-1]["capture_settle_seconds"] = round(time.perf_counter() - settled, 2)
            except Exception as error:
                log.error("  %s on %s failed:\n%s", load.name, server.name, traceback.format_exc())
                failed[server.name] = f"{type(error).__name__}: {error}"
    for server in servers:
        if server.name in failed:
            results[server.name] = {"error": failed[server.name]}
        else:
            results[server.name] = summarise(measured[server.name], load.rows)
            results[server.name]["peak_memory_mb"] = round(peak_memory_mb(server.pids), 1)
    return results


# ---------------------------------------------------------------- capture check


def capture_counts(server: Server) -> dict[str, float]:
    """Captured rows published and dropped, and requests answered OK, from the runtime's /metrics."""
    with urllib.request.urlopen(f"http://{server.http_address}/metrics", timeout=5) as answer:
        text = answer.read().decode()
    counts = {"published": 0.0, "dropped": 0.0, "requests_ok": 0.0}
    for line in text.splitlines():
        if line.startswith("mlmesh_runtime_capture_rows_total{"):
            outcome = re.search(r'outcome="(\w+)"', line)
            if outcome and outcome.group(1) in counts:
                counts[outcome.group(1)] += float(line.rsplit(" ", 1)[1])
        elif line.startswith("mlmesh_runtime_requests_total{") and 'code="OK"' in line:
            counts["requests_ok"] += float(line.rsplit(" ", 1)[1])
    return counts


async def capture_drained(server: Server, timeout: float = 60) -> dict[str, float]:
    """The capture counts once every answered request was published or dropped (or `timeout` passed)."""
    deadline = time.monotonic() + timeout
    counts = await asyncio.to_thread(capture_counts, server)
    while counts["published"] + counts["dropped"] < counts["requests_ok"] and time.monotonic() < deadline:
        await asyncio.sleep(0.1)
        counts = await asyncio.to_thread(capture_counts, server)
    return counts


def capture_report(before: dict[str, float], after: dict[str, float]) -> dict[str, Any]:
    """What the capturing runtime answered during a phase (warm-up runs included), and what of it
    reached the capture stream."""
    answered, published, dropped = (int(after[key] - before[key]) for key in ("requests_ok", "published", "dropped"))
    return {
        "requests_answered": answered,
        "rows_published": published,
        "rows_dropped": dropped,
        "every_request_captured": answered > 0 and published == answered,
    }


# ---------------------------------------------------------------- the report


def machine() -> dict[str, Any]:
    cpu_model = ""
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu_model = line.split(":", 1)[1].strip()
                break

    def version_of(package: str) -> str | None:
        with contextlib.suppress(importlib.metadata.PackageNotFoundError):
            return importlib.metadata.version(package)
        return None

    h2load_version = ""
    with contextlib.suppress(Exception):
        h2load_version = subprocess.run(
            [H2LOAD or "h2load", "--version"], capture_output=True, text=True, timeout=10
        ).stdout.strip()
    return {
        "nproc": os.cpu_count(),
        "cpus_usable": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else None,
        "cpu_model": cpu_model,
        "load_average_at_start": [round(value, 2) for value in os.getloadavg()],
        "python": platform.python_version(),
        "platform": platform.platform(),
        "versions": {
            "onnxruntime": onnxruntime.__version__,
            "grpcio": version_of("grpcio"),
            "protobuf": version_of("protobuf"),
            "numpy": np.__version__,
            "scikit-learn": version_of("scikit-learn"),
            "skl2onnx": version_of("skl2onnx"),
            "h2load": h2load_version,
        },
    }


DISTURBED_PERCENT = 25.0
"""Mean CPU of other processes during a judged pair of runs above which the verdict says the
machine was not quiet (100 = one core)."""


def median_interval(values: list[float], resamples: int = 2000, seed: int = 7) -> list[float]:
    """A 90% bootstrap interval of the median of `values` (the rounds' ratios): how far the
    machine's noise leaves the figure open."""
    generator = random.Random(seed)
    medians = sorted(statistics.median(generator.choices(values, k=len(values))) for _ in range(resamples))
    return [round(medians[int(0.05 * resamples)], 4), round(medians[int(0.95 * resamples) - 1], 4)]


def capture_cpu_share(results: dict[str, Any]) -> dict[str, Any] | None:
    """What capture adds to each call, counted instead of timed: the in-process cost of offering a
    request and encoding it into its message, over the CPU the runtime spends per call without
    capture (gRPC included). The publish to JetStream (one message per 256 requests) is left out."""
    per_request = results.get("in_process_breakdown_us", {}).get("single_row", {}).get("capture_per_request")
    runtime = results.get("single_row", {}).get("runtime", {})
    per_call = runtime.get("server_cpu_us_per_call") if isinstance(runtime, dict) else None
    if not per_request or not per_call:
        return None
    return {
        "capture_us_per_request": per_request,
        "runtime_cpu_us_per_call": per_call,
        "share": round(per_request / per_call, 4),
    }


def judge(results: dict[str, Any], plan: Plan) -> dict[str, Any]:
    """Pass/fail per target; a missing figure, or one whose answers were not all right, fails.

    Besides the ratio of the summed rounds, each verdict gives the ratio of every round on its own
    (the two servers' runs of one round were close in time), and the CPU other processes used
    meanwhile, so that a verdict made on a busy machine shows it."""

    def entry(phase: str, server: str) -> dict[str, Any] | None:
        value = results.get(phase, {}).get(server)
        return value if isinstance(value, dict) and value.get("answers_checked") is True else None

    def pick(value: Any, path: tuple[str, ...]) -> float | None:
        for key in path:
            value = value.get(key) if isinstance(value, dict) else None
        return value if isinstance(value, int | float) else None

    pairs = {
        "runtime_single_row_throughput": ("single_row", "runtime", "floor", ("per_second",), "calls/s"),
        "runtime_single_row_p99": ("single_row", "runtime", "floor", ("latency", "p99_ms"), "ms"),
        "runtime_1000_rows_throughput": ("rows_1000", "runtime", "floor", ("rows_per_second",), "rows/s"),
        "capture_single_row_throughput": ("capture_pairs", "runtime_capture", "runtime", ("per_second",), "calls/s"),
        "capture_1000_rows_throughput": ("rows_1000", "runtime_capture", "runtime", ("rows_per_second",), "rows/s"),
        "router_single_row_throughput": ("single_row", "router", "runtime", ("per_second",), "calls/s"),
    }
    router = results.get("single_row", {}).get("router", {})
    verdicts: dict[str, Any] = {}
    judged = []
    disturbed = []
    for name, (comparison, target, what) in TARGETS.items():
        phase, server, baseline_server, path, unit = pairs[name]
        if name.startswith("router") and isinstance(router, dict) and "skipped" in router:
            verdicts[name] = {"what": what, "skipped": router["skipped"]}
            continue
        measured_entry = entry(phase, server)
        baseline_entry = entry(phase, baseline_server)
        value, baseline = pick(measured_entry, path), pick(baseline_entry, path)
        measured = ratio(value, baseline)
        passed = measured is not None and (measured >= target if comparison == ">=" else measured <= target)
        judged.append(passed)
        verdict: dict[str, Any] = {
            "what": what,
            "value": value,
            "baseline": baseline,
            "unit": unit,
            "ratio": measured,
            "target": f"ratio {comparison} {target:g}",
            "pass": passed,
        }
        if measured_entry and baseline_entry:
            round_path = ("per_second",) if path == ("rows_per_second",) else path
            per_round = [
                ratio(pick(mine, round_path), pick(theirs, round_path))
                for mine, theirs in zip(measured_entry["rounds"], baseline_entry["rounds"], strict=False)
            ]
            verdict["ratio_per_round"] = per_round
            if unit != "ms":
                # CPU per call is steadier than calls/s on a busy machine; baseline over value, so that
                # it reads like the throughput ratio (below 1: the server spends more per call).
                cpu_ratio = ratio(
                    baseline_entry.get("server_cpu_us_per_call"), measured_entry.get("server_cpu_us_per_call")
                )
                verdict["cpu_per_call_ratio"] = cpu_ratio
            known = [value for value in per_round if value is not None]
            if known:
                verdict["ratio_median_of_rounds"] = round(statistics.median(known), 4)
            if len(known) >= 5:
                verdict["ratio_median_interval_90"] = median_interval(known)
            others = [
                run["other_cpu_percent"]
                for run in measured_entry["rounds"] + baseline_entry["rounds"]
                if "other_cpu_percent" in run
            ]
            if others:
                verdict["other_cpu_percent_during"] = round(sum(others) / len(others), 1)
                if verdict["other_cpu_percent_during"] > DISTURBED_PERCENT:
                    disturbed.append(name)
        if name == "capture_single_row_throughput":
            verdict["cpu_share_in_process"] = capture_cpu_share(results)
        if name.startswith("capture") and measured_entry and "capture_store_cpu_us_per_call" in measured_entry:
            # The nats-server storing the captures shares this machine's CPUs with the runtime (and
            # is left out of `other_cpu_percent_during`): part of what capture costs here.
            verdict["capture_store_cpu_us_per_call"] = measured_entry["capture_store_cpu_us_per_call"]
            if "capture_store_cpu_percent" in measured_entry:
                verdict["capture_store_cpu_percent"] = measured_entry["capture_store_cpu_percent"]
        verdicts[name] = verdict
    counted = results.get("capture_instructions", {})
    for name, (load_name, target, what) in INSTRUCTION_TARGETS.items():
        entry = counted.get(load_name)
        verdict = {"what": what, "target": f"ratio >= {target:g}", "unit": "instructions/call (callgrind)"}
        if entry and entry.get("answers_checked"):
            without = entry["runtime"]["instructions_per_call"]
            with_capture = entry["runtime_capture"]["instructions_per_call"]
            measured = ratio(without, with_capture)
            captured = entry["runtime_capture"].get("every_request_captured") is True
            passed = measured is not None and measured >= target and captured
            verdict.update(value=with_capture, baseline=without, ratio=measured, every_request_captured=captured)
        else:
            passed = False
            verdict["missing"] = counted.get("skipped") or (entry or {}).get("error")
        verdict["pass"] = passed
        judged.append(passed)
        verdicts[name] = verdict
    verdicts["all_pass"] = bool(judged) and all(judged)
    notes = []
    if plan is QUICK:
        notes.append("quick mode: short runs, one round; run without --quick to judge")
    if disturbed:
        notes.append(
            f"other processes used more than {DISTURBED_PERCENT:g}% CPU on average during the runs behind "
            f"{', '.join(disturbed)}: the machine was not quiet, so those verdicts are unsure"
        )
    if notes:
        verdicts["note"] = "; ".join(notes)
    return verdicts


def ratios_to(results: dict[str, Any], baseline: str, key: str) -> dict[str, float | None]:
    base = results.get(baseline, {}).get(key) if isinstance(results.get(baseline), dict) else None
    return {
        name: ratio(value.get(key), base)
        for name, value in results.items()
        if isinstance(value, dict) and name != baseline and key in value
    }


async def run(arguments: argparse.Namespace) -> dict[str, Any]:
    plan = QUICK if arguments.quick else FULL
    if arguments.connections or arguments.streams:
        plan = replace(
            plan, connections=arguments.connections or plan.connections, streams=arguments.streams or plan.streams
        )
    if arguments.rounds:
        plan = replace(plan, rounds=arguments.rounds)
    if arguments.capture_pairs:
        plan = replace(plan, capture_pairs=arguments.capture_pairs)
    profiler = Profiler(Path(arguments.profile) if arguments.profile else None)
    router_available = importlib.util.find_spec(ROUTER_MODULE) is not None
    report: dict[str, Any] = {
        "benchmark": "serving",
        "timestamp": datetime.now(UTC).isoformat(timespec="seconds").replace("+00:00", "Z"),
        "mode": "quick" if arguments.quick else "full",
        "machine": machine(),
        "code": code_version(),
        "setup": {
            "load_generator": (
                f"h2load, one process, one thread, {plan.connections} HTTP/2 connections x {plan.streams} streams = "
                f"{plan.connections * plan.streams} calls in flight, the same request bytes for every server; "
                "each measurement is a warm-up run (not counted, its rate sizes the next) then a run of about "
                f"{plan.seconds:g} s whose --log-file gives per-request latency; every answer's DATA bytes must "
                "equal calls x (that server's real answer size + 5), so a gRPC error behind HTTP 200 cannot count"
            ),
            "order": (
                f"{plan.rounds} round(s) per phase, servers in turn, order reversed every other round; a server's "
                "figure sums its rounds (calls / seconds; percentiles over all its calls)"
            ),
            "same_host": (
                "servers, h2load, the registry and nats-server share this machine's CPUs; every server is idle "
                "while another is measured; compare ratios, not absolute figures"
            ),
            "requests": {
                "single_row": "ModelInfer, model_name bench, typed fp32_contents, x FP32 [1, 30] (answer typed)",
                "rows_1000": "ModelInfer, model_name bench, raw_input_contents, x FP32 [1000, 30] (answer raw)",
            },
            "plan": asdict(plan),
            "profiled": bool(arguments.profile),
        },
    }
    results: dict[str, Any] = {}
    report["results"] = results
    with tempfile.TemporaryDirectory(prefix="mlmesh-bench-serving-") as temporary:
        workdir = Path(temporary)
        nats_server = NatsProcess(workdir / "nats")
        registry = RegistryProcess(workdir / "registry", f"sqlite:///{workdir / 'registry.db'}", "", 1)
        servers: list[Server] = []
        endpoint: Endpoint | None = None
        router_error: dict[str, Any] = {"error": "the endpoint was not started"}
        try:
            log.info("training and converting the model ...")
            model = await asyncio.to_thread(train_model, workdir / "model")
            report["model"] = model.description
            report["model"]["in_process_inference"] = await asyncio.to_thread(in_process_inference, model)
            log.info("in-process breakdown ...")
            try:
                results["in_process_breakdown_us"] = await in_process_breakdown(model, plan)
            except Exception as error:
                log.error("the in-process breakdown failed:\n%s", traceback.format_exc())
                results["in_process_breakdown_us"] = {"error": f"{type(error).__name__}: {error}"}

            log.info("starting nats-server and the registry ...")
            nats_server.start()
            registry.nats_url = nats_server.url
            registry.start()
            registry_address = f"127.0.0.1:{registry.port}"
            async with grpc.aio.insecure_channel(registry_address) as channel:
                await registry.wait_serving(channel)
            with RegistryClient(registry_address, actor="bench") as client:
                version = client.register_model(MODEL_NAME, [model.path], framework="onnx")
            ref = f"{MODEL_NAME}:{version.version}"
            report["setup"]["model_ref"] = ref

            log.info("starting the servers ...")
            # In this order (reversed every other round) each judged pair runs side by side:
            # floor and runtime; the proxy floor and the router last. runtime_capture shows here that
            # every request is captured, under both loads; its cost is judged on fresh pairs below.
            servers.append(start_floor(workdir, model, str(version.version), inline=True))
            servers.append(start_floor(workdir, model, str(version.version), inline=False))
            servers.append(await start_runtime(workdir / "runtime", registry_address, ref, None))
            servers.append(await start_runtime(workdir / "runtime-capture", registry_address, ref, nats_server))
            if router_available:
                try:
                    endpoint = await start_endpoint(workdir / "deployer", registry_address, nats_server.url, ref)
                    assert endpoint.server is not None
                    servers.append(start_proxy_floor(workdir, endpoint))
                    servers.append(endpoint.server)
                    report["setup"]["endpoint_ready_seconds"] = endpoint.setup_seconds
                except Exception as error:
                    log.error("the endpoint did not come up:\n%s", traceback.format_exc())
                    router_error = {"error": f"{type(error).__name__}: {error}"}
            report["setup"]["servers"] = {server.name: server.description for server in servers}
            busy_before, idle_started = machine_busy_seconds(), time.perf_counter()
            await asyncio.sleep(3)
            busy_after = machine_busy_seconds()
            if busy_before is not None and busy_after is not None:
                # Every part started and idle: what other_cpu_percent would be with nothing else running.
                idle = (busy_after - busy_before) / (time.perf_counter() - idle_started) * 100
                results["machine_cpu_percent_idle"] = round(idle, 1)

            loads = []
            for name, request, rows, warmup in (
                ("single_row", single_row_request(model), 1, plan.warmup_calls_single),
                ("rows_1000", batch_request(model), BATCH_ROWS, plan.warmup_calls_batch),
            ):
                body_path = workdir / f"{name}.bin"
                body_path.write_bytes(grpc_body(request))
                load = Load(name, body_path, rows, warmup)
                rows_in = model.single if rows == 1 else model.batch
                for server in servers:
                    answer = await first_answer(server, request)
                    load.answer_size[server.name] = len(answer.SerializeToString())
                    outputs = decoded_outputs(answer)
                    expected = local_outputs(model, rows_in)
                    if not (
                        np.array_equal(outputs.get("label"), expected["label"])
                        and np.allclose(outputs.get("probabilities"), expected["probabilities"])
                    ):
                        raise RuntimeError(f"{server.name} answered {outputs}, not what the model computes here")
                loads.append((load, request))
            report["setup"]["answer_bytes"] = {load.name: load.answer_size for load, _ in loads}
            report["setup"]["request_bytes"] = {load.name: len(request.SerializeToString()) for load, request in loads}

            capturing = next(server for server in servers if server.captures)
            results["capture"] = {
                "how": (
                    "mlmesh_runtime_capture_rows_total{outcome} and mlmesh_runtime_requests_total{code=OK} from "
                    "the capturing runtime's /metrics before and after each phase (warm-up runs included); after "
                    "each of its runs the next server waits until its capture queue is empty"
                )
            }
            for load, _ in loads:
                log.info("%s requests:", load.name)
                before = await capture_drained(capturing)
                results[load.name] = await run_phase(servers, load, plan, workdir, profiler)
                results["capture"][load.name] = capture_report(before, await capture_drained(capturing))
            log.info("single_row requests, fresh pairs without and with capture:")
            results["capture_pairs"] = await capture_pairs(
                workdir, registry_address, ref, nats_server, loads[0][0], plan, profiler
            )
            results["capture_instructions"] = await counted_capture(
                workdir, registry_address, ref, nats_server, [load for load, _ in loads], plan
            )
            for phase_name in ("single_row", "rows_1000"):
                if not router_available:
                    results[phase_name]["router"] = {"skipped": "the endpoint router is not available"}
                elif endpoint is None:
                    results[phase_name]["router"] = router_error
            results["ratios"] = {
                "single_row_calls_per_second_to_floor": ratios_to(results["single_row"], "floor", "per_second"),
                "single_row_calls_per_second_to_runtime": ratios_to(results["single_row"], "runtime", "per_second"),
                "single_row_calls_per_second_to_proxy_floor": ratios_to(
                    results["single_row"], "proxy_floor", "per_second"
                ),
                "rows_1000_rows_per_second_to_floor": ratios_to(results["rows_1000"], "floor", "rows_per_second"),
                "rows_1000_rows_per_second_to_runtime": ratios_to(results["rows_1000"], "runtime", "rows_per_second"),
            }
        except Exception as error:
            log.error("the run failed:\n%s", traceback.format_exc())
            report["error"] = f"{type(error).__name__}: {error}"
        finally:
            if endpoint is not None:
                await asyncio.to_thread(endpoint.stop)
            for server in servers:
                if server.process is not None:
                    server.stop()
            registry.stop()
            nats_server.stop()
    report["machine"]["load_average_at_end"] = [round(value, 2) for value in os.getloadavg()]
    report["targets"] = judge(results, plan)
    return report


def local_outputs(model: Model, rows: np.ndarray) -> dict[str, np.ndarray]:
    options = onnxruntime.SessionOptions()
    options.intra_op_num_threads = 1
    session = onnxruntime.InferenceSession(str(model.path), options, providers=["CPUExecutionProvider"])
    label, probabilities = session.run(["label", "probabilities"], {"x": rows})
    return {"label": label, "probabilities": probabilities}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="short runs, one round (checks that it all works)")
    parser.add_argument("--connections", type=int, default=0, help="h2load connections (default 2)")
    parser.add_argument("--streams", type=int, default=0, help="calls in flight per connection (default 8)")
    parser.add_argument("--rounds", type=int, default=0, help="measurements of each server per phase")
    parser.add_argument(
        "--capture-pairs",
        type=int,
        default=0,
        help="fresh pairs of runtimes (without, with capture) that judge capture's cost (default 4; pairs "
        "differ by several percent, so a cost near 5%% takes dozens of pairs to settle)",
    )
    parser.add_argument("--profile", metavar="DIR", help="sample each measured server with py-spy into DIR")
    arguments = parser.parse_args()
    logging.basicConfig(level=logging.INFO, stream=sys.stderr, format="%(asctime)s %(message)s", datefmt="%H:%M:%S")
    logging.getLogger("nats").setLevel(logging.CRITICAL)
    if H2LOAD is None:
        raise SystemExit(
            "bench/serving.py needs h2load, the HTTP/2 load generator: apt-get install -y nghttp2-client "
            "(Debian/Ubuntu; it is not in the venv)"
        )
    report = asyncio.run(run(arguments))
    json.dump(report, sys.stdout, indent=2)
    sys.stdout.write("\n")


if __name__ == "__main__":
    main()

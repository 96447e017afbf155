"""Profiler benchmark: how long a default profile takes, and whether the profiler's figures agree
with bench/serving.py's for the same model on the same machine in the same run.

Prints one JSON document to stdout; progress goes to stderr. Run from the repository root:

    .venv/bin/python bench/profiler.py            # full run (about 3 min)
    .venv/bin/python bench/profiler.py --quick    # one round of the agreement phase

The model is bench/serving.py's (a scikit-learn random forest converted to ONNX), registered in a
real registry process; the profiler runs as its own process (`python -m services.profiler`).

- `default_profile`: `ProfileModel` with nothing but the model and an SLO (every default: sizes,
  levels 1, 2, 4, 8, 16, step lengths), timed from the call to the stored profile.
- `agreement`: in alternating order, (a) bench/serving.py's measurement of the runtime (its own
  process, default settings, h2load with 2 connections x 8 streams, a warm-up run and then a
  measured run of 1.5 s) and (b) a profile of one size (every core, one intra-op thread, as the
  serving benchmark's runtime runs) at 16 calls in flight with 1.5 s steps. The ratios of the
  profiler's throughput and p50 to the serving benchmark's are judged.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import os
import statistics
import sys
import tempfile
import time
import traceback
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import grpc
from registry import NatsProcess, Profiler, RegistryProcess, code_version, grpc_body, start_service_process
from serving import (
    H2LOAD,
    MODEL_NAME,
    Load,
    Measured,
    Plan,
    Server,
    first_answer,
    machine,
    measure_once,
    single_row_request,
    start_runtime,
    stop_process,
    summarise,
    train_model,
)

from services.client import ProfilerClient, RegistryClient

AGREEMENT_CONCURRENCY = 16
STEP_SECONDS = 1.5
SLO_P99_MS = 100.0
log = logging.getLogger("bench.profiler")


def start_profiler(home: Path, registry_address: str, nats_url: str) -> tuple[Any, str]:
    settings = {
        "MLMESH_NATS_URL": nats_url,
        "MLMESH_PROFILER_REGISTRY_ADDRESS": registry_address,
        "MLMESH_PROFILER_LOAD_GENERATOR": "h2load",
    }
    return start_service_process("services.profiler", home, settings, "mlmesh.v1.ProfilerService")


def profile_summary(profile: Any) -> dict[str, Any]:
    return {
        "status": profile.status,
        "reason": profile.reason,
        "seconds_in_profiler": profile.seconds,
        "load_generator": profile.load_generator,
        "sizes": [
            {
                "size": {"cpus": result.size.cpus, "threads": result.size.threads, "batch": result.size.max_batch_rows},
                "start_seconds": result.start_seconds,
                "capacity_rps": result.capacity_rps,
                "steps": [
                    {
                        "concurrency": step.concurrency,
                        "throughput_rps": step.throughput_rps,
                        "p50_ms": step.p50_ms,
                        "p99_ms": step.p99_ms,
                        "cpu_percent": step.cpu_percent,
                        "memory_mb": step.memory_mb,
                        "load_generator_cpu_percent": step.load_generator_cpu_percent,
                        "errors": step.errors,
                    }
                    for step in result.steps
                ],
            }
            for result in profile.sizes
        ],
        "recommendation": {
            "met": profile.recommendation.met,
            "cpus": profile.recommendation.cpus,
            "memory_mb": profile.recommendation.memory_mb,
            "replicas": profile.recommendation.replicas,
            "max_batch_rows": profile.recommendation.max_batch_rows,
            "explanation": profile.recommendation.explanation,
        },
    }


async def serving_bench_round(
    runtime: Server, load: Load, plan: Plan, workdir: Path, round_number: int, measured: Measured
) -> dict[str, Any]:
    await measure_once(runtime, load, plan, workdir, round_number, measured, Profiler(None))
    latest = measured.rounds[-1]
    return {
        "per_second": latest["per_second"],
        "p50_ms": latest["latency"].get("p50_ms"),
        "p99_ms": latest["latency"].get("p99_ms"),
        "answers_checked": latest["answers_checked"],
        "server_cpu_percent": latest.get("server_cpu_percent"),
        "h2load_cpu_percent": latest.get("h2load_cpu_percent"),
    }


def profiler_round(address: str, ref: str) -> dict[str, Any]:
    cores = os.cpu_count() or 1
    with ProfilerClient(address, timeout=600) as client:
        profile = client.profile(
            ref,
            slo_p99_ms=SLO_P99_MS,
            concurrency=[AGREEMENT_CONCURRENCY],
            sizes=[{"cpus": cores, "threads": 1}],
            step_seconds=STEP_SECONDS,
            warmup_seconds=0.5,
        )
    if profile.status != 2:
        raise RuntimeError(f"the profile failed: {profile.reason}")
    (step,) = profile.sizes[0].steps
    return {
        "per_second": step.throughput_rps,
        "p50_ms": step.p50_ms,
        "p99_ms": step.p99_ms,
        "server_cpu_percent": step.cpu_percent,
        "load_generator_cpu_percent": step.load_generator_cpu_percent,
        "errors": step.errors,
    }


def judge(results: dict[str, Any]) -> dict[str, Any]:
    judged: dict[str, Any] = {}
    seconds = results.get("default_profile", {}).get("wall_seconds")
    if seconds is not None:
        judged["default_profile_seconds"] = {"value": seconds, "target": "<= 60", "pass": seconds <= 60}
    ratios = results.get("agreement", {}).get("ratios", {})
    for key, name in (("per_second", "throughput_ratio_to_serving_bench"), ("p50_ms", "p50_ratio_to_serving_bench")):
        value = ratios.get(key)
        if value is not None:
            judged[name] = {"value": value, "target": "0.85 .. 1.15", "pass": 0.85 <= value <= 1.15}
    return judged


async def run(arguments: argparse.Namespace) -> dict[str, Any]:
    rounds = 1 if arguments.quick else arguments.rounds
    report: dict[str, Any] = {
        "benchmark": "profiler",
        "timestamp": datetime.now(UTC).isoformat(timespec="seconds").replace("+00:00", "Z"),
        "mode": "quick" if arguments.quick else "full",
        "machine": machine(),
        "code": code_version(),
        "setup": {
            "default_profile": f"ProfileModel(ref, slo p99 {SLO_P99_MS:g} ms), every other field default",
            "agreement": (
                f"{rounds} round(s), order alternating: bench/serving.py's runtime measurement (h2load 2 x 8, "
                f"warm-up then ~{STEP_SECONDS:g} s) and a profile of one size ({os.cpu_count()} cpus, 1 thread) at "
                f"{AGREEMENT_CONCURRENCY} in flight, {STEP_SECONDS:g} s step; medians compared"
            ),
        },
    }
    results: dict[str, Any] = {}
    report["results"] = results
    with tempfile.TemporaryDirectory(prefix="mlmesh-bench-profiler-") as temporary:
        workdir = Path(temporary)
        nats_server = NatsProcess(workdir / "nats")
        registry = RegistryProcess(workdir / "registry", f"sqlite:///{workdir / 'registry.db'}", "", 1)
        profiler_process = None
        runtime: Server | None = None
        try:
            log.info("training and converting the model ...")
            model = await asyncio.to_thread(train_model, workdir / "model")
            report["model"] = model.description
            nats_server.start()
            registry.nats_url = nats_server.url
            registry.start()
            registry_address = f"127.0.0.1:{registry.port}"
            async with grpc.aio.insecure_channel(registry_address) as channel:
                await registry.wait_serving(channel)
            with RegistryClient(registry_address, actor="bench") as client:
                version = client.register_model(MODEL_NAME, [model.path], framework="onnx")
            ref = f"{MODEL_NAME}:{version.version}"
            profiler_process, address = await asyncio.to_thread(
                start_profiler, workdir / "profiler", registry_address, nats_server.url
            )

            log.info("a default profile ...")
            started = time.perf_counter()
            with ProfilerClient(address, timeout=600) as client:
                profile = await asyncio.to_thread(client.profile, ref, slo_p99_ms=SLO_P99_MS)
            results["default_profile"] = {
                "wall_seconds": round(time.perf_counter() - started, 1),
                **profile_summary(profile),
            }

            log.info("agreement with bench/serving.py ...")
            runtime = await start_runtime(workdir / "runtime", registry_address, ref, None)
            request = single_row_request(model)
            body_path = workdir / "single_row.bin"
            body_path.write_bytes(grpc_body(request))
            load = Load("single_row", body_path, 1, 400)
            load.answer_size[runtime.name] = len((await first_answer(runtime, request)).SerializeToString())
            plan = Plan(
                seconds=STEP_SECONDS,
                rounds=rounds,
                warmup_calls_single=400,
                warmup_calls_batch=16,
                connections=2,
                streams=8,
                breakdown_calls=0,
            )
            measured = Measured()
            serving_rounds: list[dict[str, Any]] = []
            profiler_rounds: list[dict[str, Any]] = []
            for number in range(rounds):
                # The profile starts its own runtime; the serving benchmark's idles meanwhile.
                order = ("serving", "profiler") if number % 2 == 0 else ("profiler", "serving")
                for which in order:
                    log.info("  round %d: %s", number + 1, which)
                    if which == "serving":
                        serving_rounds.append(await serving_bench_round(runtime, load, plan, workdir, number, measured))
                    else:
                        profiler_rounds.append(await asyncio.to_thread(profiler_round, address, ref))
            agreement: dict[str, Any] = {
                "serving_bench": {"rounds": serving_rounds, "summary": summarise(measured, 1)["latency"]},
                "profiler": {"rounds": profiler_rounds},
                "medians": {},
                "ratios": {},
            }
            for key in ("per_second", "p50_ms", "p99_ms"):
                serving_median = statistics.median(r[key] for r in serving_rounds)
                profiler_median = statistics.median(r[key] for r in profiler_rounds)
                agreement["medians"][key] = {"serving_bench": serving_median, "profiler": profiler_median}
                agreement["ratios"][key] = round(profiler_median / serving_median, 3) if serving_median else None
            results["agreement"] = agreement
        except Exception as error:
            log.error("the run failed:\n%s", traceback.format_exc())
            report["error"] = f"{type(error).__name__}: {error}"
        finally:
            if runtime is not None:
                runtime.stop()
            if profiler_process is not None:
                stop_process(profiler_process)
            registry.stop()
            nats_server.stop()
    report["machine"]["load_average_at_end"] = [round(value, 2) for value in os.getloadavg()]
    report["targets"] = judge(results)
    return report


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="one round of the agreement phase")
    parser.add_argument("--rounds", type=int, default=6, help="rounds of the agreement phase (default 6)")
    arguments = parser.parse_args()
    logging.basicConfig(level=logging.INFO, stream=sys.stderr, format="%(asctime)s %(message)s", datefmt="%H:%M:%S")
    logging.getLogger("nats").setLevel(logging.CRITICAL)
    if H2LOAD is None:
        raise SystemExit("bench/profiler.py needs h2load: apt-get install -y nghttp2-client")
    report = asyncio.run(run(arguments))
    json.dump(report, sys.stdout, indent=2)
    sys.stdout.write("\n")


if __name__ == "__main__":
    main()

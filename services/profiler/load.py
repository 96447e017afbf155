"""The profiler's load generator and its measures of a serving process.

A step sends the same ModelInfer request over and over with a fixed number of calls in flight,
for a set time, and records every call's latency. h2load (nghttp2's HTTP/2 load generator, a C
program) does it when it is installed: it costs the machine little, so the server rather than
the client is what is measured. Without it, a Python process (grpc.aio) does the same, at a
higher cost of its own. Either way the generator's own CPU is measured, so that a saturated
client shows as such.

Run as `python -m services.profiler.load ADDRESS BODY CONCURRENCY SECONDS`, the Python generator
prints one JSON line: latencies in seconds of the calls that succeeded, and the error count.
"""

from __future__ import annotations

import asyncio
import json
import math
import os
import re
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from services.common.memory import process_memory_mb

INFER_PATH = "/inference.GRPCInferenceService/ModelInfer"
STREAMS_PER_CONNECTION = 8
SATURATED_PERCENT = 90.0
"""A generator using this much of one core is the limit of the step, not the server."""

DATATYPES = {
    "BOOL": np.bool_,
    "UINT8": np.uint8,
    "UINT16": np.uint16,
    "UINT32": np.uint32,
    "UINT64": np.uint64,
    "INT8": np.int8,
    "INT16": np.int16,
    "INT32": np.int32,
    "INT64": np.int64,
    "FP16": np.float16,
    "FP32": np.float32,
    "FP64": np.float64,
}


def infer_request(model: str, inputs: dict[str, tuple[str, np.ndarray]]) -> bytes:
    """A gRPC-framed ModelInferRequest with raw tensors; `inputs` maps each input's name to its
    OIP datatype and values."""
    # Imported here: a process that also loads another copy of the `inference` package's protos
    # (tritonclient's, in the tests) cannot load both.
    from services._proto.inference import open_inference_pb2 as oip

    request = oip.ModelInferRequest(model_name=model)
    for name, (datatype, values) in inputs.items():
        request.inputs.add(name=name, datatype=datatype, shape=list(values.shape))
        request.raw_input_contents.append(np.ascontiguousarray(values, dtype=DATATYPES[datatype]).tobytes())
    return grpc_frame(request.SerializeToString())


def grpc_frame(message: bytes) -> bytes:
    """A gRPC request body: the 5-byte prefix (uncompressed, length), then the message."""
    return b"\x00" + len(message).to_bytes(4, "big") + message


@dataclass
class StepLoad:
    """What the generator saw in one step."""

    latencies: list[float]
    """Seconds, of the calls that succeeded."""
    errors: int
    seconds: float
    cpu_seconds: float
    """The generator's own CPU."""


class LoadGenerator:
    """Drives one address with one request body; `kind` is h2load or python."""

    def __init__(self, kind: str = "auto") -> None:
        found = shutil.which("h2load")
        if kind == "h2load" and found is None:
            raise RuntimeError("h2load is not installed (Debian: nghttp2-client)")
        self.h2load = found if kind in ("auto", "h2load") else None
        self.kind = "h2load" if self.h2load else "python"

    def run(self, address: str, body: bytes, answer_bytes: int, concurrency: int, seconds: float) -> StepLoad:
        """Load for `seconds` with `concurrency` calls in flight. `answer_bytes` is the size of a
        right answer's message: gRPC answers errors with HTTP 200 too, so calls whose answers are
        missing from the DATA bytes count as errors."""
        with tempfile.TemporaryDirectory(prefix="mlmesh-load-") as scratch:
            body_path = Path(scratch) / "body.bin"
            body_path.write_bytes(body)
            before = resource.getrusage(resource.RUSAGE_CHILDREN)
            started = time.perf_counter()
            if self.h2load:
                latencies, errors = self._h2load(address, body_path, answer_bytes, concurrency, seconds, scratch)
            else:
                latencies, errors = self._python(address, body_path, concurrency, seconds)
            elapsed = time.perf_counter() - started
            after = resource.getrusage(resource.RUSAGE_CHILDREN)
        cpu = (after.ru_utime + after.ru_stime) - (before.ru_utime + before.ru_stime)
        return StepLoad(latencies, errors, min(elapsed, seconds) if latencies else elapsed, cpu)

    def _h2load(
        self, address: str, body: Path, answer_bytes: int, concurrency: int, seconds: float, scratch: str
    ) -> tuple[list[float], int]:
        connections = math.ceil(concurrency / STREAMS_PER_CONNECTION)
        streams = math.ceil(concurrency / connections)
        log_file = Path(scratch) / "calls.log"
        command = [
            str(self.h2load),
            "-D",
            f"{max(1, round(seconds * 1000))}ms",
            "-c",
            str(connections),
            "-m",
            str(streams),
            "-t",
            "1",
            "-d",
            str(body),
            "-H",
            "content-type: application/grpc",
            "-H",
            "te: trailers",
            f"--log-file={log_file}",
            f"http://{address}{INFER_PATH}",
        ]
        done = subprocess.run(command, capture_output=True, text=True, timeout=seconds + 60)
        figures = h2load_figures(done.stdout)
        if done.returncode != 0 and figures["succeeded"] == 0:
            raise RuntimeError(f"h2load failed (exit {done.returncode}): {(done.stdout + done.stderr)[-500:]}")
        latencies = []
        other = 0
        if log_file.exists():
            for line in log_file.read_text().splitlines():
                columns = line.split("\t")
                if len(columns) >= 3 and columns[1] == "200":
                    latencies.append(int(columns[2]) / 1e6)
                elif len(columns) >= 3:
                    other += 1
        # Calls whose answer did not arrive as a message of the right size were gRPC errors.
        answered = figures["data_bytes"] // (answer_bytes + 5) if answer_bytes else len(latencies)
        hidden = max(0, len(latencies) - answered)
        if hidden:
            latencies.sort()
            latencies = latencies[: len(latencies) - hidden]
        errors = other + hidden + figures["failed"] + figures["errored"] + figures["timeout"]
        return latencies, errors

    @staticmethod
    def _python(address: str, body: Path, concurrency: int, seconds: float) -> tuple[list[float], int]:
        command = [sys.executable, "-m", "services.profiler.load", address, str(body), str(concurrency), f"{seconds}"]
        done = subprocess.run(command, capture_output=True, text=True, timeout=seconds + 60)
        if done.returncode != 0:
            raise RuntimeError(f"the load generator failed: {done.stderr[-500:]}")
        result = json.loads(done.stdout.strip().splitlines()[-1])
        return result["latencies"], result["errors"]


class RequestRefused(Exception):
    """The runtime answered the sample request with an error."""


def answer_bytes(address: str, body: bytes, timeout: float = 60) -> int:
    """Send the request once; the size of the answer's message (RequestRefused with the status)."""
    import grpc

    with grpc.insecure_channel(address) as channel:
        call = channel.unary_unary(INFER_PATH)  # bytes in, bytes out
        try:
            answer = call(body[5:], timeout=timeout)
        except grpc.RpcError as error:
            code = error.code().name if isinstance(error, grpc.Call) else "UNKNOWN"
            details = error.details() if isinstance(error, grpc.Call) else str(error)
            raise RequestRefused(f"{code}: {details}") from None
    return len(answer)


def h2load_figures(output: str) -> dict[str, int]:
    """Counts from h2load's summary: requests succeeded, failed, errored, timed out; DATA bytes."""

    def number(pattern: str) -> int:
        found = re.search(pattern, output)
        return int(found.group(1)) if found else 0

    return {
        "succeeded": number(r"(\d+) succeeded"),
        "failed": number(r"(\d+) failed"),
        "errored": number(r"(\d+) errored"),
        "timeout": number(r"(\d+) timeout"),
        "data_bytes": number(r"\((\d+)\) data"),
    }


def percentile(ordered: list[float], rank: float) -> float:
    """Nearest-rank percentile of sorted values (0 for none)."""
    if not ordered:
        return 0.0
    return ordered[min(len(ordered) - 1, max(0, math.ceil(rank / 100 * len(ordered)) - 1))]


# ---------------------------------------------------------------- the serving process


def process_tree(root: int) -> list[int]:
    """`root` and every process descended from it (a container's init and the runtime under it)."""
    parents: dict[int, int] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            parents[int(stat.parent.name)] = int(stat.read_text().rsplit(")", 1)[1].split()[1])
        except (OSError, IndexError, ValueError):
            continue
    tree, frontier = [root], [root]
    while frontier:
        frontier = [pid for pid, parent in parents.items() if parent in frontier]
        tree.extend(frontier)
    return tree


def cpu_seconds(pids: list[int]) -> float:
    """User + system CPU seconds so far of these processes (all their threads)."""
    total = 0.0
    for pid in pids:
        try:
            fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        except (OSError, IndexError):
            continue
        total += (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
    return total


def peak_memory_mb(pids: list[int]) -> float:
    """Sum of the processes' peak resident memory (VmHWM), MiB."""
    return sum(process_memory_mb(pid, "VmHWM") for pid in pids)


# ---------------------------------------------------------------- the Python generator


async def _drive(address: str, body: bytes, concurrency: int, seconds: float) -> dict[str, object]:
    import grpc

    message = body[5:]
    latencies: list[float] = []
    errors = 0
    async with grpc.aio.insecure_channel(address) as channel:
        call = channel.unary_unary(INFER_PATH)  # bytes in, bytes out
        deadline = time.perf_counter() + seconds

        async def worker() -> None:
            nonlocal errors
            while (started := time.perf_counter()) < deadline:
                try:
                    await call(message, timeout=30)
                    latencies.append(time.perf_counter() - started)
                except grpc.aio.AioRpcError:
                    errors += 1

        await asyncio.gather(*(worker() for _ in range(concurrency)))
    return {"latencies": latencies, "errors": errors}


def main() -> None:
    address, body_path, concurrency, seconds = sys.argv[1:5]
    result = asyncio.run(_drive(address, Path(body_path).read_bytes(), int(concurrency), float(seconds)))
    print(json.dumps(result))


if __name__ == "__main__":
    main()

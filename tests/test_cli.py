"""The `mlmesh` command against real processes: the launcher, the registry and nats-server."""

from __future__ import annotations

import json
import os
import queue
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
from typer.testing import CliRunner

from services.cli import app
from services.common import natsserver
from services.launcher import down as stop_mesh
from services.launcher import health_status, is_alive, read_state
from tests.conftest import RegistryProcess, clean_environment
from tests.e2e.test_registry_process import worker_pids

REGISTRY_GRPC_SERVICE = "mlmesh.v1.RegistryService"
runner = CliRunner()


def mlmesh(*arguments: str, env: dict[str, str] | None = None, timeout: float = 90) -> subprocess.CompletedProcess:
    """Run the real `mlmesh` entry point in its own process."""
    return subprocess.run(
        [sys.executable, "-m", "services.cli", *arguments],
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


@pytest.fixture
def cli(registry_process: RegistryProcess):
    """Invoke `mlmesh ... --address <test registry>` in this process; returns the Result."""

    def invoke(*arguments: str, input: str | None = None):
        return runner.invoke(
            app,
            [*arguments, "--address", registry_process.address],
            input=input,
            env={"MLMESH_HOME": str(registry_process.home), "MLMESH_ACTOR": "carol"},
        )

    return invoke


def json_of(result) -> object:
    assert result.exit_code == 0, f"exit {result.exit_code}: {result.output}"
    return json.loads(result.stdout)


def test_up_detach_status_refuses_a_second_up_and_down_stops_everything(tmp_path: Path) -> None:
    home = tmp_path / "mesh"
    port, deployer_port, collector_port = natsserver.free_port(), natsserver.free_port(), natsserver.free_port()
    builder_port, drift_port, profiler_port = natsserver.free_port(), natsserver.free_port(), natsserver.free_port()
    notifier_port, automation_port = natsserver.free_port(), natsserver.free_port()
    ports = {
        "MLMESH_AUTOMATION_PORT": str(automation_port),
        "MLMESH_NOTIFIER_PORT": str(notifier_port),
        "MLMESH_REGISTRY_PORT": str(port),
        "MLMESH_BUILDER_PORT": str(builder_port),
        "MLMESH_PROFILER_PORT": str(profiler_port),
        "MLMESH_DEPLOYER_PORT": str(deployer_port),
        "MLMESH_COLLECTOR_PORT": str(collector_port),
        "MLMESH_DRIFT_PORT": str(drift_port),
    }
    environment = {**clean_environment(), "MLMESH_HOME": str(home), **ports}
    settings = {"MLMESH_HOME": str(home), **ports, "MLMESH_NATS_URL": None}
    try:
        # A real process, so the test also proves the mesh outlives the command that detached it.
        started = mlmesh("up", "--detach", env=environment)
        assert started.returncode == 0, started.stderr + started.stdout
        state = read_state(home)
        assert state is not None and state.nats_pid

        status = json.loads(runner.invoke(app, ["status", "--json"], env=settings).stdout)
        assert status["services"]["registry"] == {
            "address": f"127.0.0.1:{port}",
            "pid": state.services["registry"].pid,
            "status": "SERVING",
        }
        assert status["services"]["deployer"]["status"] == "SERVING"
        assert status["services"]["deployer"]["address"] == f"127.0.0.1:{deployer_port}"
        assert status["services"]["collector"]["status"] == "SERVING"
        assert status["services"]["collector"]["address"] == f"127.0.0.1:{collector_port}"
        assert status["services"]["drift"] == {
            "address": f"127.0.0.1:{drift_port}",
            "pid": state.services["drift"].pid,
            "status": "SERVING",
        }
        assert status["services"]["builder"]["status"] == "SERVING"
        assert status["services"]["profiler"] == {
            "address": f"127.0.0.1:{profiler_port}",
            "pid": state.services["profiler"].pid,
            "status": "SERVING",
        }
        assert status["services"]["notifier"]["address"] == f"127.0.0.1:{notifier_port}"
        assert status["services"]["notifier"]["status"] == "SERVING"
        assert status["services"]["automation"]["address"] == f"127.0.0.1:{automation_port}"
        assert status["services"]["automation"]["status"] == "SERVING"
        assert status["nats_url"] == state.nats_url

        again = runner.invoke(app, ["up", "--detach"], env=settings)
        assert again.exit_code == 1
        assert "already running" in again.stderr and "mlmesh down" in again.stderr

        stopped = runner.invoke(app, ["down", "--json"], env=settings)
        assert json.loads(stopped.stdout)["stopped"] is True
        assert not is_alive(state.services["registry"].pid, "services.registry")
        assert not is_alive(state.services["deployer"].pid, "services.deployer")
        assert not is_alive(state.services["collector"].pid, "services.collector")
        assert not is_alive(state.services["drift"].pid, "services.drift")
        assert not is_alive(state.services["profiler"].pid, "services.profiler")
        assert not is_alive(state.services["notifier"].pid, "services.notifier")
        assert not is_alive(state.services["automation"].pid, "services.automation")
        assert not is_alive(state.nats_pid, "nats-server")
        assert read_state(home) is None
        after = json.loads(runner.invoke(app, ["status", "--json"], env=settings).stdout)
        assert after["services"]["registry"]["status"] == "STOPPED"
        assert "not running" in runner.invoke(app, ["down"], env=settings).stdout
    finally:
        stop_mesh(home, say=lambda _line: None)  # never leave processes behind when an assert fails


def test_register_json_returns_name_and_version(cli, tmp_path: Path) -> None:
    weights = tmp_path / "model.bin"
    weights.write_bytes(b"\x00\x01weights")

    first = json_of(cli("models", "register", "cli-json", str(weights), "--tag", "team=risk", "--json"))
    second = json_of(cli("models", "register", "cli-json", str(weights), "--json"))

    assert (first["name"], first["version"]) == ("cli-json", 1)
    assert second["version"] == 2
    assert first["tags"] == {"team": "risk"}
    assert first["created_by"] == "carol"
    assert first["files"][0]["path"] == "model.bin"


def test_show_alias_history_download_archive_delete_round_trip(cli, tmp_path: Path) -> None:
    source = tmp_path / "model"
    (source / "nested").mkdir(parents=True)
    (source / "weights.bin").write_bytes(os.urandom(1024 * 1024 + 3))
    (source / "nested" / "config.json").write_text('{"layers": 3}')
    json_of(cli("models", "register", "cli-trip", str(source), "--framework", "other", "--json"))
    json_of(cli("models", "register", "cli-trip", str(source / "weights.bin"), "--json"))

    shown = json_of(cli("models", "show", "cli-trip:1", "--json"))
    assert sorted(file["path"] for file in shown["files"]) == ["nested/config.json", "weights.bin"]

    moved = json_of(cli("models", "alias", "set", "cli-trip", "champion", "1", "--reason", "first", "--json"))
    assert (moved["version"], moved["previous_version"]) == (1, 0)
    json_of(cli("models", "alias", "set", "cli-trip", "champion", "2", "--reason", "better", "--json"))
    assert json_of(cli("models", "show", "cli-trip@champion", "--json"))["version"] == 2
    history = json_of(cli("models", "history", "cli-trip", "--json"))
    assert [(change["version"], change["reason"]) for change in history] == [(1, "first"), (2, "better")]

    target = tmp_path / "download"
    downloaded = json_of(cli("models", "download", "cli-trip:1", str(target), "--json"))
    assert downloaded["version"] == 1
    assert (target / "weights.bin").read_bytes() == (source / "weights.bin").read_bytes()
    assert (target / "nested" / "config.json").read_bytes() == (source / "nested" / "config.json").read_bytes()

    archived = json_of(cli("models", "archive", "cli-trip:1", "--reason", "superseded", "--json"))
    assert archived["status"] == "MODEL_VERSION_STATUS_ARCHIVED"
    assert [v["version"] for v in json_of(cli("models", "search", "--name-prefix", "cli-trip", "--json"))] == [2]

    assert cli("models", "delete", "cli-trip:1", "--reason", "cleanup", input="n\n").exit_code != 0
    assert json_of(cli("models", "show", "cli-trip:1", "--json"))["version"] == 1  # declining kept it
    json_of(cli("models", "delete", "cli-trip:1", "--reason", "cleanup", "--yes", "--json"))
    gone = cli("models", "show", "cli-trip:1", "--json")
    assert gone.exit_code == 1
    audit = json_of(cli("audit", "list", "--resource", "models/cli-trip", "--action", "model.delete", "--json"))
    assert [(entry["actor"], entry["reason"]) for entry in audit] == [("carol", "cleanup")]


def test_datasets_register_show_and_download(cli, tmp_path: Path) -> None:
    data = tmp_path / "train.csv"
    data.write_text("a,b,label\n1,2,0\n3,4,1\n")
    registered = json_of(cli("datasets", "register", "cli-data", str(data), "--json"))
    ref = f"cli-data:{registered['version']}"
    assert json_of(cli("datasets", "show", ref, "--json"))["row_count"] == 2
    downloaded = json_of(cli("datasets", "download", ref, str(tmp_path / "out"), "--json"))
    assert Path(downloaded["path"]).read_bytes() == data.read_bytes()
    assert cli("datasets", "download", "cli-data:99", str(tmp_path / "none")).exit_code == 1


def test_a_refused_request_prints_the_server_message_and_exits_1(cli) -> None:
    result = cli("models", "show", "cli-no-such-model:3")

    assert result.exit_code == 1
    assert result.stderr.startswith("error: ")
    assert "cli-no-such-model" in result.stderr
    assert result.stdout == ""


def test_an_unreachable_registry_exits_2_with_a_hint() -> None:
    address = f"127.0.0.1:{natsserver.free_port()}"

    result = runner.invoke(app, ["models", "list", "--address", address])

    assert result.exit_code == 2
    assert f"cannot reach the registry at {address}" in result.stderr
    assert "mlmesh up" in result.stderr


def test_events_tail_json_prints_the_registration_event(cli, registry_process: RegistryProcess, tmp_path: Path) -> None:
    tail = subprocess.Popen(
        [sys.executable, "-m", "services.cli", "events", "tail", "--json", "--type", "model.registered"],
        env={**clean_environment(), "MLMESH_NATS_URL": registry_process.nats_url},
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    lines: queue.Queue[str] = queue.Queue()
    threading.Thread(target=lambda: [lines.put(line) for line in tail.stdout], daemon=True).start()
    try:
        # The tail starts from "now": register only once it says it is watching.
        said: queue.Queue[str] = queue.Queue()
        threading.Thread(target=lambda: said.put(tail.stderr.readline()), daemon=True).start()
        assert "watching" in said.get(timeout=20)
        weights = tmp_path / "model.bin"
        weights.write_bytes(b"weights for the event")
        json_of(cli("models", "register", "cli-events", str(weights), "--json"))

        # Events of earlier tests may still trickle in; wait for ours, bounded.
        deadline = time.monotonic() + 20
        event = {}
        while event.get("subject") != "models/cli-events/versions/1":
            event = json.loads(lines.get(timeout=max(0.1, deadline - time.monotonic())))
            assert event["type"] == "io.mlmesh.model.registered.v1"  # --type filtered the others
        assert (event["data"]["name"], event["data"]["version"]) == ("cli-events", 1)
    finally:
        tail.send_signal(signal.SIGTERM)
        try:
            tail.wait(10)
        except subprocess.TimeoutExpired:
            tail.kill()
            tail.wait()
    assert tail.returncode == 0  # SIGTERM ends the tail cleanly


def test_serve_with_workers_runs_that_many_processes_on_one_port_and_stops_them_all(tmp_path) -> None:
    port = natsserver.free_port()
    env = {**clean_environment(), "MLMESH_HOME": str(tmp_path / "home"), "MLMESH_REGISTRY_PORT": str(port)}
    process = subprocess.Popen(
        [sys.executable, "-m", "services.cli", "serve", "registry", "--workers", "3"],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        deadline = time.monotonic() + 60
        while len(worker_pids(process.pid)) < 2 or health_status(f"127.0.0.1:{port}", REGISTRY_GRPC_SERVICE) != (
            "SERVING"
        ):
            assert process.poll() is None and time.monotonic() < deadline, "the registry and its workers did not start"
            time.sleep(0.2)
        workers = worker_pids(process.pid)
        assert len(workers) == 2
    finally:
        process.send_signal(signal.SIGTERM)
        process.wait(30)
    for pid in workers:
        assert not Path(f"/proc/{pid}").exists() or b"spawn_main" not in Path(f"/proc/{pid}/cmdline").read_bytes()


def test_serve_refuses_a_worker_count_below_one() -> None:
    result = mlmesh("serve", "registry", "--workers", "0", env={**clean_environment()})
    assert result.returncode == 2
    assert "--workers" in result.stderr


@pytest.fixture(scope="module")
def deployer_cli(registry_process: RegistryProcess, tmp_path_factory: pytest.TempPathFactory):
    """Invoke `mlmesh ...` against a real deployer (MLMESH_DEPLOYER_ADDRESS); returns the Result."""
    from tests.deployer.processes import running_deployer

    with running_deployer(tmp_path_factory.mktemp("cli-deployer"), registry_process) as deployer:

        def invoke(*arguments: str):
            return runner.invoke(app, list(arguments), env={"MLMESH_DEPLOYER_ADDRESS": deployer.address})

        yield invoke


def test_deploy_commands_create_show_shift_log_and_delete(deployer_cli, registry_process, tmp_path: Path) -> None:
    from tests.runtime.conftest import register_adder

    ref = register_adder(registry_process, tmp_path)
    created = json_of(deployer_cli("deploy", "create", "cli-ep", ref, "--json"))
    assert created["name"] == "cli-ep" and created["grpc_address"] and created["http_address"]
    assert created["traffic"] == {"blue": 100}
    (blue,) = created["deployments"]
    assert (blue["name"], blue["model"], blue["version"], blue["status"]) == ("blue", "adder", int(ref[6:]), "READY")
    assert blue["resources"] == {"cpus": 0, "memory_mb": 0, "max_batch_rows": 0, "profile": ""}

    green = json_of(deployer_cli("deploy", "create", "cli-ep", ref, "--deployment", "green", "--cpus", "1", "--json"))
    assert green["traffic"] == {"blue": 100, "green": 0}
    shifted = json_of(deployer_cli("deploy", "traffic", "cli-ep", "blue=20", "green=80", "--json"))
    assert shifted["traffic"] == {"blue": 20, "green": 80}
    wrong = deployer_cli("deploy", "traffic", "cli-ep", "blue=20", "green=20")
    assert wrong.exit_code == 1 and "sum to 100" in wrong.stderr
    listed = json_of(deployer_cli("deploy", "list", "--json"))
    assert [endpoint["name"] for endpoint in listed] == ["cli-ep"]
    logs = json_of(deployer_cli("deploy", "logs", "cli-ep", "green", "--json"))
    assert any("serving adder" in line for line in logs["lines"])
    shown = deployer_cli("deploy", "show", "cli-ep")
    assert "green" in shown.stdout and "80%" in shown.stdout

    refused = deployer_cli("deploy", "delete", "cli-ep", "--deployment", "blue")
    assert refused.exit_code == 1 and "shift it first" in refused.stderr
    assert json_of(deployer_cli("deploy", "delete", "cli-ep", "--json"))["deleted"] is True
    missing = deployer_cli("deploy", "show", "cli-ep")
    assert missing.exit_code == 1 and "does not exist" in missing.stderr


def test_deploy_commands_say_when_the_deployer_is_away() -> None:
    result = runner.invoke(
        app, ["deploy", "list"], env={"MLMESH_DEPLOYER_ADDRESS": f"127.0.0.1:{natsserver.free_port()}"}
    )
    assert result.exit_code == 2 and "cannot reach the deployer" in result.stderr

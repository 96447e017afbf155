"""Training in a registered environment: a real virtual environment made by venv and pip from a
lock with hashes, reused by later runs, and a retrain run that trains in it through a real builder."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from services._proto.mlmesh.v1 import automation_pb2
from services.automation import training
from services.client import BuilderClient, RegistryClient
from tests.automation.conftest import ROOT, TRAIN, AutomationProcess, running_automation
from tests.builder.conftest import start_builder
from tests.builder.wheels import make_wheel
from tests.conftest import RegistryProcess, stop_process

PROBE = "mlmesh-env-probe"
TRAIN_IN_ENVIRONMENT = str(Path(__file__).with_name("train_in_environment.py"))
RUNNING = f"{sys.version_info.major}.{sys.version_info.minor}"


def locked(wheel: Path, ref: str = "probe:1", python_version: str = RUNNING) -> training.LockedEnvironment:
    digest = hashlib.sha256(wheel.read_bytes()).hexdigest()
    version = wheel.name.split("-")[1]
    return training.LockedEnvironment(ref, python_version, f"{PROBE}=={version} --hash=sha256:{digest}\n")


@pytest.fixture
def wheels(tmp_path: Path) -> Path:
    make_wheel(tmp_path / "wheels", PROBE, "1.2.0")
    return tmp_path / "wheels"


def in_environment(folder: Path, code: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [str(folder / "bin" / "python"), "-c", code], capture_output=True, text=True, timeout=60, check=False
    )


def test_an_environment_is_made_from_its_lock_once_and_then_reused(wheels: Path, tmp_path: Path) -> None:
    lock = locked(wheels / "mlmesh_env_probe-1.2.0-py3-none-any.whl")
    pip = ["--no-index", "--find-links", str(wheels)]
    folder, printed = training.prepare_environment(lock, tmp_path / "cache", pip, 300, 200)
    assert any("Successfully installed mlmesh-env-probe-1.2.0" in line for line in printed), printed
    assert in_environment(folder, "import mlmesh_env_probe; print(mlmesh_env_probe.VERSION)").stdout == "1.2.0\n"
    # Exactly the lock: nothing of this process's environment leaks in.
    assert in_environment(folder, "import sklearn").returncode != 0
    again, printed_again = training.prepare_environment(lock, tmp_path / "cache", pip, 300, 200)
    assert again == folder and printed_again == []
    # A command run in it finds the environment's python first on PATH.
    ran = training.run_command(
        ["python", "-c", "import sys, mlmesh_env_probe; print(sys.prefix)"], tmp_path, {}, 60, 10, folder
    )
    assert ran.exit_code == 0 and ran.log_tail == [str(folder)]


def test_a_half_made_environment_is_made_again(wheels: Path, tmp_path: Path) -> None:
    lock = locked(wheels / "mlmesh_env_probe-1.2.0-py3-none-any.whl")
    pip = ["--no-index", "--find-links", str(wheels)]
    folder, _ = training.prepare_environment(lock, tmp_path / "cache", pip, 300, 200)
    (folder / training.READY).unlink()  # as a run killed while pip installed would leave it
    shutil.rmtree(next((folder / "lib").glob("python*/site-packages/mlmesh_env_probe")))
    again, printed = training.prepare_environment(lock, tmp_path / "cache", pip, 300, 200)
    assert again == folder and printed
    assert in_environment(folder, "import mlmesh_env_probe").returncode == 0


def test_a_lock_that_does_not_match_its_files_fails_and_leaves_nothing(wheels: Path, tmp_path: Path) -> None:
    good = locked(wheels / "mlmesh_env_probe-1.2.0-py3-none-any.whl")
    tampered = training.LockedEnvironment(good.ref, good.python_version, good.lock_text.replace("sha256:", "sha256:0"))
    cache = tmp_path / "cache"
    with pytest.raises(training.EnvironmentFailed) as failed:
        training.prepare_environment(tampered, cache, ["--no-index", "--find-links", str(wheels)], 300, 200)
    assert "making environment probe:1: pip exited with 1" in str(failed.value)
    assert "HASH" in str(failed.value).upper()
    assert not any(path.is_dir() for path in cache.iterdir())  # no half-made environment stays
    with pytest.raises(training.EnvironmentFailed) as missing:
        training.prepare_environment(good, cache, ["--no-index"], 300, 200)
    assert "No matching distribution" in str(missing.value) or "Could not find a version" in str(missing.value)


def test_an_environment_for_a_python_this_machine_lacks_says_so(wheels: Path, tmp_path: Path) -> None:
    absent = next(f"3.{minor}" for minor in range(30, 0, -1) if shutil.which(f"python3.{minor}") is None)
    lock = locked(wheels / "mlmesh_env_probe-1.2.0-py3-none-any.whl", python_version=absent)
    with pytest.raises(training.EnvironmentFailed) as failed:
        training.prepare_environment(lock, tmp_path / "cache", [], 300, 200)
    assert f"is for Python {absent}, and this machine has no python{absent} on PATH" in str(failed.value)
    assert f"register an environment for Python {RUNNING}" in str(failed.value)


@pytest.fixture(scope="module")
def services(
    registry_process: RegistryProcess, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[tuple[AutomationProcess, str]]:
    """A builder and an automation service that install from the same local folder of wheels."""
    builder = start_builder(tmp_path_factory.mktemp("builder"), registry_process)
    make_wheel(builder.wheels, PROBE, "1.2.0")
    settings = {
        "builder_address": builder.address,
        "find_links": json.dumps([str(builder.wheels)]),
        "no_index": "true",
    }
    try:
        with running_automation(tmp_path_factory.mktemp("automation"), registry_process, **settings) as automation:
            yield automation, builder.address
    finally:
        stop_process(builder.process)


def test_a_run_trains_in_its_registered_environment_with_lineage(
    services: tuple[AutomationProcess, str],
    registry_process: RegistryProcess,
    data: dict[str, str],
    tmp_path: Path,
) -> None:
    automation, builder_address = services
    # The model the command hands over: trained here by the same script other tests run.
    subprocess.run(
        [sys.executable, TRAIN, "logistic"],
        env={
            **os.environ,
            "MLMESH_TRAINING_DATA": f"{data['dir']}/train.csv",
            "MLMESH_OUTPUT_DIR": str(tmp_path),
            "MLMESH_RUN_ID": "-",
        },
        check=True,
        timeout=120,
    )
    with automation.client() as client:
        client.create_policy(
            "in-probe-env",
            "env-trained",
            command=["python", TRAIN_IN_ENVIRONMENT, str(tmp_path / "model.onnx")],
            training_dataset=data["train"],
            holdout_dataset=data["holdout"],
            label_column="label",
            working_dir=str(ROOT),
            environment="probe-env",
        )
        missing = client.wait_run(client.start_run("in-probe-env").id, timeout=120)
        assert missing.status == automation_pb2.RUN_STATUS_FAILED
        assert "environment probe-env does not exist" in missing.message, missing.message
        assert missing.produced_version == 0
        with BuilderClient(builder_address) as builder:
            registered, _ = builder.register_environment("probe-env", f"{PROBE}>=1\n")
        first = client.wait_run(client.start_run("in-probe-env").id, timeout=300)
        assert first.status == automation_pb2.RUN_STATUS_COMPLETED, (first.message, first.log_tail)
        assert any(line.startswith("environment probe-env:1: made at ") for line in first.log_tail)
        assert any("with mlmesh-env-probe 1.2.0" in line for line in first.log_tail), first.log_tail
        second = client.wait_run(client.start_run("in-probe-env").id, timeout=300)
        assert second.status == automation_pb2.RUN_STATUS_COMPLETED, second.message
        assert any(line.startswith("environment probe-env:1: reusing ") for line in second.log_tail)
        assert not any("Successfully installed" in line for line in second.log_tail)
    with RegistryClient(registry_process.address) as registry:
        produced = registry.get(f"env-trained:{first.produced_version}")
    assert produced.lineage.environment == f"probe-env:{registered.version}" == "probe-env:1"
    assert produced.lineage.run_id == first.id and list(produced.lineage.datasets) == ["cancer-train:1"]

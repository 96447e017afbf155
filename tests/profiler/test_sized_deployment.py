"""A deployment sized by a profile's recommendation (`--resources recommended`) meets the SLO
when its endpoint is measured again with the same load."""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest
from typer.testing import CliRunner

from services._proto.mlmesh.v1 import deployer_pb2, profiler_pb2
from services.cli import app
from services.client import DeployerClient, MeshError
from services.profiler.load import LoadGenerator, answer_bytes, percentile
from tests.conftest import RegistryProcess
from tests.deployer.processes import running_deployer
from tests.profiler.processes import adder_request, running_profiler
from tests.runtime.conftest import register_adder

SLO_MS = 50.0
runner = CliRunner()


def wait_ready(client: DeployerClient, endpoint: str, timeout: float = 60) -> deployer_pb2.Deployment:
    deadline = time.monotonic() + timeout
    while (deployment := client.get(endpoint).deployments[0]).status != deployer_pb2.DEPLOYMENT_STATUS_READY:
        assert time.monotonic() < deadline, f"{endpoint} not ready: {deployment}"
        time.sleep(0.1)
    return deployment


def test_a_deployment_sized_by_the_recommendation_meets_the_slo(
    registry_process: RegistryProcess, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    ref = register_adder(registry_process, tmp_path)
    with running_profiler(tmp_path / "profiler", registry_process) as profiler:
        with running_deployer(tmp_path / "deployer", registry_process, profiler_address=profiler.address) as deployer:
            with deployer.client() as client:
                with pytest.raises(MeshError) as unprofiled:
                    client.create("sized", ref, recommended_resources=True, replicas=0)
                assert unprofiled.value.code == "FAILED_PRECONDITION" and "mlmesh profile" in unprofiled.value.message
            # The CLI profiles (JSON for scripts) ...
            monkeypatch.setenv("MLMESH_PROFILER_ADDRESS", profiler.address)
            monkeypatch.setenv("MLMESH_DEPLOYER_ADDRESS", deployer.address)
            monkeypatch.setenv("MLMESH_REGISTRY_ADDRESS", registry_process.address)
            done = runner.invoke(
                app,
                [
                    *("profile", ref, "--slo-p99-ms", str(SLO_MS), "--concurrency", "1,4", "--size", "cpus=1"),
                    *("--step-seconds", "0.5", "--warmup-seconds", "0.2", "--json"),
                ],
            )
            assert done.exit_code == 0, done.output
            profile = json.loads(done.stdout)
            assert profile["status"] == "completed" and profile["recommendation"]["met"] is True
            assert {"concurrency", "throughput_rps", "p50_ms", "p99_ms", "cpu_percent", "memory_mb"} <= set(
                profile["steps"][0]
            )
            assert {"cpus", "memory_mb", "replicas"} <= set(profile["recommendation"])
            # ... `models show` shows it ...
            shown = runner.invoke(app, ["models", "show", ref, "--json"])
            assert shown.exit_code == 0 and json.loads(shown.stdout)["profile"]["id"] == profile["id"]
            # ... and the deployment takes it.
            created = runner.invoke(app, ["deploy", "create", "sized", ref, "--resources", "recommended", "--json"])
            assert created.exit_code == 0, created.output
            with deployer.client() as client:
                deployment = wait_ready(client, "sized")
                endpoint = client.get("sized")
            recommendation = profile["recommendation"]
            assert deployment.resources.profile == f"profiles/{profile['id']}"
            assert deployment.resources.cpus == recommendation["cpus"]
            assert deployment.resources.memory_mb == int(recommendation["memory_mb"])
            assert deployment.replicas == recommendation["replicas"]
            shown = runner.invoke(app, ["deploy", "show", "sized"])
            assert f"recommended by profiles/{profile['id']}" in shown.output
            # Measured again through the endpoint, at the busiest level the profile judged.
            body = adder_request("sized")
            size = answer_bytes(endpoint.grpc_address, body)
            measured = LoadGenerator().run(endpoint.grpc_address, body, size, 4, 1.0)
            assert measured.errors == 0 and len(measured.latencies) > 50
            assert percentile(sorted(measured.latencies), 99) * 1000 <= SLO_MS
            with profiler.client() as profiles:
                assert profiles.get(profile["id"]).status == profiler_pb2.PROFILE_STATUS_COMPLETED

"""The docker target on the real engine: the builder builds the model's image, the profiler runs
it as a container at each size (CPU quota, memory limit), measures the container's processes,
and removes every container it started."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import docker
import pytest

from services._proto.mlmesh.v1 import profiler_pb2
from tests.builder.conftest import BuilderProcess
from tests.builder.docker_parts import base_image, docker_engine, image_builder
from tests.conftest import RegistryProcess
from tests.profiler.processes import ProfilerProcess, running_profiler
from tests.runtime.conftest import register_adder

__all__ = ["base_image", "docker_engine", "image_builder"]  # fixtures, used by name
pytestmark = [pytest.mark.slow, pytest.mark.timeout(1800)]


@pytest.fixture(scope="module")
def profiler(
    registry_process: RegistryProcess, image_builder: BuilderProcess, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[ProfilerProcess]:
    home = tmp_path_factory.mktemp("profiler")
    # Building the image (cold) and copying it for each container on the vfs driver take minutes.
    with running_profiler(
        home, registry_process, builder_address=image_builder.address, start_timeout_seconds="300"
    ) as running:
        yield running


def test_a_docker_profile_measures_limited_containers_and_removes_them(
    profiler: ProfilerProcess, registry_process: RegistryProcess, docker_engine: docker.APIClient, tmp_path: Path
) -> None:
    ref = register_adder(registry_process, tmp_path)
    sizes = [{"cpus": 0.5, "memory_mb": 512}, {"cpus": 1, "memory_mb": 512}]
    with profiler.client() as client:
        profile = client.profile(
            ref, target="docker", slo_p99_ms=200, concurrency=[1, 8], sizes=sizes, step_seconds=1, warmup_seconds=0.3
        )
    assert profile.status == profiler_pb2.PROFILE_STATUS_COMPLETED, profile.reason
    assert profile.image.startswith("mlmesh-model-adder:")
    half, whole = profile.sizes
    for result in (half, whole):
        for step in result.steps:
            assert step.requests > 10 and step.errors == 0
            assert step.cpu_percent > 1 and 20 < step.memory_mb < 512
    # The quota holds: half a core cannot use more than about half a core.
    assert max(step.cpu_percent for step in half.steps) <= 60
    recommendation = profile.recommendation
    assert recommendation.met and recommendation.cpus in (0.5, 1.0) and recommendation.memory_mb <= 512
    left = docker_engine.containers(all=True, filters={"label": f"io.mlmesh.profiler.mesh={profiler.home.resolve()}"})
    assert left == []

"""How the deployer's containers reach NATS (capture from the docker target)."""

from __future__ import annotations

import pytest

from services.deployer.settings import DeployerSettings


@pytest.mark.parametrize(
    ("nats_url", "container_nats_url", "expected"),
    [
        ("nats://127.0.0.1:4222", "", "nats://host.docker.internal:4222"),
        ("nats://localhost:5000", "", "nats://host.docker.internal:5000"),
        ("nats://user:secret@127.0.0.1:4222", "", "nats://user:secret@host.docker.internal:4222"),
        ("nats://nats.example.com:4222", "", "nats://nats.example.com:4222"),
        ("nats://127.0.0.1:4222", "nats://172.17.0.1:4222", "nats://172.17.0.1:4222"),
        (None, "", None),
    ],
)
def test_containers_reach_nats_on_the_engines_host_unless_told(
    nats_url: str | None, container_nats_url: str, expected: str | None
) -> None:
    settings = DeployerSettings(nats_url=nats_url, container_nats_url=container_nats_url)
    assert settings.resolved_container_nats_url() == expected

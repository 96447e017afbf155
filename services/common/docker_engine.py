"""The Docker engine as mlmesh's services use it: a client that turns an absent engine into
UNAVAILABLE with what to do, and image references checked the way Docker reads them.

The builder builds images through it; the deployer and the profiler run them.
"""

from __future__ import annotations

import contextlib
import re
from collections.abc import Iterator
from typing import Any

import docker
import docker.errors
import requests.exceptions

from services.common.errors import FailedPrecondition, Unavailable

# An image reference as Docker takes it: [host[:port]/]path[:tag], path components lowercase.
PATH_COMPONENT = r"[a-z0-9]+(?:(?:[._]|__|-+)[a-z0-9]+)*"
REGISTRY_HOST = r"[A-Za-z0-9](?:[A-Za-z0-9.-]*[A-Za-z0-9])?(?::[0-9]+)?"
REPOSITORY = re.compile(rf"(?:{REGISTRY_HOST}/)?{PATH_COMPONENT}(?:/{PATH_COMPONENT})*")
TAG = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.-]{0,127}")
# Where the builder's images serve (services.builder.images sets these in the image).
CONTAINER_GRPC_PORT = 8001
CONTAINER_HTTP_PORT = 8000
HOST_ALIAS = "host.docker.internal"
"""The name containers reach the engine's host by."""
_API_VERSIONS: dict[str, str] = {}
"""The API version each engine (by address) answered with."""


@contextlib.contextmanager
def engine(docker_url: str | None, timeout: float = 30) -> Iterator[docker.APIClient]:
    """A client of the Docker engine at `docker_url` (else DOCKER_HOST, else the local socket),
    speaking the engine's API version; closed afterwards. Calls then wait up to `timeout` seconds."""
    options: dict[str, Any] = {"base_url": docker_url} if docker_url else docker.utils.kwargs_from_env()
    where = options.get("base_url") or "unix:///var/run/docker.sock"
    try:
        # The API version is asked of the engine once; later clients skip that round trip (the
        # deployer makes one per replica check).
        client = docker.APIClient(version=_API_VERSIONS.get(where, "auto"), timeout=30, **options)
    except docker.errors.DockerException as error:
        raise Unavailable(f"no Docker engine answers at {where}: start dockerd or set DOCKER_HOST ({error})") from None
    _API_VERSIONS[where] = client.api_version
    # Only the first answer (the version) was worth a short wait: builds and archives stream for minutes.
    client.timeout = timeout
    try:
        yield client
    except requests.exceptions.ConnectionError as error:
        raise Unavailable(f"the Docker engine at {where} stopped answering: {error}") from None
    finally:
        client.close()


def is_reference(reference: str) -> bool:
    """Whether Docker takes `reference` as an image reference ([host[:port]/]path[:tag])."""
    if not reference or len(reference) > 255:
        return False
    repository, _, tag = reference.rpartition(":") if _has_tag(reference) else (reference, "", "")
    return bool(REPOSITORY.fullmatch(repository)) and (not tag or bool(TAG.fullmatch(tag)))


def _has_tag(reference: str) -> bool:
    return ":" in reference.rsplit("/", 1)[-1]


def split_tag(reference: str) -> tuple[str, str]:
    """(repository, tag) of an image reference; the tag defaults to "latest"."""
    if _has_tag(reference):
        repository, _, tag = reference.rpartition(":")
        return repository, tag
    return reference, "latest"


class ContainerError(FailedPrecondition):
    """The engine refused to create or start a container (no such image, bad limits)."""

    reason = "CONTAINER_FAILED"


def start_runtime_container(
    docker_url: str | None,
    image: str,
    name: str,
    environment: dict[str, str],
    labels: dict[str, str],
    cpus: float,
    memory_mb: int,
) -> tuple[str, int, int]:
    """Create and start a container of a runtime image with its gRPC and REST ports published on
    127.0.0.1, `cpus` as its CPU quota and `memory_mb` as its memory limit (0: none);
    (container id, gRPC port, REST port).

    The engine picks the host ports as it starts the container: a port probed free beforehand
    can be taken by then (by another container starting, or any process), and the start fails.
    """
    with engine(docker_url, timeout=120) as client:
        limits: dict[str, Any] = {}
        if cpus:
            limits["nano_cpus"] = int(cpus * 1e9)
        if memory_mb:
            # No swap beyond the limit: a runtime that needs more memory is killed and reported.
            limits["mem_limit"] = limits["memswap_limit"] = f"{memory_mb}m"
        host_config = client.create_host_config(
            port_bindings={CONTAINER_GRPC_PORT: ("127.0.0.1",), CONTAINER_HTTP_PORT: ("127.0.0.1",)},
            extra_hosts={HOST_ALIAS: "host-gateway"},
            init=True,
            **limits,
        )
        try:
            container = client.create_container(
                image,
                name=name,
                environment=environment,
                labels=labels,
                ports=[CONTAINER_GRPC_PORT, CONTAINER_HTTP_PORT],
                host_config=host_config,
            )
        except docker.errors.ImageNotFound:
            raise ContainerError(
                f"image {image} is not on the Docker engine: build it (mlmesh build image) or pull it"
            ) from None
        except docker.errors.APIError as error:
            raise ContainerError(f"the Docker engine refused the container: {error.explanation or error}") from None
        instance = container["Id"]
        try:
            client.start(instance)
            return (
                instance,
                _host_port(client, instance, CONTAINER_GRPC_PORT),
                _host_port(client, instance, CONTAINER_HTTP_PORT),
            )
        except docker.errors.APIError as error:
            failure = ContainerError(f"the container did not start: {error.explanation or error}")
        except ContainerError as error:
            failure = error
        with contextlib.suppress(docker.errors.APIError):
            client.remove_container(instance, force=True)
        raise failure


def _host_port(client: docker.APIClient, instance: str, port: int) -> int:
    """The host port the engine published a container's `port` on; ContainerError when it has none
    (the container stopped as soon as it started, taking its ports along)."""
    for binding in client.port(instance, port) or []:
        if binding.get("HostPort"):
            return int(binding["HostPort"])
    code = client.inspect_container(instance)["State"].get("ExitCode")
    raise ContainerError(
        f"the container exited with code {code} as it started; it last logged: {last_logged(client, instance)}"
    )


def last_logged(client: docker.APIClient, instance: str, tail: int = 20) -> str:
    """The last line a container wrote that is not blank (at most 500 characters), or "(nothing)"."""
    try:
        output = client.logs(instance, stdout=True, stderr=True, tail=tail).decode(errors="replace")
    except docker.errors.NotFound:
        return "(nothing)"
    return next((line[:500] for line in reversed(output.splitlines()) if line.strip()), "(nothing)")

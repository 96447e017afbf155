"""The deployer as a real process with a real registry and NATS: endpoints come up, serve, heal,
shift traffic and go away; bad requests change nothing."""

from __future__ import annotations

import os
import signal
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import grpc
import pytest
import yaml

# Triton's client package carries the same `inference` protos (see tests/runtime/test_servicer.py).
from tritonclient.grpc import service_pb2 as oip
from tritonclient.grpc import service_pb2_grpc as oip_grpc

from services._proto.mlmesh.v1 import deployer_pb2, deployer_pb2_grpc
from services.client import DeployerClient, MeshError, RegistryClient
from services.common import events
from services.common.natsserver import free_port
from tests.conftest import RegistryProcess, stream_events
from tests.deployer.processes import DeployerProcess, running_deployer, start_deployer, stop_deployer
from tests.runtime.conftest import register_adder

READY = deployer_pb2.DEPLOYMENT_STATUS_READY


@pytest.fixture(scope="module")
def deployer(registry_process: RegistryProcess, tmp_path_factory: pytest.TempPathFactory) -> Iterator[DeployerProcess]:
    with running_deployer(tmp_path_factory.mktemp("deployer-home"), registry_process, max_restarts="3") as running:
        yield running


@pytest.fixture(scope="module")
def adder(registry_process: RegistryProcess, tmp_path_factory: pytest.TempPathFactory) -> str:
    return register_adder(registry_process, tmp_path_factory.mktemp("adder"))


def wait_for(client: DeployerClient, endpoint: str, deployment: str, status: int, timeout: float = 60) -> Any:
    deadline = time.monotonic() + timeout
    while True:
        found = {d.name: d for d in client.get(endpoint).deployments}
        if deployment in found and found[deployment].status == status:
            return found[deployment]
        if time.monotonic() > deadline:
            raise AssertionError(f"{endpoint}/{deployment} not {status} in time: {found.get(deployment)}")
        time.sleep(0.1)


def infer(address: str, model: str, values: list[float], version: str = "") -> tuple[list[float], str]:
    with grpc.insecure_channel(address) as channel:
        request = oip.ModelInferRequest(model_name=model, model_version=version)
        tensor = request.inputs.add(name="x", datatype="FP32", shape=[1, 3])
        tensor.contents.fp32_contents.extend(values)
        answer = oip_grpc.GRPCInferenceServiceStub(channel).ModelInfer(request, timeout=10)
    return list(answer.outputs[0].contents.fp32_contents), answer.model_version


def deployment_events(nats_url: str, endpoint: str) -> list[events.CloudEvent]:
    """Every deployment.* event of `endpoint` so far."""
    found = stream_events(nats_url, "mlmesh.events.deployment.>")
    return [event for event in found if event.data["endpoint"] == endpoint]


def kinds(nats_url: str, endpoint: str) -> list[str]:
    return [f"{event.kind}:{event.data['deployment']}" for event in deployment_events(nats_url, endpoint)]


def wait_for_event(nats_url: str, endpoint: str, kind: str, timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    while kind not in kinds(nats_url, endpoint):
        if time.monotonic() > deadline:
            raise AssertionError(f"no {kind} for {endpoint}; saw {kinds(nats_url, endpoint)}")


def test_a_deployment_starts_serves_and_announces_itself(deployer, registry_process, adder):
    with deployer.client() as client:
        created = client.create("serve", adder)
        assert created.status == deployer_pb2.DEPLOYMENT_STATUS_CREATING
        assert (created.model_name, created.model_version, created.traffic) == ("adder", int(adder.split(":")[1]), 100)
        ready = wait_for(client, "serve", "blue", READY)
        endpoint = client.get("serve")
    replica = ready.replica_states[0]
    outputs, version = infer(replica.grpc_address, "serve", [1, 2, 3])
    assert outputs == [2, 3, 4] and version == adder.split(":")[1]
    assert dict(endpoint.traffic) == {"blue": 100}
    wait_for_event(registry_process.nats_url, "serve", "deployment.ready:blue")
    assert kinds(registry_process.nats_url, "serve")[:2] == ["deployment.created:blue", "deployment.ready:blue"]
    with RegistryClient(registry_process.address) as registry:
        assert "endpoints/serve/deployments/blue" in registry.get(adder).used_by
        with pytest.raises(MeshError) as refused:
            registry.delete(adder)
        assert refused.value.code == "FAILED_PRECONDITION"


def test_a_killed_replica_is_reported_unhealthy_then_restarted(deployer, registry_process, adder):
    with deployer.client() as client:
        client.create("heal", adder)
        before = wait_for(client, "heal", "blue", READY).replica_states[0]
        os.kill(int(before.instance.split(":")[0]), signal.SIGKILL)
        wait_for_event(registry_process.nats_url, "heal", "deployment.unhealthy:blue")
        deadline = time.monotonic() + 60
        while kinds(registry_process.nats_url, "heal").count("deployment.ready:blue") < 2:
            assert time.monotonic() < deadline, kinds(registry_process.nats_url, "heal")
            time.sleep(0.2)
        after = wait_for(client, "heal", "blue", READY).replica_states[0]
    assert after.restarts == 1 and after.instance != before.instance
    assert infer(after.grpc_address, "heal", [0, 0, 0])[0] == [1, 1, 1]
    unhealthy = [e for e in deployment_events(registry_process.nats_url, "heal") if e.kind == "deployment.unhealthy"]
    assert "exited" in unhealthy[0].data["reason"]


def test_a_replica_over_its_memory_limit_is_killed_and_reported_out_of_memory(deployer, registry_process, adder):
    with deployer.client() as client:
        client.create("tight", adder, memory_mb=64)  # a runtime with its model holds more than 64 MiB
        # Killed at each start, never ready: restarted with backoff until the deployment fails.
        failed = wait_for(client, "tight", "blue", deployer_pb2.DEPLOYMENT_STATUS_FAILED, timeout=120)
        assert "out of memory" in failed.message and "over its limit of 64 MB" in failed.message, failed.message
        wait_for_event(registry_process.nats_url, "tight", "deployment.failed:blue")
        reasons = [
            event.data["reason"]
            for event in deployment_events(registry_process.nats_url, "tight")
            if event.kind == "deployment.failed"
        ]
        assert "out of memory" in reasons[0], reasons
        client.create("roomy", adder, memory_mb=4096)
        ready = wait_for(client, "roomy", "blue", READY)
    assert infer(ready.replica_states[0].grpc_address, "roomy", [1, 1, 1])[0] == [2, 2, 2]
    assert kinds(registry_process.nats_url, "roomy")[:2] == ["deployment.created:blue", "deployment.ready:blue"]


def test_traffic_follows_the_rules_and_deleting_releases_everything(deployer, registry_process, adder):
    with deployer.client() as client:
        client.create("shift", adder)
        client.create("shift", adder, deployment="green")
        assert dict(client.get("shift").traffic) == {"blue": 100, "green": 0}
        wait_for(client, "shift", "green", READY)
        for traffic, mirror, code in [
            ({"blue": 50, "green": 40}, {}, "INVALID_ARGUMENT"),
            ({"blue": 100, "purple": 0}, {}, "NOT_FOUND"),
            ({"blue": 101, "green": -1}, {}, "INVALID_ARGUMENT"),
            ({"blue": 100}, {"blue": 10}, "INVALID_ARGUMENT"),
        ]:
            with pytest.raises(MeshError) as refused:
                client.set_traffic("shift", traffic, mirror)
            assert refused.value.code == code, refused.value
        assert dict(client.get("shift").traffic) == {"blue": 100, "green": 0}
        shifted = client.set_traffic("shift", {"blue": 10, "green": 90}, {})
        assert dict(shifted.traffic) == {"blue": 10, "green": 90}
        with pytest.raises(MeshError) as refused:
            client.delete("shift", "blue")
        assert refused.value.code == "FAILED_PRECONDITION" and "shift it first" in refused.value.message
        client.set_traffic("shift", {"green": 100})
        blue_pid = int(wait_for(client, "shift", "blue", READY).replica_states[0].instance.split(":")[0])
        client.delete("shift", "blue")
        assert [d.name for d in client.get("shift").deployments] == ["green"]
        assert _gone(blue_pid)
        client.delete("shift")
        with pytest.raises(MeshError) as missing:
            client.get("shift")
        assert missing.value.code == "NOT_FOUND"
    with RegistryClient(registry_process.address) as registry:
        used_by = registry.get(adder).used_by
    assert not [user for user in used_by if user.startswith("endpoints/shift/")]
    seen = kinds(registry_process.nats_url, "shift")
    assert {"deployment.updated:green", "deployment.deleted:blue", "deployment.deleted:green"} <= set(seen)


def _gone(pid: int, timeout: float = 20) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return True
        stat = Path(f"/proc/{pid}/stat")
        if stat.exists() and stat.read_text().rsplit(")", 1)[1].split()[0] == "Z":
            return True
        time.sleep(0.1)
    return False


@pytest.mark.parametrize(
    ("request_fields", "code", "words"),
    [
        ({"endpoint": "Bad Name"}, "INVALID_ARGUMENT", "endpoint name"),
        ({"endpoint": "x" * 10_000}, "INVALID_ARGUMENT", "endpoint name"),
        ({"deployment": "../../etc"}, "INVALID_ARGUMENT", "deployment name"),
        ({"model_ref": ""}, "INVALID_ARGUMENT", "model_ref"),
        ({"model_ref": "no-such-model:1"}, "NOT_FOUND", "no-such-model"),
        ({"target": "mainframe"}, "INVALID_ARGUMENT", "target"),
        ({"replicas": -3}, "INVALID_ARGUMENT", "replicas"),
        ({"replicas": 10_000}, "INVALID_ARGUMENT", "replicas"),
        ({"resources": deployer_pb2.Resources(cpus=-1)}, "INVALID_ARGUMENT", "cpus"),
        ({"resources": deployer_pb2.Resources(cpus=float("nan"))}, "INVALID_ARGUMENT", "cpus"),
        ({"resources": deployer_pb2.Resources(memory_mb=1)}, "INVALID_ARGUMENT", "memory_mb"),
        ({"traffic": 50}, "INVALID_ARGUMENT", "first deployment"),
        ({"traffic": 500}, "INVALID_ARGUMENT", "traffic"),
    ],
)
def test_bad_create_requests_are_refused_and_leave_nothing(
    deployer, registry_process, adder, request_fields, code, words
):
    request = deployer_pb2.CreateDeploymentRequest(endpoint="bad", model_ref=adder)
    for name, value in request_fields.items():
        if isinstance(value, deployer_pb2.Resources):
            request.resources.CopyFrom(value)
        else:
            setattr(request, name, value)
    with grpc.insecure_channel(deployer.address) as channel:
        with pytest.raises(grpc.RpcError) as refused:
            deployer_pb2_grpc.DeployerServiceStub(channel).CreateDeployment(request, timeout=20)
    assert refused.value.code().name == code
    assert words in refused.value.details()
    with deployer.client() as client:
        assert "bad" not in [endpoint.name for endpoint in client.list()]
    with RegistryClient(registry_process.address) as registry:
        assert not [user for user in registry.get(adder).used_by if user.startswith("endpoints/bad/")]


def test_a_model_without_onnx_is_refused_and_its_usage_released(deployer, registry_process, tmp_path):
    (tmp_path / "model.pkl").write_bytes(b"not onnx")
    with RegistryClient(registry_process.address) as registry:
        version = registry.register_model("pickled", [tmp_path / "model.pkl"], framework="sklearn")
        ref = f"pickled:{version.version}"
        with deployer.client() as client, pytest.raises(MeshError) as refused:
            client.create("pickled", ref)
        assert refused.value.code == "FAILED_PRECONDITION" and "onnx" in refused.value.message
        assert list(registry.get(ref).used_by) == []


def test_a_second_deployment_of_the_same_name_is_refused(deployer, adder):
    with deployer.client() as client:
        client.create("twice", adder)
        with pytest.raises(MeshError) as refused:
            client.create("twice", adder)
        assert refused.value.code == "ALREADY_EXISTS"
        assert len(client.get("twice").deployments) == 1


def test_a_restarted_deployer_adopts_the_running_replicas(registry_process, adder, tmp_path):
    home = tmp_path / "home"
    port = free_port()
    deployer = start_deployer(home, registry_process, port)
    try:
        with deployer.client() as client:
            client.create("adopt", adder)
            before = wait_for(client, "adopt", "blue", READY).replica_states[0]
        stop_deployer(deployer)
        assert infer(before.grpc_address, "adopt", [1, 1, 1])[0] == [2, 2, 2]  # serving while the deployer is away
        deployer = start_deployer(home, registry_process, port)
        time.sleep(1.5)  # several reconcile passes
        with deployer.client() as client:
            after = wait_for(client, "adopt", "blue", READY).replica_states[0]
        assert after.instance == before.instance and after.restarts == 0
    finally:
        with deployer.client() as client:
            client.delete("adopt")
        stop_deployer(deployer)
    assert not (home / "deployer" / "endpoints" / "adopt" / "routes.json").exists()


@pytest.mark.parametrize(
    ("method", "request_message", "code", "words"),
    [
        ("GetEndpoint", deployer_pb2.GetEndpointRequest(name="../etc"), "INVALID_ARGUMENT", "endpoint name"),
        ("GetEndpoint", deployer_pb2.GetEndpointRequest(name="nobody"), "NOT_FOUND", "nobody"),
        ("ListEndpoints", deployer_pb2.ListEndpointsRequest(page_size=-5), "INVALID_ARGUMENT", "page_size"),
        (
            "SetTraffic",
            deployer_pb2.SetTrafficRequest(endpoint="nobody", traffic={"blue": 100}),
            "NOT_FOUND",
            "nobody",
        ),
        (
            "SetTraffic",
            deployer_pb2.SetTrafficRequest(endpoint="x" * 5000, traffic={"y" * 5000: 100}),
            "INVALID_ARGUMENT",
            "endpoint name",
        ),
        ("DeleteDeployment", deployer_pb2.DeleteDeploymentRequest(endpoint="nobody"), "NOT_FOUND", "nobody"),
        (
            "DeleteDeployment",
            deployer_pb2.DeleteDeploymentRequest(endpoint="Bad!", deployment="blue"),
            "INVALID_ARGUMENT",
            "endpoint name",
        ),
        ("DeleteEndpoint", deployer_pb2.DeleteEndpointRequest(name=""), "INVALID_ARGUMENT", "endpoint name"),
        (
            "GetDeploymentLogs",
            deployer_pb2.GetDeploymentLogsRequest(endpoint="nobody", deployment="blue"),
            "NOT_FOUND",
            "nobody",
        ),
        (
            "GetDeploymentLogs",
            deployer_pb2.GetDeploymentLogsRequest(endpoint="nobody", lines=10**6),
            "INVALID_ARGUMENT",
            "lines",
        ),
        ("GetBatchJob", deployer_pb2.GetBatchJobRequest(id="\x00" * 10_000), "NOT_FOUND", "does not exist"),
        ("ListBatchJobs", deployer_pb2.ListBatchJobsRequest(page_size=-1), "INVALID_ARGUMENT", "page_size"),
        (
            "CreateDeployment",
            deployer_pb2.CreateDeploymentRequest(endpoint="big", model_ref="m" * (9 * 1024 * 1024)),
            "RESOURCE_EXHAUSTED",
            "",
        ),
    ],
)
def test_every_call_answers_bad_input_with_a_clear_status_and_the_service_stays_up(
    deployer, method, request_message, code, words
):
    with grpc.insecure_channel(deployer.address) as channel:
        stub = deployer_pb2_grpc.DeployerServiceStub(channel)
        with pytest.raises(grpc.RpcError) as refused:
            getattr(stub, method)(request_message, timeout=20)
        assert refused.value.code().name == code, refused.value.details()
        assert words in (refused.value.details() or "")
        assert stub.ListEndpoints(deployer_pb2.ListEndpointsRequest(), timeout=20) is not None


def test_a_kubernetes_deployment_renders_its_manifests_without_a_cluster(deployer, adder):
    with deployer.client() as client:
        client.create("cluster", adder, target="kubernetes", cpus=0.5, memory_mb=512, replicas=2)
        deadline = time.monotonic() + 30
        while "manifests rendered at" not in (found := client.get("cluster").deployments[0]).message:
            assert time.monotonic() < deadline, found
            time.sleep(0.1)
    path = Path(found.message.split("manifests rendered at ", 1)[1].split(";", 1)[0])
    manifests = list(yaml.safe_load_all(path.read_text()))
    assert [manifest["kind"] for manifest in manifests] == [
        "ConfigMap",
        "Deployment",
        "Service",
        "HorizontalPodAutoscaler",
    ]
    deployment = manifests[1]
    assert deployment["spec"]["replicas"] == 2
    container = deployment["spec"]["template"]["spec"]["containers"][0]
    assert container["resources"]["limits"] == {"cpu": "500m", "memory": "512Mi"}
    assert manifests[0]["data"]["MLMESH_RUNTIME_MODELS"] == adder
    assert manifests[0]["data"]["MLMESH_RUNTIME_SERVED_NAME"] == "cluster"
    with deployer.client() as client:
        client.delete("cluster")
    assert not path.exists()


def test_docker_deployments_check_their_image_and_say_what_they_wait_for(deployer, adder):
    with deployer.client() as client:
        for target, image, words in [
            ("local", "mlmesh-model-adder:1", "docker target"),
            ("docker", "Not/A Reference", "not a Docker image reference"),
            ("docker", "x" * 300, "not a Docker image reference"),
        ]:
            with pytest.raises(MeshError) as refused:
                client.create("boxed", adder, target=target, image=image)
            assert refused.value.code == "INVALID_ARGUMENT" and words in refused.value.message
            assert refused.value.field == "image"
        # Given no image, the builder is asked for one; none runs here, so the deployment waits and says why.
        client.create("boxed", adder, target="docker")
        deadline = time.monotonic() + 30
        while "cannot be reached" not in (message := client.get("boxed").deployments[0].message):
            assert time.monotonic() < deadline, message
            time.sleep(0.2)
        assert (
            "builder" in message
            and client.get("boxed").deployments[0].status == deployer_pb2.DEPLOYMENT_STATUS_CREATING
        )
        client.delete("boxed")

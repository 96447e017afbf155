"""The kubernetes target: rendered manifests checked against the official client's OpenAPI models,
and apply/delete against a recording stand-in API server and an unreachable one (no cluster runs here)."""

from __future__ import annotations

import copy
import json
import threading
from collections.abc import Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlsplit

import pytest
import yaml
from kubernetes.client import ApiClient

from services.common.natsserver import free_port
from services.deployer import kubernetes as k8s
from services.deployer.kubernetes import KubernetesDeployment, KubernetesError, apply, delete, render, to_yaml
from services.runtime.settings import RuntimeSettings

MODEL_CLASSES = {
    "ConfigMap": "V1ConfigMap",
    "Deployment": "V1Deployment",
    "Service": "V1Service",
    "HorizontalPodAutoscaler": "V2HorizontalPodAutoscaler",
}


def make_spec(**changes: Any) -> KubernetesDeployment:
    values: dict[str, Any] = {
        "endpoint": "fraud-api",
        "deployment": "blue",
        "model_name": "fraud",
        "model_version": 3,
        "registry_address": "mlmesh-registry:50051",
        "cpus": 2.0,
        "memory_mb": 512,
        "replicas": 2,
        "nats_url": "nats://nats:4222",
        "capture": True,
        "namespace": "models",
    }
    values.update(changes)
    return KubernetesDeployment(**values)


def by_kind(manifests: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    return {manifest["kind"]: manifest for manifest in manifests}


def pod_spec(manifests: list[dict[str, Any]]) -> dict[str, Any]:
    return by_kind(manifests)["Deployment"]["spec"]["template"]["spec"]


def container(manifests: list[dict[str, Any]]) -> dict[str, Any]:
    (only,) = pod_spec(manifests)["containers"]
    return only


def config_hash(manifests: list[dict[str, Any]]) -> str:
    return by_kind(manifests)["Deployment"]["spec"]["template"]["metadata"]["annotations"][k8s.CONFIG_HASH_ANNOTATION]


# --- rendering


def test_defaults_follow_replicas_and_cpus() -> None:
    spec = KubernetesDeployment("e", "blue", "m", 1, "registry:50051", cpus=2.5, replicas=3)
    assert spec.image == "mlmesh:latest"
    assert spec.max_replicas == 12
    assert spec.target_cpu_percent == 70
    assert spec.namespace == "default"
    assert spec.intra_op_threads == 2
    assert KubernetesDeployment("e", "blue", "m", 1, "r:1", cpus=0.5).intra_op_threads == 1
    assert KubernetesDeployment("e", "blue", "m", 1, "r:1", replicas=2, max_replicas=2).max_replicas == 2


@pytest.mark.parametrize(
    ("changes", "problem"),
    [
        ({"replicas": 0}, "replicas"),
        ({"replicas": 3, "max_replicas": 2}, "max_replicas"),
        ({"cpus": 0.0001}, "cpus"),
        ({"memory_mb": 0}, "memory_mb"),
        ({"model_version": 0}, "model_version"),
        ({"target_cpu_percent": 0}, "target_cpu_percent"),
        ({"namespace": "Models"}, "namespace"),
    ],
)
def test_impossible_specs_are_refused(changes: dict[str, Any], problem: str) -> None:
    with pytest.raises(ValueError, match=problem):
        make_spec(**changes)


def test_four_manifests_in_apply_order_with_one_name_and_namespace() -> None:
    manifests = render(make_spec())
    assert [(manifest["apiVersion"], manifest["kind"]) for manifest in manifests] == [
        ("v1", "ConfigMap"),
        ("apps/v1", "Deployment"),
        ("v1", "Service"),
        ("autoscaling/v2", "HorizontalPodAutoscaler"),
    ]
    assert {manifest["metadata"]["name"] for manifest in manifests} == {"fraud-api-blue"}
    assert {manifest["metadata"]["namespace"] for manifest in manifests} == {"models"}


def test_every_object_and_the_pods_carry_the_labels() -> None:
    manifests = render(make_spec())
    expected = {
        "app.kubernetes.io/name": "mlmesh-runtime",
        "app.kubernetes.io/part-of": "mlmesh",
        "mlmesh.io/endpoint": "fraud-api",
        "mlmesh.io/deployment": "blue",
        "mlmesh.io/model": "fraud",
        "mlmesh.io/model-version": "3",
    }
    pod_labels = by_kind(manifests)["Deployment"]["spec"]["template"]["metadata"]["labels"]
    for labels in [manifest["metadata"]["labels"] for manifest in manifests] + [pod_labels]:
        assert expected.items() <= labels.items()


def test_selectors_pick_the_pods_and_ignore_the_model_version() -> None:
    manifests = render(make_spec())
    deployment, service = by_kind(manifests)["Deployment"], by_kind(manifests)["Service"]
    pod_labels = deployment["spec"]["template"]["metadata"]["labels"]
    selector = deployment["spec"]["selector"]["matchLabels"]
    assert selector.items() <= pod_labels.items()
    assert service["spec"]["selector"] == selector
    # A Deployment's selector is immutable: a new model version must not change it.
    assert render(make_spec(model_version=4))[1]["spec"]["selector"]["matchLabels"] == selector
    assert selector["mlmesh.io/endpoint"] == "fraud-api" and selector["mlmesh.io/deployment"] == "blue"


def test_config_map_holds_the_runtime_settings() -> None:
    data = by_kind(render(make_spec()))["ConfigMap"]["data"]
    assert data == {
        "MLMESH_HOME": "/var/lib/mlmesh",
        "MLMESH_RUNTIME_MODELS": "fraud:3",
        "MLMESH_RUNTIME_SERVED_NAME": "fraud-api",
        "MLMESH_RUNTIME_HOST": "0.0.0.0",
        "MLMESH_RUNTIME_PORT": "8001",
        "MLMESH_RUNTIME_HTTP_PORT": "8000",
        "MLMESH_RUNTIME_REGISTRY_ADDRESS": "mlmesh-registry:50051",
        "MLMESH_RUNTIME_INTRA_OP_THREADS": "2",
        "MLMESH_RUNTIME_MAX_BATCH_ROWS": "0",
        "MLMESH_RUNTIME_CAPTURE": "true",
        "MLMESH_RUNTIME_ENDPOINT": "fraud-api",
        "MLMESH_RUNTIME_DEPLOYMENT": "blue",
        "MLMESH_NATS_URL": "nats://nats:4222",
    }


def test_the_runtime_reads_the_config_map_as_meant(monkeypatch: pytest.MonkeyPatch) -> None:
    for name, value in by_kind(render(make_spec()))["ConfigMap"]["data"].items():
        monkeypatch.setenv(name, value)
    settings = RuntimeSettings()
    assert settings.model_refs() == ["fraud:3"]
    assert (settings.served_name, settings.endpoint, settings.deployment) == ("fraud-api", "fraud-api", "blue")
    assert (settings.host, settings.port, settings.http_port) == ("0.0.0.0", 8001, 8000)
    assert settings.registry_address == "mlmesh-registry:50051"
    assert settings.intra_op_threads == 2
    assert settings.capture is True
    assert settings.nats_url == "nats://nats:4222"
    assert str(settings.home) == "/var/lib/mlmesh"


def test_capture_is_off_without_nats_and_nats_url_only_when_set() -> None:
    data = by_kind(render(make_spec(nats_url=None, capture=True)))["ConfigMap"]["data"]
    assert data["MLMESH_RUNTIME_CAPTURE"] == "false"
    assert "MLMESH_NATS_URL" not in data
    assert by_kind(render(make_spec(capture=False)))["ConfigMap"]["data"]["MLMESH_RUNTIME_CAPTURE"] == "false"


def test_deployment_runs_the_runtime_from_the_config_map() -> None:
    manifests = render(make_spec(image="registry.example/mlmesh:1.2"))
    deployment = by_kind(manifests)["Deployment"]
    runtime = container(manifests)
    assert deployment["spec"]["replicas"] == 2
    assert deployment["spec"]["strategy"] == {
        "type": "RollingUpdate",
        "rollingUpdate": {"maxUnavailable": 0, "maxSurge": 1},
    }
    assert pod_spec(manifests)["terminationGracePeriodSeconds"] == 30
    assert runtime["name"] == "runtime"
    assert runtime["image"] == "registry.example/mlmesh:1.2"
    assert runtime["command"] == ["python", "-m", "services.runtime"]
    assert runtime["envFrom"] == [{"configMapRef": {"name": "fraud-api-blue"}}]
    assert {(port["name"], port["containerPort"]) for port in runtime["ports"]} == {("grpc", 8001), ("http", 8000)}


def test_home_is_an_empty_dir_volume() -> None:
    manifests = render(make_spec())
    (mount,) = container(manifests)["volumeMounts"]
    (volume,) = pod_spec(manifests)["volumes"]
    assert mount["mountPath"] == "/var/lib/mlmesh" == by_kind(manifests)["ConfigMap"]["data"]["MLMESH_HOME"]
    assert volume == {"name": mount["name"], "emptyDir": {}}


@pytest.mark.parametrize(("cpus", "quantity"), [(0.5, "500m"), (2, "2"), (1.25, "1250m"), (0.001, "1m")])
def test_resources_are_requested_and_limited(cpus: float, quantity: str) -> None:
    resources = container(render(make_spec(cpus=cpus, memory_mb=512)))["resources"]
    assert resources == {
        "requests": {"cpu": quantity, "memory": "512Mi"},
        "limits": {"cpu": quantity, "memory": "512Mi"},
    }


def test_probes_ask_the_runtime_health_routes() -> None:
    runtime = container(render(make_spec()))
    http_port_names = {port["name"] for port in runtime["ports"] if port["containerPort"] == 8000}
    for probe, path in [
        ("readinessProbe", "/v2/health/ready"),
        ("livenessProbe", "/v2/health/live"),
        ("startupProbe", "/v2/health/ready"),
    ]:
        assert runtime[probe]["httpGet"]["path"] == path
        assert runtime[probe]["httpGet"]["port"] in http_port_names
    startup = runtime["startupProbe"]
    assert startup["periodSeconds"] * startup["failureThreshold"] >= 120


def test_startup_probe_waits_as_long_as_asked() -> None:
    startup = container(render(make_spec(startup_timeout_seconds=601)))["startupProbe"]
    assert startup["periodSeconds"] * startup["failureThreshold"] >= 601


def test_service_exposes_grpc_and_http() -> None:
    service = by_kind(render(make_spec()))["Service"]
    assert service["spec"]["type"] == "ClusterIP"
    ports = {port["name"]: port for port in service["spec"]["ports"]}
    assert ports["grpc"]["port"] == 8001 and ports["grpc"]["appProtocol"] == "grpc"
    assert ports["http"]["port"] == 8000
    assert {port["targetPort"] for port in ports.values()} == {"grpc", "http"}


def test_autoscaler_bounds_and_target() -> None:
    autoscaler = by_kind(render(make_spec(replicas=2, max_replicas=5, target_cpu_percent=60)))[
        "HorizontalPodAutoscaler"
    ]
    assert autoscaler["spec"]["scaleTargetRef"] == {
        "apiVersion": "apps/v1",
        "kind": "Deployment",
        "name": "fraud-api-blue",
    }
    assert (autoscaler["spec"]["minReplicas"], autoscaler["spec"]["maxReplicas"]) == (2, 5)
    (metric,) = autoscaler["spec"]["metrics"]
    assert metric["resource"]["name"] == "cpu"
    assert metric["resource"]["target"] == {"type": "Utilization", "averageUtilization": 60}
    assert by_kind(render(make_spec(replicas=3)))["HorizontalPodAutoscaler"]["spec"]["maxReplicas"] == 12


def test_config_hash_changes_with_the_configuration_only() -> None:
    original = config_hash(render(make_spec()))
    assert config_hash(render(make_spec())) == original
    assert config_hash(render(make_spec(replicas=5, max_replicas=9, image="other:1"))) == original
    assert config_hash(render(make_spec(model_version=4))) != original
    assert config_hash(render(make_spec(registry_address="elsewhere:50051"))) != original


def test_yaml_round_trips() -> None:
    manifests = render(make_spec())
    text = to_yaml(manifests)
    assert text.startswith("---\n")
    assert text.count("\n---\n") == 3
    assert list(yaml.safe_load_all(text)) == manifests
    # Keys keep the order they were built in, as a person reads a manifest.
    assert text.splitlines()[1:3] == ["apiVersion: v1", "kind: ConfigMap"]


# --- names


@pytest.mark.parametrize(
    ("endpoint", "deployment", "name"),
    [("fraud-api", "blue", "fraud-api-blue"), ("Fraud_API", "Green", "fraud-api-green"), ("a.b", "c", "a-b-c")],
)
def test_names_become_dns_labels(endpoint: str, deployment: str, name: str) -> None:
    assert make_spec(endpoint=endpoint, deployment=deployment).resource_name == name


def test_long_names_are_shortened_and_stay_apart() -> None:
    first = make_spec(endpoint="e" * 40, deployment="d" * 39 + "1").resource_name
    second = make_spec(endpoint="e" * 40, deployment="d" * 39 + "2").resource_name
    assert len(first) <= 63 and len(second) <= 63
    assert first != second
    assert all(k8s.dns_label(name) == name for name in (first, second))


@pytest.mark.parametrize("text", ["___", "---", "...", "", "Ωμέγα"])
def test_names_without_letters_or_digits_are_refused(text: str) -> None:
    with pytest.raises(ValueError, match="cannot become a Kubernetes name"):
        k8s.dns_label(text)


def test_model_names_that_are_no_label_value_still_label() -> None:
    long_name = "model." + "x" * 100 + "_"
    manifests = render(make_spec(model_name=long_name))
    label = manifests[0]["metadata"]["labels"]["mlmesh.io/model"]
    assert len(label) <= 63 and label[0].isalnum() and label[-1].isalnum()
    assert manifests[0]["metadata"]["annotations"]["mlmesh.io/model-ref"] == f"{long_name}:3"
    assert manifests[0]["data"]["MLMESH_RUNTIME_MODELS"] == f"{long_name}:3"


# --- the manifests are real Kubernetes objects


@pytest.mark.parametrize("changes", [{}, {"cpus": 0.5, "nats_url": None, "replicas": 1}])
def test_manifests_are_valid_kubernetes_objects(changes: dict[str, Any]) -> None:
    client = ApiClient()
    for manifest in render(make_spec(**changes)):
        # The generated models know every field of the Kubernetes OpenAPI and check their types.
        model = client._ApiClient__deserialize(manifest, MODEL_CLASSES[manifest["kind"]])  # type: ignore[attr-defined]
        # A key the models do not know is dropped on the way in, so it would be missing here.
        assert client.sanitize_for_serialization(model) == manifest


def test_the_validation_catches_unknown_fields() -> None:
    client = ApiClient()
    deployment = copy.deepcopy(render(make_spec())[1])
    deployment["spec"]["template"]["spec"]["containers"][0]["readynessProbe"] = {}
    model = client._ApiClient__deserialize(deployment, "V1Deployment")  # type: ignore[attr-defined]
    assert client.sanitize_for_serialization(model) != deployment


# --- talking to a cluster


def write_kubeconfig(path: Path, server: str) -> Path:
    config = {
        "apiVersion": "v1",
        "kind": "Config",
        "clusters": [{"name": "test", "cluster": {"server": server}}],
        "users": [{"name": "test", "user": {"token": "secret-token"}}],
        "contexts": [{"name": "test", "context": {"cluster": "test", "user": "test"}}],
        "current-context": "test",
    }
    path.write_text(yaml.safe_dump(config))
    return path


@dataclass
class StandInApiServer:
    """Answers like a Kubernetes API server and records what it was asked."""

    url: str
    objects: dict[str, dict[str, Any]] = field(default_factory=dict)
    requests: list[dict[str, Any]] = field(default_factory=list)
    refusals: dict[str, tuple[int, str]] = field(default_factory=dict)
    """path -> (status, message) answered instead of doing the request."""


@pytest.fixture
def api_server() -> Iterator[StandInApiServer]:
    server_state = StandInApiServer(url="")

    class Handler(BaseHTTPRequestHandler):
        def log_message(self, format: str, *args: Any) -> None:
            pass

        def answer(self, status: int, body: dict[str, Any]) -> None:
            payload = json.dumps(body).encode()
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(payload)))
            self.end_headers()
            self.wfile.write(payload)

        def refuse(self, status: int, message: str) -> None:
            self.answer(
                status, {"kind": "Status", "apiVersion": "v1", "status": "Failure", "message": message, "code": status}
            )

        def handle_request(self) -> None:
            url = urlsplit(self.path)
            length = int(self.headers.get("Content-Length") or 0)
            body = json.loads(self.rfile.read(length)) if length else None
            server_state.requests.append(
                {
                    "method": self.command,
                    "path": url.path,
                    "query": parse_qs(url.query),
                    "content_type": self.headers.get("Content-Type"),
                    "authorization": self.headers.get("Authorization"),
                    "body": body,
                }
            )
            if url.path in server_state.refusals:
                self.refuse(*server_state.refusals[url.path])
            elif self.command == "PATCH":
                server_state.objects[url.path] = body
                self.answer(200, body)
            elif url.path in server_state.objects:
                stored = server_state.objects[url.path]
                if self.command == "DELETE":
                    del server_state.objects[url.path]
                    self.answer(200, {"kind": "Status", "apiVersion": "v1", "status": "Success"})
                else:
                    self.answer(200, stored)
            else:
                self.refuse(404, f"{url.path} not found")

        do_GET = do_PATCH = do_DELETE = handle_request

    httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    server_state.url = f"http://127.0.0.1:{httpd.server_address[1]}"
    thread = threading.Thread(target=httpd.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    try:
        yield server_state
    finally:
        httpd.shutdown()
        httpd.server_close()
        thread.join()


OBJECT_PATHS = [
    "/api/v1/namespaces/team/configmaps/fraud-api-blue",
    "/apis/apps/v1/namespaces/team/deployments/fraud-api-blue",
    "/api/v1/namespaces/team/services/fraud-api-blue",
    "/apis/autoscaling/v2/namespaces/team/horizontalpodautoscalers/fraud-api-blue",
]


def test_apply_server_side_applies_each_manifest(api_server: StandInApiServer, tmp_path: Path) -> None:
    kubeconfig = write_kubeconfig(tmp_path / "kubeconfig", api_server.url)
    manifests = render(make_spec())
    apply(manifests, kubeconfig, namespace="team")
    patches = [request for request in api_server.requests if request["method"] == "PATCH"]
    assert [request["path"] for request in patches] == OBJECT_PATHS
    for request, manifest in zip(patches, manifests, strict=True):
        assert request["content_type"] == "application/apply-patch+yaml"
        assert request["query"]["fieldManager"] == ["mlmesh"]
        assert request["query"]["force"] == ["true"]
        assert request["authorization"] == "Bearer secret-token"
        assert request["body"]["metadata"]["namespace"] == "team"
        assert {**request["body"], "metadata": manifest["metadata"]} == manifest
    assert manifests[0]["metadata"]["namespace"] == "models", "the caller's manifests are left as they were"


def test_apply_keeps_the_replicas_the_autoscaler_runs(api_server: StandInApiServer, tmp_path: Path) -> None:
    kubeconfig = write_kubeconfig(tmp_path / "kubeconfig", api_server.url)
    apply(render(make_spec(replicas=2, max_replicas=8)), kubeconfig, namespace="team")
    api_server.objects[OBJECT_PATHS[1]]["spec"]["replicas"] = 6
    api_server.requests.clear()
    apply(render(make_spec(replicas=2, max_replicas=8, model_version=4)), kubeconfig, namespace="team")
    assert api_server.objects[OBJECT_PATHS[1]]["spec"]["replicas"] == 6
    assert api_server.objects[OBJECT_PATHS[0]]["data"]["MLMESH_RUNTIME_MODELS"] == "fraud:4"
    # A lower maximum wins over what runs.
    apply(render(make_spec(replicas=2, max_replicas=4)), kubeconfig, namespace="team")
    assert api_server.objects[OBJECT_PATHS[1]]["spec"]["replicas"] == 4


def test_apply_refuses_a_name_another_deployment_holds(api_server: StandInApiServer, tmp_path: Path) -> None:
    kubeconfig = write_kubeconfig(tmp_path / "kubeconfig", api_server.url)
    # "fraud" + "api-blue" and "fraud-api" + "blue" make the same object names.
    apply(render(make_spec(endpoint="fraud", deployment="api-blue")), kubeconfig, namespace="team")
    with pytest.raises(KubernetesError, match=r"already exists for another mlmesh\.io/endpoint") as raised:
        apply(render(make_spec()), kubeconfig, namespace="team")
    assert raised.value.status == 409


def test_delete_removes_every_object_and_tolerates_missing_ones(api_server: StandInApiServer, tmp_path: Path) -> None:
    kubeconfig = write_kubeconfig(tmp_path / "kubeconfig", api_server.url)
    spec = make_spec(namespace="team")
    apply(render(spec), kubeconfig, namespace="team")
    api_server.objects.pop(OBJECT_PATHS[2])
    api_server.requests.clear()
    delete(spec, kubeconfig)
    assert api_server.objects == {}
    deletions = [request["path"] for request in api_server.requests if request["method"] == "DELETE"]
    assert deletions == [OBJECT_PATHS[3], OBJECT_PATHS[1], OBJECT_PATHS[2], OBJECT_PATHS[0]]
    delete(spec, kubeconfig)


def test_refusals_carry_the_api_message(api_server: StandInApiServer, tmp_path: Path) -> None:
    kubeconfig = write_kubeconfig(tmp_path / "kubeconfig", api_server.url)
    message = 'Service "fraud-api-blue" is invalid: spec.ports[0].port: Invalid value'
    api_server.refusals[OBJECT_PATHS[2]] = (422, message)
    with pytest.raises(KubernetesError) as raised:
        apply(render(make_spec()), kubeconfig, namespace="team")
    assert raised.value.status == 422
    assert str(raised.value) == f"patch Service team/fraud-api-blue: 422 {message}"
    api_server.refusals = {OBJECT_PATHS[0]: (403, "configmaps is forbidden")}
    with pytest.raises(KubernetesError, match="delete ConfigMap team/fraud-api-blue: 403 configmaps is forbidden"):
        delete(make_spec(namespace="team"), kubeconfig)


def test_apply_to_an_unreachable_server_names_it(tmp_path: Path) -> None:
    server = f"http://127.0.0.1:{free_port()}"
    kubeconfig = write_kubeconfig(tmp_path / "kubeconfig", server)
    with pytest.raises(KubernetesError, match=f"cannot reach the Kubernetes API server {server}") as raised:
        apply(render(make_spec()), kubeconfig, namespace="team")
    assert raised.value.status is None


def test_a_missing_kubeconfig_is_named(tmp_path: Path) -> None:
    with pytest.raises(KubernetesError, match=r"kubeconfig .*absent"):
        apply(render(make_spec()), tmp_path / "absent", namespace="team")


def test_apply_refuses_kinds_it_does_not_handle(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="Ingress"):
        apply([{"apiVersion": "networking.k8s.io/v1", "kind": "Ingress", "metadata": {"name": "x"}}], tmp_path, "team")

"""The `kubernetes` target: a deployment as Kubernetes manifests, applied with the official client.

`render` is pure: it turns a `KubernetesDeployment` into a ConfigMap, a Deployment, a Service and
a HorizontalPodAutoscaler as plain dicts, which `to_yaml` prints for `kubectl apply -f -`.
`apply` and `delete` talk to a cluster through a kubeconfig; the `kubernetes` package is imported
only there, so the rest of mlmesh does not pay its import time.
"""

from __future__ import annotations

import copy
import dataclasses
import hashlib
import json
import math
import re
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any

import yaml

if TYPE_CHECKING:
    from kubernetes.client import ApiClient

DEFAULT_IMAGE = "mlmesh:latest"
"""The mesh image built from deploy/Dockerfile; it holds the runtime (`python -m services.runtime`)."""

RUNTIME_COMMAND = ["python", "-m", "services.runtime"]
GRPC_PORT = 8001
HTTP_PORT = 8000
RUNTIME_HOME = "/var/lib/mlmesh"
CONTAINER_NAME = "runtime"
FIELD_MANAGER = "mlmesh"

APP_NAME_LABEL = "app.kubernetes.io/name"
PART_OF_LABEL = "app.kubernetes.io/part-of"
MANAGED_BY_LABEL = "app.kubernetes.io/managed-by"
ENDPOINT_LABEL = "mlmesh.io/endpoint"
DEPLOYMENT_LABEL = "mlmesh.io/deployment"
MODEL_LABEL = "mlmesh.io/model"
MODEL_VERSION_LABEL = "mlmesh.io/model-version"
CONFIG_HASH_ANNOTATION = "mlmesh.io/config-sha256"
MODEL_ANNOTATION = "mlmesh.io/model-ref"

STARTUP_PROBE_PERIOD_SECONDS = 2

# (connect, read) seconds: without them an unreachable API server blocks for minutes per call.
REQUEST_TIMEOUT_SECONDS = (10.0, 60.0)

_DNS_LABEL_MAX = 63
_DNS_LABEL = re.compile(r"^[a-z0-9]([a-z0-9-]*[a-z0-9])?$")
_LABEL_VALUE = re.compile(r"^([A-Za-z0-9]([A-Za-z0-9._-]*[A-Za-z0-9])?)?$")
_HASH_SUFFIX_LENGTH = 8


class KubernetesError(Exception):
    """A Kubernetes API server refused a request or could not be reached.

    Attributes:
        status: The HTTP status the server answered, or None when no answer came.
    """

    def __init__(self, message: str, status: int | None = None) -> None:
        super().__init__(message)
        self.status = status


@dataclasses.dataclass(frozen=True)
class KubernetesDeployment:
    """One deployment of an endpoint, as the Kubernetes target runs it.

    Attributes:
        endpoint: Endpoint name; the runtime serves the model under it.
        deployment: Deployment name within the endpoint, e.g. "blue".
        model_name: Registry name of the model served.
        model_version: Registry version of the model served.
        registry_address: host:port of the registry, as reachable from inside the cluster.
        image: Image holding the runtime; the mesh image by default.
        cpus: CPU cores of one replica, both requested and the limit.
        memory_mb: Memory of one replica in MiB, both requested and the limit.
        replicas: Replicas to start with; the autoscaler never goes below.
        max_replicas: Most replicas the autoscaler may run; None means replicas * 4.
        target_cpu_percent: Average CPU use, of what is requested, the autoscaler aims at.
        nats_url: NATS server the runtime sends captured requests to.
        capture: Capture every request's inputs and outputs (only when nats_url is set).
        namespace: Namespace of every object.
        intra_op_threads: onnxruntime threads inside one operator; None means one per whole core.
        startup_timeout_seconds: How long a replica may take to download and load its model.
    """

    endpoint: str
    deployment: str
    model_name: str
    model_version: int
    registry_address: str
    image: str = DEFAULT_IMAGE
    cpus: float = 1.0
    memory_mb: int = 1024
    replicas: int = 1
    max_replicas: int | None = None
    target_cpu_percent: int = 70
    nats_url: str | None = None
    capture: bool = False
    namespace: str = "default"
    intra_op_threads: int | None = None
    max_batch_rows: int = 0
    startup_timeout_seconds: int = 300

    def __post_init__(self) -> None:
        if self.model_version < 1:
            raise ValueError(f"model_version must be 1 or more, not {self.model_version}")
        if round(self.cpus * 1000) < 1:
            raise ValueError(f"cpus must be at least 0.001 (one millicore), not {self.cpus}")
        if self.memory_mb < 1:
            raise ValueError(f"memory_mb must be 1 or more, not {self.memory_mb}")
        # An autoscaler cannot have minReplicas 0, and it owns the count once it runs.
        if self.replicas < 1:
            raise ValueError(f"replicas must be 1 or more, not {self.replicas}")
        if not 1 <= self.target_cpu_percent <= 100:
            raise ValueError(f"target_cpu_percent must be between 1 and 100, not {self.target_cpu_percent}")
        if self.startup_timeout_seconds < STARTUP_PROBE_PERIOD_SECONDS:
            raise ValueError(f"startup_timeout_seconds must be {STARTUP_PROBE_PERIOD_SECONDS} or more")
        if not _DNS_LABEL.fullmatch(self.namespace) or len(self.namespace) > _DNS_LABEL_MAX:
            raise ValueError(f"namespace {self.namespace!r} is not a DNS-1123 label")
        if self.max_replicas is None:
            object.__setattr__(self, "max_replicas", self.replicas * 4)
        elif self.max_replicas < self.replicas:
            raise ValueError(f"max_replicas ({self.max_replicas}) is below replicas ({self.replicas})")
        if self.intra_op_threads is None:
            object.__setattr__(self, "intra_op_threads", max(1, math.floor(self.cpus)))

    @property
    def resource_name(self) -> str:
        """Name of every object of this deployment: `<endpoint>-<deployment>`, DNS-1123 safe."""
        return dns_label(f"{self.endpoint}-{self.deployment}")


def dns_label(text: str) -> str:
    """Turns `text` into a DNS-1123 label: lowercase, [a-z0-9-], at most 63 characters.

    Characters outside the alphabet become '-'. A longer name keeps its first characters and
    ends with a hash of the whole, so two long names stay apart.

    Raises:
        ValueError: When no letter or digit is left to name the object with.
    """
    label = re.sub(r"[^a-z0-9-]", "-", text.lower()).strip("-")
    if not label:
        raise ValueError(f"{text!r} cannot become a Kubernetes name: it has no letter or digit")
    if len(label) > _DNS_LABEL_MAX:
        label = _shorten(label, text, lambda head: head.rstrip("-"))
    return label


def _label_value(text: str) -> str:
    """`text` as a label value (at most 63 of [A-Za-z0-9._-], alphanumeric at both ends)."""
    if len(text) <= _DNS_LABEL_MAX and _LABEL_VALUE.fullmatch(text):
        return text
    cleaned = re.sub(r"[^A-Za-z0-9._-]", "-", text)
    return _shorten(cleaned, text, lambda head: re.sub(r"^[^A-Za-z0-9]+|[^A-Za-z0-9]+$", "", head))


def _shorten(cleaned: str, original: str, trim: Callable[[str], str]) -> str:
    digest = hashlib.sha256(original.encode()).hexdigest()[:_HASH_SUFFIX_LENGTH]
    head = trim(cleaned[: _DNS_LABEL_MAX - _HASH_SUFFIX_LENGTH - 1])
    return f"{head}-{digest}" if head else digest


def _cpu_quantity(cpus: float) -> str:
    millicores = round(cpus * 1000)
    return str(millicores // 1000) if millicores % 1000 == 0 else f"{millicores}m"


def _config_hash(data: dict[str, str]) -> str:
    return hashlib.sha256(json.dumps(data, sort_keys=True, separators=(",", ":")).encode()).hexdigest()


def selector_labels(spec: KubernetesDeployment) -> dict[str, str]:
    """Labels that pick this deployment's pods; they never change, as a Deployment's selector cannot."""
    return {
        APP_NAME_LABEL: "mlmesh-runtime",
        ENDPOINT_LABEL: _label_value(spec.endpoint),
        DEPLOYMENT_LABEL: _label_value(spec.deployment),
    }


def _labels(spec: KubernetesDeployment) -> dict[str, str]:
    return {
        APP_NAME_LABEL: "mlmesh-runtime",
        PART_OF_LABEL: "mlmesh",
        MANAGED_BY_LABEL: "mlmesh",
        ENDPOINT_LABEL: _label_value(spec.endpoint),
        DEPLOYMENT_LABEL: _label_value(spec.deployment),
        MODEL_LABEL: _label_value(spec.model_name),
        MODEL_VERSION_LABEL: str(spec.model_version),
    }


def runtime_environment(spec: KubernetesDeployment) -> dict[str, str]:
    """The runtime's settings (services/runtime/settings.py) as environment variables."""
    environment = {
        "MLMESH_HOME": RUNTIME_HOME,
        "MLMESH_RUNTIME_MODELS": f"{spec.model_name}:{spec.model_version}",
        "MLMESH_RUNTIME_SERVED_NAME": spec.endpoint,
        "MLMESH_RUNTIME_HOST": "0.0.0.0",
        "MLMESH_RUNTIME_PORT": str(GRPC_PORT),
        "MLMESH_RUNTIME_HTTP_PORT": str(HTTP_PORT),
        "MLMESH_RUNTIME_REGISTRY_ADDRESS": spec.registry_address,
        "MLMESH_RUNTIME_INTRA_OP_THREADS": str(spec.intra_op_threads),
        "MLMESH_RUNTIME_MAX_BATCH_ROWS": str(spec.max_batch_rows),
        # The runtime refuses to start capturing without NATS; the local target drops it the same way.
        "MLMESH_RUNTIME_CAPTURE": "true" if spec.capture and spec.nats_url else "false",
        "MLMESH_RUNTIME_ENDPOINT": spec.endpoint,
        "MLMESH_RUNTIME_DEPLOYMENT": spec.deployment,
    }
    if spec.nats_url:
        environment["MLMESH_NATS_URL"] = spec.nats_url
    return environment


def _metadata(spec: KubernetesDeployment) -> dict[str, Any]:
    return {
        "name": spec.resource_name,
        "namespace": spec.namespace,
        "labels": _labels(spec),
        "annotations": {MODEL_ANNOTATION: f"{spec.model_name}:{spec.model_version}"},
    }


def _http_probe(path: str, period_seconds: int, failure_threshold: int) -> dict[str, Any]:
    return {
        "httpGet": {"path": path, "port": "http"},
        "periodSeconds": period_seconds,
        "timeoutSeconds": 2,
        "failureThreshold": failure_threshold,
    }


def render(spec: KubernetesDeployment) -> list[dict[str, Any]]:
    """The ConfigMap, Deployment, Service and HorizontalPodAutoscaler of one deployment, in apply order."""
    name = spec.resource_name
    environment = runtime_environment(spec)
    resources = {"cpu": _cpu_quantity(spec.cpus), "memory": f"{spec.memory_mb}Mi"}
    ports = [
        {"name": "grpc", "containerPort": GRPC_PORT, "protocol": "TCP"},
        {"name": "http", "containerPort": HTTP_PORT, "protocol": "TCP"},
    ]
    config_map = {
        "apiVersion": "v1",
        "kind": "ConfigMap",
        "metadata": _metadata(spec),
        "data": environment,
    }
    container = {
        "name": CONTAINER_NAME,
        "image": spec.image,
        # Replaces the image's `mlmesh` entrypoint.
        "command": list(RUNTIME_COMMAND),
        "envFrom": [{"configMapRef": {"name": name}}],
        "ports": ports,
        # Requests equal to limits: the pod is Guaranteed, so the sizing the profiler measured holds.
        "resources": {"requests": dict(resources), "limits": dict(resources)},
        "startupProbe": _http_probe(
            "/v2/health/ready",
            STARTUP_PROBE_PERIOD_SECONDS,
            math.ceil(spec.startup_timeout_seconds / STARTUP_PROBE_PERIOD_SECONDS),
        ),
        "readinessProbe": _http_probe("/v2/health/ready", 5, 3),
        "livenessProbe": _http_probe("/v2/health/live", 10, 3),
        "volumeMounts": [{"name": "home", "mountPath": RUNTIME_HOME}],
    }
    deployment = {
        "apiVersion": "apps/v1",
        "kind": "Deployment",
        "metadata": _metadata(spec),
        "spec": {
            "replicas": spec.replicas,
            "selector": {"matchLabels": selector_labels(spec)},
            # A new replica must be ready before an old one goes: serving never drops below replicas.
            "strategy": {"type": "RollingUpdate", "rollingUpdate": {"maxUnavailable": 0, "maxSurge": 1}},
            "template": {
                "metadata": {
                    "labels": _labels(spec),
                    # A changed ConfigMap alone does not restart pods; a changed template does.
                    "annotations": {CONFIG_HASH_ANNOTATION: _config_hash(environment)},
                },
                "spec": {
                    # Service links would add `<SERVICE>_PORT=tcp://...` variables, which collide
                    # with MLMESH_RUNTIME_* settings when a Service is named like a prefix of them.
                    "enableServiceLinks": False,
                    # The runtime never calls the Kubernetes API.
                    "automountServiceAccountToken": False,
                    "terminationGracePeriodSeconds": 30,
                    "containers": [container],
                    "volumes": [{"name": "home", "emptyDir": {}}],
                },
            },
        },
    }
    service = {
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": _metadata(spec),
        "spec": {
            "type": "ClusterIP",
            "selector": selector_labels(spec),
            "ports": [
                {"name": "grpc", "port": GRPC_PORT, "targetPort": "grpc", "protocol": "TCP", "appProtocol": "grpc"},
                {"name": "http", "port": HTTP_PORT, "targetPort": "http", "protocol": "TCP"},
            ],
        },
    }
    autoscaler = {
        "apiVersion": "autoscaling/v2",
        "kind": "HorizontalPodAutoscaler",
        "metadata": _metadata(spec),
        "spec": {
            "scaleTargetRef": {"apiVersion": "apps/v1", "kind": "Deployment", "name": name},
            "minReplicas": spec.replicas,
            "maxReplicas": spec.max_replicas,
            "metrics": [
                {
                    "type": "Resource",
                    "resource": {
                        "name": "cpu",
                        "target": {"type": "Utilization", "averageUtilization": spec.target_cpu_percent},
                    },
                }
            ],
        },
    }
    return [config_map, deployment, service, autoscaler]


def to_yaml(manifests: Sequence[dict[str, Any]]) -> str:
    """The manifests as one multi-document YAML stream, keys in the order they were built."""
    return yaml.safe_dump_all(manifests, sort_keys=False, explicit_start=True, default_flow_style=False)


# kind -> (API class in kubernetes.client, snake_case resource name in its method names).
_APIS = {
    ("v1", "ConfigMap"): ("CoreV1Api", "config_map"),
    ("v1", "Service"): ("CoreV1Api", "service"),
    ("apps/v1", "Deployment"): ("AppsV1Api", "deployment"),
    ("autoscaling/v2", "HorizontalPodAutoscaler"): ("AutoscalingV2Api", "horizontal_pod_autoscaler"),
}
# Deleted in this order so the autoscaler does not rescale a Deployment that is going away.
_DELETE_ORDER = [
    ("autoscaling/v2", "HorizontalPodAutoscaler"),
    ("apps/v1", "Deployment"),
    ("v1", "Service"),
    ("v1", "ConfigMap"),
]


def apply(manifests: Sequence[dict[str, Any]], kubeconfig: Path, namespace: str) -> None:
    """Server-side applies the manifests in `namespace`, in order; applying twice changes nothing.

    A Deployment an autoscaler in `manifests` scales keeps the replica count it runs with (within
    the autoscaler's bounds), so redeploying does not scale it down first.

    Raises:
        KubernetesError: The kubeconfig is unusable, the API server unreachable, or it refused a manifest.
        ValueError: A manifest is of a kind this target does not handle.
    """
    for manifest in manifests:
        _api_for(manifest)
    with _api_client(kubeconfig) as api_client:
        for manifest in manifests:
            body = copy.deepcopy(manifest)
            body["metadata"]["namespace"] = namespace
            if body["kind"] == "Deployment":
                _adopt_live_replicas(api_client, body, manifests, namespace)
            _call(api_client, body, "patch", namespace, body=body, force=True, field_validation="Strict")


def delete(spec: KubernetesDeployment, kubeconfig: Path) -> None:
    """Deletes the objects `render(spec)` makes; objects already gone are fine.

    Raises:
        KubernetesError: The kubeconfig is unusable, the API server unreachable, or it refused a deletion.
    """
    with _api_client(kubeconfig) as api_client:
        for api_version, kind in _DELETE_ORDER:
            manifest = {"apiVersion": api_version, "kind": kind, "metadata": {"name": spec.resource_name}}
            try:
                _call(api_client, manifest, "delete", spec.namespace, propagation_policy="Background")
            except KubernetesError as error:
                if error.status != 404:
                    raise


def _api_for(manifest: dict[str, Any]) -> tuple[str, str]:
    api_version, kind = manifest.get("apiVersion"), manifest.get("kind")
    api = _APIS.get((str(api_version), str(kind)))
    if api is None:
        raise ValueError(f"cannot apply {kind} of {api_version}: only {sorted(known for _, known in _APIS)}")
    return api


@contextmanager
def _api_client(kubeconfig: Path) -> Iterator[ApiClient]:
    import kubernetes.config
    from kubernetes.config.config_exception import ConfigException

    try:
        # A client of its own: the process-wide default configuration stays untouched, and
        # persist_config=False never writes refreshed credentials back into the user's file.
        api_client = kubernetes.config.new_client_from_config(config_file=str(kubeconfig), persist_config=False)
    except (ConfigException, OSError, yaml.YAMLError) as error:
        raise KubernetesError(f"cannot use kubeconfig {kubeconfig}: {error}") from error
    try:
        yield api_client
    finally:
        api_client.close()


def _call(api_client: ApiClient, manifest: dict[str, Any], verb: str, namespace: str, **arguments: Any) -> Any:
    """Calls `<verb>_namespaced_<kind>` for the manifest's object, turning failures into KubernetesError."""
    import kubernetes.client
    import urllib3

    api_class, resource = _api_for(manifest)
    method = getattr(getattr(kubernetes.client, api_class)(api_client), f"{verb}_namespaced_{resource}")
    name = manifest["metadata"]["name"]
    what = f"{manifest['kind']} {namespace}/{name}"
    if verb == "patch":
        arguments.update(field_manager=FIELD_MANAGER, _content_type="application/apply-patch+yaml")
    try:
        return method(name, namespace, _request_timeout=REQUEST_TIMEOUT_SECONDS, **arguments)
    except kubernetes.client.ApiException as error:
        raise KubernetesError(f"{verb} {what}: {error.status} {_api_message(error)}", error.status) from error
    except urllib3.exceptions.HTTPError as error:
        server = api_client.configuration.host
        raise KubernetesError(f"{verb} {what}: cannot reach the Kubernetes API server {server}: {error}") from error


def _api_message(error: Any) -> str:
    """The `message` of the API's Status answer, else whatever the server said."""
    try:
        message = json.loads(error.body)["message"]
    except (TypeError, ValueError, KeyError):
        return str(error.body or error.reason)
    return str(message)


def _adopt_live_replicas(
    api_client: ApiClient, deployment: dict[str, Any], manifests: Sequence[dict[str, Any]], namespace: str
) -> None:
    """Keeps an autoscaled Deployment's running replica count, and refuses to take over another's."""
    try:
        live = _call(api_client, deployment, "read", namespace)
    except KubernetesError as error:
        if error.status == 404:
            return
        raise
    live_labels = live.metadata.labels or {}
    for label in (ENDPOINT_LABEL, DEPLOYMENT_LABEL):
        wanted = deployment["metadata"]["labels"][label]
        if live_labels.get(label) != wanted:
            raise KubernetesError(
                f"Deployment {namespace}/{deployment['metadata']['name']} already exists for another "
                f"{label} ({live_labels.get(label)!r}, not {wanted!r})",
                409,
            )
    name = deployment["metadata"]["name"]
    for manifest in manifests:
        if manifest["kind"] == "HorizontalPodAutoscaler" and manifest["spec"]["scaleTargetRef"]["name"] == name:
            bounds = manifest["spec"]
            running = live.spec.replicas or 0
            deployment["spec"]["replicas"] = min(max(running, bounds["minReplicas"]), bounds["maxReplicas"])

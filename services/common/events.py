"""Lifecycle events: subjects, the CloudEvents 1.0 envelope, and one typed payload per kind.

An event's kind (e.g. `model.registered`) gives its NATS subject `mlmesh.events.<kind>` and its
CloudEvents type `io.mlmesh.<kind>.v1`. Services never publish these directly: they add them
to their outbox (services.common.outbox) in the same transaction as the change.
"""

from __future__ import annotations

import json
import os
import time
import uuid
from datetime import UTC, datetime
from typing import Any, ClassVar

from pydantic import BaseModel, ConfigDict, Field

STREAM = "MLMESH_EVENTS"
SUBJECT_PREFIX = "mlmesh.events."
SUBJECTS = f"{SUBJECT_PREFIX}>"
TYPE_PREFIX = "io.mlmesh."
TYPE_SUFFIX = ".v1"
CONTENT_TYPE = "application/cloudevents+json"
DUPLICATE_WINDOW_SECONDS = 120
MAX_EVENT_BYTES = 64 * 1024

KINDS = (
    "run.completed",
    "dataset.registered",
    "model.registered",
    "model.updated",
    "model.alias.set",
    "model.alias.removed",
    "model.archived",
    "model.deleted",
    "environment.registered",
    "model.converted",
    "image.built",
    "image.failed",
    "profile.completed",
    "profile.failed",
    "deployment.created",
    "deployment.ready",
    "deployment.updated",
    "deployment.unhealthy",
    "deployment.failed",
    "deployment.deleted",
    "batch.completed",
    "batch.failed",
    "drift.checked",
    "drift.detected",
    "retrain.started",
    "retrain.completed",
    "model.promoted",
    "model.rolled_back",
    "webhook.disabled",
)


def subject_of(kind: str) -> str:
    return f"{SUBJECT_PREFIX}{kind}"


def type_of(kind: str) -> str:
    return f"{TYPE_PREFIX}{kind}{TYPE_SUFFIX}"


def kind_of_type(event_type: str) -> str:
    """`io.mlmesh.model.registered.v1` -> `model.registered`."""
    return event_type.removeprefix(TYPE_PREFIX).removesuffix(TYPE_SUFFIX)


def uuid7() -> str:
    """A time-ordered UUIDv7 (RFC 9562): 48 bits of Unix milliseconds, then randomness."""
    milliseconds = time.time_ns() // 1_000_000
    value = (milliseconds & ((1 << 48) - 1)) << 80
    value |= int.from_bytes(os.urandom(10), "big") & ((1 << 80) - 1)
    value = (value & ~(0xF << 76)) | (0x7 << 76)  # version 7
    value = (value & ~(0x3 << 62)) | (0x2 << 62)  # RFC 4122 variant
    return str(uuid.UUID(int=value))


class EventPayload(BaseModel):
    """Base of every payload; subclasses set `kind`."""

    model_config = ConfigDict(extra="forbid")
    kind: ClassVar[str]


class FileRecord(BaseModel):
    path: str
    size: int
    sha256: str


class ModelRegistered(EventPayload):
    kind: ClassVar[str] = "model.registered"
    name: str
    version: int
    framework: str
    tags: dict[str, str] = Field(default_factory=dict)
    files: list[FileRecord] = Field(default_factory=list)
    """The first files, as many as fit in the event; `file_count` says how many there are."""
    file_count: int = 0
    run_id: str = ""
    created_by: str = ""


class ModelUpdated(EventPayload):
    kind: ClassVar[str] = "model.updated"
    name: str
    version: int
    tags: dict[str, str]
    description: str
    changed: list[str]


class ModelAliasSet(EventPayload):
    kind: ClassVar[str] = "model.alias.set"
    name: str
    alias: str
    version: int
    previous_version: int | None = None
    reason: str = ""


class ModelAliasRemoved(EventPayload):
    kind: ClassVar[str] = "model.alias.removed"
    name: str
    alias: str
    previous_version: int
    reason: str = ""


class ModelArchived(EventPayload):
    kind: ClassVar[str] = "model.archived"
    name: str
    version: int
    reason: str = ""


class ModelDeleted(EventPayload):
    kind: ClassVar[str] = "model.deleted"
    name: str
    version: int
    reason: str = ""


class DatasetRegistered(EventPayload):
    kind: ClassVar[str] = "dataset.registered"
    name: str
    version: int
    format: str
    row_count: int
    fingerprint: str


class RunCompleted(EventPayload):
    kind: ClassVar[str] = "run.completed"
    run_id: str
    experiment: str
    status: str
    metrics: dict[str, float] = Field(default_factory=dict)
    """The first metrics, as many as fit in the event; `metric_count` says how many there are."""
    metric_count: int = 0


class EnvironmentRegistered(EventPayload):
    kind: ClassVar[str] = "environment.registered"
    name: str
    version: int
    python_version: str
    base_image: str
    requirements: list[str]
    packages: int
    """How many packages the lock holds."""
    spec_digest: str


class ModelConverted(EventPayload):
    kind: ClassVar[str] = "model.converted"
    conversion_id: str
    name: str
    source_version: int
    source_framework: str
    estimator: str
    version: int
    """The registered ONNX version."""
    rows_checked: int
    labels_equal: bool
    max_abs_diff: float
    speedup_one_row: float
    speedup_1000_rows: float
    optimized: bool
    quantized: bool


class ImageEvent(EventPayload):
    """What image.* events say: the models and environment the image is (or was to be) built from."""

    models: list[str]
    """"name:version" of each model served."""
    environment: str
    base_image: str


class ImageBuilt(ImageEvent):
    kind: ClassVar[str] = "image.built"
    tag: str
    image_id: str
    size_bytes: int
    key: str
    reused: bool
    pushed: str = ""


class ImageFailed(ImageEvent):
    kind: ClassVar[str] = "image.failed"
    reason: str


class DeploymentEvent(EventPayload):
    """What every deployment.* event says: which deployment, serving what, where."""

    endpoint: str
    deployment: str
    model_name: str
    model_version: int
    target: str


class DeploymentCreated(DeploymentEvent):
    kind: ClassVar[str] = "deployment.created"
    model_ref: str
    cpus: float
    memory_mb: int
    replicas: int
    traffic: dict[str, int]


class DeploymentReady(DeploymentEvent):
    kind: ClassVar[str] = "deployment.ready"
    replicas: int
    grpc_address: str
    http_address: str


class DeploymentUpdated(DeploymentEvent):
    kind: ClassVar[str] = "deployment.updated"
    changed: list[str]
    traffic: dict[str, int]
    mirror: dict[str, int]


class DeploymentUnhealthy(DeploymentEvent):
    kind: ClassVar[str] = "deployment.unhealthy"
    replica: int
    reason: str
    restarts: int


class DeploymentFailed(DeploymentEvent):
    kind: ClassVar[str] = "deployment.failed"
    reason: str


class DeploymentDeleted(DeploymentEvent):
    kind: ClassVar[str] = "deployment.deleted"


class BatchEvent(EventPayload):
    """What every batch.* event says: the job, what scored, where the output is."""

    job_id: str
    model_name: str
    model_version: int
    endpoint: str
    output_dir: str
    parts: int
    rows: int
    seconds: float


class BatchCompleted(BatchEvent):
    kind: ClassVar[str] = "batch.completed"


class BatchFailed(BatchEvent):
    kind: ClassVar[str] = "batch.failed"
    reason: str


class ProfileEvent(EventPayload):
    """What every profile.* event says: the profile, the model version, where it ran."""

    profile_id: str
    model_name: str
    model_version: int
    target: str
    slo_p99_ms: float
    seconds: float


class ProfileCompleted(ProfileEvent):
    kind: ClassVar[str] = "profile.completed"
    met: bool
    """Whether some size met the SLO."""
    recommendation: dict[str, Any]
    """cpus, memory_mb, replicas, threads, max_batch_rows, explanation."""


class ProfileFailed(ProfileEvent):
    kind: ClassVar[str] = "profile.failed"
    reason: str
    """Starts with `crash:`, `timeout:` or `errors:`."""


class WebhookDisabled(EventPayload):
    """A webhook endpoint stopped receiving: it answered 410 Gone, or failed past the last retry."""

    kind: ClassVar[str] = "webhook.disabled"
    webhook_id: str
    url: str
    """Without its query string, which may hold a token."""
    reason: str
    event_id: str = ""
    """The event whose delivery disabled it."""


class RetrainEvent(EventPayload):
    """What every retrain.* event says: the run, its policy and model, what started it."""

    run_id: str
    policy: str
    model: str
    trigger: str
    """manual, drift:<monitor>:<check id>, dataset:<name>:<version> or schedule."""


class RetrainStarted(RetrainEvent):
    kind: ClassVar[str] = "retrain.started"


class RetrainCompleted(RetrainEvent):
    kind: ClassVar[str] = "retrain.completed"
    status: str
    """completed (a version was produced and judged) or failed."""
    message: str
    """The decision in words, or why the run failed."""
    produced_version: int = 0
    champion_version: int = 0
    metric: str = ""
    challenger_score: float | None = None
    champion_score: float | None = None
    promoted: bool = False


class ModelPromoted(EventPayload):
    """A retrain run's challenger became the champion: the alias moved, and why."""

    kind: ClassVar[str] = "model.promoted"
    name: str
    version: int
    alias: str
    previous_version: int = 0
    reason: str
    run_id: str
    metric: str = ""
    challenger_score: float | None = None
    champion_score: float | None = None


class ModelRolledBack(EventPayload):
    """A retrain run's challenger failed its staged rollout: traffic returned to the serving
    deployment, the challenger's deployment was removed, the champion alias did not move."""

    kind: ClassVar[str] = "model.rolled_back"
    name: str
    version: int
    endpoint: str
    reason: str
    run_id: str
    figures: dict[str, float] = Field(default_factory=dict)
    """Requests, error rates and p99 latencies of both deployments during the phases."""


class DriftEvent(EventPayload):
    """What drift.* events say; the counterparts of Azure's DatasetDriftDetected fields are noted."""

    monitor: str
    """The monitor's name (DataDriftName)."""
    check_id: str
    """This check (RunId)."""
    endpoint: str
    """The endpoint checked; empty for a monitor of a model."""
    model: str = ""
    """A monitor of a model: the model, whose every endpoint's captures were checked."""
    baseline: str
    """The baseline dataset `name:version`, or `captures:<endpoint>:<start>:<end>` (BaseDatasetId)."""
    target: str
    """What was checked: `endpoints/<endpoint>/captures` or `models/<model>/captures` (TargetDatasetId)."""
    window_start: float
    """Seconds since the epoch (StartTime)."""
    window_end: float
    """(EndTime)"""
    rows: int
    drifted: bool
    """Drift in this window alone."""
    drift_detected: bool
    """Drift that held over the monitor's consecutive windows."""
    drift_coefficient: float
    """0 to 1 (DriftCoefficient)."""
    drifted_features: list[str]
    features: dict[str, dict[str, Any]]
    """Per feature: drifted, its scores, missing rates, unseen categories."""


class DriftChecked(DriftEvent):
    kind: ClassVar[str] = "drift.checked"


class DriftDetected(DriftEvent):
    kind: ClassVar[str] = "drift.detected"


class CloudEvent(BaseModel):
    """A CloudEvents 1.0 envelope in structured JSON mode."""

    model_config = ConfigDict(extra="allow")
    specversion: str = "1.0"
    id: str
    source: str
    type: str
    subject: str | None = None
    time: str
    datacontenttype: str = "application/json"
    data: dict[str, Any]

    @property
    def kind(self) -> str:
        return kind_of_type(self.type)

    def to_json(self) -> bytes:
        return json.dumps(self.model_dump(exclude_none=True), separators=(",", ":")).encode()

    @classmethod
    def from_json(cls, payload: bytes) -> CloudEvent:
        return cls.model_validate_json(payload)


def make_event(service: str, payload: EventPayload, subject: str) -> CloudEvent:
    """Wrap a payload in its envelope with a fresh UUIDv7 id and the current time."""
    return CloudEvent(
        id=uuid7(),
        source=f"/mlmesh/{service}",
        type=type_of(payload.kind),
        subject=subject,
        time=datetime.now(UTC).isoformat().replace("+00:00", "Z"),
        data=payload.model_dump(mode="json"),
    )

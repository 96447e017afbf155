"""Settings of the runtime, the inference server of a deployment (environment prefix MLMESH_RUNTIME_)."""

from __future__ import annotations

from pathlib import Path

from pydantic import Field
from pydantic_settings import SettingsConfigDict

from services.common.settings import ServiceSettings


class RuntimeSettings(ServiceSettings):
    model_config = SettingsConfigDict(env_prefix="MLMESH_RUNTIME_", extra="ignore", populate_by_name=True)

    service_name: str = "runtime"
    """Name used in telemetry and file names."""

    port: int = 8001
    """gRPC port of the Open Inference Protocol (8001, as Triton's)."""

    http_port: int = 8000
    """HTTP port of the Open Inference Protocol's REST API, `/v2/...` (8000, as Triton's)."""

    models: str = ""
    """The model versions to serve, comma-separated registry refs: `name:version` or `name@alias`."""

    model_dir: Path | None = None
    """Serve the model versions in this folder instead of downloading them from the registry: one folder
    per version, `<name>/<version>/` holding `model.onnx` and `model.json` (name, version, sha256, signature)."""

    served_name: str = Field(default="", pattern=r"^([A-Za-z0-9][A-Za-z0-9._-]{0,99})?$")
    """The name the one served model answers to instead of its registry name (a deployment serves
    its model under its endpoint's name); needs exactly one model."""

    registry_address: str = "127.0.0.1:50051"
    """host:port of the registry the models are downloaded from."""

    cache_dir: Path | None = None
    """Where downloaded model files are kept by sha256; default <home>/runtime-cache."""

    intra_op_threads: int = Field(default=1, ge=0)
    """onnxruntime threads inside one operator (0: onnxruntime decides)."""

    inter_op_threads: int = Field(default=1, ge=0)
    """onnxruntime threads across operators (0: onnxruntime decides)."""

    max_elements: int = Field(default=16 * 1024 * 1024, ge=1)
    """Most elements one input tensor may hold; more answers RESOURCE_EXHAUSTED."""

    max_batch_rows: int = Field(default=0, ge=0)
    """Adaptive batching: requests arriving together are run as one onnxruntime call of at most
    this many rows (0: off). Only models whose inputs all have a variable first dimension."""

    max_batch_wait_ms: float = Field(default=2.0, ge=0)
    """Adaptive batching: how long the first request of a batch waits for others."""

    capture: bool = False
    """Send every request's inputs and outputs to stream MLMESH_CAPTURE (needs MLMESH_NATS_URL)."""

    endpoint: str = Field(default="default", pattern=r"^[A-Za-z0-9_-]{1,100}$")
    """The endpoint this runtime serves; names its capture subject."""

    deployment: str = Field(default="default", pattern=r"^[A-Za-z0-9_-]{1,100}$")
    """The deployment this runtime is; names its capture subject."""

    capture_queue_rows: int = Field(default=10_000, ge=1)
    """Captured requests waiting to be sent at most; more are dropped (and counted), never waited for."""

    capture_queue_bytes: int = Field(default=256 * 1024**2, ge=1024 * 1024)
    """Tensor bytes of the captured requests waiting to be sent at most; more are dropped (and counted)."""

    capture_batch_rows: int = Field(default=256, ge=1)
    """Captured requests sent in one message at most."""

    capture_flush_seconds: float = Field(default=0.2, gt=0)
    """Longest a captured request waits for its batch to fill."""

    capture_max_age_seconds: float = Field(default=7 * 24 * 3600, gt=0)
    """How long MLMESH_CAPTURE keeps messages (set when the runtime creates the stream)."""

    capture_max_bytes: int = Field(default=1024**3, ge=1024 * 1024)
    """Largest size of MLMESH_CAPTURE (set when the runtime creates the stream); the oldest go first."""

    def model_refs(self) -> list[str]:
        return [ref.strip() for ref in self.models.split(",") if ref.strip()]

    def resolved_cache_dir(self) -> Path:
        return self.cache_dir or self.home / "runtime-cache"

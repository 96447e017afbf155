"""Settings of the notifier (environment prefix MLMESH_NOTIFIER_)."""

from __future__ import annotations

from typing import Annotated

from pydantic import Field, field_validator
from pydantic_settings import NoDecode, SettingsConfigDict

from services.common.settings import ServiceSettings

# Standard Webhooks' schedule: at once, 5 s, 5 min, 30 min, 2 h, 5 h, 10 h, 14 h, 20 h, 24 h.
SPEC_SCHEDULE = (0.0, 5.0, 300.0, 1800.0, 7200.0, 18000.0, 36000.0, 50400.0, 72000.0, 86400.0)


class NotifierSettings(ServiceSettings):
    model_config = SettingsConfigDict(env_prefix="MLMESH_NOTIFIER_", extra="ignore", populate_by_name=True)

    service_name: str = "notifier"
    """Name used in event sources, file names and telemetry."""

    port: int = 50057
    """gRPC port of the notifier."""

    retry_schedule: Annotated[tuple[float, ...], NoDecode] = SPEC_SCHEDULE
    """Seconds before each attempt after the one before, comma-separated (the first is the first
    attempt's delay, usually 0); each gets up to 10% jitter. Past the last, the endpoint is disabled."""

    allowed_hosts: Annotated[tuple[str, ...], NoDecode] = ()
    """Hosts, addresses or networks (CIDR) that may be private, loopback or link-local,
    comma-separated; every other such destination is refused."""

    timeout_seconds: float = Field(default=15, gt=0, le=60)
    """How long one attempt waits for the answer."""

    concurrency_per_endpoint: int = Field(default=4, ge=1, le=64)
    """Deliveries in flight to one endpoint at most; each endpoint has its own, so a slow or dead
    receiver never delays another."""

    rotation_seconds: float = Field(default=24 * 3600, ge=0)
    """How long a rotated-out secret keeps signing beside the new one."""

    event_retention_seconds: float = Field(default=30 * 24 * 3600, gt=0)
    """How long events are kept for redelivery and replay (and deliveries with them)."""

    scan_seconds: float = Field(default=1.0, gt=0)
    """How often deliveries due for a retry are looked for."""

    max_webhooks: int = Field(default=1000, ge=1)
    """Most webhook endpoints."""

    @field_validator("retry_schedule", mode="before")
    @classmethod
    def _schedule(cls, value: object) -> object:
        if isinstance(value, str):
            try:
                value = tuple(float(part) for part in value.split(",") if part.strip())
            except ValueError:
                raise ValueError("MLMESH_NOTIFIER_RETRY_SCHEDULE: seconds separated by commas, e.g. 0,5,300") from None
        if not value or any(not 0 <= part <= 7 * 86400 for part in value):  # type: ignore[union-attr]
            raise ValueError("the retry schedule needs at least one delay, each 0 to 604800 seconds")
        return value

    @field_validator("allowed_hosts", mode="before")
    @classmethod
    def _hosts(cls, value: object) -> object:
        if isinstance(value, str):
            return tuple(part.strip().lower() for part in value.split(",") if part.strip())
        return value

"""The one error hierarchy of mlmesh.

Domain code raises these; the gRPC error interceptor (services.common.server) maps each to its
status code with `google.rpc.Status` details, and HTTP APIs map them with `http_status`. Codes
are named as strings so that domain code never imports grpc.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Any


class MlmeshError(Exception):
    """Base of every error a caller should see; `code` names the gRPC status."""

    code = "INTERNAL"
    reason = "INTERNAL"

    def __init__(
        self,
        message: str,
        *,
        reason: str | None = None,
        field: str | None = None,
        metadata: dict[str, str] | None = None,
    ) -> None:
        super().__init__(message)
        self.message = message
        if reason:
            self.reason = reason
        self.field = field
        self.metadata = metadata or {}


class InvalidArgument(MlmeshError):
    """The request itself is wrong; `field` names the offending field."""

    code = "INVALID_ARGUMENT"
    reason = "INVALID_ARGUMENT"


class NotFound(MlmeshError):
    code = "NOT_FOUND"
    reason = "NOT_FOUND"


class AlreadyExists(MlmeshError):
    code = "ALREADY_EXISTS"
    reason = "ALREADY_EXISTS"


class FailedPrecondition(MlmeshError):
    """The resource's state forbids the call (e.g. deleting a version in use)."""

    code = "FAILED_PRECONDITION"
    reason = "FAILED_PRECONDITION"


class Aborted(MlmeshError):
    """A concurrent change won the race; retrying may succeed."""

    code = "ABORTED"
    reason = "ABORTED"


class ResourceExhausted(MlmeshError):
    """A size or count limit was exceeded."""

    code = "RESOURCE_EXHAUSTED"
    reason = "RESOURCE_EXHAUSTED"


class DataLoss(MlmeshError):
    """Stored content no longer matches its checksum."""

    code = "DATA_LOSS"
    reason = "DATA_LOSS"


class Unavailable(MlmeshError):
    """A dependency (database, NATS, another service) cannot be reached right now."""

    code = "UNAVAILABLE"
    reason = "UNAVAILABLE"


def error_for(code: str, message: str, *, field: str | None = None) -> MlmeshError:
    """The error of this hierarchy whose gRPC status is `code` (another service's answer, passed
    on); INTERNAL for codes that have no class here."""
    for kind in (InvalidArgument, NotFound, AlreadyExists, FailedPrecondition, Aborted, ResourceExhausted):
        if kind.code == code:
            return kind(message, field=field)
    if code in (DataLoss.code, Unavailable.code):
        return (DataLoss if code == DataLoss.code else Unavailable)(message, field=field)
    return MlmeshError(message, field=field)


# For the HTTP APIs (the runtime's /v2): the status each code answers with.
HTTP_STATUS = {
    "INVALID_ARGUMENT": 400,
    "FAILED_PRECONDITION": 400,
    "NOT_FOUND": 404,
    "ALREADY_EXISTS": 409,
    "ABORTED": 409,
    "RESOURCE_EXHAUSTED": 413,
    "UNAVAILABLE": 503,
}


def http_status(error: MlmeshError) -> int:
    """The HTTP status of `error` (500 for what the caller cannot fix)."""
    return HTTP_STATUS.get(error.code, 500)


def http_error_middleware(too_large: str = "") -> Any:
    """aiohttp middleware that answers errors as the Open Inference Protocol's REST API says: a 4xx
    or 5xx status with `{"error": "..."}`; `too_large` replaces the message of a 413."""
    from aiohttp import web  # only the HTTP servers need aiohttp

    @web.middleware
    async def middleware(request: web.Request, handler: Callable[[web.Request], Awaitable[Any]]) -> Any:
        try:
            return await handler(request)
        except MlmeshError as error:
            return web.json_response({"error": error.message}, status=http_status(error))
        except web.HTTPException as error:
            if error.status < 400:
                raise
            message = too_large if too_large and isinstance(error, web.HTTPRequestEntityTooLarge) else error.reason
            return web.json_response({"error": message}, status=error.status)

    return middleware

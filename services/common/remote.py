"""Calls from one service to another through its client (services.client), with the callee's
failures turned into mlmesh errors that name it: the caller's own callers then see NOT_FOUND for
an unknown model, UNAVAILABLE when the other service is away."""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any

from services.client import MeshError
from services.common.errors import Unavailable, error_for


class RemoteCalls:
    """Every method of `client`, with MeshError mapped to mlmesh errors prefixed by `service`."""

    def __init__(self, client: Any, service: str) -> None:
        self.client = client
        self.service = service

    def __getattr__(self, name: str) -> Callable[..., Any]:
        method = getattr(self.client, name)

        @functools.wraps(method)
        def call(*args: Any, **kwargs: Any) -> Any:
            try:
                return method(*args, **kwargs)
            except MeshError as error:
                if error.unreachable:
                    raise Unavailable(
                        f"the {self.service} at {self.client.address} cannot be reached; is it running?"
                    ) from None
                raise error_for(error.code, f"{self.service}: {error.message}", field=error.field or None) from None

        return call

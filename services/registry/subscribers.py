"""Events the registry reacts to: none yet. It is the source of model lifecycle events;
usage of versions by deployments arrives through AcquireUsage/ReleaseUsage calls."""

from __future__ import annotations

from faststream.nats import NatsBroker

from services.common.db import Database


def register(broker: NatsBroker, database: Database) -> None:
    """Attach the registry's event handlers to `broker` (there are none yet)."""

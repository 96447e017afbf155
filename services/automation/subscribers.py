"""Events the automation service reacts to: `drift.detected` (policies triggered by that
monitor) and `dataset.registered` (policies triggered by a new version of that dataset). Each
starts a run of every such policy, in the background."""

from __future__ import annotations

from collections.abc import Callable

from faststream.nats import NatsBroker

from services.automation.domain import Automation
from services.common.bus import subscribe_events
from services.common.db import Database
from services.common.events import CloudEvent, subject_of

DURABLE = "automation"


def subscribe(broker: NatsBroker, database: Database, automation: Automation, launch: Callable[[str], None]) -> None:
    async def trigger(event: CloudEvent) -> None:
        for run in await database.run(automation.runs_for_event, event):
            launch(run.id)

    for kind in ("drift.detected", "dataset.registered"):
        subscribe_events(
            broker, database, durable=f"{DURABLE}-{kind.replace('.', '-')}", handler=trigger, subject=subject_of(kind)
        )

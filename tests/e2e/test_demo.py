"""`mlmesh demo`, the README's main job, as a user runs it: a real mesh on the embedded defaults
(SQLite, embedded NATS, local target), the whole loop, every event verified at the demo's own
webhook receiver; then `mlmesh down` stops what it left running."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from services.common import natsserver
from services.launcher import SERVICES, read_state
from tests.conftest import clean_environment

pytestmark = pytest.mark.timeout(900)
ROOT = Path(__file__).resolve().parents[2]
MLMESH = [sys.executable, "-m", "services.cli"]


def test_the_demo_walks_the_whole_loop_and_leaves_the_mesh_running(tmp_path: Path) -> None:
    home = tmp_path / "mesh"
    environment = {
        **clean_environment(),
        "MLMESH_HOME": str(home),
        # Free ports, so that the test never meets a mesh running on the defaults here.
        **{f"MLMESH_{name.upper()}_PORT": str(natsserver.free_port()) for name in SERVICES},
    }
    try:
        done = subprocess.run(
            [*MLMESH, "demo", "--json"], cwd=ROOT, env=environment, capture_output=True, text=True, timeout=840
        )
        assert done.returncode == 0, done.stderr[-5000:] + "\n" + log_tails(home)
        summary = json.loads(done.stdout)
        state = read_state(home)
        assert state is not None and set(state.services) == set(SERVICES)  # still running, for exploring
        assert summary["converted"]["labels_equal"] is True and summary["converted"]["speedup_one_row"] > 1
        assert summary["profile"]["met"] is True
        assert summary["drift"]["detected"] is True
        retrain = summary["retrain"]
        assert retrain["promoted"] is True and retrain["challenger_accuracy"] > retrain["champion_accuracy"]
        assert summary["promoted_version"] == retrain["produced_version"] > summary["converted"]["version"]
        assert summary["rollout"]["after"] == {str(summary["promoted_version"]): 149}
        events = summary["events"]
        for kind in (
            "dataset.registered",
            "run.completed",
            "model.registered",
            "model.converted",
            "model.alias.set",
            "profile.completed",
            "deployment.created",
            "deployment.ready",
            "drift.detected",
            "retrain.started",
            "retrain.completed",
            "model.promoted",
            "deployment.deleted",
        ):
            assert events.get(kind, 0) >= 1, (kind, events)
        assert summary["webhook_deliveries_rejected"] == 0
        assert summary["webhook_deliveries_verified"] >= sum(events.values())
        print(f"the demo took {summary['seconds']} s")
    finally:
        stopped = subprocess.run([*MLMESH, "down"], cwd=ROOT, env=environment, capture_output=True, text=True)
        assert stopped.returncode == 0, stopped.stderr
    assert read_state(home) is None


def log_tails(home: Path, lines: int = 40) -> str:
    tails = []
    for log in sorted((home / "logs").glob("*.log")) if (home / "logs").exists() else []:
        text = log.read_text(errors="replace").splitlines()[-lines:]
        tails.append(f"--- {log.name}\n" + "\n".join(text))
    return "\n".join(tails)

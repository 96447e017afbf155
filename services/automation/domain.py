"""Retrain policies and runs: what starts a run, what a run does, and when its challenger
replaces the champion."""

from __future__ import annotations

import contextlib
import json
import logging
import math
import re
import shutil
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

from sqlmodel import Session, col, select

from services.automation import training
from services.automation.models import PolicyRow, RunRow
from services.common import events, paging
from services.common.db import Database
from services.common.errors import AlreadyExists, InvalidArgument, MlmeshError, NotFound
from services.common.names import ENDPOINT_NAME, REGISTERED_NAME
from services.common.outbox import Outbox

SERVICE = "automation"
CHAMPION = "champion"
POLICY_NAME = re.compile(r"[a-z][a-z0-9-]{0,62}")
TRIGGERS = ("manual", "drift", "dataset", "schedule")
REGISTERED_REF = re.compile(rf"{REGISTERED_NAME.pattern}(:[0-9]{{1,9}})?")
"""A dataset or an environment: `name` (its newest version when a run starts) or `name:version`."""
RUNNING, COMPLETED, FAILED = "running", "completed", "failed"
MAX_ARGUMENTS = 100
LATENCY_TOLERANCE_SECONDS = 0.010
"""A challenger's p99 this close to the serving deployment's is never judged slower."""
log = logging.getLogger(__name__)


class Registry(Protocol):
    """What runs need of the registry (an adapter over services.client.RegistryClient)."""

    def dataset_file(self, ref: str, directory: Path) -> tuple[str, Path]:
        """(`name:version`, the downloaded file) of a dataset ref (`name` means its newest version)."""
        ...

    def champion(self, model: str) -> int:
        """The version `model@champion` names, 0 when there is none."""
        ...

    def model_file(self, model: str, version: int) -> Path:
        """The version's ONNX file, downloaded (and kept) locally."""
        ...

    def register(self, model: str, output_dir: Path, lineage: dict[str, Any], description: str) -> int: ...

    def record_run(self, run_id: str, experiment: str, metrics: dict[str, float], lineage: dict[str, Any]) -> None: ...

    def promote(self, model: str, version: int, reason: str) -> int:
        """Move `model@champion` to `version`; the version it named before (0: none)."""
        ...


class Environments(Protocol):
    """What runs need of the builder (an adapter over services.client.BuilderClient)."""

    def locked(self, ref: str) -> training.LockedEnvironment:
        """The registered environment `ref` (`name` means its newest version) with its lock."""
        ...


@dataclass(frozen=True)
class Figures:
    """What one deployment answered during a phase."""

    requests: int
    errors: int
    p99_seconds: float | None

    @property
    def error_rate(self) -> float:
        return self.errors / self.requests if self.requests else 0.0


class Endpoints(Protocol):
    """What a rollout needs of the deployer (an adapter over services.client.DeployerClient)."""

    def serving(self, endpoint: str) -> tuple[str, str, int]:
        """(deployment, target, replicas) of the deployment taking the most traffic."""
        ...

    def add(self, endpoint: str, deployment: str, model_ref: str, target: str, replicas: int) -> None:
        """Add a deployment taking no traffic and wait until it is ready."""
        ...

    def route(self, endpoint: str, traffic: dict[str, int], mirror: dict[str, int]) -> None: ...

    def remove(self, endpoint: str, deployment: str) -> None: ...

    def counters(self, endpoint: str, deployment: str) -> dict[str, Any]:
        """The deployment's replicas' request and latency counters so far (summed)."""
        ...

    def figures(self, before: dict[str, Any], after: dict[str, Any]) -> Figures:
        """What was answered between two readings of `counters`."""
        ...


@dataclass(frozen=True)
class PolicySpec:
    name: str
    model: str
    trigger: dict[str, Any]
    training: dict[str, Any]
    evaluation: dict[str, Any]
    rollout: dict[str, Any] = field(default_factory=dict)


@dataclass
class PolicyView:
    name: str
    model: str
    trigger: dict[str, Any]
    training: dict[str, Any]
    evaluation: dict[str, Any]
    rollout: dict[str, Any]
    created_at: float
    last_run_at: float | None


@dataclass
class RunView:
    id: str
    policy: str
    model: str
    trigger: str
    status: str
    message: str
    produced_version: int
    champion_version: int
    metric: str
    challenger_score: float | None
    champion_score: float | None
    promoted: bool
    training_metrics: dict[str, float] = field(default_factory=dict)
    log_tail: list[str] = field(default_factory=list)
    rollout: str = "none"
    rollout_figures: dict[str, float] = field(default_factory=dict)
    started_at: float = 0.0
    finished_at: float | None = None


class RunFailed(Exception):
    """Ends a run as failed, with a message for a person."""


# ---------------------------------------------------------------- checks


def check_policy(spec: PolicySpec, min_schedule_seconds: float) -> PolicySpec:
    """The spec checked, with defaults filled in; InvalidArgument names the field."""
    if not POLICY_NAME.fullmatch(spec.name):
        raise InvalidArgument(
            f"policy name {spec.name[:100]!r}: 1-63 lowercase letters, digits and '-', starting with a letter",
            field="name",
        )
    if not REGISTERED_NAME.fullmatch(spec.model):
        raise InvalidArgument(f"model {spec.model[:100]!r} is not a model name", field="model")
    trigger = {"kind": "manual", "monitor": "", "dataset": "", "schedule_seconds": 0.0, **spec.trigger}
    kind = trigger["kind"] or "manual"
    if kind not in TRIGGERS:
        raise InvalidArgument(f"trigger.kind must be one of {', '.join(TRIGGERS)}, not {kind[:40]!r}", field="trigger")
    if kind == "drift" and not POLICY_NAME.fullmatch(trigger["monitor"]):
        raise InvalidArgument("a drift trigger names its monitor (trigger.monitor)", field="trigger.monitor")
    if kind == "dataset" and not REGISTERED_NAME.fullmatch(trigger["dataset"]):
        raise InvalidArgument("a dataset trigger names its dataset (trigger.dataset)", field="trigger.dataset")
    seconds = float(trigger["schedule_seconds"] or 0)
    if kind == "schedule" and not (math.isfinite(seconds) and min_schedule_seconds <= seconds <= 365 * 86400):
        raise InvalidArgument(
            f"trigger.schedule_seconds must be {min_schedule_seconds:g} to 31536000 "
            "(MLMESH_AUTOMATION_MIN_SCHEDULE_SECONDS)",
            field="trigger.schedule_seconds",
        )
    trigger.update(kind=kind, schedule_seconds=seconds)
    train = {
        "command": [],
        "dataset": "",
        "working_dir": "",
        "timeout_seconds": 3600.0,
        "environment": "",
        **spec.training,
    }
    command = [str(argument) for argument in train["command"]]
    if not command or not command[0]:
        raise InvalidArgument("training.command is required: the program and its arguments", field="training.command")
    if len(command) > MAX_ARGUMENTS or any(len(argument) > 4096 or "\x00" in argument for argument in command):
        raise InvalidArgument(
            f"training.command: at most {MAX_ARGUMENTS} arguments of at most 4096 characters, no NUL",
            field="training.command",
        )
    if train["dataset"] and not REGISTERED_REF.fullmatch(train["dataset"]):
        raise InvalidArgument("training.dataset must be a dataset `name` or `name:version`", field="training.dataset")
    if train["environment"] and not REGISTERED_REF.fullmatch(train["environment"]):
        raise InvalidArgument(
            "training.environment must be a registered environment `name` or `name:version` (`mlmesh env list`)",
            field="training.environment",
        )
    if train["working_dir"] and not Path(train["working_dir"]).is_dir():
        raise InvalidArgument(
            f"training.working_dir {train['working_dir'][:200]!r} is not a folder here", field="training.working_dir"
        )
    timeout = float(train["timeout_seconds"] or 3600)
    if not (math.isfinite(timeout) and 1 <= timeout <= 7 * 86400):
        raise InvalidArgument("training.timeout_seconds must be 1 to 604800", field="training.timeout_seconds")
    train.update(command=command, timeout_seconds=timeout)
    evaluation = {"holdout_dataset": "", "label_column": "", "metric": "accuracy", "min_delta": 0.0, **spec.evaluation}
    if not REGISTERED_REF.fullmatch(evaluation["holdout_dataset"] or ""):
        raise InvalidArgument(
            "evaluation.holdout_dataset is required: a dataset `name` or `name:version` both models are scored on",
            field="evaluation.holdout_dataset",
        )
    if not evaluation["label_column"] or len(evaluation["label_column"]) > 200:
        raise InvalidArgument(
            "evaluation.label_column names the column of true answers", field="evaluation.label_column"
        )
    metric = evaluation["metric"] or "accuracy"
    if metric not in training.METRICS:
        raise InvalidArgument(
            f"evaluation.metric must be one of {', '.join(training.METRICS)}, not {metric[:40]!r}",
            field="evaluation.metric",
        )
    delta = float(evaluation["min_delta"] or 0)
    if not (math.isfinite(delta) and -1e9 <= delta <= 1e9):
        raise InvalidArgument("evaluation.min_delta must be a finite number", field="evaluation.min_delta")
    evaluation.update(metric=metric, min_delta=delta)
    return PolicySpec(spec.name, spec.model, trigger, train, evaluation, check_rollout(spec.rollout))


def check_rollout(values: dict[str, Any]) -> dict[str, Any]:
    rollout = {
        "endpoint": "",
        "shadow_seconds": 0.0,
        "canary_percent": 10,
        "canary_seconds": 60.0,
        "max_error_rate": 0.01,
        "max_latency_ratio": 1.5,
        "min_requests": 20,
        **{key: value for key, value in values.items() if value},
    }
    if rollout["endpoint"] and not ENDPOINT_NAME.fullmatch(rollout["endpoint"]):
        raise InvalidArgument(
            f"rollout.endpoint {rollout['endpoint'][:100]!r} is not an endpoint name", field="rollout.endpoint"
        )
    limits = [
        ("shadow_seconds", 0, 86400),
        ("canary_percent", 1, 99),
        ("canary_seconds", 0.1, 86400),
        ("max_error_rate", 0, 1),
        ("max_latency_ratio", 1, 100),
        ("min_requests", 1, 1_000_000),
    ]
    for key, low, high in limits:
        value = float(rollout[key])
        if not (math.isfinite(value) and low <= value <= high):
            raise InvalidArgument(f"rollout.{key} must be {low:g} to {high:g}", field=f"rollout.{key}")
    return rollout


def decide(metric: str, challenger: float, champion: float | None, min_delta: float) -> tuple[bool, str]:
    """Whether the challenger replaces the champion, and why, in words."""
    if champion is None:
        return True, f"no champion yet: the first version that trained becomes it ({metric} {challenger:.4f})"
    higher_is_better = training.METRICS[metric]
    margin = challenger - champion if higher_is_better else champion - challenger
    direction = "higher" if higher_is_better else "lower"
    words = f"{metric} {challenger:.4f} against the champion's {champion:.4f}"
    if margin >= min_delta:
        return True, f"{words}: better by {margin:.4f} ({direction} is better), at least the required {min_delta:g}"
    verdict = "better" if margin > 0 else "no better"
    return False, f"{words}: {verdict} by {margin:.4f}, less than the required {min_delta:g}; the champion stays"


# ---------------------------------------------------------------- the service


class Automation:
    """Policies, and the runs they start."""

    def __init__(
        self,
        database: Database,
        outbox: Outbox,
        registry: Registry,
        work_dir: Path,
        *,
        min_schedule_seconds: float,
        log_lines: int,
        endpoints: Endpoints | None = None,
        environments: Environments | None = None,
        pip_arguments: list[str] | None = None,
    ) -> None:
        self.database = database
        self.outbox = outbox
        self.registry = registry
        self.endpoints = endpoints
        self.environments = environments
        self.pip_arguments = pip_arguments or []
        self.work_dir = work_dir
        self.min_schedule_seconds = min_schedule_seconds
        self.log_lines = log_lines

    # ------------------------------------------------------------ policies

    def create_policy(self, spec: PolicySpec) -> PolicyView:
        spec = check_policy(spec, self.min_schedule_seconds)
        with self.database.transaction() as session:
            if session.get(PolicyRow, spec.name) is not None:
                raise AlreadyExists(f"policy {spec.name} exists; delete it first or pick another name", field="name")
            row = PolicyRow(
                name=spec.name,
                model=spec.model,
                trigger=json.dumps(spec.trigger),
                training=json.dumps(spec.training),
                evaluation=json.dumps(spec.evaluation),
                rollout=json.dumps(spec.rollout),
                created_at=time.time(),
            )
            session.add(row)
            return policy_view(row)

    def get_policy(self, name: str) -> PolicyView:
        with self.database.session() as session:
            return policy_view(self._policy(session, name))

    def list_policies(self, page_size: int, page_token: str) -> tuple[list[PolicyView], str]:
        size, offset = paging.page_size(page_size), paging.decode(page_token)
        with self.database.session() as session:
            rows = session.exec(select(PolicyRow).order_by(col(PolicyRow.name)).offset(offset).limit(size + 1)).all()
            views = [policy_view(row) for row in rows[:size]]
        return views, paging.encode(offset + size) if len(rows) > size else ""

    def delete_policy(self, name: str) -> None:
        with self.database.transaction() as session:
            session.delete(self._policy(session, name))

    # ------------------------------------------------------------ starting runs

    def start_run(self, policy: str, trigger: str = "manual") -> RunView:
        """Record a new run of the policy (running) and emit retrain.started; `execute` does it."""
        now = time.time()
        with self.database.transaction() as session:
            row = self._policy(session, policy)
            run = RunRow(
                id=str(uuid.uuid4()), policy=row.name, model=row.model, trigger=trigger, status=RUNNING, started_at=now
            )
            row.last_run_at = now
            session.add(row)
            session.add(run)
            payload = events.RetrainStarted(run_id=run.id, policy=row.name, model=row.model, trigger=trigger)
            self.outbox.add(session, events.make_event(SERVICE, payload, f"policies/{row.name}/runs/{run.id}"))
            return run_view(run)

    def runs_for_event(self, event: events.CloudEvent) -> list[RunView]:
        """Start a run of every policy this event triggers: drift.detected of its monitor, or a
        new version of its dataset."""
        if event.kind == "drift.detected":
            monitor = str(event.data.get("monitor", ""))
            wanted, trigger = ("drift", monitor), f"drift:{monitor}:{event.data.get('check_id', '')}"
        elif event.kind == "dataset.registered":
            dataset = str(event.data.get("name", ""))
            wanted, trigger = ("dataset", dataset), f"dataset:{dataset}:{event.data.get('version', '')}"
        else:
            return []
        with self.database.session() as session:
            names = [
                row.name
                for row in session.exec(select(PolicyRow)).all()
                if (trigger_of(row)["kind"], trigger_of(row)["monitor" if wanted[0] == "drift" else "dataset"])
                == wanted
            ]
        return [self.start_run(name, trigger) for name in names]

    def due_policies(self, now: float) -> list[str]:
        """Scheduled policies whose next run is due."""
        with self.database.session() as session:
            due = []
            for row in session.exec(select(PolicyRow)).all():
                trigger = trigger_of(row)
                if (
                    trigger["kind"] == "schedule"
                    and (row.last_run_at or row.created_at) + trigger["schedule_seconds"] <= now
                ):
                    due.append(row.name)
            return due

    def interrupted(self) -> int:
        """Runs left running by a service that stopped: failed, and said so."""
        with self.database.session() as session:
            ids = [row.id for row in session.exec(select(RunRow).where(RunRow.status == RUNNING)).all()]
        for run_id in ids:
            self._finish(run_id, FAILED, "the automation service stopped while the run was going on")
        return len(ids)

    # ------------------------------------------------------------ a run

    def execute(self, run_id: str) -> RunView:
        """Train, register, evaluate, decide; the finished run."""
        with self.database.session() as session:
            run = session.get(RunRow, run_id)
            if run is None:
                raise NotFound(f"no run {run_id}")
            policy = policy_view(self._policy(session, run.policy))
        scratch = self.work_dir / "runs" / run_id
        try:
            return self._execute(run_id, policy, scratch)
        except RunFailed as failure:
            return self._finish(run_id, FAILED, str(failure))
        except MlmeshError as error:
            return self._finish(run_id, FAILED, error.message)
        except Exception as error:
            log.exception("run %s failed", run_id)
            return self._finish(run_id, FAILED, f"{type(error).__name__}: {error}")
        finally:
            shutil.rmtree(scratch, ignore_errors=True)

    def _execute(self, run_id: str, policy: PolicyView, scratch: Path) -> RunView:
        train, evaluation = policy.training, policy.evaluation
        output_dir = scratch / "output"
        output_dir.mkdir(parents=True)
        champion = self.registry.champion(policy.model)
        environment = {"MLMESH_OUTPUT_DIR": str(output_dir), "MLMESH_RUN_ID": run_id}
        environment["MLMESH_CHAMPION_VERSION"] = str(champion)
        datasets = []
        if train["dataset"]:
            resolved, path = self.registry.dataset_file(train["dataset"], scratch / "training-data")
            environment["MLMESH_TRAINING_DATA"] = str(path)
            datasets.append(resolved)
        working_dir = Path(train["working_dir"] or ".").resolve()
        python_environment, prepared, environment_ref = self._environment(train)
        trained = training.run_command(
            train["command"], working_dir, environment, train["timeout_seconds"], self.log_lines, python_environment
        )
        self._update(run_id, log_tail=json.dumps((prepared + trained.log_tail)[-self.log_lines :]))
        if trained.exit_code is None:
            raise RunFailed(f"the training command ran past its {train['timeout_seconds']:g} s and was stopped")
        if trained.exit_code != 0:
            last = trained.log_tail[-1] if trained.log_tail else "(it printed nothing)"
            raise RunFailed(f"the training command exited with code {trained.exit_code}: {last}")
        if not (output_dir / "model.onnx").is_file():
            raise RunFailed("the training command wrote no model.onnx into $MLMESH_OUTPUT_DIR")
        metrics = training.read_metrics(output_dir)
        git = training.git_lineage(working_dir)
        lineage = {
            "run_id": run_id,
            "experiment": policy.name,
            "datasets": datasets,
            "git": git,
            "parent": champion,
            "environment": environment_ref,
        }
        self.registry.record_run(run_id, policy.name, metrics, lineage)
        version = self.registry.register(
            policy.model, output_dir, lineage, f"trained by retrain policy {policy.name} (run {run_id})"
        )
        self._update(run_id, produced_version=version, champion_version=champion, training_metrics=json.dumps(metrics))
        _, holdout_path = self.registry.dataset_file(evaluation["holdout_dataset"], scratch / "holdout")
        metric = evaluation["metric"]
        try:
            features, labels, _ = training.holdout(holdout_path, evaluation["label_column"])
            challenger = training.score(self.registry.model_file(policy.model, version), features, labels, metric)
            incumbent = (
                training.score(self.registry.model_file(policy.model, champion), features, labels, metric)
                if champion
                else None
            )
        except training.EvaluationError as error:
            raise RunFailed(f"version {version} was registered but could not be evaluated: {error}") from None
        promoted, reason = decide(metric, challenger, incumbent, evaluation["min_delta"])
        self._update(run_id, metric=metric, challenger_score=challenger, champion_score=incumbent)
        if promoted and policy.rollout.get("endpoint"):
            rolled_back = self._roll_out(run_id, policy, version)
            if rolled_back:
                return self._finish(run_id, COMPLETED, f"{reason}; {rolled_back}", rolled_back=rolled_back)
        previous = 0
        if promoted:
            previous = self.registry.promote(policy.model, version, f"retrain run {run_id}: {reason}")
        return self._finish(run_id, COMPLETED, reason, promoted=promoted, previous=previous)

    def _environment(self, train: dict[str, Any]) -> tuple[Path | None, list[str], str]:
        """(the virtual environment, what making it printed, `name:version`) of the policy's
        registered environment; (None, [], "") when it trains in the service's own."""
        ref = train.get("environment", "")
        if not ref:
            return None, [], ""
        if self.environments is None:
            raise RunFailed("this automation service has no builder (MLMESH_AUTOMATION_BUILDER_ADDRESS)")
        locked = self.environments.locked(ref)
        try:
            folder, printed = training.prepare_environment(
                locked, self.work_dir / "environments", self.pip_arguments, train["timeout_seconds"], self.log_lines
            )
        except training.EnvironmentFailed as error:
            raise RunFailed(str(error)) from None
        said = f"environment {locked.ref}: " + (f"made at {folder}" if printed else f"reusing {folder}")
        return folder, [*printed, said], locked.ref

    def _roll_out(self, run_id: str, policy: PolicyView, version: int) -> str:
        """Shadow, canary, then all traffic for the challenger; the reason it was rolled back, or
        an empty string when it took over."""
        if self.endpoints is None:
            raise RunFailed("this automation service has no deployer (MLMESH_AUTOMATION_DEPLOYER_ADDRESS)")
        rollout, endpoints = policy.rollout, self.endpoints
        endpoint = rollout["endpoint"]
        stable, target, replicas = endpoints.serving(endpoint)
        challenger = f"v{version}"
        endpoints.add(endpoint, challenger, f"{policy.model}:{version}", target, replicas)
        figures: dict[str, float] = {}
        try:
            phases = [("shadow", rollout["shadow_seconds"])] if rollout["shadow_seconds"] else []
            phases.append(("canary", rollout["canary_seconds"]))
            for phase, seconds in phases:
                if phase == "shadow":
                    endpoints.route(endpoint, {stable: 100}, {challenger: 100})
                else:
                    percent = int(rollout["canary_percent"])
                    endpoints.route(endpoint, {stable: 100 - percent, challenger: percent}, {})
                problem = self._watch(endpoint, stable, challenger, rollout, seconds, phase, figures)
                if problem:
                    endpoints.route(endpoint, {stable: 100}, {})
                    endpoints.remove(endpoint, challenger)
                    self._update(run_id, rollout="rolled_back", rollout_figures=json.dumps(figures))
                    return f"rolled back from {endpoint}: {problem}"
            endpoints.route(endpoint, {challenger: 100}, {})
            endpoints.remove(endpoint, stable)
        except BaseException:
            with contextlib.suppress(Exception):  # leave the endpoint as it was
                endpoints.route(endpoint, {stable: 100}, {})
                endpoints.remove(endpoint, challenger)
            raise
        self._update(run_id, rollout="rolled_out", rollout_figures=json.dumps(figures))
        return ""

    def _watch(
        self,
        endpoint: str,
        stable: str,
        challenger: str,
        rollout: dict[str, Any],
        seconds: float,
        phase: str,
        figures: dict[str, float],
    ) -> str:
        """Watch a phase for `seconds` (longer, up to three times, until the challenger has answered
        `min_requests`); why the challenger must go back, or an empty string."""
        assert self.endpoints is not None
        before = {name: self.endpoints.counters(endpoint, name) for name in (stable, challenger)}
        started = time.monotonic()
        while True:
            time.sleep(min(1.0, seconds))
            after = {name: self.endpoints.counters(endpoint, name) for name in (stable, challenger)}
            seen = {name: self.endpoints.figures(before[name], after[name]) for name in (stable, challenger)}
            elapsed = time.monotonic() - started
            enough = seen[challenger].requests >= rollout["min_requests"]
            if elapsed >= seconds and (enough or elapsed >= 3 * seconds):
                break
        new, old = seen[challenger], seen[stable]
        figures[f"{phase}_requests"] = new.requests
        figures[f"{phase}_error_rate"] = round(new.error_rate, 4)
        figures[f"{phase}_serving_error_rate"] = round(old.error_rate, 4)
        if new.p99_seconds is not None:
            figures[f"{phase}_p99_ms"] = round(new.p99_seconds * 1000, 3)
        if old.p99_seconds is not None:
            figures[f"{phase}_serving_p99_ms"] = round(old.p99_seconds * 1000, 3)
        if new.requests < rollout["min_requests"]:
            return f"the {phase} saw {new.requests} requests, fewer than the {rollout['min_requests']} needed to judge"
        if new.error_rate > rollout["max_error_rate"]:
            return (
                f"during the {phase} the challenger answered {new.errors} of {new.requests} requests with errors "
                f"({new.error_rate:.1%}, more than {rollout['max_error_rate']:.1%})"
            )
        slower = (
            new.p99_seconds is not None
            and old.p99_seconds is not None
            and new.p99_seconds > old.p99_seconds * rollout["max_latency_ratio"]
            # Latency comes from histogram buckets (2.5 ms, 5 ms, 10 ms, ...): a few milliseconds
            # apart is a bucket apart, not a regression.
            and new.p99_seconds - old.p99_seconds > LATENCY_TOLERANCE_SECONDS
        )
        if slower:
            return (
                f"during the {phase} the challenger's p99 was {new.p99_seconds * 1000:.1f} ms, more than "
                f"{rollout['max_latency_ratio']:g}x the serving deployment's {old.p99_seconds * 1000:.1f} ms"
            )
        return ""

    def _update(self, run_id: str, **values: Any) -> None:
        with self.database.transaction() as session:
            row = session.get(RunRow, run_id)
            if row is not None:
                for key, value in values.items():
                    setattr(row, key, value)
                session.add(row)

    def _finish(
        self,
        run_id: str,
        status: str,
        message: str,
        *,
        promoted: bool = False,
        previous: int = 0,
        rolled_back: str = "",
    ) -> RunView:
        with self.database.transaction() as session:
            row = session.get(RunRow, run_id)
            assert row is not None
            row.status, row.message, row.promoted, row.finished_at = status, message[:2000], promoted, time.time()
            session.add(row)
            subject = f"policies/{row.policy}/runs/{row.id}"
            payload = events.RetrainCompleted(
                run_id=row.id,
                policy=row.policy,
                model=row.model,
                trigger=row.trigger,
                status=status,
                message=row.message,
                produced_version=row.produced_version,
                champion_version=row.champion_version,
                metric=row.metric,
                challenger_score=row.challenger_score,
                champion_score=row.champion_score,
                promoted=promoted,
            )
            self.outbox.add(session, events.make_event(SERVICE, payload, subject))
            if promoted:
                promotion = events.ModelPromoted(
                    name=row.model,
                    version=row.produced_version,
                    alias=CHAMPION,
                    previous_version=previous,
                    reason=row.message,
                    run_id=row.id,
                    metric=row.metric,
                    challenger_score=row.challenger_score,
                    champion_score=row.champion_score,
                )
                self.outbox.add(
                    session,
                    events.make_event(SERVICE, promotion, f"models/{row.model}/versions/{row.produced_version}"),
                )
            if rolled_back:
                policy = session.get(PolicyRow, row.policy)
                rollback = events.ModelRolledBack(
                    name=row.model,
                    version=row.produced_version,
                    endpoint=json.loads(policy.rollout).get("endpoint", "") if policy else "",
                    reason=rolled_back,
                    run_id=row.id,
                    figures=json.loads(row.rollout_figures),
                )
                subject = f"models/{row.model}/versions/{row.produced_version}"
                self.outbox.add(session, events.make_event(SERVICE, rollback, subject))
            return run_view(row)

    # ------------------------------------------------------------ reading

    def get_run(self, run_id: str) -> RunView:
        with self.database.session() as session:
            row = session.get(RunRow, run_id) if 0 < len(run_id) <= 100 else None
            if row is None:
                raise NotFound(f"no run {run_id[:100]!r}; `mlmesh retrain runs` lists them", field="id")
            return run_view(row)

    def list_runs(self, policy: str, page_size: int, page_token: str) -> tuple[list[RunView], str]:
        size, offset = paging.page_size(page_size), paging.decode(page_token)
        query = select(RunRow).order_by(col(RunRow.started_at).desc(), col(RunRow.id))
        if policy:
            query = query.where(RunRow.policy == policy[:100])
        with self.database.session() as session:
            rows = session.exec(query.offset(offset).limit(size + 1)).all()
            views = [run_view(row) for row in rows[:size]]
        return views, paging.encode(offset + size) if len(rows) > size else ""

    @staticmethod
    def _policy(session: Session, name: str) -> PolicyRow:
        row = session.get(PolicyRow, name) if 0 < len(name) <= 100 else None
        if row is None:
            raise NotFound(f"no policy {name[:100]!r}; `mlmesh retrain policy list` shows them", field="name")
        return row


def trigger_of(row: PolicyRow) -> dict[str, Any]:
    return json.loads(row.trigger)


def policy_view(row: PolicyRow) -> PolicyView:
    return PolicyView(
        name=row.name,
        model=row.model,
        trigger=trigger_of(row),
        training=json.loads(row.training),
        evaluation=json.loads(row.evaluation),
        rollout=json.loads(row.rollout),
        created_at=row.created_at,
        last_run_at=row.last_run_at,
    )


def run_view(row: RunRow) -> RunView:
    values = row.model_dump()
    values["training_metrics"] = json.loads(row.training_metrics)
    values["log_tail"] = json.loads(row.log_tail)
    values["rollout_figures"] = json.loads(row.rollout_figures)
    return RunView(**values)

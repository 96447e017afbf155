"""Drift monitors and their checks, over the drift service's own tables.

A monitor summarises its baseline once (services.drift.statistics) and keeps the summaries; a
check reads the endpoint's latest captured window through what it is given (`Captures`),
compares every feature, and stores the result with its drift.checked event (and drift.detected
when drift held over the monitor's `consecutive` windows) in one transaction. Nothing here
talks gRPC or NATS.
"""

from __future__ import annotations

import json
import math
import re
import time
import uuid
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.csv
from sqlalchemy import delete
from sqlmodel import Session, col, select

from services.common import events, paging
from services.common.db import Database
from services.common.errors import AlreadyExists, FailedPrecondition, InvalidArgument, NotFound
from services.common.names import ENDPOINT_NAME, REGISTERED_NAME
from services.common.outbox import Outbox
from services.drift import statistics
from services.drift.models import CheckRow, MonitorRow

SERVICE = "drift"
NAME_PATTERN = re.compile(r"^[a-z][a-z0-9-]{0,62}$")
COLUMN_PATTERN = re.compile(r"^[^\x00-\x1f]{1,200}$")
MAX_FEATURES = 1000
MAX_BACKFILL_STEPS = 1000
MAX_CONSECUTIVE = 100
DEFAULT_WINDOW_ROWS = 10_000
# Columns the collector adds to every captured row: never features.
CAPTURE_COLUMNS = frozenset(
    {"request_id", "time", "row", "label", "endpoint", "deployment", "model_version", "date", "hour"}
)
# How far back a row window looks for its rows, widening until it has enough.
ROW_WINDOW_SPANS = (3600.0, 86_400.0, 7 * 86_400.0, 30 * 86_400.0, None)
CAPTURED_BASELINE = "captures"


class Captures(Protocol):
    """What a check needs of the collector (the drift service's main.py has it)."""

    def read(self, endpoint: str, start: float | None, end: float, columns: Sequence[str] | None) -> pa.Table:
        """The endpoint's captured rows with start <= time < end (start None: from the first)."""
        ...


class Endpoints(Protocol):
    """What a monitor of a model needs of the deployer: the endpoints serving it."""

    def serving(self, model: str) -> list[str]:
        """Names of the endpoints with a deployment of `model` (any version)."""
        ...


class Datasets(Protocol):
    """What a monitor needs of the registry: a dataset as a table."""

    def read(self, ref: str) -> tuple[str, pa.Table]:
        """The dataset's resolved `name:version` and its rows."""
        ...


@dataclass(frozen=True)
class MonitorSpec:
    name: str
    endpoint: str = ""
    model: str = ""
    """Instead of `endpoint`: the captures of every endpoint serving this model."""
    baseline_dataset: str = ""
    baseline_window: tuple[float, float] | None = None
    features: tuple[str, ...] = ()
    """Captured column names, or `captured=baseline` pairs."""
    exclude: tuple[str, ...] = ()
    window_rows: int = 0
    window_seconds: float = 0
    schedule_seconds: float = 0
    thresholds: dict[str, float] = field(default_factory=dict)
    """wasserstein, psi, js_distance, alpha; a missing or zero one takes its default."""
    consecutive: int = 1


@dataclass
class MonitorView:
    name: str
    endpoint: str
    model: str
    baseline: str
    baseline_rows: int
    features: dict[str, str]
    kinds: dict[str, str]
    window_rows: int
    window_seconds: float
    schedule_seconds: float
    thresholds: statistics.Thresholds
    consecutive: int
    created_at: float
    last_checked_at: float | None


@dataclass
class ResultView:
    id: str
    monitor: str
    endpoint: str
    model: str
    baseline: str
    window_start: float
    window_end: float
    rows: int
    drifted: bool
    drift_detected: bool
    drift_coefficient: float
    drifted_features: list[str]
    features: dict[str, dict[str, Any]]
    """Captured column -> feature_dict()."""
    checked_at: float


def check_name(value: str, pattern: re.Pattern[str], what: str, rule: str) -> str:
    if not pattern.fullmatch(value or ""):
        raise InvalidArgument(f"{what} {value[:100]!r} is not valid: {rule}", field=what.replace(" ", "_"))
    return value


def check_spec(spec: MonitorSpec, max_window_rows: int) -> None:
    check_name(spec.name, NAME_PATTERN, "name", "1-63 lowercase letters, digits and '-', starting with a letter")
    if bool(spec.endpoint) == bool(spec.model):
        raise InvalidArgument("give exactly one of endpoint and model: whose captures are checked", field="endpoint")
    if spec.endpoint:
        check_name(
            spec.endpoint,
            ENDPOINT_NAME,
            "endpoint",
            "1-40 lowercase letters, digits and '-', starting with a letter",
        )
    else:
        check_name(spec.model, REGISTERED_NAME, "model", "a registered model's name: letters, digits, '.', '_', '-'")
    if bool(spec.baseline_dataset) == (spec.baseline_window is not None):
        raise InvalidArgument(
            "give exactly one baseline: a registered dataset (name:version) or a captured window", field="baseline"
        )
    if spec.baseline_window is not None:
        start, end = spec.baseline_window
        if not (math.isfinite(start) and math.isfinite(end) and start < end):
            raise InvalidArgument("the baseline window must end after it starts", field="baseline_window")
    elif len(spec.baseline_dataset) > 300:
        raise InvalidArgument("baseline_dataset is too long to be a dataset ref", field="baseline_dataset")
    if spec.window_rows and spec.window_seconds:
        raise InvalidArgument("give window_rows or window_seconds, not both", field="window_rows")
    if not 0 <= spec.window_rows <= max_window_rows:
        raise InvalidArgument(f"window_rows must be between 1 and {max_window_rows}", field="window_rows")
    for value, what in ((spec.window_seconds, "window_seconds"), (spec.schedule_seconds, "schedule_seconds")):
        if not (math.isfinite(value) and 0 <= value <= 366 * 86_400):
            raise InvalidArgument(f"{what} must be between 0 and a year", field=what)
    if spec.schedule_seconds and spec.schedule_seconds < 1:
        raise InvalidArgument("schedule_seconds must be at least 1 (or 0: no schedule)", field="schedule_seconds")
    if not 1 <= spec.consecutive <= MAX_CONSECUTIVE:
        raise InvalidArgument(f"consecutive must be between 1 and {MAX_CONSECUTIVE}", field="consecutive")
    make_thresholds(spec.thresholds)
    if len(spec.features) > MAX_FEATURES or len(spec.exclude) > MAX_FEATURES:
        raise InvalidArgument(f"at most {MAX_FEATURES} features", field="features")
    for name in (*spec.features, *spec.exclude):
        for part in name.split("=", 1):
            check_name(part, COLUMN_PATTERN, "feature", "a column name of 1-200 printable characters")


def make_thresholds(values: dict[str, float]) -> statistics.Thresholds:
    """The thresholds asked for, each missing or zero one at its default; InvalidArgument for the rest."""
    defaults = statistics.Thresholds()
    unknown = sorted(set(values) - {"wasserstein", "psi", "js_distance", "alpha"})
    if unknown:
        raise InvalidArgument(f"no threshold {unknown[0]!r}: there are wasserstein, psi, js_distance and alpha")
    chosen = {name: values.get(name) or getattr(defaults, name) for name in ("wasserstein", "psi", "js_distance")}
    for name, value in chosen.items():
        if not (math.isfinite(value) and value > 0):
            raise InvalidArgument(f"the {name} threshold must be a positive number", field=f"thresholds.{name}")
    alpha = values.get("alpha") or defaults.alpha
    if not (math.isfinite(alpha) and 0 < alpha < 1):
        raise InvalidArgument(f"alpha must be between 0 and 1, not {alpha:g}", field="thresholds.alpha")
    return statistics.Thresholds(alpha=alpha, **chosen)


def feature_pairs(features: Sequence[str]) -> dict[str, str]:
    """`captured=baseline` pairs (or plain names, the same on both sides) as captured -> baseline."""
    pairs: dict[str, str] = {}
    for entry in features:
        captured, _, baseline = entry.partition("=")
        if captured in pairs:
            raise InvalidArgument(f"feature {captured!r} is given twice", field="features")
        pairs[captured] = baseline or captured
    return pairs


def baseline_features(table: pa.Table, spec: MonitorSpec) -> dict[str, str]:
    """Captured column -> baseline column for each feature of a new monitor."""
    if spec.features:
        pairs = feature_pairs(spec.features)
        missing = sorted({baseline for baseline in pairs.values()} - set(table.column_names))
        if missing:
            raise InvalidArgument(
                f"the baseline has no column {', '.join(repr(name) for name in missing[:5])}; "
                f"it has {', '.join(table.column_names[:20])}",
                field="features",
            )
        return pairs
    excluded = set(spec.exclude)
    unknown = sorted(excluded - set(table.column_names))
    if unknown:
        raise InvalidArgument(f"the baseline has no column {unknown[0]!r} to exclude", field="exclude")
    names = [name for name in table.column_names if name not in excluded and name not in CAPTURE_COLUMNS]
    if not names:
        raise InvalidArgument("the baseline has no column left to check", field="features")
    if len(names) > MAX_FEATURES:
        raise InvalidArgument(f"the baseline has {len(names)} columns; name at most {MAX_FEATURES}", field="features")
    return {name: name for name in names}


def column_values(table: pa.Table, name: str) -> np.ndarray:
    """A column as numpy (nulls as NaN for numbers, None otherwise); one chunk at most copied."""
    column = table.column(name)
    if pa.types.is_integer(column.type) or pa.types.is_floating(column.type) or pa.types.is_boolean(column.type):
        return column.cast(pa.float64()).to_numpy(zero_copy_only=False)
    if pa.types.is_dictionary(column.type):
        column = column.cast(column.type.value_type)
    if pa.types.is_timestamp(column.type) or pa.types.is_date(column.type):
        return column.cast(pa.int64()).cast(pa.float64()).to_numpy(zero_copy_only=False)
    if pa.types.is_string(column.type) or pa.types.is_large_string(column.type) or pa.types.is_binary(column.type):
        return np.asarray(column.to_pylist(), dtype=object)
    raise InvalidArgument(
        f"column {name!r} holds {column.type}, which drift is not computed for: give numbers or categories",
        field="features",
    )


def summarize_table(table: pa.Table, features: dict[str, str]) -> dict[str, statistics.BaselineSummary]:
    summaries = {}
    for captured, baseline in features.items():
        values = column_values(table, baseline)
        kind = "numeric" if values.dtype.kind == "f" else "categorical"
        try:
            summaries[captured] = statistics.summarize(values, kind)
        except ValueError as error:
            raise InvalidArgument(f"baseline column {baseline!r}: {error}", field="features") from None
    return summaries


def feature_dict(baseline_column: str, result: statistics.FeatureResult) -> dict[str, Any]:
    """One feature's result as stored and sent in events: JSON-safe, None where not computed."""
    values = result.to_dict()
    values["baseline_column"] = baseline_column
    values["unseen_categories"] = [str(category) for category in values.get("unseen_categories", [])]
    return values


def compare_tables(
    reference: pa.Table,
    current: pa.Table,
    features: Sequence[str] = (),
    thresholds: statistics.Thresholds | None = None,
) -> statistics.CheckResult:
    """Two tables compared column by column with the monitors' statistics (`mlmesh drift compare`)."""
    spec = MonitorSpec(name="compare", endpoint="compare", baseline_dataset="-", features=tuple(features))
    pairs = baseline_features(reference, spec)
    missing = sorted(captured for captured in pairs if captured not in current.column_names)
    if missing:
        raise InvalidArgument(f"the current data has no column {missing[0]!r}", field="features")
    summaries = summarize_table(reference, pairs)
    window = {captured: column_values(current, captured) for captured in pairs}
    return statistics.check(summaries, window, thresholds)


class DriftMonitors:
    """Monitors, their checks and results."""

    def __init__(
        self,
        database: Database,
        outbox: Outbox,
        captures: Captures,
        datasets: Datasets,
        endpoints: Endpoints,
        *,
        max_window_rows: int,
    ) -> None:
        self.database = database
        self.outbox = outbox
        self.captures = captures
        self.datasets = datasets
        self.endpoints = endpoints
        self.max_window_rows = max_window_rows

    def _captured(self, endpoint: str, model: str, start: float | None, end: float) -> pa.Table:
        """An endpoint's captures, or those of every endpoint serving `model`, in [start, end)."""
        if not model:
            return self.captures.read(endpoint, start, end, None)
        tables = [self.captures.read(name, start, end, None) for name in self.endpoints.serving(model)]
        tables = [table for table in tables if table.num_rows]
        if not tables:
            return pa.table({})
        return pa.concat_tables(tables, promote_options="default")

    # ------------------------------------------------------------ monitors

    def create_monitor(self, spec: MonitorSpec) -> MonitorView:
        check_spec(spec, self.max_window_rows)
        with self.database.session() as session:
            if session.get(MonitorRow, spec.name) is not None:
                raise AlreadyExists(f"monitor {spec.name} exists; delete it first or pick another name", field="name")
        if spec.baseline_window is not None:
            start, end = spec.baseline_window
            table = self._captured(spec.endpoint, spec.model, start, end)
            baseline = f"{CAPTURED_BASELINE}:{spec.endpoint or spec.model}:{start:.3f}:{end:.3f}"
            if table.num_rows == 0:
                raise FailedPrecondition(f"{source(spec.endpoint, spec.model)} captured nothing in the baseline window")
        else:
            baseline, table = self.datasets.read(spec.baseline_dataset)
            if table.num_rows == 0:
                raise FailedPrecondition(f"dataset {baseline} has no rows to be a baseline", field="baseline_dataset")
        features = baseline_features(table, spec)
        summaries = summarize_table(table, features)
        row = MonitorRow(
            name=spec.name,
            endpoint=spec.endpoint,
            model=spec.model,
            baseline=baseline,
            baseline_rows=table.num_rows,
            features=json.dumps(features),
            summaries=json.dumps({name: summary.to_dict() for name, summary in summaries.items()}),
            window_rows=spec.window_rows or (0 if spec.window_seconds else DEFAULT_WINDOW_ROWS),
            window_seconds=spec.window_seconds,
            schedule_seconds=spec.schedule_seconds,
            thresholds=json.dumps(thresholds_dict(make_thresholds(spec.thresholds))),
            consecutive=spec.consecutive,
            created_at=time.time(),
        )
        with self.database.transaction() as session:
            if session.get(MonitorRow, spec.name) is not None:
                raise AlreadyExists(f"monitor {spec.name} exists", field="name")
            session.add(row)
            session.flush()
            return monitor_view(row)

    def get_monitor(self, name: str) -> MonitorView:
        with self.database.session() as session:
            return monitor_view(self._monitor(session, name))

    def list_monitors(self, endpoint: str, page_size: int, page_token: str) -> tuple[list[MonitorView], str]:
        size, offset = paging.page_size(page_size), paging.decode(page_token)
        with self.database.session() as session:
            query = select(MonitorRow).order_by(col(MonitorRow.name))
            if endpoint:
                query = query.where(MonitorRow.endpoint == endpoint)
            rows = session.exec(query.offset(offset).limit(size + 1)).all()
        views = [monitor_view(row) for row in rows[:size]]
        return views, paging.encode(offset + size) if len(rows) > size else ""

    def delete_monitor(self, name: str) -> None:
        with self.database.transaction() as session:
            self._monitor(session, name)
            session.execute(delete(CheckRow).where(col(CheckRow.monitor) == name))
            session.execute(delete(MonitorRow).where(col(MonitorRow.name) == name))

    def due_monitors(self, now: float) -> list[str]:
        """Monitors with a schedule whose next check is due."""
        with self.database.session() as session:
            rows = session.exec(select(MonitorRow).where(col(MonitorRow.schedule_seconds) > 0)).all()
        return [row.name for row in rows if (row.last_checked_at or row.created_at) + row.schedule_seconds <= now]

    # ------------------------------------------------------------ checks

    def check(self, name: str, window_end: float | None = None, window_seconds: float = 0) -> ResultView:
        """Check the monitor's window ending at `window_end` (default now), or the `window_seconds`
        before it when given; store and announce the result."""
        with self.database.session() as session:
            row = self._monitor(session, name)
        end = time.time() if window_end is None else window_end
        if not math.isfinite(end):
            raise InvalidArgument("window_end must be a time", field="window_end")
        features: dict[str, str] = json.loads(row.features)
        table, start = self._window(row, end, window_seconds or row.window_seconds)
        if table.num_rows == 0:
            raise FailedPrecondition(
                f"{source(row.endpoint, row.model)} captured nothing in the window ending {format_time(end)}; "
                "deploy with capture on (mlmesh deploy create ... --capture) and send it requests"
            )
        features = self._matched(row, features, table)
        summaries = {
            captured: statistics.BaselineSummary.from_dict(summary)
            for captured, summary in json.loads(row.summaries).items()
        }
        window = {captured: column_values(table, captured) for captured in features}
        thresholds = statistics.Thresholds(**json.loads(row.thresholds))
        result = statistics.check(summaries, window, thresholds)
        return self._store(row, features, result, start, end, table.num_rows)

    def backfill(self, name: str, start: float, end: float, step_seconds: float) -> list[ResultView]:
        """Checks of past windows: each step's captures (from `start` to `end`, `step_seconds`
        at a time) make one window; steps without captured rows are skipped."""
        with self.database.session() as session:
            row = self._monitor(session, name)
        if not (math.isfinite(start) and math.isfinite(end) and start < end):
            raise InvalidArgument("the backfill range must end after it starts", field="range")
        step = step_seconds or row.window_seconds or 3600.0
        if not (math.isfinite(step) and step > 0):
            raise InvalidArgument("step_seconds must be positive", field="step_seconds")
        steps = math.ceil((end - start) / step)
        if steps > MAX_BACKFILL_STEPS:
            raise InvalidArgument(
                f"{steps} steps; at most {MAX_BACKFILL_STEPS}: take a longer step or a shorter range",
                field="step_seconds",
            )
        results = []
        for number in range(1, steps + 1):
            try:
                step_end = min(end, start + number * step)
                results.append(self.check(name, step_end, step_end - (start + (number - 1) * step)))
            except FailedPrecondition:
                continue  # nothing captured in that window
        return results

    def list_results(self, name: str, page_size: int, page_token: str) -> tuple[list[ResultView], str]:
        size, offset = paging.page_size(page_size), paging.decode(page_token)
        with self.database.session() as session:
            self._monitor(session, name)
            query = select(CheckRow).where(CheckRow.monitor == name).order_by(col(CheckRow.checked_at).desc())
            rows = session.exec(query.offset(offset).limit(size + 1)).all()
        return [result_view(row) for row in rows[:size]], paging.encode(offset + size) if len(rows) > size else ""

    def _window(self, row: MonitorRow, end: float, seconds: float) -> tuple[pa.Table, float]:
        """The rows to check and where their window starts: the last `seconds` before `end`, or
        without them the last `window_rows` rows."""
        if seconds:
            start = end - seconds
            return self._captured(row.endpoint, row.model, start, end), start
        table = pa.table({})
        for span in ROW_WINDOW_SPANS:
            start = None if span is None else end - span
            table = self._captured(row.endpoint, row.model, start, end)
            if table.num_rows >= row.window_rows:
                break
        if "time" in table.column_names and table.num_rows:
            if table.num_rows > row.window_rows:
                table = table.sort_by("time").slice(table.num_rows - row.window_rows)
            first = pc.min(table.column("time")).as_py()
            return table, first.timestamp() if hasattr(first, "timestamp") else float(first)
        return table.slice(max(0, table.num_rows - row.window_rows)), start if start is not None else end

    def _matched(self, row: MonitorRow, features: dict[str, str], table: pa.Table) -> dict[str, str]:
        """The monitor's features as the window names them. A baseline named differently from the
        captures (a training table against a model's tensor columns `x.0`, `x.1`, ...) is matched
        by position, once, and the match kept on the monitor."""
        present = set(table.column_names)
        if all(captured in present for captured in features):
            return features
        captured_columns = [name for name in table.column_names if name not in CAPTURE_COLUMNS]
        if any(captured in present for captured in features) or len(captured_columns) < len(features):
            missing = ", ".join(repr(captured) for captured in features if captured not in present)
            raise FailedPrecondition(
                f"the captures of {source(row.endpoint, row.model)} have no column {missing[:300]} "
                f"(they have {', '.join(captured_columns[:20])}); recreate the monitor with features given as "
                "captured=baseline pairs",
                field="features",
            )
        matched = dict(zip(captured_columns, features.values(), strict=False))
        summaries = json.loads(row.summaries)
        renamed = {captured: summaries[old] for captured, old in zip(captured_columns, features, strict=False)}
        with self.database.transaction() as session:
            stored = session.get(MonitorRow, row.name)
            if stored is not None:
                stored.features = json.dumps(matched)
                stored.summaries = json.dumps(renamed)
                session.add(stored)
        row.features, row.summaries = json.dumps(matched), json.dumps(renamed)
        return matched

    def _store(
        self,
        row: MonitorRow,
        features: dict[str, str],
        result: statistics.CheckResult,
        start: float,
        end: float,
        rows: int,
    ) -> ResultView:
        checked_at = time.time()
        details = {captured: feature_dict(features[captured], found) for captured, found in result.features.items()}
        with self.database.transaction() as session:
            earlier = session.exec(
                select(CheckRow)
                .where(CheckRow.monitor == row.name)
                .order_by(col(CheckRow.checked_at).desc())
                .limit(max(0, row.consecutive - 1))
            ).all()
            detected = result.drift_detected and all(check.drifted for check in earlier)
            detected = detected and len(earlier) == row.consecutive - 1
            check = CheckRow(
                id=str(uuid.uuid4()),
                monitor=row.name,
                endpoint=row.endpoint,
                model=row.model,
                baseline=row.baseline,
                window_start=start,
                window_end=end,
                rows=rows,
                drifted=result.drift_detected,
                drift_detected=detected,
                drift_coefficient=result.drift_coefficient,
                drifted_features=json.dumps(list(result.drifted_features)),
                features=json.dumps(details),
                checked_at=checked_at,
            )
            session.add(check)
            stored = session.get(MonitorRow, row.name)
            if stored is not None:
                stored.last_checked_at = checked_at
                session.add(stored)
            view = result_view(check)
            self._emit(session, view, events.DriftChecked)
            if detected:
                self._emit(session, view, events.DriftDetected)
            return view

    def _emit(self, session: Session, view: ResultView, payload_type: type[events.DriftEvent]) -> None:
        payload = payload_type(
            monitor=view.monitor,
            check_id=view.id,
            endpoint=view.endpoint,
            model=view.model,
            baseline=view.baseline,
            target=f"models/{view.model}/captures" if view.model else f"endpoints/{view.endpoint}/captures",
            window_start=view.window_start,
            window_end=view.window_end,
            rows=view.rows,
            drifted=view.drifted,
            drift_detected=view.drift_detected,
            drift_coefficient=view.drift_coefficient,
            drifted_features=view.drifted_features,
            features=view.features,
        )
        self.outbox.add(session, events.make_event(SERVICE, payload, f"monitors/{view.monitor}"))

    @staticmethod
    def _monitor(session: Session, name: str) -> MonitorRow:
        row = session.get(MonitorRow, name)
        if row is None:
            raise NotFound(f"no monitor {name[:100]!r}; `mlmesh drift monitor list` shows them", field="name")
        return row


def thresholds_dict(thresholds: Any) -> dict[str, float]:
    """The four thresholds of a statistics.Thresholds (or of a message with the same fields)."""
    return {
        "wasserstein": thresholds.wasserstein,
        "psi": thresholds.psi,
        "js_distance": thresholds.js_distance,
        "alpha": thresholds.alpha,
    }


def monitor_view(row: MonitorRow) -> MonitorView:
    summaries = json.loads(row.summaries)
    return MonitorView(
        name=row.name,
        endpoint=row.endpoint,
        model=row.model,
        baseline=row.baseline,
        baseline_rows=row.baseline_rows,
        features=json.loads(row.features),
        kinds={name: summary["kind"] for name, summary in summaries.items()},
        window_rows=row.window_rows,
        window_seconds=row.window_seconds,
        schedule_seconds=row.schedule_seconds,
        thresholds=statistics.Thresholds(**json.loads(row.thresholds)),
        consecutive=row.consecutive,
        created_at=row.created_at,
        last_checked_at=row.last_checked_at,
    )


def result_view(row: CheckRow) -> ResultView:
    return ResultView(
        id=row.id,
        monitor=row.monitor,
        endpoint=row.endpoint,
        model=row.model,
        baseline=row.baseline,
        window_start=row.window_start,
        window_end=row.window_end,
        rows=row.rows,
        drifted=row.drifted,
        drift_detected=row.drift_detected,
        drift_coefficient=row.drift_coefficient,
        drifted_features=json.loads(row.drifted_features),
        features=json.loads(row.features),
        checked_at=row.checked_at,
    )


def source(endpoint: str, model: str) -> str:
    """What a monitor reads, in words."""
    return f"endpoint {endpoint}" if endpoint else f"the endpoints serving model {model}"


def format_time(seconds: float) -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(seconds))

"""Webhook endpoints, the events they receive, and what became of each delivery.

The bookkeeping only: which event goes to which endpoint, when it is tried next, what an attempt's
answer means (delivered, retry later, throttle, disable). Sending is services.notifier.delivery's.
"""

from __future__ import annotations

import base64
import fnmatch
import ipaddress
import json
import random
import re
import secrets
import socket
import time
import uuid
from dataclasses import dataclass, field
from datetime import datetime
from urllib.parse import urlsplit, urlunsplit

import sqlalchemy as sql
from sqlalchemy import delete
from sqlmodel import Session, col, func, select

from services.common import events, paging
from services.common.db import Database
from services.common.errors import FailedPrecondition, InvalidArgument, NotFound, ResourceExhausted
from services.common.outbox import Outbox
from services.notifier.models import AttemptRow, DeliveryRow, EventRow, WebhookRow

# The tables themselves, for the paths every event and attempt take (SQL without ORM objects).
WEBHOOKS: sql.Table = WebhookRow.__table__  # type: ignore[attr-defined]
DELIVERIES: sql.Table = DeliveryRow.__table__  # type: ignore[attr-defined]
ATTEMPTS: sql.Table = AttemptRow.__table__  # type: ignore[attr-defined]
MOVE_DELIVERY = (
    sql.update(DELIVERIES)
    .where(DELIVERIES.c.id == sql.bindparam("delivery"))
    .values(
        attempts=sql.bindparam("attempts"),
        status=sql.bindparam("status"),
        next_attempt_at=sql.bindparam("next_attempt_at"),
        delivered_at=sql.bindparam("delivered_at"),
    )
)

SERVICE = "notifier"
PATTERN = re.compile(r"^[a-z0-9*?._-]{1,100}$")
MAX_PATTERNS = 50
MAX_URL = 2000
MAX_DESCRIPTION = 1000
SNIPPET = 500
PENDING, DELIVERED, FAILED = "pending", "delivered", "failed"
ORIGINS = ("event", "redeliver", "replay", "test")
THROTTLING = (429, 502, 504)
TEST_KIND = "webhook.test"


@dataclass
class WebhookView:
    id: str
    url: str
    events: list[str]
    description: str
    enabled: bool
    disabled_reason: str
    created_at: float
    updated_at: float
    previous_secret_expires_at: float | None


@dataclass
class AttemptView:
    attempted_at: float
    status_code: int
    latency_ms: float
    response_snippet: str
    error: str


@dataclass
class DeliveryView:
    id: str
    webhook_id: str
    event_id: str
    event_kind: str
    status: str
    origin: str
    attempts: int
    next_attempt_at: float | None
    created_at: float
    delivered_at: float | None
    attempt_log: list[AttemptView] = field(default_factory=list)


@dataclass(frozen=True)
class Outgoing:
    """What one attempt sends."""

    delivery_id: str
    webhook_id: str
    url: str
    event_id: str
    body: bytes
    secrets: tuple[str, ...]
    """Every secret that signs it: the current one, and the previous one during a rotation."""
    due_at: float = 0.0


@dataclass(frozen=True)
class Outcome:
    """What an attempt got: a status code (0 for none) or an error, and any Retry-After."""

    status_code: int
    latency_ms: float
    response_snippet: str = ""
    error: str = ""
    retry_after_seconds: float | None = None


@dataclass(frozen=True)
class Verdict:
    """What the notifier does after an attempt."""

    status: str
    """pending (tried again at `next_attempt_at`), delivered or failed."""
    next_attempt_at: float | None = None
    pause_until: float | None = None
    """Throttled: the endpoint's next attempts wait until then."""
    disabled: str = ""
    """The endpoint is disabled, for this reason."""


# ---------------------------------------------------------------- checks


def check_url(url: str, allowed_hosts: tuple[str, ...]) -> str:
    """The URL, checked: http(s), a host, no credentials; a private, loopback or link-local
    destination only when its host is allowed. InvalidArgument says what is wrong."""
    if not url or len(url) > MAX_URL:
        raise InvalidArgument(f"url must be 1 to {MAX_URL} characters", field="url")
    try:
        parts = urlsplit(url)
        port = parts.port
    except ValueError as error:
        raise InvalidArgument(f"url is not a URL: {error}", field="url") from None
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise InvalidArgument("url must be http:// or https:// with a host", field="url")
    if parts.username or parts.password:
        raise InvalidArgument("url must not carry a user name or password; put tokens in the path", field="url")
    if any(character.isspace() or ord(character) < 32 for character in url):
        raise InvalidArgument("url must not contain spaces or control characters", field="url")
    problem = destination_problem(parts.hostname, port or (443 if parts.scheme == "https" else 80), allowed_hosts)
    if problem:
        raise InvalidArgument(problem, field="url")
    return url


def destination_problem(host: str, port: int, allowed_hosts: tuple[str, ...]) -> str:
    """Why a host must not be called (an empty string when it may): it resolves to a private,
    loopback, link-local or otherwise internal address and is not allowed by name or address."""
    host = host.lower().strip("[]")
    if host in allowed_hosts:
        return ""
    try:
        found = {info[4][0] for info in socket.getaddrinfo(host, port, proto=socket.IPPROTO_TCP)}
    except (OSError, UnicodeError) as error:
        return f"the host {host} does not resolve: {error}"
    for address_text in found:
        problem = address_problem(address_text, allowed_hosts)
        if problem:
            return f"{host} resolves to {address_text}, {problem}"
    return ""


def address_problem(address_text: str, allowed_hosts: tuple[str, ...]) -> str:
    """Why an address must not be called, or an empty string."""
    address = ipaddress.ip_address(address_text.split("%", 1)[0])
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped:
        address = address.ipv4_mapped
    internal = (
        address.is_private
        or address.is_loopback
        or address.is_link_local
        or address.is_reserved
        or address.is_multicast
        or address.is_unspecified
    )
    if not internal or str(address) in allowed_hosts or address_text.lower() in allowed_hosts:
        return ""
    for entry in allowed_hosts:
        if "/" in entry:
            try:
                if address in ipaddress.ip_network(entry, strict=False):
                    return ""
            except ValueError:
                continue
    return (
        "a private, loopback or link-local address: refused unless allowed in MLMESH_NOTIFIER_ALLOWED_HOSTS "
        "(a server-side request forgery guard)"
    )


def check_patterns(patterns: list[str]) -> list[str]:
    if not patterns:
        raise InvalidArgument("events needs at least one pattern, such as model.* or * for every event", field="events")
    if len(patterns) > MAX_PATTERNS:
        raise InvalidArgument(f"at most {MAX_PATTERNS} event patterns", field="events")
    for pattern in patterns:
        if not PATTERN.fullmatch(pattern):
            raise InvalidArgument(
                f"event pattern {pattern[:100]!r}: lowercase kinds with * and ? wildcards, such as model.* or "
                "deployment.ready",
                field="events",
            )
    return sorted(set(patterns))


def matches(patterns: list[str], kind: str) -> bool:
    return any(fnmatch.fnmatchcase(kind, pattern) for pattern in patterns)


def new_secret() -> str:
    return "whsec_" + base64.b64encode(secrets.token_bytes(32)).decode()


def shown_url(url: str) -> str:
    """The URL without its query string and fragment, which may hold tokens."""
    parts = urlsplit(url)
    return urlunsplit((parts.scheme, parts.netloc, parts.path, "", ""))


def judge(outcome: Outcome, attempts: int, schedule: tuple[float, ...], now: float) -> Verdict:
    """What follows an attempt (the `attempts`-th) of a delivery, as Standard Webhooks says:
    2xx delivered; 410 disables the endpoint; 429, 502 and 504 throttle (Retry-After honoured);
    anything else (redirects included) is retried on the schedule, with jitter, and past its end
    the endpoint is disabled."""
    code = outcome.status_code
    if 200 <= code < 300:
        return Verdict(DELIVERED)
    if code == 410:
        return Verdict(FAILED, disabled="it answered 410 Gone")
    if attempts >= len(schedule):
        what = f"HTTP {code}" if code else (outcome.error or "no answer")
        return Verdict(FAILED, disabled=f"every one of {attempts} attempts failed (the last: {what})")
    delay = schedule[attempts] * random.uniform(1.0, 1.1)
    pause = None
    if code in THROTTLING:
        wait = outcome.retry_after_seconds or 0.0
        delay = max(delay, wait)
        pause = now + wait if wait else None
    return Verdict(PENDING, next_attempt_at=now + delay, pause_until=pause)


def retry_after(value: str | None, now: float) -> float | None:
    """Seconds from a Retry-After header (seconds or an HTTP date), at most a day."""
    if not value:
        return None
    value = value.strip()
    if value.isdigit():
        return min(float(value), 86400.0)
    try:
        moment = datetime.strptime(value, "%a, %d %b %Y %H:%M:%S GMT").timestamp() - time.timezone
    except ValueError:
        return None
    return max(0.0, min(moment - now, 86400.0))


# ---------------------------------------------------------------- the store


@dataclass(slots=True)
class _Tracked:
    """A delivery as `Webhooks.record` moves it on, kept current as its batch goes."""

    status: str
    attempts: int
    webhook_id: str
    event_id: str


class Webhooks:
    """Endpoints, events and deliveries."""

    def __init__(
        self,
        database: Database,
        outbox: Outbox,
        *,
        allowed_hosts: tuple[str, ...],
        schedule: tuple[float, ...],
        rotation_seconds: float,
        retention_seconds: float,
        max_webhooks: int,
    ) -> None:
        self.database = database
        self.outbox = outbox
        self.allowed_hosts = allowed_hosts
        self.schedule = schedule
        self.rotation_seconds = rotation_seconds
        self.retention_seconds = retention_seconds
        self.max_webhooks = max_webhooks

    # ------------------------------------------------------------ endpoints

    def create(self, url: str, patterns: list[str], description: str) -> tuple[WebhookView, str]:
        url = check_url(url, self.allowed_hosts)
        patterns = check_patterns(patterns)
        check_description(description)
        now = time.time()
        secret = new_secret()
        with self.database.transaction() as session:
            count = session.exec(select(func.count()).select_from(WebhookRow)).one()
            if count >= self.max_webhooks:
                raise ResourceExhausted(f"at most {self.max_webhooks} webhooks (MLMESH_NOTIFIER_MAX_WEBHOOKS)")
            row = WebhookRow(
                id=str(uuid.uuid4()),
                url=url,
                events=json.dumps(patterns),
                description=description,
                secret=secret,
                created_at=now,
                updated_at=now,
            )
            session.add(row)
            return webhook_view(row), secret

    def get(self, name: str) -> WebhookView:
        with self.database.session() as session:
            return webhook_view(self._webhook(session, name))

    def list(self, page_size: int, page_token: str) -> tuple[list[WebhookView], str]:
        size, offset = paging.page_size(page_size), paging.decode(page_token)
        query = select(WebhookRow).order_by(col(WebhookRow.created_at), col(WebhookRow.id))
        with self.database.session() as session:
            rows = session.exec(query.offset(offset).limit(size + 1)).all()
            views = [webhook_view(row) for row in rows[:size]]
        return views, paging.encode(offset + size) if len(rows) > size else ""

    def update(
        self,
        name: str,
        url: str | None,
        patterns: list[str] | None,
        description: str | None,
        enabled: bool | None,
    ) -> WebhookView:
        if url is not None:
            url = check_url(url, self.allowed_hosts)
        if patterns is not None:
            patterns = check_patterns(patterns)
        if description is not None:
            check_description(description)
        with self.database.transaction() as session:
            row = self._webhook(session, name)
            if url is not None:
                row.url = url
            if patterns is not None:
                row.events = json.dumps(patterns)
            if description is not None:
                row.description = description
            if enabled is not None:
                if not enabled:
                    fail_pending(session, row.id)
                row.enabled = enabled
                row.disabled_reason = "" if enabled else "disabled by hand"
            row.updated_at = time.time()
            session.add(row)
            return webhook_view(row)

    def delete(self, name: str) -> None:
        with self.database.transaction() as session:
            row = self._webhook(session, name)
            deliveries = select(DeliveryRow.id).where(DeliveryRow.webhook_id == row.id)
            session.exec(delete(AttemptRow).where(col(AttemptRow.delivery_id).in_(deliveries)))  # type: ignore[call-overload]
            session.exec(delete(DeliveryRow).where(col(DeliveryRow.webhook_id) == row.id))  # type: ignore[call-overload]
            session.delete(row)

    def rotate(self, name: str) -> tuple[WebhookView, str]:
        secret = new_secret()
        with self.database.transaction() as session:
            row = self._webhook(session, name)
            row.previous_secret = row.secret
            row.previous_secret_expires_at = time.time() + self.rotation_seconds
            row.secret = secret
            row.updated_at = time.time()
            session.add(row)
            return webhook_view(row), secret

    # ------------------------------------------------------------ events in

    def take_event(self, event: events.CloudEvent, body: bytes) -> list[Outgoing]:
        """Keep an event and queue one delivery per enabled endpoint whose patterns match it; what
        each new delivery's first attempt sends. An event already kept queues nothing (the stream
        delivered it again): this makes the consumer idempotent in the same transaction. Every
        event passes here, so it speaks SQL directly rather than through ORM objects."""
        now = time.time()
        with self.database.transaction() as session:
            connection = session.connection()
            kept = connection.execute(
                self.database.insert(EventRow)
                .values(id=event.id, kind=event.kind, time=event_time(event, now), body=body, received_at=now)
                .on_conflict_do_nothing(index_elements=["id"])
                .returning(sql.literal_column("1"))
            ).first()
            if kept is None:
                return []
            queued, rows = [], []
            for row in connection.execute(sql.select(WEBHOOKS).where(WEBHOOKS.c.enabled)):
                if matches(json.loads(row.events), event.kind):
                    delivery_id = str(uuid.uuid4())
                    rows.append(new_delivery(delivery_id, row.id, event.id, event.kind, "event", 0, now))
                    queued.append(Outgoing(delivery_id, row.id, row.url, event.id, body, signing_keys(row, now)))
            if rows:
                connection.execute(sql.insert(DELIVERIES), rows)
            return queued

    def redeliver(self, name: str, event_id: str) -> tuple[DeliveryView, Outgoing]:
        now = time.time()
        with self.database.transaction() as session:
            row = self._webhook(session, name)
            self._require_enabled(row)
            event = session.get(EventRow, event_id) if 0 < len(event_id) <= 100 else None
            if event is None:
                raise NotFound(
                    f"no event {event_id[:100]!r} is kept (events are kept for "
                    "MLMESH_NOTIFIER_EVENT_RETENTION_SECONDS)",
                    field="event_id",
                )
            delivery_id = self._queue(session, row.id, event.id, event.kind, "redeliver", now)
            outgoing = Outgoing(delivery_id, row.id, row.url, event.id, event.body, signing_keys(row, now))
            return delivery_view(session.get(DeliveryRow, delivery_id), []), outgoing  # type: ignore[arg-type]

    def replay(self, name: str, start: float, end: float) -> list[Outgoing]:
        """Queue again every kept event of [start, end) that the endpoint's patterns match; what
        each new delivery sends."""
        if not (start < end):  # NaN (a bound not given) fails too
            raise InvalidArgument("give a start and an end, the end after the start", field="end")
        now = time.time()
        with self.database.transaction() as session:
            row = self._webhook(session, name)
            self._require_enabled(row)
            patterns = json.loads(row.events)
            found = session.exec(
                select(EventRow)
                .where(col(EventRow.time) >= start, col(EventRow.time) < end)
                .order_by(col(EventRow.time))
            ).all()
            keys = signing_keys(row, now)
            return [
                Outgoing(
                    self._queue(session, row.id, event.id, event.kind, "replay", now),
                    row.id,
                    row.url,
                    event.id,
                    event.body,
                    keys,
                )
                for event in found
                if event.kind != TEST_KIND and matches(patterns, event.kind)
            ]

    def test_delivery(self, name: str) -> str:
        """A `webhook.test` event for this endpoint only, queued; its delivery id."""
        now = time.time()
        with self.database.transaction() as session:
            row = self._webhook(session, name)
            self._require_enabled(row)
            event = events.CloudEvent(
                id=events.uuid7(),
                source=f"/mlmesh/{SERVICE}",
                type=events.type_of(TEST_KIND),
                subject=f"webhooks/{row.id}",
                time=datetime.fromtimestamp(now).astimezone().isoformat(),
                data={"webhook_id": row.id, "message": "a test event from mlmesh: this endpoint receives events"},
            )
            session.add(EventRow(id=event.id, kind=TEST_KIND, time=now, body=event.to_json(), received_at=now))
            return self._queue(session, row.id, event.id, TEST_KIND, "test", now)

    def _queue(self, session: Session, webhook_id: str, event_id: str, kind: str, origin: str, now: float) -> str:
        generation = 0
        if origin != "event":
            generation = 1 + (
                session.exec(
                    select(func.max(DeliveryRow.generation)).where(
                        DeliveryRow.webhook_id == webhook_id, DeliveryRow.event_id == event_id
                    )
                ).one()
                or 0
            )
        delivery = DeliveryRow(**new_delivery(str(uuid.uuid4()), webhook_id, event_id, kind, origin, generation, now))
        session.add(delivery)
        return delivery.id

    # ------------------------------------------------------------ attempts

    def due(self, since: float, now: float, limit: int = 1000, retries_only: bool = False) -> list[Outgoing]:
        """What to send for pending deliveries that fell due in (since, now], oldest first (one
        query); `retries_only` leaves out those never attempted."""
        with self.database.session() as session:
            query = (
                select(DeliveryRow, WebhookRow, EventRow)
                .join(WebhookRow, col(WebhookRow.id) == col(DeliveryRow.webhook_id))
                .join(EventRow, col(EventRow.id) == col(DeliveryRow.event_id))
                .where(
                    DeliveryRow.status == PENDING,
                    col(DeliveryRow.next_attempt_at) > since,
                    col(DeliveryRow.next_attempt_at) <= now,
                    col(WebhookRow.enabled),
                )
            )
            if retries_only:
                query = query.where(col(DeliveryRow.attempts) > 0)
            rows = session.exec(query.order_by(col(DeliveryRow.next_attempt_at)).limit(limit)).all()
            return [
                Outgoing(
                    delivery.id,
                    webhook.id,
                    webhook.url,
                    event.id,
                    event.body,
                    signing_keys(webhook, now),
                    delivery.next_attempt_at or now,
                )
                for delivery, webhook, event in rows
            ]

    def outgoing(self, delivery_id: str, now: float) -> Outgoing | None:
        """What to send for a pending delivery of an enabled endpoint (None otherwise)."""
        with self.database.session() as session:
            delivery = session.get(DeliveryRow, delivery_id)
            if delivery is None or delivery.status != PENDING:
                return None
            webhook = session.get(WebhookRow, delivery.webhook_id)
            event = session.get(EventRow, delivery.event_id)
            if webhook is None or event is None or not webhook.enabled:
                return None
            return Outgoing(delivery.id, webhook.id, webhook.url, event.id, event.body, signing_keys(webhook, now))

    def record(self, attempts: list[tuple[str, Outcome, float]]) -> list[Verdict]:
        """Log attempts (delivery id, outcome, when) and move each delivery on, all in one
        transaction; a verdict that disables an endpoint also fails its other pending deliveries
        and emits `webhook.disabled`. Every attempt passes here: SQL directly, not ORM objects."""
        verdicts, logged, moved, disabled = [], [], [], []
        with self.database.transaction() as session:
            connection = session.connection()
            ids = [delivery_id for delivery_id, _, _ in attempts]
            columns = (DELIVERIES.c.status, DELIVERIES.c.attempts, DELIVERIES.c.webhook_id, DELIVERIES.c.event_id)
            query = sql.select(DELIVERIES.c.id, *columns).where(DELIVERIES.c.id.in_(ids))
            found = {row[0]: _Tracked(*row[1:]) for row in connection.execute(query)}
            for delivery_id, outcome, now in attempts:
                delivery = found.get(delivery_id)
                if delivery is None or delivery.status != PENDING:
                    verdicts.append(Verdict(delivery.status if delivery else FAILED))
                    continue
                delivery.attempts += 1
                logged.append(
                    {
                        "delivery_id": delivery_id,
                        "attempted_at": now,
                        "status_code": outcome.status_code,
                        "latency_ms": round(outcome.latency_ms, 3),
                        "response_snippet": outcome.response_snippet[:SNIPPET],
                        "error": outcome.error[:SNIPPET],
                    }
                )
                verdict = judge(outcome, delivery.attempts, self.schedule, now)
                delivery.status = verdict.status
                moved.append(
                    {
                        "delivery": delivery_id,
                        "attempts": delivery.attempts,
                        "status": verdict.status,
                        "next_attempt_at": verdict.next_attempt_at,
                        "delivered_at": now if verdict.status == DELIVERED else None,
                    }
                )
                if verdict.disabled:
                    disabled.append((delivery.webhook_id, verdict.disabled, delivery.event_id))
                verdicts.append(verdict)
            if logged:
                connection.execute(sql.insert(ATTEMPTS), logged)
                connection.execute(MOVE_DELIVERY, moved)
            for webhook_id, reason, event_id in disabled:
                self._disable(session, webhook_id, reason, event_id)
        return verdicts

    def _disable(self, session: Session, webhook_id: str, reason: str, event_id: str) -> None:
        webhook = session.get(WebhookRow, webhook_id)
        if webhook is None or not webhook.enabled:
            return
        webhook.enabled = False
        webhook.disabled_reason = reason
        webhook.updated_at = time.time()
        session.add(webhook)
        fail_pending(session, webhook_id)
        payload = events.WebhookDisabled(
            webhook_id=webhook_id, url=shown_url(webhook.url), reason=reason, event_id=event_id
        )
        self.outbox.add(session, events.make_event(SERVICE, payload, f"webhooks/{webhook_id}"))

    # ------------------------------------------------------------ reading

    def deliveries(
        self, name: str, event_id: str, status: str, page_size: int, page_token: str
    ) -> tuple[list[DeliveryView], str]:
        size, offset = paging.page_size(page_size), paging.decode(page_token)
        with self.database.session() as session:
            webhook = self._webhook(session, name)
            query = select(DeliveryRow).where(DeliveryRow.webhook_id == webhook.id)
            if event_id:
                query = query.where(DeliveryRow.event_id == event_id[:100])
            if status:
                query = query.where(DeliveryRow.status == status)
            rows = session.exec(
                query.order_by(col(DeliveryRow.created_at).desc(), col(DeliveryRow.id)).offset(offset).limit(size + 1)
            ).all()
            views = []
            for row in rows[:size]:
                attempts = session.exec(
                    select(AttemptRow).where(AttemptRow.delivery_id == row.id).order_by(col(AttemptRow.id))
                ).all()
                views.append(delivery_view(row, attempts))
        return views, paging.encode(offset + size) if len(rows) > size else ""

    def delivery(self, delivery_id: str) -> DeliveryView:
        with self.database.session() as session:
            row = session.get(DeliveryRow, delivery_id)
            if row is None:
                raise NotFound(f"no delivery {delivery_id[:100]!r}")
            attempts = session.exec(
                select(AttemptRow).where(AttemptRow.delivery_id == row.id).order_by(col(AttemptRow.id))
            ).all()
            return delivery_view(row, attempts)

    def prune(self, now: float) -> int:
        """Forget events (and their finished deliveries) older than the retention; how many events."""
        cutoff = now - self.retention_seconds
        with self.database.transaction() as session:
            old = select(EventRow.id).where(col(EventRow.received_at) < cutoff)
            finished = select(DeliveryRow.id).where(col(DeliveryRow.event_id).in_(old), DeliveryRow.status != PENDING)
            session.exec(delete(AttemptRow).where(col(AttemptRow.delivery_id).in_(finished)))  # type: ignore[call-overload]
            session.exec(
                delete(DeliveryRow).where(col(DeliveryRow.event_id).in_(old), col(DeliveryRow.status) != PENDING)  # type: ignore[call-overload]
            )
            pending = select(DeliveryRow.event_id).where(DeliveryRow.status == PENDING)
            result = session.exec(
                delete(EventRow).where(col(EventRow.received_at) < cutoff, col(EventRow.id).not_in(pending))  # type: ignore[call-overload]
            )
            return result.rowcount or 0

    @staticmethod
    def _webhook(session: Session, name: str) -> WebhookRow:
        webhook_id = name.removeprefix("webhooks/")
        row = session.get(WebhookRow, webhook_id) if 0 < len(webhook_id) <= 100 else None
        if row is None:
            raise NotFound(f"no webhook {name[:100]!r}; `mlmesh webhooks list` shows them", field="name")
        return row

    @staticmethod
    def _require_enabled(row: WebhookRow) -> None:
        if not row.enabled:
            raise FailedPrecondition(
                f"webhook {row.id} is disabled ({row.disabled_reason}); enable it first (mlmesh webhooks enable)",
                field="name",
            )


def fail_pending(session: Session, webhook_id: str) -> None:
    """Give up the pending deliveries of an endpoint being disabled (a replay sends them again)."""
    session.connection().execute(
        sql.update(DELIVERIES)
        .where(DELIVERIES.c.webhook_id == webhook_id, DELIVERIES.c.status == PENDING)
        .values(status=FAILED, next_attempt_at=None)
    )


def new_delivery(
    delivery_id: str, webhook_id: str, event_id: str, kind: str, origin: str, generation: int, now: float
) -> dict[str, object]:
    """The columns of a delivery just queued, due at once."""
    return {
        "id": delivery_id,
        "webhook_id": webhook_id,
        "event_id": event_id,
        "event_kind": kind,
        "origin": origin,
        "generation": generation,
        "status": PENDING,
        "attempts": 0,
        "next_attempt_at": now,
        "created_at": now,
        "delivered_at": None,
    }


def signing_keys(webhook: WebhookRow, now: float) -> tuple[str, ...]:
    """The secrets that sign: the current one, and the previous one while its rotation lasts."""
    if webhook.previous_secret and (webhook.previous_secret_expires_at or 0) > now:
        return (webhook.secret, webhook.previous_secret)
    return (webhook.secret,)


def check_description(description: str) -> None:
    if len(description) > MAX_DESCRIPTION:
        raise InvalidArgument(f"description is longer than {MAX_DESCRIPTION} characters", field="description")


def event_time(event: events.CloudEvent, default: float) -> float:
    try:
        return datetime.fromisoformat(event.time.replace("Z", "+00:00")).timestamp()
    except ValueError:
        return default


def webhook_view(row: WebhookRow) -> WebhookView:
    return WebhookView(
        id=row.id,
        url=row.url,
        events=json.loads(row.events),
        description=row.description,
        enabled=row.enabled,
        disabled_reason=row.disabled_reason,
        created_at=row.created_at,
        updated_at=row.updated_at,
        previous_secret_expires_at=row.previous_secret_expires_at,
    )


def delivery_view(row: DeliveryRow, attempts: list[AttemptRow] | tuple[AttemptRow, ...]) -> DeliveryView:
    return DeliveryView(
        id=row.id,
        webhook_id=row.webhook_id,
        event_id=row.event_id,
        event_kind=row.event_kind,
        status=row.status,
        origin=row.origin,
        attempts=row.attempts,
        next_attempt_at=row.next_attempt_at,
        created_at=row.created_at,
        delivered_at=row.delivered_at,
        attempt_log=[
            AttemptView(a.attempted_at, a.status_code, a.latency_ms, a.response_snippet, a.error) for a in attempts
        ],
    )

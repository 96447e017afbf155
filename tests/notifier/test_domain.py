"""Signatures, the retry rules and the SSRF guard, on their own."""

from __future__ import annotations

import time

import pytest
from sqlmodel import select
from standardwebhooks import Webhook, WebhookVerificationError

from services.common import events
from services.common.db import Database
from services.common.errors import InvalidArgument
from services.common.outbox import Outbox, OutboxEvent
from services.notifier.delivery import GuardedResolver, RefusedDestination, literal_problem, sign
from services.notifier.domain import (
    DELIVERED,
    FAILED,
    PENDING,
    Outcome,
    Webhooks,
    address_problem,
    check_patterns,
    judge,
    matches,
    new_secret,
    retry_after,
    shown_url,
)
from services.notifier.models import TABLES, create_tables

SCHEDULE = (0.0, 5.0, 300.0)


def test_signatures_verify_with_the_reference_library_for_every_secret() -> None:
    old, new = new_secret(), new_secret()
    body, now = b'{"id":"e1","data":{}}', int(time.time())
    header = sign((new, old), "e1", now, body)
    assert len(header.split(" ")) == 2 and all(part.startswith("v1,") for part in header.split(" "))
    headers = {"webhook-id": "e1", "webhook-timestamp": str(now), "webhook-signature": header}
    for secret in (new, old):
        assert Webhook(secret).verify(body, headers) == {"id": "e1", "data": {}}
    with pytest.raises(WebhookVerificationError):
        Webhook(new_secret()).verify(body, headers)


def test_what_follows_an_attempt() -> None:
    now = 1000.0
    assert judge(Outcome(204, 1), 1, SCHEDULE, now).status == DELIVERED
    gone = judge(Outcome(410, 1), 1, SCHEDULE, now)
    assert gone.status == FAILED and gone.disabled == "it answered 410 Gone"
    retry = judge(Outcome(500, 1), 1, SCHEDULE, now)
    assert retry.status == PENDING and 1005 <= retry.next_attempt_at <= 1005.5 and not retry.disabled
    redirect = judge(Outcome(302, 1), 2, SCHEDULE, now)
    assert redirect.status == PENDING and 1300 <= redirect.next_attempt_at <= 1330
    throttled = judge(Outcome(429, 1, retry_after_seconds=60), 1, SCHEDULE, now)
    assert throttled.next_attempt_at >= 1060 and throttled.pause_until == 1060
    last = judge(Outcome(0, 1, error="cannot connect"), 3, SCHEDULE, now)
    assert last.status == FAILED and last.disabled == "every one of 3 attempts failed (the last: cannot connect)"


def test_retry_after_takes_seconds_or_a_date_and_caps_a_day() -> None:
    assert retry_after("30", 0) == 30
    assert retry_after("9999999", 0) == 86400
    assert retry_after(None, 0) is None and retry_after("soon", 0) is None
    moment = time.time()
    date = time.strftime("%a, %d %b %Y %H:%M:%S GMT", time.gmtime(moment + 120))
    assert 115 <= retry_after(date, moment) <= 121


@pytest.mark.parametrize(
    ("address", "refused"),
    [
        ("10.0.0.1", True),
        ("172.16.5.4", True),
        ("192.168.1.1", True),
        ("127.0.0.1", True),
        ("169.254.169.254", True),
        ("::1", True),
        ("fe80::1", True),
        ("::ffff:10.0.0.1", True),
        ("0.0.0.0", True),
        ("224.0.0.1", True),
        ("93.184.216.34", False),
        ("2606:4700::1111", False),
    ],
)
def test_internal_addresses_are_refused_unless_allowed(address: str, refused: bool) -> None:
    assert bool(address_problem(address, ())) is refused
    assert address_problem(address, (address,)) == ""
    assert address_problem("10.1.2.3", ("10.0.0.0/8",)) == ""


async def test_the_resolver_checks_the_addresses_it_connects_to() -> None:
    with pytest.raises(RefusedDestination) as refused:
        await GuardedResolver(()).resolve("localhost", 80)
    assert "private, loopback or link-local" in str(refused.value)
    assert await GuardedResolver(("localhost",)).resolve("localhost", 80)
    assert literal_problem("http://127.0.0.1:8080/x", ()) and not literal_problem("http://127.0.0.1/x", ("127.0.0.1",))
    assert literal_problem("http://example.com/x", ()) == ""  # names go through the resolver


def test_patterns_and_urls() -> None:
    assert matches(["model.*"], "model.alias.set") and not matches(["model.*"], "deployment.ready")
    assert matches(["*"], "drift.detected") and matches(["deployment.read?"], "deployment.ready")
    assert check_patterns(["b.*", "a.*", "a.*"]) == ["a.*", "b.*"]
    with pytest.raises(InvalidArgument):
        check_patterns(["model.*", "DROP TABLE"])
    assert shown_url("https://h.example/p?token=secret#x") == "https://h.example/p"


def test_events_queue_deliveries_once_and_attempts_move_them_on(database_url: str) -> None:
    """The paths every event and attempt take, on SQLite and PostgreSQL: an event kept once, a
    delivery per matching endpoint, attempts logged, 410 disabling the endpoint with its event."""
    database = Database(database_url, TABLES)
    create_tables(database)
    webhooks = Webhooks(
        database,
        Outbox(),
        allowed_hosts=("127.0.0.1",),
        schedule=SCHEDULE,
        rotation_seconds=3600,
        retention_seconds=3600,
        max_webhooks=10,
    )
    try:
        models, _ = webhooks.create("http://127.0.0.1:9/models", ["model.*"], "")
        gone, _ = webhooks.create("http://127.0.0.1:9/gone", ["*"], "")
        webhooks.create("http://127.0.0.1:9/drift", ["drift.*"], "")
        event = events.make_event("test", events.WebhookDisabled(webhook_id="w", url="u", reason="r"), "s")
        event = event.model_copy(update={"type": "io.mlmesh.model.registered.v1"})
        first = webhooks.take_event(event, event.to_json())
        assert sorted(outgoing.url for outgoing in first) == ["http://127.0.0.1:9/gone", "http://127.0.0.1:9/models"]
        assert webhooks.take_event(event, event.to_json()) == []  # delivered again by the stream: nothing new
        by_url = {outgoing.url: outgoing for outgoing in first}
        now = time.time()
        verdicts = webhooks.record(
            [
                (by_url["http://127.0.0.1:9/models"].delivery_id, Outcome(204, 1.5), now),
                (by_url["http://127.0.0.1:9/gone"].delivery_id, Outcome(410, 2.0, "gone"), now),
                ("no-such-delivery", Outcome(200, 1.0), now),
            ]
        )
        assert [verdict.status for verdict in verdicts] == [DELIVERED, FAILED, FAILED]
        assert verdicts[1].disabled
        (delivered,) = webhooks.deliveries(models.id, "", "", 10, "")[0]
        assert delivered.status == DELIVERED and delivered.attempts == 1 and delivered.delivered_at == now
        assert [(attempt.status_code, attempt.latency_ms) for attempt in delivered.attempt_log] == [(204, 1.5)]
        assert not webhooks.get(gone.id).enabled
        with database.session() as session:
            kinds = [row.subject for row in session.exec(select(OutboxEvent)).all()]
        assert kinds == ["mlmesh.events.webhook.disabled"]
        # An attempt recorded again (after a failed commit, say) changes nothing.
        again = webhooks.record([(by_url["http://127.0.0.1:9/models"].delivery_id, Outcome(500, 1.0), now)])
        assert again[0].status == DELIVERED
    finally:
        database.dispose()

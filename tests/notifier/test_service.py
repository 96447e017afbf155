"""The notifier as a real process beside a real registry and NATS, delivering real lifecycle
events to real HTTP receivers on 127.0.0.1 that verify every signature with the
`standardwebhooks` package."""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import grpc
import pytest
from typer.testing import CliRunner

from services._proto.mlmesh.v1 import notifier_pb2, notifier_pb2_grpc
from services.cli import app
from services.client import MeshError, NotifierClient, RegistryClient
from services.common import natsserver
from tests.conftest import RegistryProcess, start_service, stop_process, stream_events, wait_until
from tests.notifier.receiver import Answer, Receiver, serving

SERVICE = "mlmesh.v1.NotifierService"
SCHEDULE = ",".join(["0"] + ["0.2"] * 9)  # ten attempts, 0.2 s apart (plus jitter)
runner = CliRunner()


@dataclass
class NotifierProcess:
    address: str
    home: Path
    log: Path

    def client(self) -> NotifierClient:
        return NotifierClient(self.address)


@pytest.fixture(scope="module")
def notifier(registry_process: RegistryProcess, tmp_path_factory: pytest.TempPathFactory) -> Iterator[NotifierProcess]:
    home = tmp_path_factory.mktemp("notifier")
    options = {
        "retry_schedule": SCHEDULE,
        "allowed_hosts": "127.0.0.1",
        "scan_seconds": "0.2",
        "timeout_seconds": "2",
    }
    # The most a log says: a secret must not reach even the debug lines.
    started = start_service("notifier", home, registry_process.nats_url, options, log_level="DEBUG")
    process = started.process
    try:
        yield NotifierProcess(started.address, home, home / "notifier.log")
    finally:
        stop_process(process)


def assert_not_logged(notifier: NotifierProcess, secret: str) -> None:
    """Neither the secret nor its key (the part after `whsec_`) is in the notifier's log, which
    it writes at DEBUG."""
    logged = notifier.log.read_text()
    assert "DEBUG" in logged
    assert secret.removeprefix("whsec_") not in logged


def register(registry: RegistryProcess, name: str, directory: Path, count: int = 1) -> None:
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "model.bin").write_bytes(b"weights")
    with RegistryClient(registry.address) as client:
        for _ in range(count):
            client.register_model(name, [directory / "model.bin"])


def test_a_receiver_down_then_failing_then_up_gets_every_event_once(
    notifier: NotifierProcess, registry_process: RegistryProcess, tmp_path: Path
) -> None:
    port = natsserver.free_port()  # nothing listens there yet: connections are refused
    with notifier.client() as client:
        created = client.create(f"http://127.0.0.1:{port}/hook", ["model.registered"], "down, then flaky")
        assert created.secret.startswith("whsec_") and created.webhook.enabled
        register(registry_process, "flaky-model", tmp_path, count=3)
        wait_until(
            lambda: any(d.attempts >= 2 for d in client.deliveries(created.webhook.id)),
            timeout=20,
            what="refused attempts",
        )
        receiver = Receiver([created.secret], script=[Answer(500), Answer(500)])
        with serving(receiver, port):
            receiver.received.wait_for(3)
            time.sleep(0.5)  # anything late would arrive now
        deliveries = client.deliveries(created.webhook.id)
    received = receiver.received
    assert received.unverified == 0 and received.duplicates == 0
    assert {event["data"]["name"] for event in received.processed.values()} == {"flaky-model"}
    assert sorted(event["data"]["version"] for event in received.processed.values()) == [1, 2, 3]
    assert all(event["type"] == "io.mlmesh.model.registered.v1" for event in received.processed.values())
    # webhook-id is the CloudEvent id, and the body is the CloudEvent itself.
    assert set(received.processed) == {event["id"] for event in received.processed.values()}
    assert len(deliveries) == 3 and {d.status for d in deliveries} == {notifier_pb2.DELIVERY_STATUS_DELIVERED}
    logged = [attempt for delivery in deliveries for attempt in delivery.attempt_log]
    assert any(attempt.status_code == 0 and "connect" in attempt.error for attempt in logged)
    assert sum(attempt.status_code == 500 for attempt in logged) == 2
    assert sum(attempt.status_code == 200 for attempt in logged) == 3
    assert all(attempt.latency_ms >= 0 for attempt in logged) and any(a.response_snippet == "ok" for a in logged)
    assert_not_logged(notifier, created.secret)


def test_a_rotated_secret_signs_beside_the_old_one(
    notifier: NotifierProcess, registry_process: RegistryProcess, tmp_path: Path
) -> None:
    receiver = Receiver([])
    with serving(receiver) as url, notifier.client() as client:
        created = client.create(url, ["model.*"])
        rotated = client.rotate(created.webhook.id)
        assert rotated.secret != created.secret and rotated.webhook.HasField("previous_secret_expires_at")
        receiver.secrets = [rotated.secret]
        register(registry_process, "rotated-model", tmp_path)
        receiver.received.wait_for(1)
        signatures = receiver.received.requests[-1]["headers"]["webhook-signature"].split(" ")
        assert len(signatures) == 2  # new and old
        receiver.secrets = [created.secret]  # a receiver still on the old secret verifies too
        assert client.test(created.webhook.id).status == notifier_pb2.DELIVERY_STATUS_DELIVERED
        assert receiver.received.unverified == 0 and len(receiver.received.processed) == 2
        test_event = list(receiver.received.processed.values())[-1]
        assert test_event["type"] == "io.mlmesh.webhook.test.v1"
        client.delete(created.webhook.id)
    assert_not_logged(notifier, created.secret)
    assert_not_logged(notifier, rotated.secret)


def test_410_disables_the_endpoint_and_says_so_with_an_event(
    notifier: NotifierProcess, registry_process: RegistryProcess, tmp_path: Path
) -> None:
    receiver = Receiver([], then=Answer(410, body="gone"))
    with serving(receiver) as url, notifier.client() as client:
        created = client.create(url + "?token=hidden", ["model.registered"])
        receiver.secrets = [created.secret]
        register(registry_process, "gone-model", tmp_path)
        wait_until(lambda: not client.get(created.webhook.id).enabled, what="the endpoint disabled", timeout=20)
        webhook = client.get(created.webhook.id)
        assert webhook.disabled_reason == "it answered 410 Gone"
        assert len(receiver.received.requests) == 1  # not retried
        (delivery,) = client.deliveries(created.webhook.id)
        assert delivery.status == notifier_pb2.DELIVERY_STATUS_FAILED and delivery.attempt_log[0].status_code == 410
        with pytest.raises(MeshError) as disabled:
            client.test(created.webhook.id)
        assert disabled.value.code == "FAILED_PRECONDITION" and "enable it" in disabled.value.message
    wait_until(
        lambda: any(
            event.data["webhook_id"] == created.webhook.id
            for event in stream_events(registry_process.nats_url, "mlmesh.events.webhook.disabled")
        ),
        timeout=20,
        what="webhook.disabled",
    )
    (event,) = [
        event
        for event in stream_events(registry_process.nats_url, "mlmesh.events.webhook.disabled")
        if event.data["webhook_id"] == created.webhook.id
    ]
    assert event.data["reason"] == "it answered 410 Gone" and "token" not in event.data["url"]


def test_failing_past_the_last_retry_disables_and_redirects_are_not_followed(
    notifier: NotifierProcess, registry_process: RegistryProcess, tmp_path: Path
) -> None:
    target = Receiver([])
    redirecting = Receiver([])
    with serving(target) as target_url, serving(redirecting) as url, notifier.client() as client:
        redirecting.then = Answer(302, headers={"Location": target_url})
        created = client.create(url, ["model.registered"])
        register(registry_process, "redirected-model", tmp_path)
        wait_until(lambda: not client.get(created.webhook.id).enabled, timeout=30, what="retries exhausted")
        webhook = client.get(created.webhook.id)
        assert webhook.disabled_reason.startswith("every one of 10 attempts failed (the last: HTTP 302")
        assert len(redirecting.received.requests) == 10 and target.received.requests == []
        (delivery,) = client.deliveries(created.webhook.id)
        assert "redirects are not followed" in delivery.attempt_log[0].error
        # Enabled again by hand, the event can be delivered again (same webhook-id).
        client.update(created.webhook.id, enabled=True, url=target_url)
        target.secrets = [created.secret]
        again = client.redeliver(created.webhook.id, delivery.event_id)
        assert again.origin == "redeliver"
        target.received.wait_for(1)
        assert set(target.received.processed) == {delivery.event_id}


def test_a_dead_receiver_does_not_delay_the_others_and_429_throttles(
    notifier: NotifierProcess, registry_process: RegistryProcess, tmp_path: Path
) -> None:
    slow = Receiver([], then=Answer(200, delay=5))
    fast = Receiver([])
    throttling = Receiver([], script=[Answer(429, headers={"Retry-After": "1"})])
    with serving(slow) as slow_url, serving(fast) as fast_url, serving(throttling) as throttled_url:
        with notifier.client() as client:
            hanging = client.create(slow_url, ["model.registered"])
            quick = client.create(fast_url, ["model.registered"])
            throttled = client.create(throttled_url, ["model.registered"])
            fast.secrets, slow.secrets, throttling.secrets = [quick.secret], [hanging.secret], [throttled.secret]
            register(registry_process, "busy-model", tmp_path, count=10)
            registered = time.time()
            fast.received.wait_for(10, timeout=10)
            # The hanging receiver (5 s an answer, 4 in flight) held up nothing: its first answer
            # has not even come when the fast one has all ten.
            assert max(request["at"] for request in fast.received.requests) - registered < 3
            assert len(slow.received.requests) <= 8
            throttling.received.wait_for(10, timeout=20)
            (throttled_delivery,) = [
                delivery for delivery in client.deliveries(throttled.webhook.id) if delivery.attempts == 2
            ]
            first, second = throttled_delivery.attempt_log
            assert first.status_code == 429 and second.status_code == 200
            assert second.attempted_at.ToNanoseconds() - first.attempted_at.ToNanoseconds() >= 0.9e9  # Retry-After
            for webhook in (hanging, quick, throttled):
                client.delete(webhook.webhook.id)


def test_replay_delivers_a_time_range_again(
    notifier: NotifierProcess, registry_process: RegistryProcess, tmp_path: Path
) -> None:
    receiver = Receiver([])
    with serving(receiver) as url, notifier.client() as client:
        created = client.create(url, ["model.registered"])
        receiver.secrets = [created.secret]
        start = time.time()
        register(registry_process, "replayed-model", tmp_path, count=2)
        receiver.received.wait_for(2)
        queued = client.replay(created.webhook.id, start, time.time() + 1)
        assert queued == 2
        wait_until(lambda: receiver.received.duplicates == 2, what="the replayed events", timeout=20)
        origins = sorted(d.origin for d in client.deliveries(created.webhook.id))
        assert origins == ["event", "event", "replay", "replay"]
        client.delete(created.webhook.id)


@pytest.mark.parametrize(
    ("url", "words"),
    [
        ("http://10.1.2.3/hook", "private"),
        ("http://169.254.169.254/latest/meta-data", "private, loopback or link-local"),
        ("http://192.168.0.10:8080/x", "MLMESH_NOTIFIER_ALLOWED_HOSTS"),
        ("http://[::1]/hook", "private"),
        ("http://[::ffff:10.0.0.1]/hook", "private"),
        ("ftp://example.com/x", "http:// or https://"),
        ("http://user:pw@example.com/x", "user name or password"),
        ("not a url", "http:// or https://"),
        ("http://x" * 1000, "1 to 2000"),
        ("http://no-such-host.invalid/x", "does not resolve"),
    ],
)
def test_dangerous_and_malformed_urls_are_refused(notifier: NotifierProcess, url: str, words: str) -> None:
    with notifier.client() as client:
        before = len(client.list())
        with pytest.raises(MeshError) as refused:
            client.create(url, ["*"])
        assert refused.value.code == "INVALID_ARGUMENT" and words in refused.value.message
        assert len(client.list()) == before


def test_bad_requests_get_clear_errors_and_change_nothing(notifier: NotifierProcess, tmp_path: Path) -> None:
    with notifier.client() as client:
        created = client.create("http://127.0.0.1:9/hook", ["deployment.*"])
        webhook_id = created.webhook.id
        for call, code, words in [
            (lambda: client.create("http://127.0.0.1:9/x", []), "INVALID_ARGUMENT", "at least one pattern"),
            (lambda: client.create("http://127.0.0.1:9/x", ["Model.*"]), "INVALID_ARGUMENT", "lowercase"),
            (lambda: client.create("http://127.0.0.1:9/x", ["a"] * 100), "INVALID_ARGUMENT", "at most 50"),
            (lambda: client.create("http://127.0.0.1:9/x", ["*"], "d" * 5000), "INVALID_ARGUMENT", "description"),
            (lambda: client.get("nope"), "NOT_FOUND", "webhooks list"),
            (lambda: client.get("x" * 10_000), "NOT_FOUND", "no webhook"),
            (lambda: client.update("nope", enabled=True), "NOT_FOUND", "no webhook"),
            (lambda: client.update(webhook_id, url="http://10.0.0.1/"), "INVALID_ARGUMENT", "private"),
            (lambda: client.update(webhook_id, events=["bad pattern"]), "INVALID_ARGUMENT", "pattern"),
            (lambda: client.delete("nope"), "NOT_FOUND", "no webhook"),
            (lambda: client.rotate("nope"), "NOT_FOUND", "no webhook"),
            (lambda: client.test("nope"), "NOT_FOUND", "no webhook"),
            (lambda: client.deliveries("nope"), "NOT_FOUND", "no webhook"),
            (lambda: client.redeliver(webhook_id, "no-such-event"), "NOT_FOUND", "no event"),
            (lambda: client.redeliver(webhook_id, ""), "NOT_FOUND", "no event"),
            (lambda: client.replay(webhook_id, 200.0, 100.0), "INVALID_ARGUMENT", "end after the start"),
        ]:
            with pytest.raises(MeshError) as refused:
                call()
            assert refused.value.code == code and words in refused.value.message, (words, refused.value)
        with grpc.insecure_channel(notifier.address) as channel:
            stub = notifier_pb2_grpc.NotifierServiceStub(channel)
            for method, request in [
                (stub.ListWebhooks, notifier_pb2.ListWebhooksRequest(page_token="garbage")),
                (stub.ListWebhooks, notifier_pb2.ListWebhooksRequest(page_size=-5)),
                (stub.ListDeliveries, notifier_pb2.ListDeliveriesRequest(name=webhook_id, page_token="garbage")),
                (stub.ReplayEvents, notifier_pb2.ReplayEventsRequest(name=webhook_id)),
            ]:
                with pytest.raises(grpc.RpcError) as bad:
                    method(request)
                assert bad.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        webhook = client.get(webhook_id)
        assert webhook.url == "http://127.0.0.1:9/hook" and list(webhook.events) == ["deployment.*"]
        client.delete(webhook_id)
        with pytest.raises(MeshError):
            client.get(webhook_id)


def test_the_cli_adds_tests_lists_rotates_and_removes(
    notifier: NotifierProcess, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("MLMESH_NOTIFIER_ADDRESS", notifier.address)
    receiver = Receiver([])
    with serving(receiver) as url:
        added = runner.invoke(app, ["webhooks", "add", url, "--events", "model.*, deployment.ready", "--json"])
        assert added.exit_code == 0, added.output
        created = json.loads(added.stdout)
        assert created["secret"].startswith("whsec_") and created["webhook"]["events"] == [
            "deployment.ready",
            "model.*",
        ]
        receiver.secrets = [created["secret"]]
        tested = runner.invoke(app, ["webhooks", "test", created["id"]])
        assert tested.exit_code == 0 and "delivered" in tested.output and "HTTP 200" in tested.output
        listed = json.loads(runner.invoke(app, ["webhooks", "list", "--json"]).stdout)
        assert created["id"] in [webhook["id"] for webhook in listed]
        deliveries = json.loads(runner.invoke(app, ["webhooks", "deliveries", created["id"], "--json"]).stdout)
        assert [delivery["status"] for delivery in deliveries] == ["delivered"]
        assert deliveries[0]["attempt_log"][0]["status_code"] == 200
        rotated = json.loads(runner.invoke(app, ["webhooks", "rotate", created["id"], "--json"]).stdout)
        assert rotated["secret"] != created["secret"]
        disabled = runner.invoke(app, ["webhooks", "update", created["id"], "--disable"])
        assert disabled.exit_code == 0 and "disabled by hand" in disabled.output
        refused = runner.invoke(app, ["webhooks", "test", created["id"]])
        assert refused.exit_code == 1 and "enable it" in refused.output
        bad = runner.invoke(app, ["webhooks", "deliveries", created["id"], "--status", "lost"])
        assert bad.exit_code == 2 and "pending, delivered or failed" in bad.output
        removed = runner.invoke(app, ["webhooks", "rm", created["id"]])
        assert removed.exit_code == 0
        assert runner.invoke(app, ["webhooks", "show", created["id"]]).exit_code == 1

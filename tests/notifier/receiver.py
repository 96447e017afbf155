"""A real webhook receiver on 127.0.0.1 for the notifier's tests: an HTTP server in a thread that
answers from a script, verifies every request with the `standardwebhooks` package, and processes
each webhook-id once, as a receiver should."""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

from standardwebhooks import Webhook, WebhookVerificationError


@dataclass
class Answer:
    status: int = 200
    delay: float = 0.0
    headers: dict[str, str] = field(default_factory=dict)
    body: str = "ok"


@dataclass
class Received:
    """Every request, and the events processed (the first arrival of each webhook-id)."""

    requests: list[dict] = field(default_factory=list)
    processed: dict[str, dict] = field(default_factory=dict)
    duplicates: int = 0
    unverified: int = 0
    lock: threading.Lock = field(default_factory=threading.Lock)

    def wait_for(self, count: int, timeout: float = 20) -> None:
        deadline = time.monotonic() + timeout
        while len(self.processed) < count:
            assert time.monotonic() < deadline, f"{len(self.processed)} of {count} events arrived: {self.requests[-3:]}"
            time.sleep(0.02)


class Receiver:
    """Answers with `script` in order, then with `then` for every later request."""

    def __init__(self, secrets: list[str], script: list[Answer] | None = None, then: Answer | None = None) -> None:
        self.secrets = secrets
        self.script = list(script or [])
        self.then = then or Answer()
        self.received = Received()

    def answer(self) -> Answer:
        with self.received.lock:
            return self.script.pop(0) if self.script else self.then

    def handle(self, headers: dict[str, str], body: bytes) -> Answer:
        answer = self.answer()
        verified = False
        for secret in self.secrets:
            try:
                Webhook(secret).verify(body, headers)
                verified = True
                break
            except WebhookVerificationError:
                continue
        with self.received.lock:
            self.received.requests.append(
                {"headers": headers, "status": answer.status, "verified": verified, "at": time.time()}
            )
            if not verified:
                self.received.unverified += 1
            elif 200 <= answer.status < 300:
                event_id = headers["webhook-id"]
                if event_id in self.received.processed:
                    self.received.duplicates += 1
                else:
                    self.received.processed[event_id] = json.loads(body)
        return answer


@contextmanager
def serving(receiver: Receiver, port: int = 0) -> Iterator[str]:
    """Serve `receiver` on 127.0.0.1:`port` (0: a free port); yields the URL."""

    class Handler(BaseHTTPRequestHandler):
        def do_POST(self) -> None:
            body = self.rfile.read(int(self.headers.get("content-length", 0)))
            answer = receiver.handle({key.lower(): value for key, value in self.headers.items()}, body)
            if answer.delay:
                time.sleep(answer.delay)
            payload = answer.body.encode()
            try:
                self.send_response(answer.status)
                for key, value in answer.headers.items():
                    self.send_header(key, value)
                self.send_header("content-length", str(len(payload)))
                self.end_headers()
                self.wfile.write(payload)
            except (BrokenPipeError, ConnectionResetError):
                pass  # the notifier gave up waiting

        def log_message(self, *arguments: object) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", port), Handler)
    server.daemon_threads = True
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}/hook"
    finally:
        server.shutdown()
        server.server_close()

"""Sending deliveries: Standard Webhooks signatures, one queue and its own workers per endpoint
(a slow or dead receiver holds up only its own), retries when they fall due, and a guard that
refuses private destinations at connection time, whatever the name resolves to then.
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import hmac
import ipaddress
import logging
import math
import socket
import time
from importlib import metadata
from typing import Any
from urllib.parse import urlsplit

import aiohttp
from aiohttp.abc import AbstractResolver, ResolveResult

from services.notifier.domain import (
    DELIVERED,
    SNIPPET,
    THROTTLING,
    Outcome,
    Outgoing,
    Verdict,
    Webhooks,
    address_problem,
    retry_after,
)

log = logging.getLogger(__name__)
PRUNE_SECONDS = 3600.0
SCAN_LIMIT = 1000
RECORD_BATCH = 64
DOWN_AFTER = 3
"""Attempts in a row without an answer (refused, timed out) after which an endpoint is held."""
MAX_PROBE_SECONDS = 60.0
SCAN_MARGIN_SECONDS = 1.0


def sign(secrets: tuple[str, ...], message_id: str, timestamp: int, body: bytes) -> str:
    """The `webhook-signature` header: `v1,<base64 HMAC-SHA256>` per secret, space-separated, over
    `{message id}.{timestamp}.{body}` with the secret's decoded bytes as the key."""
    content = f"{message_id}.{timestamp}.".encode() + body
    signatures = []
    for secret in secrets:
        key = base64.b64decode(secret.removeprefix("whsec_"))
        signatures.append("v1," + base64.b64encode(hmac.new(key, content, hashlib.sha256).digest()).decode())
    return " ".join(signatures)


class RefusedDestination(OSError):
    """The destination resolved to an address the SSRF guard refuses."""


class GuardedResolver(AbstractResolver):
    """Resolves as usual, then refuses private, loopback and link-local addresses that are not
    allowed: checked on the addresses actually connected to, so a name that changes what it
    resolves to after the endpoint was created is caught."""

    def __init__(self, allowed_hosts: tuple[str, ...]) -> None:
        self.allowed_hosts = allowed_hosts

    async def resolve(
        self, host: str, port: int = 0, family: socket.AddressFamily = socket.AF_INET
    ) -> list[ResolveResult]:
        infos = await asyncio.get_running_loop().getaddrinfo(host, port, type=socket.SOCK_STREAM, family=family)
        trusted = host.lower() in self.allowed_hosts
        results: list[ResolveResult] = []
        for info_family, _, proto, _, address in infos:
            problem = "" if trusted else address_problem(str(address[0]), self.allowed_hosts)
            if problem:
                raise RefusedDestination(f"{host} resolves to {address[0]}, {problem}")
            results.append(
                ResolveResult(
                    hostname=host, host=str(address[0]), port=address[1], family=info_family, proto=proto, flags=0
                )
            )
        return results

    async def close(self) -> None:
        return None


def literal_problem(url: str, allowed_hosts: tuple[str, ...]) -> str:
    """aiohttp connects to an IP literal without resolving it: check those here."""
    host = (urlsplit(url).hostname or "").strip("[]")
    try:
        ipaddress.ip_address(host.split("%", 1)[0])
    except ValueError:
        return ""
    return "" if host in allowed_hosts else address_problem(host, allowed_hosts)


class Dispatcher:
    """Sends what is due: deliveries queued by new events at once, retries when their time comes.
    Attempts are recorded in batches (one transaction for all that finished meanwhile), so that
    receivers that fail a lot do not hold the database, and so the others, up."""

    def __init__(
        self,
        webhooks: Webhooks,
        *,
        timeout_seconds: float,
        concurrency_per_endpoint: int,
        allowed_hosts: tuple[str, ...],
        scan_seconds: float,
    ) -> None:
        self.webhooks = webhooks
        self.timeout_seconds = timeout_seconds
        self.concurrency = concurrency_per_endpoint
        self.allowed_hosts = allowed_hosts
        self.scan_seconds = scan_seconds
        self.queues: dict[str, asyncio.Queue[Outgoing]] = {}
        self.tasks: list[asyncio.Task[None]] = []
        self.queued: set[str] = set()
        """Deliveries queued, in flight or being recorded, so that a scan does not queue them twice."""
        self.finished: asyncio.Queue[tuple[str, str, Outcome, float, asyncio.Future[Verdict] | None]] = asyncio.Queue()
        self.paused_until: dict[str, float] = {}
        self.unanswered: dict[str, int] = {}
        """Attempts in a row that got no answer, per endpoint."""
        self.rescan = False
        """Set when attempts could not be recorded: the next scan looks at everything pending again."""
        self.session: aiohttp.ClientSession | None = None
        self.user_agent = f"mlmesh-notifier/{_version()}"

    async def run(self) -> None:
        """Until cancelled: record finished attempts; look for due deliveries every `scan_seconds`
        (retries, and what an earlier process left); prune old events every hour."""
        connector = aiohttp.TCPConnector(resolver=GuardedResolver(self.allowed_hosts), limit=0)
        self.session = aiohttp.ClientSession(connector=connector, auto_decompress=False)
        self.tasks.append(asyncio.create_task(self._record()))
        pruned = 0.0
        # The first scan takes everything due (what an earlier process left); later ones only what
        # fell due since, with a margin for transactions that committed late. Deliveries already
        # queued (new events go straight to their queue) are never read again while they wait.
        since = -math.inf
        try:
            while True:
                now = time.time()
                if self.rescan:
                    since, self.rescan = -math.inf, False
                try:
                    # First attempts go to their queue when they are made; after the first scan only
                    # retries need finding.
                    retries_only = since > -math.inf
                    found = await self.webhooks.database.run(self.webhooks.due, since, now, SCAN_LIMIT, retries_only)
                    for outgoing in found:
                        self.submit(outgoing)
                    # A full page leaves the rest for the next scan.
                    since = found[-1].due_at if len(found) == SCAN_LIMIT else now - SCAN_MARGIN_SECONDS
                    if now - pruned > PRUNE_SECONDS:
                        await self.webhooks.database.run(self.webhooks.prune, now)
                        pruned = now
                except Exception:  # a failed scan is retried on the next; it must not stop the loop
                    log.exception("notifier: scanning for due deliveries failed")
                await asyncio.sleep(self.scan_seconds)
        finally:
            for task in self.tasks:
                task.cancel()
            await asyncio.gather(*self.tasks, return_exceptions=True)
            await self.session.close()

    def submit(self, outgoing: Outgoing) -> None:
        """Queue a delivery on its endpoint's queue, unless it is queued already (or the dispatcher
        is not running yet: the next scan finds it)."""
        if outgoing.delivery_id in self.queued or self.session is None:
            return
        self.queued.add(outgoing.delivery_id)
        queue = self.queues.get(outgoing.webhook_id)
        if queue is None:
            queue = self.queues[outgoing.webhook_id] = asyncio.Queue()
            work = (self._work(outgoing.webhook_id, queue) for _ in range(self.concurrency))
            self.tasks.extend(asyncio.create_task(job) for job in work)
        queue.put_nowait(outgoing)

    async def deliver_now(self, delivery_id: str) -> Verdict | None:
        """Attempt a delivery at once, outside its endpoint's queue (a test event); its verdict."""
        self.queued.add(delivery_id)
        outgoing = await self.webhooks.database.run(self.webhooks.outgoing, delivery_id, time.time())
        if outgoing is None:
            self.queued.discard(delivery_id)
            return None
        recorded: asyncio.Future[Verdict] = asyncio.get_running_loop().create_future()
        outcome = await self.send(outgoing)
        self.finished.put_nowait((delivery_id, outgoing.webhook_id, outcome, time.time(), recorded))
        return await recorded

    async def _work(self, webhook_id: str, queue: asyncio.Queue[Outgoing]) -> None:
        while True:
            outgoing = await queue.get()
            delivery_id = outgoing.delivery_id
            try:
                # Held: throttled by the receiver, or not answering. The hold is a deadline that
                # other attempts may move later meanwhile, so it is read again after each wait.
                while (wait := self.paused_until.get(webhook_id, 0.0) - time.time()) > 0:  # noqa: ASYNC110
                    await asyncio.sleep(wait)
                outcome = await self.send(outgoing)
                self._hold_if_down(webhook_id, outcome)
                self.finished.put_nowait((delivery_id, webhook_id, outcome, time.time(), None))
            except Exception:
                log.exception("notifier: delivery %s failed unexpectedly", delivery_id)
                self.queued.discard(delivery_id)

    def drop(self, webhook_id: str) -> None:
        """Forget what waits in an endpoint's queue (it was disabled or deleted); attempts in
        flight finish and are recorded as given up."""
        queue = self.queues.get(webhook_id)
        while queue is not None and not queue.empty():
            self.queued.discard(queue.get_nowait().delivery_id)

    def _hold_if_down(self, webhook_id: str, outcome: Outcome) -> None:
        """Hold an endpoint's next attempts when it throttles (at once, not only once the attempt
        is recorded), and when it stops answering: after a few attempts in a row without an
        answer, one probe at growing intervals, not every queued delivery in turn. Held
        deliveries keep their place and their count of attempts."""
        now = time.time()
        if outcome.status_code in THROTTLING and outcome.retry_after_seconds:
            self.paused_until[webhook_id] = now + outcome.retry_after_seconds
        if outcome.status_code:
            self.unanswered.pop(webhook_id, None)
            return
        misses = self.unanswered[webhook_id] = self.unanswered.get(webhook_id, 0) + 1
        if misses >= DOWN_AFTER:
            wait = min(MAX_PROBE_SECONDS, 2.0 ** (misses - DOWN_AFTER))
            self.paused_until[webhook_id] = max(self.paused_until.get(webhook_id, 0.0), now + wait)

    async def _record(self) -> None:
        """Record finished attempts, as many at a time as have finished, and act on the verdicts."""
        while True:
            batch = [await self.finished.get()]
            # Short transactions: new events wait for the same database writer.
            while not self.finished.empty() and len(batch) < RECORD_BATCH:
                batch.append(self.finished.get_nowait())
            try:
                verdicts = await self.webhooks.database.run_short(
                    self.webhooks.record, [(delivery_id, outcome, at) for delivery_id, _, outcome, at, _ in batch]
                )
            except Exception as error:
                log.exception("notifier: recording %d attempts failed; they will be tried again", len(batch))
                self.rescan = True
                for delivery_id, _, _, _, waiter in batch:
                    self.queued.discard(delivery_id)
                    if waiter is not None and not waiter.done():
                        waiter.set_exception(error)
                continue
            for (delivery_id, webhook_id, outcome, _, waiter), verdict in zip(batch, verdicts, strict=True):
                self.queued.discard(delivery_id)
                self._follow(delivery_id, webhook_id, outcome, verdict)
                if waiter is not None and not waiter.done():
                    waiter.set_result(verdict)

    def _follow(self, delivery_id: str, webhook_id: str, outcome: Outcome, verdict: Verdict) -> None:
        if verdict.disabled:
            self.drop(webhook_id)
        if verdict.pause_until:
            self.paused_until[webhook_id] = verdict.pause_until
        # A retry falls due by its time and the next scan after it finds it (within scan_seconds).
        if verdict.status != DELIVERED:
            log.info(
                "notifier: delivery %s to webhook %s: %s (%s)",
                delivery_id,
                webhook_id,
                verdict.status,
                outcome.error or f"HTTP {outcome.status_code}",
            )

    async def send(self, outgoing: Outgoing) -> Outcome:
        """POST the event with Standard Webhooks headers; redirects are not followed."""
        assert self.session is not None
        started = time.perf_counter()
        problem = literal_problem(outgoing.url, self.allowed_hosts)
        if problem:
            return Outcome(0, 0.0, error=f"refused: {problem}")
        timestamp = int(time.time())
        headers = {
            "content-type": "application/cloudevents+json",
            "user-agent": self.user_agent,
            "webhook-id": outgoing.event_id,
            "webhook-timestamp": str(timestamp),
            "webhook-signature": sign(outgoing.secrets, outgoing.event_id, timestamp, outgoing.body),
        }
        try:
            async with self.session.post(
                outgoing.url,
                data=outgoing.body,
                headers=headers,
                allow_redirects=False,
                timeout=aiohttp.ClientTimeout(total=self.timeout_seconds),
            ) as response:
                snippet = (await response.content.read(SNIPPET * 4)).decode(errors="replace")[:SNIPPET]
                code = response.status
                error = "" if 200 <= code < 300 else _error_of(code, response.headers)
                wait = retry_after(response.headers.get("Retry-After"), time.time())
                return Outcome(code, _since(started), snippet, error, wait)
        except TimeoutError:
            return Outcome(0, _since(started), error=f"no answer within {self.timeout_seconds:g} s")
        except aiohttp.ClientConnectorError as error:
            cause = error.os_error
            if isinstance(cause, RefusedDestination):
                return Outcome(0, _since(started), error=f"refused: {cause}")
            return Outcome(0, _since(started), error=f"cannot connect: {cause or error}")
        except (aiohttp.ClientError, OSError) as error:
            return Outcome(0, _since(started), error=f"{type(error).__name__}: {error}")


def _error_of(code: int, headers: Any) -> str:
    if 300 <= code < 400:
        return f"HTTP {code}: redirects are not followed (to {headers.get('Location', '?')[:200]})"
    return f"HTTP {code}"


def _since(started: float) -> float:
    return (time.perf_counter() - started) * 1000


def _version() -> str:
    try:
        return metadata.version("mlmesh")
    except metadata.PackageNotFoundError:
        return "dev"

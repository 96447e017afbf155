"""The durable JetStream consumer that feeds the collector: stream MLMESH_CAPTURE in, flushes out.

Messages are pulled in batches, decoded into a CaptureBuffer off the event loop, and acknowledged
only after the flush that holds their rows has committed (services.collector.domain). A flush is
due at `flush_rows` rows, `flush_bytes` of tensors or `flush_seconds` after the first waiting
message, and at the end of a backlog (full pulls, then one that is not); while it writes, the
next messages are decoded into a fresh buffer. A message whose stream sequence is already recorded
(delivered again after a crash between commit and ack) is acknowledged and skipped. A message that
cannot be decoded is logged, counted and acknowledged, so that it does not hold up the stream.
"""

from __future__ import annotations

import asyncio
import gc
import logging
import time
from typing import Any

import nats.errors
from nats.js.api import AckPolicy, ConsumerConfig, DeliverPolicy

from services.collector.domain import Collector, IngestCounters, SequenceRanges
from services.collector.records import CAPTURE_SUBJECT_PREFIX, CaptureBuffer, MalformedCapture, parse_subject
from services.collector.settings import CollectorSettings
from services.common import bus

log = logging.getLogger(__name__)

DURABLE = "mlmesh-collector"
RETRY_SECONDS = 1.0
MAX_FLUSHES = 2
"""Flushes under way at once: one writes Parquet (without the GIL) while the next builds its tables."""


class CaptureConsumer:
    """Pulls captures from JetStream into the collector's store, exactly once."""

    def __init__(self, collector: Collector, settings: CollectorSettings, counters: IngestCounters) -> None:
        assert settings.nats_url
        self.collector = collector
        self.settings = settings
        self.counters = counters
        self.recorded = SequenceRanges()
        self.stream_epoch = ""
        self._buffer = CaptureBuffer()
        self._waiting: dict[int, Any] = {}
        """Stream sequence -> the message to acknowledge once the current buffer is flushed."""
        self._flushing: list[dict[int, Any]] = []
        """The same for each buffer being flushed now."""
        self._flush_tasks: list[asyncio.Task[None]] = []
        self._first_waiting_at = 0.0

    async def run(self) -> None:
        """Consume until cancelled; on the way out, flush what was decoded so it is not redelivered."""
        assert self.settings.nats_url
        # Decoding makes a few dicts per captured request that die at once; a collection of the
        # youngest generation every 700 allocations (the default) cost a fifth of decoding.
        gc.set_threshold(10_000, *gc.get_threshold()[1:])
        connection = await bus.connect_with_retry(self.settings.nats_url, name="collector")
        try:
            jetstream = connection.jetstream(timeout=10)
            subscription = await self._subscribe(jetstream)
            largest = max(connection.max_payload, 1)
            pull = max(1, min(self.settings.fetch_messages, self.settings.fetch_bytes // largest))
            try:
                await self._consume(subscription, pull)
            finally:
                await self._drain()
        finally:
            await connection.close()

    async def _subscribe(self, jetstream: Any) -> Any:
        while True:
            try:
                config = bus.capture_stream_config(self.settings.stream_max_age_seconds, self.settings.stream_max_bytes)
                await bus.ensure_stream(jetstream, config)
                info = await jetstream.stream_info(bus.CAPTURE_STREAM)
                # A stream deleted and made again counts its sequences from 1 anew: its creation
                # time tells which stream recorded sequences belong to.
                self.stream_epoch = info.created.isoformat() if info.created else "unknown"
                self.recorded = await asyncio.to_thread(self.collector.recorded_sequences, self.stream_epoch)
                await jetstream.add_consumer(bus.CAPTURE_STREAM, self._consumer_config())
                subscription = await jetstream.pull_subscribe_bind(
                    durable=DURABLE,
                    stream=bus.CAPTURE_STREAM,
                    # Room for two pulls: a pull never brings more than fetch_bytes.
                    pending_bytes_limit=2 * self.settings.fetch_bytes,
                )
                log.info(
                    "consuming %s as %s (%d recorded sequence ranges)", bus.CAPTURE_STREAM, DURABLE, len(self.recorded)
                )
                return subscription
            except Exception as error:  # NATS away or not ready: keep trying, the API serves meanwhile
                log.warning("cannot consume %s yet: %s; retrying", bus.CAPTURE_STREAM, error)
                await asyncio.sleep(RETRY_SECONDS)

    def _consumer_config(self) -> ConsumerConfig:
        settings = self.settings
        return ConsumerConfig(
            durable_name=DURABLE,
            description="mlmesh collector: captures into Parquet",
            filter_subject=f"{CAPTURE_SUBJECT_PREFIX}>",
            deliver_policy=DeliverPolicy.ALL,
            ack_policy=AckPolicy.EXPLICIT,
            ack_wait=settings.ack_wait_seconds,
            max_deliver=-1,  # a capture is never given up on; undecodable ones are acked instead
            # Two buffers (one decoding, one flushing) may each wait for flush_rows messages.
            max_ack_pending=2 * (settings.flush_rows + settings.fetch_messages),
        )

    async def _consume(self, subscription: Any, pull: int) -> None:
        # The next pull travels while this one is decoded: waiting on the network and decoding overlap.
        pulled: asyncio.Queue[list[Any]] = asyncio.Queue(maxsize=1)
        puller = asyncio.create_task(self._pull(subscription, pull, pulled))
        getter: asyncio.Future[list[Any]] | None = None
        backlog = False
        try:
            while True:
                wait = self.settings.flush_seconds
                if self._waiting:
                    wait = max(0.0, self._first_waiting_at + self.settings.flush_seconds - time.monotonic())
                # A getter that times out is kept for the next round, so no pulled batch is lost.
                getter = getter or asyncio.ensure_future(pulled.get())
                done, _ = await asyncio.wait({getter}, timeout=wait)
                drained = False
                if done:
                    messages, getter = getter.result(), None
                    await self._take(messages)
                    # Full pulls mean a backlog; the first pull that is not full, its end: what it
                    # left waiting is flushed at once rather than after flush_seconds.
                    drained, backlog = backlog and len(messages) < pull, len(messages) >= pull
                if self._waiting and (drained or self._flush_due()):
                    await self._start_flush()
        finally:
            for task in (puller, getter):
                if task is not None:
                    task.cancel()

    async def _pull(self, subscription: Any, pull: int, pulled: asyncio.Queue[list[Any]]) -> None:
        while True:
            try:
                messages = await subscription.fetch(pull, timeout=1.0)
            except (TimeoutError, nats.errors.TimeoutError):
                messages = []  # nothing came: the stream is drained, which a backlog's end needs to know
            except Exception as error:  # NATS reconnecting: try again shortly
                log.warning("fetching captures failed: %s", error)
                await asyncio.sleep(RETRY_SECONDS)
                continue
            await pulled.put(messages)

    async def _take(self, messages: list[Any]) -> None:
        fresh = []
        for message in messages:
            sequence = message.metadata.sequence.stream
            if sequence in self._waiting:  # delivered again while its buffer waits: ack the newest copy
                self._waiting[sequence] = message
            elif flushing := next((each for each in self._flushing if sequence in each), None):
                flushing[sequence] = message
            elif sequence in self.recorded:
                self.counters.duplicates_skipped += 1
                await _ack(message)
            else:
                fresh.append((sequence, message))
        if not fresh:
            return
        # Decoding is CPU work: off the loop, so API calls are answered meanwhile.
        decoding = asyncio.ensure_future(asyncio.to_thread(self._decode, fresh))
        try:
            done_now = await asyncio.shield(decoding)
        except asyncio.CancelledError:
            # The thread goes on: let it finish before the last flush takes the buffer it fills.
            await asyncio.wait({decoding})
            raise
        for message in done_now:
            await _ack(message)
        if self._waiting and not self._first_waiting_at:
            self._first_waiting_at = time.monotonic()
        self.counters.pending_rows = self._buffer.rows

    def _decode(self, fresh: list[tuple[int, Any]]) -> list[Any]:
        """Add messages to the buffer; returns those to acknowledge at once (no rows to keep)."""
        done_now = []
        for sequence, message in fresh:
            self.counters.messages_consumed += 1
            try:
                endpoint, deployment = parse_subject(message.subject)
                added = self._buffer.add(endpoint, deployment, sequence, message.data)
            except MalformedCapture as error:
                self.counters.malformed_messages += 1
                log.warning("skipping capture message %d on %s: %s", sequence, message.subject[:200], error)
                done_now.append(message)
                continue
            if added.malformed_records:
                self.counters.malformed_records += added.malformed_records
                log.warning(
                    "capture message %d on %s: %d records skipped (%s)",
                    sequence,
                    message.subject[:200],
                    added.malformed_records,
                    added.first_error[:300],
                )
            if added.rows:
                self._waiting[sequence] = message
            else:
                done_now.append(message)
        return done_now

    def _flush_due(self) -> bool:
        settings = self.settings
        if not self._waiting:
            return False
        return (
            self._buffer.rows >= settings.flush_rows
            or self._buffer.bytes >= settings.flush_bytes
            or len(self._waiting) >= settings.flush_rows
            or time.monotonic() - self._first_waiting_at >= settings.flush_seconds
        )

    async def _start_flush(self) -> None:
        """Hand the buffer to a flush of its own (once fewer than MAX_FLUSHES are under way) and
        start a new one."""
        await self._wait_for_flushes(fewer_than=MAX_FLUSHES)
        buffer, self._buffer = self._buffer, CaptureBuffer()
        messages, self._waiting = self._waiting, {}
        self._first_waiting_at = 0.0
        self.counters.pending_rows = 0
        self._flushing.append(messages)
        self._flush_tasks.append(asyncio.create_task(self._flush(buffer, messages)))

    async def _wait_for_flushes(self, fewer_than: int) -> None:
        while len(self._flush_tasks) >= fewer_than:
            # Shielded: a cancelled consumer still lets a flush under way commit and acknowledge.
            await asyncio.shield(self._flush_tasks[0])
            self._flush_tasks = [task for task in self._flush_tasks if not task.done()]

    async def _flush(self, buffer: CaptureBuffer, messages: dict[int, Any], retry: bool = True) -> None:
        """Commit the buffer, then acknowledge its messages. A failed commit is retried (with
        `retry`): the messages stay unacknowledged meanwhile, and redeliveries find them waiting."""
        started = time.monotonic()
        while True:
            try:
                files = await asyncio.to_thread(self.collector.flush, buffer, self.stream_epoch)
                break
            except Exception:
                if not retry:
                    raise
                log.exception("flush of %d rows failed; retrying in %.0fs", buffer.rows, RETRY_SECONDS)
                await asyncio.sleep(RETRY_SECONDS)
        # Recorded before the messages leave `_flushing`, so a redelivery always finds one or the other.
        self.recorded.add(buffer.sequences)
        self._flushing = [each for each in self._flushing if each is not messages]
        for message in messages.values():
            await _ack(message)
        self.counters.rows_written += buffer.rows
        self.counters.files_written += len(files)
        self.counters.last_flush_at = time.time()
        log.debug(
            "flushed %d rows of %d messages into %d files in %.3fs",
            buffer.rows,
            len(messages),
            len(files),
            time.monotonic() - started,
        )

    async def _drain(self) -> None:
        """On the way out (SIGTERM): finish the flush under way and flush what is waiting, once,
        so those messages are acknowledged now instead of delivered again to the next start."""
        try:
            await self._wait_for_flushes(fewer_than=1)
            if self._waiting:
                messages, self._waiting = self._waiting, {}
                self._flushing.append(messages)
                buffer, self._buffer = self._buffer, CaptureBuffer()
                await self._flush(buffer, messages, retry=False)
        except Exception as error:  # what was not acknowledged comes again: nothing is lost
            log.warning("the last flush did not complete: %s", error)


async def _ack(message: Any) -> None:
    try:
        await message.ack()
    except Exception as error:  # lost acks mean a redelivery, which the recorded sequences absorb
        log.debug("ack failed: %s", error)

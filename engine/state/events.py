"""Engine -> PostgreSQL events, through the Redis stream ``{prefix}events``, off the hot path.

The engine never writes PostgreSQL: what must be persisted (an account's first use,
call records) is handed to :class:`EventPublisher`, whose ``first_use`` /
``call_record`` only put the event on an in-process queue (microseconds, never
blocking, never raising). A background loop (``run``, a greenlet in the engine)
XADDs the queue in pipelined batches to the capped stream; the sync worker
(engine.sync.persist) reads the stream with a consumer group and writes PostgreSQL
idempotently, so an event delivered twice changes nothing.

When Redis is unreachable, the batch in flight is retried with backoff and new events
wait in the queue; once the queue is full, further events are dropped and counted
(``dropped``, ``callgate_events_dropped_total``) rather than blocking calls. A dropped
first use is not lost for good: the account still shows no first use, so its next
authorized call reports it again.

Stream entries (all values strings; ``v`` is the entry format, 1)::

    type=first_use    account_id, first_used (ISO 8601 UTC), expiry (ISO 8601 UTC or "")
    type=call_record  uuid, account_id (or ""), at (ISO 8601 UTC), data (a JSON object)
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Iterable, Mapping
from datetime import UTC, datetime
from typing import Any

import redis

from engine.rules.gate import FirstUse
from engine.state.batches import BatchQueue, StopEvent
from engine.state.keys import events_stream

__all__ = ["EVENT_FORMAT", "EventPublisher"]

log = logging.getLogger(__name__)

EVENT_FORMAT = "1"
_IDLE_WAIT = 0.5


def _iso(moment: datetime) -> str:
    if moment.tzinfo is None:
        moment = moment.replace(tzinfo=UTC)
    return moment.astimezone(UTC).isoformat()


class EventPublisher:
    """Queues engine events and XADDs them to ``{prefix}events`` in the background."""

    def __init__(
        self,
        client: redis.Redis,
        prefix: str,
        *,
        maxlen: int = 1_000_000,
        queue_size: int = 10_000,
        batch_size: int = 200,
        dedupe_seconds: float = 60.0,
        retry_max: float = 5.0,
        registry: Any = None,
    ) -> None:
        """``maxlen`` caps the stream (approximately); ``queue_size`` bounds the memory held while
        Redis is away; a first use of one account is queued at most once per ``dedupe_seconds``
        (calls in quick succession all see it unrecorded). ``registry``: a prometheus
        CollectorRegistry to count into (queued, published, dropped)."""
        self._client = client
        self._stream = events_stream(prefix)
        self._maxlen = maxlen
        # The loop (batches, retries, the last attempt at stop) is the settler's too.
        self._batches: BatchQueue[dict[str, str]] = BatchQueue(
            "events",
            send=self._send,
            retryable=(redis.RedisError, OSError),
            abandon=self._forget,
            queue_size=queue_size,
            batch_size=batch_size,
            retry_max=retry_max,
            idle_wait=_IDLE_WAIT,
            logger=log,
        )
        self._dedupe_seconds = dedupe_seconds
        self._recent: dict[int, float] = {}  # account id -> when its first use was queued
        self.queued = 0
        self.published = 0
        self.dropped = 0
        self._counters = _Counters(registry) if registry is not None else None

    # --- the hot path: never blocks, never raises ----------------------------------------

    def first_use(self, record: FirstUse) -> bool:
        """Queue an account's first use; False if it was a duplicate or had to be dropped."""
        now = time.monotonic()
        seen = self._recent.get(record.account_id)
        if seen is not None and now - seen < self._dedupe_seconds:
            return False
        fields = {
            "type": "first_use",
            "v": EVENT_FORMAT,
            "account_id": str(record.account_id),
            "first_used": _iso(record.first_used),
            "expiry": "" if record.expiry is None else _iso(record.expiry),
        }
        if not self._put(fields, "first_use"):
            return False
        if len(self._recent) >= 100_000:
            self._recent = {k: t for k, t in self._recent.items() if now - t < self._dedupe_seconds}
        self._recent[record.account_id] = now
        return True

    def first_uses(self, records: Iterable[FirstUse]) -> None:
        """``first_use`` for each record (what ``engine.rules.gate.first_uses`` returns)."""
        for record in records:
            self.first_use(record)

    def call_record(
        self,
        uuid: str,
        *,
        account_id: int | None = None,
        data: Mapping[str, Any] | None = None,
        at: datetime | None = None,
    ) -> bool:
        """Queue a call record (persisted once per ``uuid``); ``data`` must be JSON-serialisable."""
        try:
            body = json.dumps(dict(data or {}), separators=(",", ":"), default=str)
        except (TypeError, ValueError):
            log.exception("uuid=%s call record is not serialisable; dropped", uuid)
            self._drop("call_record", "invalid")
            return False
        fields = {
            "type": "call_record",
            "v": EVENT_FORMAT,
            "uuid": uuid,
            "account_id": "" if account_id is None else str(account_id),
            "at": _iso(at or datetime.now(UTC)),
            "data": body,
        }
        return self._put(fields, "call_record")

    def _put(self, fields: dict[str, str], kind: str) -> bool:
        if not self._batches.put(fields):
            self._drop(kind, "queue_full")
            return False
        self.queued += 1
        if self._counters is not None:
            self._counters.queued.labels(kind).inc()
        return True

    def _drop(self, kind: str, reason: str) -> None:
        self.dropped += 1
        if self._counters is not None:
            self._counters.dropped.labels(kind, reason).inc()

    # --- the background loop -------------------------------------------------------------

    @property
    def pending(self) -> int:
        """Events queued or in flight, not yet in Redis."""
        return self._batches.pending

    @property
    def failures(self) -> int:
        """Consecutive failed batches (0 once one goes through)."""
        return self._batches.failures

    def run(self, stop_event: StopEvent) -> None:
        """XADD queued events until ``stop_event`` is set (then one last attempt). Never raises."""
        self._batches.run(stop_event)

    def _send(self, batch: list[dict[str, str]]) -> None:
        with self._client.pipeline(transaction=False) as pipe:
            for fields in batch:
                pipe.xadd(self._stream, dict(fields), maxlen=self._maxlen, approximate=True)  # type: ignore[arg-type]
            pipe.execute()
        self.published += len(batch)
        if self._counters is not None:
            self._counters.published.inc(len(batch))

    def _forget(self, batch: list[dict[str, str]]) -> None:
        """Redis unreachable at shutdown: counted as dropped; a first use is reported again later."""
        for fields in batch:
            self._drop(fields["type"], "stopped")
            if fields["type"] == "first_use":
                self._recent.pop(int(fields["account_id"]), None)


EVENT_TYPES = ("first_use", "call_record")


class _Counters:
    def __init__(self, registry: Any) -> None:
        from prometheus_client import Counter

        self.queued = Counter(
            "callgate_events_queued_total", "Engine events queued for PostgreSQL", ["type"], registry=registry
        )
        self.published = Counter(
            "callgate_events_published_total", "Engine events written to the Redis stream", registry=registry
        )
        self.dropped = Counter(
            "callgate_events_dropped_total",
            "Engine events dropped (queue full while Redis was unreachable, unserialisable)",
            ["type", "reason"],
            registry=registry,
        )
        # Every series exists from the start, so dashboards see 0 rather than nothing.
        for kind in EVENT_TYPES:
            self.queued.labels(kind)

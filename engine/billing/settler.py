"""The engine's hangup side: settlements queued by the call sessions, sent to Redis in batches.

A call session ends with ``settler.put(settlement)``: microseconds, never blocking, never
raising. A background loop (a greenlet in the engine, a thread in tests) takes what is queued
and runs :meth:`Funds.settle_many`, one pipelined round trip per batch. The settle script is
idempotent per call UUID, so a batch retried after a Redis error (some of it may have run)
changes nothing twice.

Redis unreachable: the batch in flight is retried with backoff, new settlements wait in the
queue. A full queue (``queue_size``; Redis away for long at full traffic) drops the newest
settlement: it is counted and its CDR is logged whole at ERROR level (``settlement dropped``),
so it can be replayed; the call is then neither debited nor recorded, like a hangup never seen.
"""

from __future__ import annotations

import json
import logging
import queue
from typing import Any, Protocol

from engine.billing.funds import Funds, FundsUnavailable, Settlement

log = logging.getLogger("callgate.billing.settler")

_IDLE_WAIT = 0.2


class StopEvent(Protocol):
    def is_set(self) -> bool: ...

    def wait(self, timeout: float | None = None) -> Any: ...


class Settler:
    def __init__(
        self,
        funds: Funds,
        *,
        queue_size: int = 100_000,
        batch_size: int = 500,
        retry_max: float = 5.0,
        registry: Any = None,
    ) -> None:
        self._funds = funds
        self._queue: queue.Queue[Settlement] = queue.Queue(maxsize=queue_size)
        self._batch_size = batch_size
        self._retry_max = retry_max
        self._in_flight = 0
        self.settled = 0  # settled now (first time)
        self.repeated = 0  # already settled (duplicate hangups)
        self.dropped = 0
        self.failures = 0
        self._counters = _Counters(registry) if registry is not None else None

    # --- the call sessions' side: never blocks, never raises -----------------------------------

    def put(self, item: Settlement) -> bool:
        try:
            self._queue.put_nowait(item)
        except queue.Full:
            self.dropped += 1
            if self._counters is not None:
                self._counters.dropped.inc()
            log.error(
                "settlement dropped (queue full, Redis unreachable?): uuid=%s cdr=%s",
                json.dumps(item.uuid),
                json.dumps(dict(item.cdr), default=str),
            )
            return False
        return True

    @property
    def pending(self) -> int:
        return self._queue.qsize() + self._in_flight

    # --- the background loop ----------------------------------------------------------------

    def run(self, stop: StopEvent) -> None:
        """Settle until ``stop`` is set, then what is still queued (one attempt). Never raises."""
        batch: list[Settlement] = []
        delay = 0.05
        while True:
            stopping = stop.is_set()
            if not batch:
                batch = self._take(0.0 if stopping else _IDLE_WAIT)
                self._in_flight = len(batch)
                if not batch:
                    if stopping:
                        return
                    continue
            try:
                results = self._funds.settle_many(batch)
            except FundsUnavailable as exc:
                self.failures += 1
                if self.failures == 1:
                    log.warning("settlements: Redis unreachable, %d waiting: %s", self.pending, exc)
                if stopping:
                    for item in batch:
                        log.error(
                            "settlement not sent at shutdown: uuid=%s cdr=%s",
                            json.dumps(item.uuid),
                            json.dumps(dict(item.cdr), default=str),
                        )
                    self.dropped += len(batch)
                    return
                stop.wait(delay)
                delay = min(self._retry_max, delay * 2)
                continue
            if self.failures:
                log.info("settlements: Redis reachable again after %d failures", self.failures)
                self.failures = 0
            fresh = sum(results)
            self.settled += fresh
            self.repeated += len(results) - fresh
            if self._counters is not None:
                self._counters.settled.inc(fresh)
                self._counters.repeated.inc(len(results) - fresh)
            batch, delay = [], 0.05
            self._in_flight = 0

    def _take(self, wait: float) -> list[Settlement]:
        try:
            first = self._queue.get(timeout=wait) if wait > 0 else self._queue.get_nowait()
        except queue.Empty:
            return []
        batch = [first]
        while len(batch) < self._batch_size:
            try:
                batch.append(self._queue.get_nowait())
            except queue.Empty:
                break
        return batch


class _Counters:
    def __init__(self, registry: Any) -> None:
        from prometheus_client import Counter

        self.settled = Counter(
            "callgate_settlements_total", "Calls settled in Redis (debit + CDR queued)", registry=registry
        )
        self.repeated = Counter(
            "callgate_settlements_repeated_total",
            "Settlements of calls already settled (ignored)",
            registry=registry,
        )
        self.dropped = Counter(
            "callgate_settlements_dropped_total",
            "Settlements dropped (queue full or shutdown while Redis was unreachable); their CDR is logged",
            registry=registry,
        )

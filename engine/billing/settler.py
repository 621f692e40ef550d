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
import time
from collections.abc import Callable
from typing import Any, Protocol

from engine.billing.funds import Funds, FundsUnavailable, Settlement
from engine.state.batches import BatchQueue, StopEvent

log = logging.getLogger("callgate.billing.settler")

_IDLE_WAIT = 0.2
# A settlement waits up to this long for others to share its round trip. Below saturation
# hangups arrive one per round trip otherwise (measured: 0.9 settle batches per call at 70 % of
# saturation, each with its SCRIPT LOAD), and a balance settled 10 ms later changes nothing:
# the call's reservation holds its funds until then.
_GATHER = 0.01


# With deferred settlements, how many are computed and sent per moment the hub is idle: ~16
# hangups are ~1-2 ms of CPU, which a decision arriving meanwhile waits for.
_CHUNK = 16


class Deferred(Protocol):
    """A call's settlement still to compute: the settler's loop computes it, in its batch."""

    @property
    def uuid(self) -> str: ...

    def resolve(self) -> Settlement | None:
        """The settlement, computed on the first call only; None when the call cannot be
        billed (the reason logged). Never raises."""
        ...


class Settler:
    def __init__(
        self,
        funds: Funds,
        *,
        queue_size: int = 100_000,
        batch_size: int = 500,
        retry_max: float = 5.0,
        registry: Any = None,
        wait_for_idle: Callable[[float], object] | None = None,
        idle_wait: float = 0.0,
    ) -> None:
        """With ``wait_for_idle`` (engine.priority's), a batch is computed and sent
        ``_CHUNK`` settlements at a time, each chunk once the hub is idle, all of them within
        ``idle_wait`` seconds of the batch's start: a busy hub delays a batch that long at most."""
        self._funds = funds
        self._wait_for_idle = wait_for_idle
        self._idle_wait = idle_wait
        # The loop (batches, retries, the last attempt at stop) is the event publisher's too.
        self._batches: BatchQueue[Settlement | Deferred] = BatchQueue(
            "settlements",
            send=self._settle,
            retryable=(FundsUnavailable,),
            abandon=self._not_sent,
            queue_size=queue_size,
            batch_size=batch_size,
            retry_max=retry_max,
            idle_wait=_IDLE_WAIT,
            gather=_GATHER,
            logger=log,
        )
        self.settled = 0  # settled now (first time)
        self.repeated = 0  # already settled (duplicate hangups)
        self.dropped = 0
        self._counters = _Counters(registry) if registry is not None else None

    # --- the call sessions' side: never blocks, never raises -----------------------------------

    def put(self, item: Settlement | Deferred) -> bool:
        if self._batches.put(item):
            return True
        self.dropped += 1
        if self._counters is not None:
            self._counters.dropped.inc()
        ready = _resolved(item)
        log.error(
            "settlement dropped (queue full, Redis unreachable?): uuid=%s cdr=%s",
            json.dumps(item.uuid),
            json.dumps(dict(ready.cdr), default=str) if ready is not None else "(not billable)",
        )
        return False

    @property
    def pending(self) -> int:
        return self._batches.pending

    @property
    def failures(self) -> int:
        """Consecutive failed batches (0 once one goes through)."""
        return self._batches.failures

    # --- the background loop ----------------------------------------------------------------

    def run(self, stop: StopEvent) -> None:
        """Settle until ``stop`` is set, then what is still queued (one attempt). Never raises."""
        self._batches.run(stop)

    def _settle(self, batch: list[Settlement | Deferred]) -> None:
        """Sends ``batch``, consuming it: after a Redis error the retry sends what is left."""
        wait = self._wait_for_idle
        size = _CHUNK if wait is not None else len(batch)
        deadline = time.monotonic() + self._idle_wait
        while batch:
            if wait is not None:
                wait(max(0.0, deadline - time.monotonic()))
            ready = [item for item in map(_resolved, batch[:size]) if item is not None]
            if ready:
                self._send(ready)
            del batch[:size]

    def _send(self, ready: list[Settlement]) -> None:
        results = self._funds.settle_many(ready)
        fresh = sum(results)
        self.settled += fresh
        self.repeated += len(results) - fresh
        if self._counters is not None:
            self._counters.settled.inc(fresh)
            self._counters.repeated.inc(len(results) - fresh)

    def _not_sent(self, batch: list[Settlement | Deferred]) -> None:
        """Redis unreachable at shutdown: each CDR logged whole, so it can be replayed."""
        for item in batch:
            ready = _resolved(item)
            if ready is None:
                continue  # not billable: logged as such
            log.error(
                "settlement not sent at shutdown: uuid=%s cdr=%s",
                json.dumps(ready.uuid),
                json.dumps(dict(ready.cdr), default=str),
            )
            self.dropped += 1


def _resolved(item: Settlement | Deferred) -> Settlement | None:
    return item if isinstance(item, Settlement) else item.resolve()


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

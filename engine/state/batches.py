"""A queue the call path fills without waiting, drained to Redis in batches by one background loop.

Both things the engine hands to Redis after a call has been answered, the events for
PostgreSQL (engine.state.events) and the settlements of hangups (engine.billing.settler),
follow the same rules, kept here once:

* ``put`` never blocks and never raises: a full queue refuses the item (the owner counts
  and logs what it lost);
* ``run`` (a greenlet in the engine, a thread in tests) takes up to ``batch_size`` items,
  waiting at most ``idle_wait`` for the first, and sends them with one call of ``send``;
  with ``gather``, a batch waits that long after its first item for more to join it (a round
  trip costs the engine and Redis ~100 us of CPU whatever its size: below saturation, items
  arrive one per round trip unless something makes them wait);
* a batch whose ``send`` raises one of ``retryable`` is retried, with a delay doubling from
  50 ms to ``retry_max``, until it goes through; new items wait in the queue meanwhile
  (``send`` must therefore be idempotent: a batch that failed half-way is sent again);
* once ``stop`` is set, what is still queued gets one attempt; a batch that fails then is
  handed to ``abandon`` and the loop returns. Only an error outside ``retryable`` (a bug)
  leaves ``run``.
"""

from __future__ import annotations

import logging
import queue
import time
from collections.abc import Callable
from typing import Any, Generic, Protocol, TypeVar

log = logging.getLogger(__name__)

T = TypeVar("T")

FIRST_RETRY_DELAY = 0.05


class StopEvent(Protocol):
    def is_set(self) -> bool: ...

    def wait(self, timeout: float | None = None) -> Any: ...


class BatchQueue(Generic[T]):
    def __init__(
        self,
        what: str,
        *,
        send: Callable[[list[T]], None],
        retryable: tuple[type[BaseException], ...],
        abandon: Callable[[list[T]], None],
        queue_size: int,
        batch_size: int,
        retry_max: float,
        idle_wait: float,
        gather: float = 0.0,
        logger: logging.Logger = log,
    ) -> None:
        """``what`` names the items in the log lines ("events", "settlements")."""
        self._what = what
        self._send = send
        self._retryable = retryable
        self._abandon = abandon
        self._queue: queue.Queue[T] = queue.Queue(maxsize=queue_size)
        self._batch_size = batch_size
        self._retry_max = retry_max
        self._idle_wait = idle_wait
        self._gather = gather
        self._log = logger
        self._in_flight = 0
        self.failures = 0  # consecutive failed sends; 0 once one goes through

    def put(self, item: T) -> bool:
        """Queue ``item``; False (nothing else happens) when the queue is full."""
        try:
            self._queue.put_nowait(item)
        except queue.Full:
            return False
        return True

    @property
    def pending(self) -> int:
        """Items queued or in the batch being sent."""
        return self._queue.qsize() + self._in_flight

    def run(self, stop: StopEvent) -> None:
        """Send batches until ``stop`` is set, then what is still queued (one attempt)."""
        batch: list[T] = []
        delay = FIRST_RETRY_DELAY
        while True:
            stopping = stop.is_set()
            if not batch:
                batch = self._take(0.0 if stopping else self._idle_wait)
                self._in_flight = len(batch)
                if not batch:
                    if stopping:
                        return
                    continue
            try:
                self._send(batch)
            except self._retryable as exc:
                self.failures += 1
                if self.failures == 1:
                    self._log.warning("%s: Redis unreachable, %d waiting: %r", self._what, self.pending, exc)
                if stopping:
                    self._abandon(batch)
                    self._in_flight = 0
                    return
                stop.wait(delay)
                delay = min(self._retry_max, delay * 2)
                continue
            if self.failures:
                self._log.info("%s: Redis reachable again after %d failures", self._what, self.failures)
                self.failures = 0
            batch, delay = [], FIRST_RETRY_DELAY
            self._in_flight = 0

    def _take(self, wait: float) -> list[T]:
        try:
            first = self._queue.get(timeout=wait) if wait > 0 else self._queue.get_nowait()
        except queue.Empty:
            return []
        if wait > 0 and self._gather > 0 and self._queue.qsize() < self._batch_size - 1:
            time.sleep(self._gather)  # gevent's sleep in the engine (monkey-patched); not when stopping
        batch = [first]
        while len(batch) < self._batch_size:
            try:
                batch.append(self._queue.get_nowait())
            except queue.Empty:
                break
        return batch

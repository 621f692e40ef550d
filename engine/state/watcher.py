"""Keeps the engine's in-memory catalog in step with the current Redis snapshot.

:class:`SnapshotHolder` holds the object built from the current snapshot (the rules'
``Catalog.build``, injected as ``build``). ``current`` is a plain attribute read: calls
take ``(version, catalog)`` once and keep using it while a reload swaps in a new tuple,
so a call in flight never sees two catalogs.

``run(stop_event, interval)`` is the background loop (spawn it as a greenlet once the
process is monkey-patched): it subscribes to the snapshot events and reloads when
told, and also polls the snapshot stamp every ``interval`` seconds, because pub/sub
messages sent while the connection is down are lost. Redis I/O is cooperative under
gevent; the CPU-bound part (decoding a million rows and ``build``) runs in gevent's
thread pool so the hub keeps serving calls meanwhile.

``last_confirmed`` is the ``time.monotonic()`` at which Redis was last seen pointing at
exactly the held content (version, token and change count); the engine refuses to decide
from a snapshot unconfirmed for longer than its configured bound (``confirmed_age``).
A change of only the change count (``apply_changes``) currently reloads the whole
snapshot; the live-sync issue will reload just the changed entities.
"""

from __future__ import annotations

import logging
import math
import random
import threading
import time
from collections.abc import Callable
from typing import Any, Generic, Protocol, TypeVar

import redis

from engine.model import CatalogData
from engine.state.snapshot import (
    DEFAULT_SCAN_COUNT,
    RawSnapshot,
    SnapshotStamp,
    SnapshotUnavailable,
    current_stamp,
    events_channel,
    fetch_snapshot,
    gc_paused,
)

__all__ = ["SnapshotHolder", "StopEvent"]

log = logging.getLogger(__name__)

T = TypeVar("T")
R = TypeVar("R")

_MAX_WAIT = 1.0  # longest single wait, so that stop_event is honoured within about a second
_SUBSCRIBE_TIMEOUT = 10.0


class StopEvent(Protocol):
    """threading.Event or gevent.event.Event."""

    def is_set(self) -> bool: ...

    def wait(self, timeout: float | None = None) -> Any: ...


def offload_to_threadpool(fn: Callable[[], R]) -> R:
    """Run CPU-bound ``fn`` in gevent's thread pool when gevent has patched threading, else inline."""
    from gevent import get_hub, monkey

    if monkey.is_module_patched("threading"):
        return get_hub().threadpool.apply(fn)
    return fn()


class SnapshotHolder(Generic[T]):
    """The engine's current catalog, reloaded from Redis when its snapshot changes."""

    def __init__(
        self,
        client: redis.Redis,
        prefix: str,
        build: Callable[[CatalogData], T],
        *,
        subscribe: bool = True,
        offload: Callable[[Callable[[], Any]], Any] = offload_to_threadpool,
        scan_count: int = DEFAULT_SCAN_COUNT,
        backoff_initial: float = 0.5,
        backoff_max: float = 30.0,
        freeze_gc: bool = True,
        on_swap: Callable[[int, T], None] | None = None,
    ) -> None:
        """``build`` turns CatalogData into what ``current`` serves (``Catalog.build``).

        ``subscribe=False`` polls only. ``offload`` runs decode+build (default: gevent's
        thread pool when monkey-patched). ``freeze_gc`` pauses the cyclic GC during
        decode+build and then ``gc.freeze()``s the result, so that no collection ever
        walks the catalog's millions of objects while holding the GIL (see
        :func:`engine.state.snapshot.gc_paused`; process-wide, hence switchable).
        ``on_swap(version, value)`` is called after each swap (metrics, logging).
        """
        self._client = client
        self._prefix = prefix
        self._build = build
        self._subscribe = subscribe
        self._offload = offload
        self._scan_count = scan_count
        self._backoff_initial = backoff_initial
        self._backoff_max = backoff_max
        self._freeze_gc = freeze_gc
        self._on_swap = on_swap
        self._lock = threading.Lock()  # a gevent lock once monkey-patched
        self._state: tuple[int, T] | None = None
        self._stamp: SnapshotStamp | None = None
        self._recheck = False
        self.last_confirmed: float | None = None
        self.loaded_at: float | None = None
        self.failures = 0  # length of the current failure streak of run()

    # --- reading, no I/O ---------------------------------------------------------------------

    @property
    def current(self) -> tuple[int, T]:
        """(snapshot version, built catalog); raises SnapshotUnavailable before the first load."""
        state = self._state
        if state is None:
            raise SnapshotUnavailable("no snapshot loaded yet")
        return state

    @property
    def loaded(self) -> bool:
        return self._state is not None

    @property
    def stamp(self) -> SnapshotStamp | None:
        """The (version, token, changes) of the held snapshot."""
        return self._stamp

    def confirmed_age(self, now: float | None = None) -> float:
        """Seconds since Redis was last seen at the held snapshot (inf if never)."""
        if self.last_confirmed is None:
            return math.inf
        return (time.monotonic() if now is None else now) - self.last_confirmed

    # --- reloading ---------------------------------------------------------------------------

    def refresh(self) -> bool:
        """Reload if the Redis snapshot differs from the held one; True if a new one was swapped in.

        Raises SnapshotUnavailable if nothing was ever published, redis errors, and
        whatever decoding or ``build`` raise; the held catalog is then kept.
        """
        with self._lock:
            asked_at = time.monotonic()
            stamp = current_stamp(self._client, self._prefix)
            if stamp is None:
                raise SnapshotUnavailable("no snapshot has been published")
            if stamp == self._stamp:
                self.last_confirmed = asked_at
                self._recheck = False
                return False
            self._load()
            return True

    def _load(self) -> None:
        started = time.monotonic()
        raw = fetch_snapshot(self._client, self._prefix, scan_count=self._scan_count)
        fetched = time.monotonic()
        value = self._offload(lambda: self._decode_and_build(raw))
        self._state = (raw.version, value)  # one reference swap: readers see old or new, whole
        self._stamp = raw.stamp
        self.loaded_at = time.monotonic()
        # If the pointer moved on during the read, the held version is complete but not current.
        self._recheck = raw.confirmed_at is None
        if raw.confirmed_at is not None:
            self.last_confirmed = raw.confirmed_at
        log.info(
            "snapshot version %d loaded (changes %d): fetch %.2fs, decode+build %.2fs",
            raw.version,
            raw.stamp.changes,
            fetched - started,
            self.loaded_at - fetched,
        )
        if self._on_swap is not None:
            self._on_swap(raw.version, value)

    def _decode_and_build(self, raw: RawSnapshot) -> T:
        if not self._freeze_gc:
            return self._build(raw.decode())
        with gc_paused(freeze=True):
            return self._build(raw.decode())

    # --- the background loop -----------------------------------------------------------------

    def run(self, stop_event: StopEvent, interval: float = 5.0) -> None:
        """Follow the snapshot until ``stop_event`` is set: pub/sub events plus polling.

        Never raises (except BaseException): failures are logged once per streak and
        retried with exponential backoff.
        """
        pubsub: Any = None
        next_check = 0.0
        try:
            while not stop_event.is_set():
                try:
                    if pubsub is None and self._subscribe:
                        pubsub = self._open_pubsub()
                        next_check = 0.0  # events may have been missed while unsubscribed
                    if self._recheck or time.monotonic() >= next_check:
                        self.refresh()
                        next_check = time.monotonic() + interval
                    self._recovered()
                    if self._wait_for_event(pubsub, stop_event, next_check):
                        next_check = 0.0
                except Exception as exc:  # the loop must survive anything
                    self._close_pubsub(pubsub)
                    pubsub, next_check = None, 0.0
                    stop_event.wait(self._failed(exc))
        finally:
            self._close_pubsub(pubsub)

    def _open_pubsub(self) -> Any:
        """Subscribe and wait for Redis to confirm, so no event after the next check is missed."""
        pubsub = self._client.pubsub()
        try:
            pubsub.subscribe(events_channel(self._prefix))
            deadline = time.monotonic() + _SUBSCRIBE_TIMEOUT
            while (message := pubsub.get_message(timeout=_MAX_WAIT)) is None or message[
                "type"
            ] != "subscribe":
                if time.monotonic() > deadline:
                    raise TimeoutError("no confirmation of the snapshot events subscription")
        except BaseException:
            self._close_pubsub(pubsub)
            raise
        return pubsub

    @staticmethod
    def _close_pubsub(pubsub: Any) -> None:
        if pubsub is not None:
            try:
                pubsub.close()
            except Exception:  # closing a broken connection may fail too
                log.debug("closing the snapshot subscription failed", exc_info=True)

    def _wait_for_event(self, pubsub: Any, stop_event: StopEvent, next_check: float) -> bool:
        """Wait until the next poll (at most _MAX_WAIT); True if the snapshot must be checked now.

        That is on any event, and on a ``subscribe`` confirmation: redis-py reconnects a
        broken subscription by itself, and events sent meanwhile are lost.
        """
        timeout = min(max(next_check - time.monotonic(), 0.0), _MAX_WAIT)
        if pubsub is None:
            stop_event.wait(timeout)
            return False
        message = pubsub.get_message(timeout=timeout)
        if message is None:
            return False
        while pubsub.get_message(timeout=0.0) is not None:  # a burst needs one check
            pass
        return True

    def _failed(self, exc: Exception) -> float:
        """Log (once per streak) and return the backoff delay."""
        self.failures += 1
        if self.failures == 1:
            log.warning(
                "snapshot watch failed, keeping version %s: %r", self._held_version(), exc, exc_info=True
            )
        else:
            log.debug("snapshot watch failed again (%d): %r", self.failures, exc)
        delay = min(self._backoff_max, self._backoff_initial * 2 ** (self.failures - 1))
        return delay * random.uniform(0.8, 1.2)

    def _recovered(self) -> None:
        if self.failures:
            log.info("snapshot watch recovered after %d failures", self.failures)
            self.failures = 0

    def _held_version(self) -> int | None:
        state = self._state
        return None if state is None else state[0]

"""Load shedding before deciding: when the process is saturated, answer ENGINE_DEGRADED at once.

Beyond one process's capacity, calls queue for the CPU: every call's latency grows together
until the decision deadline answers all of them ENGINE_DEGRADED, seconds late. Shedding
refuses the excess *before* the expensive part (rules, limits round trip) so that the calls
that are decided keep a short latency, and the refused ones are refused fast (the switch can
fail over to another engine at once).

Two signals, both cheap to read on every call:

* **event-loop lag**: a greenlet asks to wake every ``interval`` seconds and records how late
  it woke. While the hub is saturated that greenlet is itself late, so the lag read by a call
  is the larger of the last measurement and how overdue the next wake-up already is (a stale
  "all is well" is never read during a stall). Above ``max_lag``: shed.
* **backlog**: the calls of this process that have arrived (their greenlet runs) and have not
  reached their decision yet, counted by the caller. Above ``max_backlog``: shed.

Either limit at 0 turns that signal off. Pure logic with an injected clock; the greenlet that
feeds the lag is :meth:`LoadShedder.run_lag_monitor`, which runs while calls are up (an idle
process has no lag to measure, and a test's handler leaves no greenlet behind).
"""

from __future__ import annotations

import time
from collections.abc import Callable

SHED_LAG = "load shed: event loop lag"  # the reject's detail; metrics.degraded_cause maps it
SHED_BACKLOG = "load shed: backlog"


class LoadShedder:
    def __init__(
        self,
        *,
        max_lag: float,
        max_backlog: int,
        interval: float = 0.005,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.max_lag = max_lag
        self.max_backlog = max_backlog
        self.interval = interval
        self._clock = clock
        self.shed = 0  # calls refused so far (the metrics count them by cause as well)
        self._last_lag = 0.0
        self._next_wake = clock() + interval

    # ------------------------------------------------------------------ the lag

    def tick(self) -> None:
        """The monitor woke up: record how late it was, and when it should wake next."""
        now = self._clock()
        self._last_lag = max(0.0, now - self._next_wake)
        self._next_wake = now + self.interval

    def lag(self) -> float:
        """Seconds the event loop is behind now (never less than the overdue wake-up)."""
        return max(self._last_lag, self._clock() - self._next_wake)

    def restart(self) -> None:
        """A monitor is about to be started: the lag is measured from now (an idle process
        had no monitor running, so the last wake-up time is stale)."""
        self._last_lag = 0.0
        self._next_wake = self._clock() + self.interval

    def run_lag_monitor(self, sleep: Callable[[float], None], busy: Callable[[], bool]) -> None:
        """Sleep ``interval`` (gevent.sleep) and :meth:`tick`, as long as ``busy()`` says so.

        Call :meth:`restart` when spawning it, not here: the greenlet may itself start late.
        """
        while busy():
            sleep(self.interval)
            self.tick()

    # ------------------------------------------------------------------ the calls

    def verdict(self, backlog: int) -> str | None:
        """None to decide the call; otherwise why it is shed (the ENGINE_DEGRADED detail).

        ``backlog``: calls of the process waiting for their decision, this one excluded.
        """
        if self.max_backlog and backlog > self.max_backlog:
            self.shed += 1
            return SHED_BACKLOG
        if self.max_lag and self.lag() > self.max_lag:
            self.shed += 1
            return SHED_LAG
        return None

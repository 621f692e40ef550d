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

* **wait since accept**: how long the call's connection waited between the engine's accept and
  the first run of its greenlet (when the engine sends ``connect``). Above ``max_wait``: shed.
  This is the one signal that sees the queue *in front* of the call (greenlets waiting for the
  CPU after the accept); the two above only see the process as a whole. The time FreeSWITCH
  then takes to send the channel data is not counted: on the real switch, a switch slow to
  answer made an idle engine shed every call and stop listening for all its switches.

Either limit at 0 turns that signal off. Pure logic with an injected clock; the greenlet that
feeds the lag is :meth:`LoadShedder.run_lag_monitor`, which runs while calls are up (an idle
process has no lag to measure, and a test's handler leaves no greenlet behind).

Shedding a call still costs its conversation (connect, channel data, the reject). The cheapest
answer while saturated is no conversation at all: :class:`ListenGate` says when the process
should **stop listening**, so that the kernel refuses new connections (a SYN to a port nobody
listens on gets a RST at once: FreeSWITCH's ``connect()`` fails with ECONNREFUSED and it tries
the next host of ``socket h1|h2``, or the dialplan's ``respond 503``), and when to listen again
(hysteresis, so that it does not flap). docs/performance.md "Load shedding" has the Linux
semantics this relies on.
"""

from __future__ import annotations

import time
from collections.abc import Callable

SHED_LAG = "load shed: event loop lag"  # the reject's detail; metrics.degraded_cause maps it
SHED_BACKLOG = "load shed: backlog"
SHED_WAIT = "load shed: waited since accept"

PAUSE = "pause"  # ListenGate.update: stop listening
RESUME = "resume"  # ListenGate.update: listen again


class LoadShedder:
    def __init__(
        self,
        *,
        max_lag: float,
        max_backlog: int,
        max_wait: float = 0.0,
        interval: float = 0.005,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.max_lag = max_lag
        self.max_backlog = max_backlog
        self.max_wait = max_wait
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

    def run_lag_monitor(
        self,
        sleep: Callable[[float], None],
        busy: Callable[[], bool],
        after_tick: Callable[[], None] | None = None,
    ) -> None:
        """Sleep ``interval`` (gevent.sleep) and :meth:`tick`, as long as ``busy()`` says so;
        ``after_tick`` runs after each tick (the listener gate).

        Call :meth:`restart` when spawning it, not here: the greenlet may itself start late.
        """
        while busy():
            sleep(self.interval)
            self.tick()
            if after_tick is not None:
                after_tick()

    # ------------------------------------------------------------------ the calls

    def verdict(self, backlog: int, waited: float = 0.0) -> str | None:
        """None to decide the call; otherwise why it is shed (the ENGINE_DEGRADED detail).

        ``backlog``: calls of the process waiting for their decision, this one excluded.
        ``waited``: seconds the call's connection waited in the engine after its accept.
        """
        if self.max_wait and waited > self.max_wait:
            self.shed += 1
            return SHED_WAIT
        if self.max_backlog and backlog > self.max_backlog:
            self.shed += 1
            return SHED_BACKLOG
        if self.max_lag and self.lag() > self.max_lag:
            self.shed += 1
            return SHED_LAG
        return None


class ListenGate:
    """Whether the process should listen: stop while saturated, listen again once recovered.

    Stop when the event-loop lag is over ``max_lag`` or the backlog over ``max_backlog`` (the
    shedding bounds: at that point every new call would be shed anyway, at the cost of its
    conversation). Listen again only when both are down to ``resume_fraction`` of their bound
    *and* the pause has lasted ``min_pause`` seconds: without the gap between the two levels
    and the minimum pause, the first calls of a resumed listener would push it over again
    within a tick, and the listener would flap every few milliseconds. A bound at 0 takes no
    part (both at 0: never stops). A call shed for its wait since accept stops the listener as
    well (:meth:`overflowing`): that wait is the queue in front of the calls, measured directly.
    """

    def __init__(
        self,
        *,
        max_lag: float,
        max_backlog: int,
        resume_fraction: float = 0.5,
        min_pause: float = 0.05,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.max_lag = max_lag
        self.max_backlog = max_backlog
        self.resume_fraction = resume_fraction
        self.min_pause = min_pause
        self._clock = clock
        self.paused = False
        self.pauses = 0  # times it stopped listening
        self.paused_seconds = 0.0  # total of the pauses that ended
        self.last_pause = 0.0  # seconds the last ended pause lasted
        self._since = 0.0  # when the current pause began
        self._not_before = 0.0  # no resume before this time

    @property
    def enabled(self) -> bool:
        return bool(self.max_lag or self.max_backlog)

    def _over(self, lag: float, backlog: int) -> bool:
        return bool(
            (self.max_lag and lag > self.max_lag) or (self.max_backlog and backlog > self.max_backlog)
        )

    def _recovered(self, lag: float, backlog: int) -> bool:
        lag_ok = not self.max_lag or lag <= self.max_lag * self.resume_fraction
        backlog_ok = not self.max_backlog or backlog <= self.max_backlog * self.resume_fraction
        return lag_ok and backlog_ok

    def update(self, lag: float, backlog: int) -> str | None:
        """:data:`PAUSE` or :data:`RESUME` when the listener must change state, else None."""
        now = self._clock()
        if not self.paused:
            if self._over(lag, backlog):
                self.paused = True
                self.pauses += 1
                self._since = now
                self._not_before = now + self.min_pause
                return PAUSE
            return None
        if now >= self._not_before and self._recovered(lag, backlog):
            self.paused = False
            self.last_pause = now - self._since
            self.paused_seconds += self.last_pause
            return RESUME
        return None

    def overflowing(self) -> str | None:
        """A call was shed because it waited past its bound since accept: the queue in front of
        the calls is too long whatever the lag reads. :data:`PAUSE` unless already paused."""
        if self.paused or not self.enabled:
            return None
        now = self._clock()
        self.paused = True
        self.pauses += 1
        self._since = now
        self._not_before = now + self.min_pause
        return PAUSE

    def resume_failed_pause(self) -> None:
        """The listener could not be stopped: count the process as listening again."""
        if self.paused:
            self.paused = False
            self.pauses -= 1

    def retry_resume(self) -> None:
        """Listening again failed: still paused; try again after another ``min_pause``."""
        if not self.paused:
            self.paused = True
            self.paused_seconds -= self.last_pause
            self._not_before = self._clock() + self.min_pause

"""engine.shedding: the two saturation signals, with a fake clock (and once with a real hub)."""

from __future__ import annotations

import time

import gevent
import pytest

from engine.config import ConfigError, load_config
from engine.shedding import PAUSE, RESUME, SHED_BACKLOG, SHED_LAG, SHED_WAIT, ListenGate, LoadShedder


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def test_quiet_process_decides_every_call() -> None:
    clock = Clock()
    shedder = LoadShedder(max_lag=0.02, max_backlog=3, interval=0.005, clock=clock)
    clock.now += 0.005
    shedder.tick()
    assert shedder.lag() == 0.0
    assert shedder.verdict(3) is None and shedder.shed == 0


def test_backlog_over_the_bound_is_shed_and_recovers() -> None:
    shedder = LoadShedder(max_lag=0, max_backlog=2, clock=Clock())
    assert shedder.verdict(3) == SHED_BACKLOG
    assert shedder.verdict(2) is None  # at the bound, not over it
    assert shedder.shed == 1


def test_late_wake_up_is_lag() -> None:
    clock = Clock()
    shedder = LoadShedder(max_lag=0.02, max_backlog=0, interval=0.005, clock=clock)
    clock.now += 0.005 + 0.03  # the monitor woke 30 ms late
    shedder.tick()
    assert shedder.lag() == pytest.approx(0.03)
    assert shedder.verdict(0) == SHED_LAG
    clock.now += 0.005  # the next wake-up is on time: the lag is gone
    shedder.tick()
    assert shedder.verdict(0) is None


def test_an_overdue_monitor_counts_as_lag_before_it_runs() -> None:
    """During a stall the monitor cannot run; its last reading (0) must not be trusted."""
    clock = Clock()
    shedder = LoadShedder(max_lag=0.02, max_backlog=0, interval=0.005, clock=clock)
    clock.now += 0.005
    shedder.tick()
    clock.now += 0.004
    assert shedder.verdict(0) is None  # not due yet
    clock.now += 0.050
    assert shedder.lag() == pytest.approx(0.049)
    assert shedder.verdict(0) == SHED_LAG


def test_zero_limits_turn_shedding_off() -> None:
    clock = Clock()
    shedder = LoadShedder(max_lag=0, max_backlog=0, clock=clock)
    clock.now += 60
    assert shedder.verdict(10_000) is None


def test_lag_monitor_sees_a_busy_hub() -> None:
    shedder = LoadShedder(max_lag=0.1, max_backlog=0, interval=0.005)  # generous: the machine is shared
    busy = [True]
    shedder.restart()
    monitor = gevent.spawn(shedder.run_lag_monitor, gevent.sleep, lambda: busy[0])
    try:
        gevent.sleep(0.05)
        assert shedder.verdict(0) is None
        time.sleep(0.3)  # blocks the hub, as a CPU-bound backlog does
        assert shedder.lag() >= 0.25
        assert shedder.verdict(0) == SHED_LAG
        gevent.sleep(0.05)  # the monitor runs again: the hub is free
        assert shedder.lag() < 0.1
        busy[0] = False  # no call up: the monitor stops by itself
        monitor.join(1.0)
        assert monitor.dead
    finally:
        monitor.kill()


def test_restart_forgets_the_stale_wake_up_of_an_idle_process() -> None:
    clock = Clock()
    shedder = LoadShedder(max_lag=0.02, max_backlog=0, interval=0.005, clock=clock)
    clock.now += 3600  # no call for an hour: no monitor ran
    assert shedder.verdict(0) == SHED_LAG
    shedder.restart()
    assert shedder.verdict(0) is None
    clock.now += 0.03  # the new monitor has not run yet, 30 ms later: that is lag
    assert shedder.verdict(0) == SHED_LAG


# ---------------------------------------------------------------------- wait since accept


def test_a_call_that_waited_too_long_since_accept_is_shed() -> None:
    shedder = LoadShedder(max_lag=0, max_backlog=0, max_wait=0.05, clock=Clock())
    assert shedder.verdict(0, waited=0.05) is None  # at the bound, not over it
    assert shedder.verdict(0, waited=0.051) == SHED_WAIT
    assert shedder.shed == 1
    assert LoadShedder(max_lag=0, max_backlog=0, max_wait=0, clock=Clock()).verdict(0, waited=60) is None


# ---------------------------------------------------------------------- the listener gate


def gate(clock: Clock, **bounds: float) -> ListenGate:
    return ListenGate(
        max_lag=bounds.get("lag", 0.1),
        max_backlog=int(bounds.get("backlog", 100)),
        resume_fraction=0.5,
        min_pause=0.05,
        clock=clock,
    )


def test_the_gate_stops_listening_over_either_bound() -> None:
    clock = Clock()
    by_lag = gate(clock)
    assert by_lag.update(0.1, 100) is None  # at the bounds: still listening
    assert by_lag.update(0.101, 0) == PAUSE and by_lag.paused and by_lag.pauses == 1
    by_backlog = gate(clock)
    assert by_backlog.update(0.0, 101) == PAUSE
    assert by_backlog.update(0.0, 500) is None  # already paused: no second change


def test_the_gate_resumes_only_below_half_the_bounds_and_after_the_minimum_pause() -> None:
    clock = Clock()
    g = gate(clock)
    assert g.update(0.2, 0) == PAUSE
    clock.now += 0.01
    assert g.update(0.0, 0) is None  # recovered at once, but the pause is too short: no flapping
    clock.now += 0.04
    assert g.update(0.06, 0) is None  # under the bound, above half of it: hysteresis holds
    assert g.update(0.05, 51) is None  # lag down to half, backlog still above half
    assert g.update(0.05, 50) == RESUME and not g.paused
    assert g.last_pause == pytest.approx(0.05) and g.paused_seconds == pytest.approx(0.05)
    assert g.update(0.09, 90) is None  # listening again: below the bounds, no new pause
    assert g.update(0.11, 0) == PAUSE and g.pauses == 2


def test_a_bound_at_zero_takes_no_part_and_both_at_zero_never_stop() -> None:
    clock = Clock()
    lag_only = gate(clock, backlog=0)
    assert lag_only.update(0.0, 10**6) is None
    assert lag_only.update(0.2, 10**6) == PAUSE
    clock.now += 0.05
    assert lag_only.update(0.01, 10**6) == RESUME  # the backlog does not hold it either
    off = gate(clock, lag=0, backlog=0)
    assert not off.enabled
    assert off.update(60.0, 10**9) is None


def test_failed_listener_changes_are_undone() -> None:
    clock = Clock()
    g = gate(clock)
    assert g.update(0.2, 0) == PAUSE
    g.resume_failed_pause()  # the socket could not stop listening: it still listens
    assert not g.paused and g.pauses == 0
    assert g.update(0.2, 0) == PAUSE
    clock.now += 0.05
    assert g.update(0.0, 0) == RESUME
    g.retry_resume()  # listen() failed: still paused, the next try after another min_pause
    assert g.paused and g.paused_seconds == 0.0
    assert g.update(0.0, 0) is None
    clock.now += 0.05
    assert g.update(0.0, 0) == RESUME and g.last_pause == pytest.approx(0.1)


def test_a_call_shed_for_its_wait_stops_the_listener_until_the_signals_recover() -> None:
    clock = Clock()
    g = gate(clock)
    assert g.overflowing() == PAUSE and g.pauses == 1
    assert g.overflowing() is None  # already stopped
    clock.now += 0.01
    assert g.update(0.0, 0) is None  # the minimum pause holds
    clock.now += 0.04
    assert g.update(0.0, 0) == RESUME
    assert gate(clock, lag=0, backlog=0).overflowing() is None  # listener stops turned off


@pytest.mark.parametrize(
    "variable",
    ["SHED_LOOP_LAG", "SHED_BACKLOG", "SHED_ACCEPT_WAIT", "SHED_MIN_PAUSE"],
)
def test_negative_shedding_settings_are_refused_at_start(variable: str) -> None:
    with pytest.raises(ConfigError, match=variable.lower()):
        load_config(environ={f"CALLGATE_ENGINE__{variable}": "-1"})


def test_a_gate_without_minimum_pause_resumes_at_the_first_tick_that_recovered() -> None:
    clock = Clock()
    gate = ListenGate(max_lag=0.0, max_backlog=16, min_pause=0.0, clock=clock)
    assert gate.update(0.0, 17) == PAUSE
    assert gate.update(0.0, 9) is None  # over half the bound: still paused
    clock.now += 0.005
    assert gate.update(0.0, 8) == RESUME

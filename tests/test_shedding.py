"""engine.shedding: the two saturation signals, with a fake clock (and once with a real hub)."""

from __future__ import annotations

import time

import gevent
import pytest

from engine.shedding import SHED_BACKLOG, SHED_LAG, LoadShedder


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

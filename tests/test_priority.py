"""engine.priority: work that waits for an idle hub, a bounded time (a real gevent hub and sockets)."""

from __future__ import annotations

import time

import gevent
import gevent.socket

from engine.priority import wait_for_idle


def test_an_idle_hub_lets_the_work_run_at_once() -> None:
    started = time.monotonic()
    assert wait_for_idle(5.0) is True
    assert time.monotonic() - started < 1.0  # far below the bound: it did not wait for it


def test_off_returns_at_once_without_yielding() -> None:
    ran: list[str] = []
    gevent.spawn(ran.append, "other")
    assert wait_for_idle(0) is False
    assert ran == []  # nothing else ran: the caller kept the hub


def test_a_busy_hub_makes_the_work_wait_but_only_up_to_the_bound() -> None:
    """Two greenlets keep a socket pair busy (what calls do): the hub is never idle, so the
    work waits for its bound, and meanwhile the busy greenlets are served."""
    left, right = gevent.socket.socketpair()
    exchanged = [0]
    stop = [False]

    def ping_pong(sock: gevent.socket.socket, serve_first: bool) -> None:
        if serve_first:
            sock.sendall(b"x")
        while not stop[0]:
            sock.recv(1)
            exchanged[0] += 1
            sock.sendall(b"x")

    busy = [gevent.spawn(ping_pong, left, True), gevent.spawn(ping_pong, right, False)]
    try:
        gevent.sleep(0.01)
        before = exchanged[0]
        started = time.monotonic()
        assert wait_for_idle(0.2) is False
        waited = time.monotonic() - started
        assert waited >= 0.19  # the whole bound, to the timer's resolution
        assert exchanged[0] - before > 100  # the busy ones ran meanwhile
    finally:
        stop[0] = True
        gevent.killall(busy)
        left.close()
        right.close()
    assert wait_for_idle(5.0) is True  # idle again: at once

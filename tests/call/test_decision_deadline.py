"""engine.decision_deadline in the call driver: a decision that takes too long is answered
ENGINE_DEGRADED, whatever the decision path catches, and a decision in time leaves no timer.

The real CallHandler over a socket pair, FreeSWITCH's side played from the capture of a
connect reply (as tests/call/test_shedding_driver.py).
"""

from __future__ import annotations

import time

import gevent
from gevent import socket as gsocket
from prometheus_client import CollectorRegistry

from engine.call.driver import CallHandler, CallRecord, DecideFn
from engine.config import load_config
from engine.decision import Decision, Reason, Reject
from engine.esl.connection import EslConnection
from engine.metrics import EngineMetrics
from engine.model import CallRequest
from engine.rules.config import RulesConfig
from tests.call.test_shedding_driver import connect_reply, recv_until


def handler(decide: DecideFn, ended: list[CallRecord], deadline: str) -> CallHandler:
    config = load_config(environ={"CALLGATE_ENGINE__DECISION_DEADLINE": deadline})
    return CallHandler(
        config,
        decide,
        EngineMetrics(CollectorRegistry()),
        RulesConfig(),
        on_end=ended.append,
    )


def converse(call_handler: CallHandler, linger: float = 0.0) -> tuple[bytes, gevent.Greenlet]:
    """The engine's answer to the channel data; ``linger`` seconds later the switch hangs up."""
    engine_side, switch_side = gsocket.socketpair()
    conn = EslConnection(engine_side)
    worker = gevent.spawn(call_handler, conn, ("127.0.0.1", 0))
    try:
        assert recv_until(switch_side, b"connect\n\n") == b"connect\n\n"
        switch_side.sendall(connect_reply())
        answer = recv_until(switch_side, b"\n\n")
        gevent.sleep(linger)
    finally:
        switch_side.close()
        worker.join(10)
        conn.close()
    return answer, worker


def test_a_late_decision_is_answered_engine_degraded_and_releases_its_slots() -> None:
    swallowed: list[BaseException] = []

    def slow_decide(request: CallRequest) -> Decision:
        try:
            gevent.sleep(5)  # a Redis that does not answer
        except Exception as exc:  # the decision path's own handlers must not swallow the deadline
            swallowed.append(exc)
        return Reject(Reason.DESTINATION_BLOCKED, detail="too late")

    ended: list[CallRecord] = []
    started = time.monotonic()  # (not the loop's clock: it is only updated as the loop runs)
    answer, worker = converse(handler(slow_decide, ended, deadline="0.2"))
    assert b"ENGINE_DEGRADED" in answer and b"DESTINATION_BLOCKED" not in answer, answer
    assert time.monotonic() - started < 4  # the decision would have taken 5 s
    assert swallowed == []
    assert worker.successful()
    # Whatever the limits script took before the deadline is released with the call.
    assert len(ended) == 1 and isinstance(ended[0].decision, Reject)
    assert ended[0].decision.detail == "decision deadline exceeded"


def test_a_decision_in_time_leaves_no_timer_behind() -> None:
    def quick_decide(request: CallRequest) -> Decision:
        return Reject(Reason.DESTINATION_BLOCKED, detail="test")

    ended: list[CallRecord] = []
    # The call stays up past its decision's deadline: a timer left running would throw into it.
    answer, worker = converse(handler(quick_decide, ended, deadline="0.1"), linger=0.3)
    assert b"DESTINATION_BLOCKED" in answer, answer
    assert worker.successful(), worker.exception
    assert ended == []  # a reject without slots: nothing to release

"""Load shedding in the call driver: a saturated hub answers ENGINE_DEGRADED before deciding.

The real CallHandler over a socket pair, FreeSWITCH's side played from the capture of a
connect reply. Saturation is a blocked hub (``time.sleep`` between the connect and its
reply), which is what a CPU-bound backlog looks like to the event loop.
"""

from __future__ import annotations

import re
import time
from pathlib import Path

import gevent
from gevent import socket as gsocket
from prometheus_client import CollectorRegistry

from engine.call.driver import CallHandler
from engine.config import load_config
from engine.decision import Decision, Reason, Reject
from engine.esl.connection import EslConnection
from engine.metrics import EngineMetrics
from engine.model import CallRequest
from engine.rules.config import RulesConfig

FIXTURES = Path(__file__).resolve().parent.parent / "fixtures"


def connect_reply() -> bytes:
    text = (FIXTURES / "connect_reply_raw.txt").read_bytes()
    return re.split(rb"^----- << -----\n", text, flags=re.MULTILINE)[1][:-1]


def recv_until(sock: gsocket.socket, marker: bytes, timeout: float = 10.0) -> bytes:
    data = b""
    with gevent.Timeout(timeout):
        while marker not in data:
            chunk = sock.recv(65536)
            if not chunk:
                break
            data += chunk
    return data


def one_call(handler: CallHandler, block_hub: float) -> bytes:
    """Returns what the engine wrote after the channel data (its decision)."""
    engine_side, switch_side = gsocket.socketpair()
    conn = EslConnection(engine_side)
    worker = gevent.spawn(handler, conn, ("127.0.0.1", 0))
    try:
        assert recv_until(switch_side, b"connect\n\n") == b"connect\n\n"
        time.sleep(block_hub)  # the hub is stuck: every greenlet, the lag monitor too, waits
        switch_side.sendall(connect_reply())
        return recv_until(switch_side, b"\n\n")
    finally:
        switch_side.close()
        worker.join(10)
        conn.close()


def handler_with(decided: list[CallRequest], **engine: str) -> CallHandler:
    environ = {f"CALLGATE_ENGINE__{k.upper()}": v for k, v in engine.items()}
    config = load_config(environ=environ)

    def decide(request: CallRequest) -> Decision:
        decided.append(request)
        return Reject(Reason.DESTINATION_BLOCKED, detail="test")

    return CallHandler(config, decide, EngineMetrics(CollectorRegistry()), RulesConfig())


def test_a_call_arriving_on_a_stuck_hub_is_shed_without_deciding() -> None:
    decided: list[CallRequest] = []
    handler = handler_with(decided, shed_loop_lag="0.1")
    first = one_call(handler, block_hub=0.0)
    assert b"DESTINATION_BLOCKED" in first and len(decided) == 1
    shed = one_call(handler, block_hub=0.4)
    assert b"ENGINE_DEGRADED" in shed, shed
    assert len(decided) == 1  # the rules and the limits never ran for it
    assert handler._shedder.shed == 1
    gevent.sleep(0.05)  # the hub is free again: the monitor's next readings show it
    after = one_call(handler, block_hub=0.0)
    assert b"DESTINATION_BLOCKED" in after and len(decided) == 2


def test_shedding_off_decides_even_on_a_stuck_hub() -> None:
    decided: list[CallRequest] = []
    handler = handler_with(decided, shed_loop_lag="0", shed_backlog="0", shed_accept_wait="0")
    assert b"DESTINATION_BLOCKED" in one_call(handler, block_hub=0.4)
    assert len(decided) == 1 and handler._lag_monitor is None


def test_backlog_over_its_bound_is_shed() -> None:
    decided: list[CallRequest] = []
    handler = handler_with(decided, shed_loop_lag="0", shed_backlog="1")
    waiting = [gevent.spawn(gevent.sleep, 5) for _ in range(2)]
    handler._undecided.update(waiting)  # two other calls still waiting for their decision
    try:
        assert b"ENGINE_DEGRADED" in one_call(handler, block_hub=0.0)
        assert decided == []
        handler._undecided.difference_update(waiting)
        assert b"DESTINATION_BLOCKED" in one_call(handler, block_hub=0.0)
    finally:
        gevent.killall(waiting)

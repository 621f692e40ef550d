"""Shedding at the front of the queue, on real sockets: a saturated engine stops listening.

What FreeSWITCH needs from a saturated engine is a *refused* connection (it then tries the next
host of ``socket h1|h2`` at once); an accepted connection is final. These tests use the real
CallServer and CallHandler on a loopback listener; saturation is a blocked hub (``time.sleep``),
what a CPU-bound backlog looks like to the event loop. Refused means ECONNREFUSED: the kernel
answered the SYN with a RST (a dropped SYN would be a timeout instead, see the last test).
"""

from __future__ import annotations

import logging
import socket as stdsocket
import time

import gevent
import pytest
from gevent import socket as gsocket
from prometheus_client import CollectorRegistry

from engine.call.driver import CallHandler
from engine.config import load_config
from engine.decision import Decision, Reason, Reject
from engine.esl.server import CallServer, listening_socket
from engine.metrics import EngineMetrics
from engine.model import CallRequest
from engine.rules.config import RulesConfig
from tests.call.test_shedding_driver import connect_reply, recv_until


def free_port() -> int:
    with stdsocket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


class Engine:
    """A CallHandler behind a CallServer on an explicitly bound port, as `callgate serve` binds."""

    def __init__(self, **engine: str) -> None:
        environ = {f"CALLGATE_ENGINE__{k.upper()}": v for k, v in engine.items()}
        self.decided: list[CallRequest] = []
        self.metrics = EngineMetrics(CollectorRegistry())
        self.handler = CallHandler(load_config(environ=environ), self._decide, self.metrics, RulesConfig())
        self.listener = listening_socket("127.0.0.1", free_port())
        self.address = self.listener.getsockname()
        self.server = CallServer(self.listener, self.handler)
        self.handler.attach_listener(self.server)
        self.server.start()

    def _decide(self, request: CallRequest) -> Decision:
        self.decided.append(request)
        return Reject(Reason.DESTINATION_BLOCKED, detail="test")

    def gauge(self, name: str) -> float:
        value = self.metrics.registry.get_sample_value(name)
        assert value is not None
        return value

    def wait_listening(self, listening: bool, timeout: float = 10.0) -> None:
        with gevent.Timeout(timeout):
            while self.server.listening is not listening:
                gevent.sleep(0.005)

    def close(self) -> None:
        self.server.stop(timeout=1)


def play_call(sock: gsocket.socket) -> bytes:
    """FreeSWITCH's side of a call on a connected socket: the engine's decision."""
    assert recv_until(sock, b"connect\n\n") == b"connect\n\n"
    sock.sendall(connect_reply())
    return recv_until(sock, b"\n\n")


def refused(address: tuple[str, int]) -> bool:
    """True when the kernel answered the SYN with a RST (ECONNREFUSED)."""
    try:
        gsocket.create_connection(address, timeout=5).close()
    except ConnectionRefusedError:
        return True
    return False


def test_a_saturated_engine_refuses_connections_and_listens_again_when_it_recovers() -> None:
    engine = Engine(shed_loop_lag="0.1", shed_accept_wait="0")
    engine.handler._gate.min_pause = 0.5  # long enough for this test to look while it lasts
    try:
        first = gsocket.create_connection(engine.address, timeout=5)
        assert recv_until(first, b"connect\n\n") == b"connect\n\n"  # a call in flight
        time.sleep(0.4)  # the hub is stuck: the lag monitor wakes 0.4 s late
        engine.wait_listening(False)
        assert engine.gauge("callgate_listening") == 0
        assert engine.gauge("callgate_listener_stops_total") == 1
        assert refused(engine.address)  # FreeSWITCH would try its next engine now
        first.sendall(connect_reply())  # the call accepted before the stop is still answered
        answer = recv_until(first, b"\n\n")
        assert b"ENGINE_DEGRADED" in answer or b"DESTINATION_BLOCKED" in answer, answer
        first.close()
        engine.wait_listening(True)  # the hub is free again: lag under half its bound
        assert engine.gauge("callgate_listening") == 1
        assert engine.gauge("callgate_listener_stopped_seconds_total") >= 0.5
        with gsocket.create_connection(engine.address, timeout=5) as again:
            assert b"DESTINATION_BLOCKED" in play_call(again)
    finally:
        engine.close()


def test_a_flapping_listener_is_counted_every_time_and_logged_once_per_interval(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """With tight bounds and no minimum pause (the 50 ms recipe of docs/performance.md) the
    listener may stop and resume many times a second: each change is in the metrics, the log
    has one line of each kind per interval."""
    engine = Engine(shed_loop_lag="0.1", shed_accept_wait="0", shed_min_pause="0")
    assert engine.handler._gate.min_pause == 0
    try:
        with caplog.at_level(logging.WARNING, logger="callgate.call"):
            for _ in range(3):
                call = gsocket.create_connection(engine.address, timeout=5)
                assert recv_until(call, b"connect\n\n") == b"connect\n\n"  # calls up: the monitor runs
                time.sleep(0.25)  # the hub is stuck: over the lag bound
                engine.wait_listening(False)
                engine.wait_listening(True)
                call.close()
        assert engine.gauge("callgate_listener_stops_total") == 3
        lines = [record.getMessage() for record in caplog.records]
        assert sum("saturated: stopped listening" in line for line in lines) == 1, lines
        assert sum("recovered: listening again" in line for line in lines) == 1, lines
    finally:
        engine.close()


def test_connections_queued_in_the_kernel_are_taken_before_the_listener_stops() -> None:
    """shutdown() of a listener resets what is still in its accept queue; FreeSWITCH would treat
    that as a silent engine (park_timeout). So the queue is accepted first and answered."""
    engine = Engine(shed_loop_lag="0", shed_backlog="0", shed_accept_wait="0")
    try:
        # Blocking stdlib sockets: the hub cannot run, so the kernel completes the handshakes
        # and the connections wait in the accept queue, as they do on a saturated engine.
        queued = [stdsocket.create_connection(engine.address, timeout=5) for _ in range(3)]
        assert engine.server.stop_listening() == 3
        assert refused(engine.address)
        for sock in queued:
            sock.setblocking(False)
            switch_side = gsocket.socket(fileno=sock.detach())
            assert b"DESTINATION_BLOCKED" in play_call(switch_side)  # answered, not reset
            switch_side.close()
        assert len(engine.decided) == 3
        engine.server.listen_again()
        with gsocket.create_connection(engine.address, timeout=5) as again:
            assert b"DESTINATION_BLOCKED" in play_call(again)
    finally:
        engine.close()


def test_a_call_that_waited_too_long_since_accept_is_answered_engine_degraded() -> None:
    engine = Engine(shed_loop_lag="1", shed_backlog="0", shed_accept_wait="0.2")
    serve = engine.server._handler

    def starved(conn: object, peer: tuple[object, ...], accepted_at: float) -> None:
        # A CPU-bound hub: the call's greenlet first runs 0.3 s after its accept (a blocking
        # sleep, so nothing else runs meanwhile, as when other calls hold the CPU).
        time.sleep(0.3)
        serve(conn, peer, accepted_at)  # type: ignore[arg-type]

    engine.server._handler = starved
    try:
        with gsocket.create_connection(engine.address, timeout=5) as switch_side:
            assert recv_until(switch_side, b"connect\n\n") == b"connect\n\n"
            switch_side.sendall(connect_reply())
            assert b"ENGINE_DEGRADED" in recv_until(switch_side, b"\n\n")
        assert engine.decided == []  # refused before the rules and the limits ran
        registry = engine.metrics.registry
        assert registry.get_sample_value("callgate_degraded_decisions_total", {"cause": "shed"}) == 1
        # That wait is the queue in front of the calls: the listener stopped for it as well.
        assert registry.get_sample_value("callgate_listener_stops_total") == 1
        engine.server._handler = serve
        engine.wait_listening(True)
        with gsocket.create_connection(engine.address, timeout=5) as fresh:
            assert b"DESTINATION_BLOCKED" in play_call(fresh)
    finally:
        engine.close()


def test_a_switch_slow_to_send_its_channel_data_is_not_the_engines_queue() -> None:
    # On the real switch, FreeSWITCH's replies delayed 0.5 s made an idle engine shed every
    # call and stop listening (docs/real-switch-lab.md): the wait after `connect` is the switch's.
    engine = Engine(shed_loop_lag="1", shed_backlog="0", shed_accept_wait="0.2")
    try:
        with gsocket.create_connection(engine.address, timeout=5) as switch_side:
            assert recv_until(switch_side, b"connect\n\n") == b"connect\n\n"
            gevent.sleep(0.4)  # the switch takes 0.4 s to answer; the engine's hub is free
            switch_side.sendall(connect_reply())
            assert b"DESTINATION_BLOCKED" in recv_until(switch_side, b"\n\n")
        assert len(engine.decided) == 1
        registry = engine.metrics.registry
        assert registry.get_sample_value("callgate_degraded_decisions_total", {"cause": "shed"}) == 0
        assert registry.get_sample_value("callgate_listener_stops_total") == 0
        assert engine.server.listening
    finally:
        engine.close()


def test_a_listener_bound_to_a_kernel_chosen_port_keeps_it_across_a_stop() -> None:
    listener = listening_socket("127.0.0.1", 0)
    address = listener.getsockname()
    server = CallServer(listener, lambda conn, peer, accepted_at: None)
    server.start()
    try:
        server.stop_listening()
        assert refused(address)
        server.listen_again()
        assert listener.getsockname() == address
        gsocket.create_connection(address, timeout=5).close()
    finally:
        server.stop(timeout=1)


def test_why_not_a_small_backlog_a_full_accept_queue_drops_the_syn() -> None:
    """The alternative the design rejects, shown: with the accept queue full, Linux drops the SYN
    silently (no RST), so the client's connect() waits for its SYN retransmission (1 s, then 3 s,
    ...). FreeSWITCH sets no connect timeout: a full queue would cost the caller seconds."""
    with stdsocket.socket() as server:
        server.bind(("127.0.0.1", 0))
        server.listen(0)  # Linux keeps backlog + 1 = 1 completed connection
        held = [stdsocket.create_connection(server.getsockname(), timeout=5)]
        late = stdsocket.socket()
        late.settimeout(0.5)  # shorter than the first SYN retransmission
        try:
            with pytest.raises(TimeoutError):
                late.connect(server.getsockname())  # neither accepted nor refused: dropped
        finally:
            late.close()
            for sock in held:
                sock.close()


def test_a_stopped_server_never_listens_again() -> None:
    """At shutdown the lag monitor may still run (calls draining): no listen() on a closed socket."""
    listener = listening_socket("127.0.0.1", 0)
    server = CallServer(listener, lambda conn, peer, accepted_at: None)
    server.start()
    server.stop_listening()
    server.stop(timeout=1)
    server.listen_again()  # a no-op, not an error
    assert not server.listening and server.stop_listening() == 0

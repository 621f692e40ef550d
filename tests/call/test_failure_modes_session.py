"""The documented failure modes no other test proved (the audit of the failure-mode tables).

docs/call-session.md, "Failure modes and what the engine decides": the session's decisions
are tested on the pure session (frames in, actions out, as tests/call/test_session.py); the
driver's (metrics, logs, the socket, what a failed write or a reset means, a decision that
raises) with the real CallHandler over a socket pair, FreeSWITCH's side played by the test
(as tests/call/test_decision_deadline.py).

docs/freeswitch.md, "Failure modes and the decision for each" (`callgate fsxml`): the
WSGI application over a stub or a real SnapshotHolder (as tests/fsxml/test_service.py), and
one real `callgate fsxml` process for what only its start-up code does.

The other modes of both tables are proved elsewhere (the list is in the audit's report).
"""

from __future__ import annotations

import base64
import contextlib
import hashlib
import http.client
import io
import logging
import socket
import struct
import subprocess
import threading
import time
import xml.etree.ElementTree as ET
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType
from typing import Any

import gevent
import gevent.event
import pytest
import redis
from gevent import socket as gsocket
from prometheus_client import CollectorRegistry

import engine.fsxml.access as fsxml_access
import engine.fsxml.server as fsxml_server
from engine.call.driver import CallHandler, CallRecord
from engine.call.render import accept_batch, reject_batch
from engine.call.session import Action, CallSession, Deadline, Disarm, Finish, Outcome, Phase, Warn
from engine.config import FsxmlSettings, load_config
from engine.decision import Decision, Reason, Reject
from engine.esl.commands import Batch
from engine.esl.connection import EslConnection
from engine.fsxml.credentials import GatewayPasswords
from engine.fsxml.directory import Answers, Directory, a1_hash
from engine.fsxml.request import Lookup
from engine.fsxml.server import PATH, FsxmlApp, SnapshotSource
from engine.metrics import EngineMetrics
from engine.model import CallRequest, Gateway
from engine.rules.config import RulesConfig
from engine.state.snapshot import apply_changes, publish_snapshot
from engine.state.watcher import SnapshotHolder
from engine.sync import publish_once
from loadtest.fsemu import wire
from tests.call.test_session import (
    ACCEPT,
    DISCONNECT,
    LINGER,
    REJECT,
    UUID,
    deciding,
    hangup_complete,
    new_session,
    reply,
)
from tests.call.test_shedding_driver import connect_reply
from tests.fsxml import forms
from tests.fsxml.catalog import DOMAIN, catalog
from tests.private_redis import PrivateRedis, private_redis_fixture, quick_client  # noqa: F401
from tests.support import (
    CALLGATE,
    ROOT,
    config_for,
    engine_environment,
    free_port,
    prepare_database,
    wait_until,
)

# ====================================================================== the session (pure)


def test_late_replies_after_a_reject_are_warned_and_the_session_keeps_reading() -> None:
    """call-session.md: replies late, after a reject: "warned, keep reading"."""
    session = deciding()
    session.decided(REJECT, holds_slots=False)
    [warning] = session.expired(Deadline.REPLIES)
    assert isinstance(warning, Warn) and warning.kind == "late_replies"
    assert "8 command replies still due" in warning.message
    assert session.phase is Phase.ANSWERING and not session.done
    for _ in range(7):
        assert session.frame(reply()) == []  # still counted after the deadline
    assert session.frame(reply()) == [Disarm(Deadline.REPLIES)]
    assert session.frame(hangup_complete("CALL_REJECTED")) == [Finish(Outcome.ENDED, "CALL_REJECTED")]


def test_a_disconnect_notice_ends_a_rejected_call_a_linger_notice_does_not() -> None:
    """call-session.md: CHANNEL_HANGUP_COMPLETE / `disconnect` notice, after a reject: "ended"."""
    session = deciding()
    session.decided(REJECT, holds_slots=False)
    for _ in range(session.replies_pending):
        session.frame(reply())
    assert session.frame(LINGER) == [] and not session.done
    assert session.frame(DISCONNECT) == [Finish(Outcome.ENDED, "FreeSWITCH disconnected")]
    assert session.done


@pytest.mark.parametrize(
    ("end", "outcome"),
    [
        (lambda s: s.peer_gone("connection reset by peer", clean=False), Outcome.GONE),
        (lambda s: s.peer_gone("connection closed by the peer", clean=True), Outcome.GONE),
        (lambda s: s.protocol_error("bad header"), Outcome.PROTOCOL),
    ],
    ids=["reset", "eof", "garbage"],
)
def test_before_the_decision_a_dropped_connection_ends_with_its_kind(
    end: Callable[[CallSession], list[Action]], outcome: Outcome
) -> None:
    """call-session.md, before the decision: a reset or a failed write is "dropped, `gone`",
    garbage "dropped, `protocol`" (the driver counts the metric by the outcome)."""
    session = new_session()
    session.start()
    [finish] = end(session)
    assert isinstance(finish, Finish) and finish.outcome is outcome and not finish.kept
    assert session.done


# ====================================================================== the driver (CallHandler)

NO_SHEDDING = {"shed_loop_lag": "0", "shed_backlog": "0", "shed_accept_wait": "0"}
WAIT = 10.0  # seconds: generous bounds for what must happen (the machine may be busy)


@dataclass
class Engine:
    handler: CallHandler
    metrics: EngineMetrics
    released: list[CallRecord] = field(default_factory=list)  # on_end: the call's slots released
    decided: list[CallRequest] = field(default_factory=list)

    def socket_errors(self, kind: str) -> float:
        value = self.metrics.registry.get_sample_value("callgate_socket_errors_total", {"kind": kind})
        return 0.0 if value is None else value


def engine_with(decide: Callable[[CallRequest], Decision], **settings: str) -> Engine:
    environ = {f"CALLGATE_ENGINE__{k.upper()}": v for k, v in {**NO_SHEDDING, **settings}.items()}
    metrics = EngineMetrics(CollectorRegistry())
    made = Engine(CallHandler(load_config(environ=environ), decide, metrics, RulesConfig()), metrics)

    def on_end(record: CallRecord) -> None:
        made.released.append(record)

    made.handler._on_end = on_end
    return made


def deciding_with(decision: Decision, **settings: str) -> Engine:
    def decide(request: CallRequest) -> Decision:
        made.decided.append(request)
        return decision

    made = engine_with(decide, **settings)
    return made


ACCEPTED = accept_batch(ACCEPT, None, UUID, guard_uuid=UUID)
BLOCKED = Reject(Reason.DESTINATION_BLOCKED, detail="test")
REJECTED = reject_batch(BLOCKED, 403, "Forbidden", guard_uuid=UUID)


def tcp_pair() -> tuple[gsocket.socket, gsocket.socket]:
    """(engine side, switch side) of a loopback TCP connection: a reset (RST) is possible."""
    with gsocket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen(1)
        switch = gsocket.create_connection(listener.getsockname())
        engine_side, _ = listener.accept()
    return engine_side, switch


class Switch:
    """FreeSWITCH's side of one outbound-socket call; the engine's side runs the handler as
    engine.esl.server does (the socket is closed once the handler returns)."""

    def __init__(self, made: Engine, *, tcp: bool = False) -> None:
        engine_side, self.sock = tcp_pair() if tcp else gsocket.socketpair()
        self.conn = EslConnection(engine_side)
        self.replied = 0
        self.worker = gevent.spawn(self._serve, made.handler)

    def _serve(self, handler: CallHandler) -> None:
        try:
            handler(self.conn, ("127.0.0.1", 0))
        finally:
            self.conn.close()

    def __enter__(self) -> Switch:
        assert self.read(len(b"connect\n\n")) == b"connect\n\n"
        return self

    def __exit__(
        self, kind: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.sock.close()
        self.worker.join(WAIT)
        alive = not self.worker.dead
        self.worker.kill()
        if kind is None:
            assert not alive, "the engine still follows a call whose socket is gone"
            assert self.worker.successful(), self.worker.exception

    def read(self, size: int) -> bytes:
        data = b""
        with gevent.Timeout(WAIT, AssertionError(f"the engine did not write {size} bytes")):
            while len(data) < size:
                chunk = self.sock.recv(size - len(data))
                if not chunk:
                    break
                data += chunk
        return data

    def send_channel_data(self) -> None:
        self.sock.sendall(connect_reply())

    def expect(self, batch: Batch) -> None:
        assert self.read(len(batch.payload)) == batch.payload

    def reply(self, count: int) -> None:
        """The next ``count`` replies to the batch, in order (the guard's sched_del first)."""
        for _ in range(count):
            first = self.replied == 0
            self.sock.sendall(wire.api_response("+OK Deleted: 1\n") if first else wire.command_reply("+OK"))
            self.replied += 1

    def hang_up(self, cause: str = "NORMAL_CLEARING") -> None:
        fields = [("Event-Name", "CHANNEL_HANGUP_COMPLETE"), ("Unique-ID", UUID), ("Hangup-Cause", cause)]
        self.sock.sendall(wire.event_plain_frame(fields))

    def reset(self) -> None:
        """Close with an RST (SO_LINGER 0), as a crashed peer or a middlebox does."""
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        self.sock.close()

    def closed_by_engine(self) -> bool:
        """Wait for the engine to close its side: True at end of stream, having read nothing."""
        with gevent.Timeout(WAIT, AssertionError("the engine did not close the socket")):
            return self.sock.recv(65536) == b""


def kept_lines(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [r.getMessage() for r in caplog.records if "its limit slots are kept" in r.getMessage()]


@pytest.mark.parametrize("case", ["abandoned", "no channel data", "garbage", "reset"])
def test_before_the_decision_each_drop_is_counted_by_its_kind(
    case: str, caplog: pytest.LogCaptureFixture
) -> None:
    """call-session.md, before the decision: the disconnect notice "counted as `gone`, logged at
    INFO, not a protocol error"; no channel data within connect_timeout "dropped, `timeout`";
    garbage "dropped, `protocol`"; a reset "dropped, `gone`". Nothing is decided."""
    caplog.set_level(logging.INFO)
    # Only the silent switch waits for the deadline: the others must not race it.
    made = deciding_with(BLOCKED, connect_timeout="0.2" if case == "no channel data" else "30")
    kind, level, detail = {
        "abandoned": ("gone", logging.INFO, "dropped: the call ended before its channel data"),
        "no channel data": ("timeout", logging.WARNING, "dropped: no channel data within 0.2s"),
        "garbage": ("protocol", logging.WARNING, "dropped: malformed data from FreeSWITCH"),
        "reset": ("gone", logging.WARNING, "Connection reset by peer"),
    }[case]
    with Switch(made, tcp=True) as switch:
        if case == "abandoned":
            switch.sock.sendall(wire.disconnect_notice(UUID))
        elif case == "garbage":
            switch.sock.sendall(b"\x00\xffno colon here\n\n")
        if case == "reset":
            switch.reset()
            switch.worker.join(WAIT)
        else:
            assert switch.closed_by_engine()
    assert made.decided == [] and made.released == []
    counted = {k: made.socket_errors(k) for k in ("gone", "timeout", "protocol")}
    assert counted == {k: float(k == kind) for k in counted}
    [line] = [r for r in caplog.records if "dropped: " in r.getMessage()]
    assert line.levelno == level and detail in line.getMessage(), line.getMessage()


def test_late_replies_after_an_accept_are_counted_and_the_call_is_followed_to_its_hangup(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """call-session.md, after an accept: replies past reply_timeout are "warned
    (`late_replies`), keep reading, keep counting": the socket stays open, the slots held,
    and the hangup that comes later releases them."""
    caplog.set_level(logging.INFO)
    made = deciding_with(ACCEPT, reply_timeout="0.1")
    with Switch(made) as switch:
        switch.send_channel_data()
        switch.expect(ACCEPTED)
        wait_until(lambda: made.socket_errors("late_replies") == 1, WAIT, what="late replies counted")
        assert not switch.worker.dead and made.released == []  # still following, still counted
        switch.reply(8)
        switch.hang_up()
        assert switch.closed_by_engine()
    assert [record.hangup_cause for record in made.released] == ["NORMAL_CLEARING"]
    assert made.socket_errors("late_replies") == 1
    assert "still following the call" in caplog.text


@pytest.mark.parametrize("decision", ["accept", "reject"])
def test_no_hangup_within_hangup_timeout_closes_the_socket_and_keeps_an_accepted_call_counted(
    decision: str, caplog: pytest.LogCaptureFixture
) -> None:
    """call-session.md: no CHANNEL_HANGUP_COMPLETE within hangup_timeout: "socket closed", and
    after an accept "slots kept" (left to their Redis deadline / the reconciler)."""
    caplog.set_level(logging.INFO)
    made = deciding_with(ACCEPT if decision == "accept" else BLOCKED, hangup_timeout="0.3")
    with Switch(made) as switch:
        switch.send_channel_data()
        switch.expect(ACCEPTED if decision == "accept" else REJECTED)
        with contextlib.suppress(OSError):  # on a stalled machine the deadline may come first
            switch.reply(8)
        assert switch.closed_by_engine()  # the switch never hung up
    assert made.released == []
    assert made.socket_errors("timeout") == 1
    kept = kept_lines(caplog)
    if decision == "accept":
        assert len(kept) == 1 and "no CHANNEL_HANGUP_COMPLETE within 0.3s" in kept[0], kept
    else:
        assert kept == []


def test_a_failed_write_of_an_accept_keeps_it_counted(caplog: pytest.LogCaptureFixture) -> None:
    """call-session.md: "connection reset, write failed", after an accept: "slots kept". The
    switch is gone while the engine decides; the accept's write fails."""
    caplog.set_level(logging.INFO)
    gone = gevent.event.Event()

    def decide(request: CallRequest) -> Decision:
        made.decided.append(request)
        gone.wait(WAIT)
        return ACCEPT

    made = engine_with(decide, decision_deadline="30")
    with Switch(made) as switch:
        switch.send_channel_data()
        wait_until(lambda: made.decided, WAIT, what="the decision started")
        switch.sock.close()
        gone.set()
        switch.worker.join(WAIT)
        assert switch.worker.dead
    assert made.released == []
    [line] = kept_lines(caplog)
    assert "Broken pipe" in line or "Connection reset" in line, line  # the failed write
    assert made.socket_errors("gone") == 0  # a decided call's socket may end: not an error


@pytest.mark.parametrize(
    ("replies", "end", "released"),
    [
        (4, "eof", True),  # the bridge never acknowledged: never queued
        (4, "reset", False),  # a reset says nothing of what FreeSWITCH read
        (8, "eof", False),  # the bridge was queued: it may run
        (8, "garbage", False),
    ],
)
def test_after_an_accept_only_an_orderly_end_before_the_bridge_reply_releases(
    replies: int, end: str, released: bool, caplog: pytest.LogCaptureFixture
) -> None:
    """call-session.md, after an accept: orderly EOF before the bridge's reply "released";
    orderly EOF after it, a reset, garbage: "slots kept". Over a real TCP connection, so
    the driver's end-of-stream / reset distinction is the one that decides."""
    caplog.set_level(logging.INFO)
    made = deciding_with(ACCEPT)
    with Switch(made, tcp=True) as switch:
        switch.send_channel_data()
        switch.expect(ACCEPTED)
        switch.reply(replies)
        if end == "reset":
            switch.reset()
        elif end == "eof":
            switch.sock.shutdown(socket.SHUT_WR)
            assert switch.closed_by_engine()
        else:
            switch.sock.sendall(b"\x00\xffno colon here\n\n")
            assert switch.closed_by_engine()
        switch.worker.join(WAIT)
    assert len(made.released) == int(released), made.released
    assert len(kept_lines(caplog)) == int(not released)
    assert made.socket_errors("protocol") == float(end == "garbage")


def test_a_decision_that_raises_is_answered_degraded_and_releases_at_once(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """call-session.md: a decision that "raised": ENGINE_DEGRADED, "whatever the limits took is
    released at once" (before the call ends, not at its hangup)."""
    caplog.set_level(logging.INFO)

    def decide(request: CallRequest) -> Decision:
        raise RuntimeError("the limits script failed")

    made = engine_with(decide)
    degraded = reject_batch(Reject(Reason.ENGINE_DEGRADED), 503, "Service Unavailable", guard_uuid=UUID)
    with Switch(made) as switch:
        switch.send_channel_data()
        switch.expect(degraded)
        wait_until(lambda: made.released, WAIT, what="the slots released")  # the switch has not hung up
        [record] = made.released
        assert isinstance(record.decision, Reject) and record.decision.detail == "internal error"
        switch.reply(8)
        switch.hang_up("CALL_REJECTED")
        assert switch.closed_by_engine()
    assert len(made.released) == 1
    assert "decision failed; answering ENGINE_DEGRADED" in caplog.text
    assert "the limits script failed" in caplog.text  # the traceback is logged


# ====================================================================== callgate fsxml

SECRET = "fs-S3cret!"
SETTINGS = FsxmlSettings(
    domain=DOMAIN, allowed_networks=("127.0.0.1/32", "10.0.0.0/8"), username="fs", password=SECRET
)


def basic(user: str = "fs", password: str = SECRET) -> str:
    return "Basic " + base64.b64encode(f"{user}:{password}".encode()).decode()


class Untouchable(io.RawIOBase):
    """A request body that must not be read."""

    def read(self, size: int = -1) -> bytes:
        raise AssertionError("the body of a refused request was read")


def request(
    app: FsxmlApp,
    body: str,
    *,
    remote: str = "127.0.0.1",
    authorization: str | None = None,
    stream: io.RawIOBase | None = None,
) -> tuple[int, bytes]:
    data = body.encode()
    environ: dict[str, Any] = {
        "REQUEST_METHOD": "POST",
        "PATH_INFO": PATH,
        "REMOTE_ADDR": remote,
        "CONTENT_LENGTH": str(len(data)),
        "wsgi.input": stream or io.BytesIO(data),
    }
    if authorization is not None:
        environ["HTTP_AUTHORIZATION"] = authorization
    status: list[int] = []

    def start_response(line: str, headers: list[tuple[str, str]]) -> None:
        status.append(int(line.split()[0]))

    payload = b"".join(app(environ, start_response))
    return status[0], payload


@dataclass
class HeldSnapshot:
    """What SnapshotSource reads of a SnapshotHolder: a loaded directory confirmed ``age`` ago."""

    current: tuple[int, Directory] = field(default_factory=lambda: (1, Directory.build(catalog())))
    loaded: bool = True
    age: float = 0.0

    def confirmed_age(self) -> float:
        return self.age


def a1_of(document: bytes, user: str) -> str | None:
    for element in ET.fromstring(document).iter("user"):
        if element.get("id") == user:
            return next((p.get("value") for p in element.iter("param") if p.get("name") == "a1-hash"), None)
    return None


ALICE_A1 = a1_hash("alice", DOMAIN, "Wd3kM9pQs7Vx")


def test_an_unexpected_error_is_logged_without_the_request_and_answered_503(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """freeswitch.md: "an unexpected error in callgate: logged (without the request), 503:
    never a 500" (FreeSWITCH then falls back)."""
    caplog.set_level(logging.INFO)

    class Broken(Answers):
        def answer(self, lookup: Lookup, directory: Directory) -> bytes:
            raise RuntimeError("the directory broke")

    app = FsxmlApp(SETTINGS, Broken(DOMAIN), SnapshotSource(HeldSnapshot()))
    body = forms.sip_auth("alice-secret-user", DOMAIN, ip="198.51.100.77")
    assert request(app, body, authorization=basic()) == (503, b"unavailable\n")
    [line] = [r for r in caplog.records if r.getMessage() == "fsxml request failed"]
    assert line.levelno == logging.ERROR and line.exc_info is not None
    assert "alice-secret-user" not in caplog.text and "198.51.100.77" not in caplog.text
    assert SECRET not in caplog.text
    # the request itself is a good one: a working application answers it
    good = FsxmlApp(SETTINGS, Answers(DOMAIN), SnapshotSource(HeldSnapshot()))
    status, document = request(good, forms.sip_auth("alice", DOMAIN), authorization=basic())
    assert status == 200 and a1_of(document, "alice") == ALICE_A1


def test_a_snapshot_is_served_from_memory_for_snapshot_max_age_then_503() -> None:
    """freeswitch.md, Redis unreachable: "answers from memory while Redis confirmed the snapshot
    within fsxml.snapshot_max_age (60 s), then 503"."""
    assert FsxmlSettings().snapshot_max_age == 60.0
    held = HeldSnapshot()
    app = FsxmlApp(SETTINGS, Answers(DOMAIN), SnapshotSource(held))
    for age, status in ((0.0, 200), (59.0, 200), (60.5, 503), (3600.0, 503)):
        held.age = age
        code, document = request(app, forms.sip_auth("alice", DOMAIN), authorization=basic())
        assert code == status, (age, code)
        if status == 200:
            assert a1_of(document, "alice") == ALICE_A1


def test_during_a_redis_outage_the_held_snapshot_answers_until_it_is_too_old(
    private_redis: PrivateRedis,
) -> None:
    """The same with a real SnapshotHolder and a Redis that stops: the directory it holds keeps
    answering (fsxml.snapshot_max_age, 60 s); with a 1 s bound the same holder answers 503
    once Redis has not confirmed it for 1 s."""
    client = quick_client(private_redis.port)
    publish_snapshot(client, "cg:", catalog())
    holder: SnapshotHolder[Directory] = SnapshotHolder(
        client, "cg:", Directory.build, offload=lambda fn: fn(), freeze_gc=False
    )
    stop = threading.Event()
    thread = threading.Thread(target=holder.run, args=(stop, 0.1), daemon=True)
    thread.start()
    patient = FsxmlApp(SETTINGS, Answers(DOMAIN), SnapshotSource(holder))
    strict = FsxmlApp(
        FsxmlSettings(domain=DOMAIN, allowed_networks=("127.0.0.1/32",), snapshot_max_age=1.0),
        Answers(DOMAIN),
        SnapshotSource(holder),
    )
    try:
        wait_until(lambda: holder.loaded, WAIT, what="the snapshot loaded")
        private_redis.stop()
        wait_until(lambda: holder.failures >= 1, WAIT, what="the holder seeing Redis gone")
        lookup = forms.sip_auth("alice", DOMAIN)
        status, document = request(patient, lookup, authorization=basic())
        assert status == 200 and a1_of(document, "alice") == ALICE_A1
        wait_until(lambda: request(strict, lookup)[0] == 503, 15, what="503 past the 1 s bound")
        assert holder.confirmed_age() > 1.0
        status, document = request(patient, lookup, authorization=basic())
        assert status == 200 and a1_of(document, "alice") == ALICE_A1
    finally:
        stop.set()
        thread.join(WAIT)
        client.close()


class Clock:
    """engine.fsxml.server's ``time``, with a monotonic clock the test moves."""

    def __init__(self) -> None:
        self.now = 1000.0
        self.perf_counter = time.perf_counter

    def monotonic(self) -> float:
        return self.now


def test_refusals_read_nothing_and_are_logged_once_a_minute_per_source_and_kind_with_the_count(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """freeswitch.md: a source not allowed gets "403, nothing read"; "Refusals are logged at
    WARNING, at most once a minute per source and kind, with the number refused", "the
    source address is escaped (%r)", never a credential."""
    clock = Clock()
    monkeypatch.setattr(fsxml_server, "time", clock)
    caplog.set_level(logging.INFO, logger="callgate.fsxml")
    app = FsxmlApp(SETTINGS, Answers(DOMAIN), SnapshotSource(HeldSnapshot()))
    lookup = forms.sip_auth("alice", DOMAIN)

    def lines() -> list[str]:
        return [r.getMessage() for r in caplog.records if r.getMessage().startswith("fsxml: refused")]

    for _ in range(3):
        assert request(app, lookup, remote="192.0.2.1", authorization=basic(), stream=Untouchable())[0] == 403
    assert request(app, lookup, remote="192.0.2.2", stream=Untouchable())[0] == 403
    for _ in range(2):
        assert request(app, lookup, authorization=basic(password="wrong-guess"))[0] == 401
    assert lines() == [
        "fsxml: refused 1 request(s) from '192.0.2.1': source",
        "fsxml: refused 1 request(s) from '192.0.2.2': source",
        "fsxml: refused 1 request(s) from '127.0.0.1': credentials",
    ]
    assert all(r.levelno == logging.WARNING for r in caplog.records if "refused" in r.getMessage())
    clock.now += 61
    assert request(app, lookup, remote="192.0.2.1", stream=Untouchable())[0] == 403
    assert lines()[-1] == "fsxml: refused 3 request(s) from '192.0.2.1': source"  # 2 held back + this one
    forged = "192.0.2.9\nWARNING forged line"
    assert request(app, lookup, remote=forged, stream=Untouchable())[0] == 403
    assert lines()[-1] == f"fsxml: refused 1 request(s) from {forged!r}: source"
    assert "wrong-guess" not in caplog.text and SECRET not in caplog.text


def test_both_parts_of_the_credentials_are_always_compared_in_constant_time(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """freeswitch.md: 401 "both parts compared in constant time" (hmac.compare_digest, both
    always compared: a wrong user name costs the same as a wrong password)."""
    compared: list[tuple[bytes, bytes]] = []

    class Hmac:
        @staticmethod
        def compare_digest(a: bytes, b: bytes) -> bool:
            compared.append((a, b))
            return a == b

    monkeypatch.setattr(fsxml_access, "hmac", Hmac)
    app = FsxmlApp(SETTINGS, Answers(DOMAIN), SnapshotSource(HeldSnapshot()))
    lookup = forms.sip_auth("alice", DOMAIN)
    for authorization, status in (
        (basic(user="intruder"), 401),
        (basic(password="wrong"), 401),
        (None, 401),
        ("Basic ####", 401),
        (basic(), 200),
    ):
        compared.clear()
        assert request(app, lookup, authorization=authorization)[0] == status
        assert len(compared) == 2, (authorization, compared)


def test_a_gateway_added_or_changed_by_the_live_sync_is_served_from_the_next_request(
    redis_url: str, key_prefix: str
) -> None:
    """freeswitch.md: "a gateway added, changed or deactivated: served from the next request"
    (the deactivated one: tests/fsxml/test_service.py)."""
    client = redis.Redis.from_url(redis_url)
    version = publish_snapshot(client, key_prefix, catalog())
    holder: SnapshotHolder[Directory] = SnapshotHolder(
        client, key_prefix, Directory.build, offload=lambda fn: fn(), freeze_gc=False
    )
    stop = threading.Event()
    thread = threading.Thread(target=holder.run, args=(stop, 0.2), daemon=True)
    thread.start()
    app = FsxmlApp(SETTINGS, Answers(DOMAIN), SnapshotSource(holder))

    def gateways() -> dict[str, dict[str, str]]:
        status, document = request(app, forms.gateways("external"), authorization=basic())
        assert status == 200
        return {
            g.get("name", ""): {p.get("name", ""): p.get("value", "") for p in g.iter("param")}
            for g in ET.fromstring(document).iter("gateway")
        }

    try:
        wait_until(lambda: holder.loaded, WAIT, what="the snapshot loaded")
        assert "delta-gw1" not in gateways()
        assert gateways()["alpha-gw1"]["proxy"] == "sip1.alpha.example"
        added = Gateway(26, "delta-gw1", proxy="203.0.113.40")
        changed = Gateway(21, "alpha-gw1", proxy="sip2.alpha.example", params=("ping=30",))
        apply_changes(client, key_prefix, version, [added, changed], [])
        wait_until(lambda: "delta-gw1" in gateways(), WAIT, what="the added gateway served")
        served = gateways()
        assert served["delta-gw1"]["proxy"] == "203.0.113.40"
        assert served["alpha-gw1"]["proxy"] == "sip2.alpha.example"
    finally:
        stop.set()
        thread.join(WAIT)
        client.close()


def test_the_documented_bounds_are_the_shipped_ones() -> None:
    """freeswitch.md's numbers: the binding's timeout (2 s in the shipped file), snapshot_max_age
    (60 s; the engine's 5 s), max_body_bytes (256 KiB), the PostgreSQL retry (every 5 s)."""
    root = ET.parse(ROOT / "config" / "freeswitch" / "xml_curl.conf.xml").getroot()
    params = {p.get("name"): p.get("value") for p in root.iter("param")}
    assert params["timeout"] == "2"
    assert str(params["gateway-url"]).endswith(PATH)
    config = load_config(environ={})
    assert config.fsxml.snapshot_max_age == 60.0 and config.engine.snapshot_max_age == 5.0
    assert config.fsxml.max_body_bytes == 256 * 1024
    assert GatewayPasswords(lambda: {})._retry_every == 5.0
    app = FsxmlApp(config.fsxml, Answers(DOMAIN), SnapshotSource(HeldSnapshot()))
    assert request(app, "x=" + "a" * (256 * 1024))[0] == 413


# ---------------------------------------------------------------------- a real `callgate fsxml`

SYNC_REALM = "other.example.org"
SERVED_DOMAIN = "voice.example.net"
REALM_CATALOGUE: dict[str, Any] = {
    "rate_groups": [{"name": "retail"}],
    "customers": [
        {
            "number": "1000000001",
            "email": "alice@example.com",
            "rate_group": "retail",
            "sip_devices": [{"username": "alice", "password": "Al1ce-Pw"}],
        }
    ],
}


@contextlib.contextmanager
def fsxml_process(env: dict[str, str], log_path: Path) -> Iterator[subprocess.Popen[bytes]]:
    with log_path.open("wb") as log:
        process = subprocess.Popen([*CALLGATE, "fsxml"], env=env, cwd=ROOT, stdout=log, stderr=log)
    try:
        yield process
    finally:
        process.terminate()
        try:
            process.wait(timeout=WAIT)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


def post(port: int, body: str) -> tuple[int, bytes]:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=WAIT)
    try:
        conn.request("POST", PATH, body=body, headers={"Content-Type": "application/x-www-form-urlencoded"})
        answer = conn.getresponse()
        return answer.status, answer.read()
    finally:
        conn.close()


def test_a_sync_realm_other_than_the_domain_is_served_and_named_in_an_error_at_load(
    fresh_pg_url: str, redis_url: str, key_prefix: str, tmp_path: Path
) -> None:
    """freeswitch.md: "fsxml.domain of callgate sync and of callgate fsxml differ": the hashes
    for the sync's realm are served, and an ERROR at the full snapshot load names both realms.
    Only `callgate fsxml`'s start-up code logs it, hence a real process."""
    port = free_port()
    env = engine_environment(
        fresh_pg_url,
        redis_url,
        key_prefix,
        CALLGATE_FSXML__DOMAIN=SERVED_DOMAIN,
        CALLGATE_FSXML__LISTEN_PORT=str(port),
        CALLGATE_FSXML__METRICS_PORT="0",
    )
    prepare_database(fresh_pg_url, REALM_CATALOGUE)
    config = config_for({**env, "CALLGATE_FSXML__DOMAIN": SYNC_REALM})
    publish_once(config)  # the sync configured with another realm
    log_path = tmp_path / "fsxml.log"
    with fsxml_process(env, log_path) as process:

        def answered() -> bytes:
            if process.poll() is not None:
                raise AssertionError(f"callgate fsxml exited:\n{log_path.read_text(errors='replace')}")
            with contextlib.suppress(OSError):
                status, document = post(port, forms.sip_auth("alice", SERVED_DOMAIN))
                if status == 200:
                    return document
            return b""

        document = wait_until(answered, 30, what="callgate fsxml answering")
        wanted = f"holds a1-hashes for realm {SYNC_REALM!r} but fsxml.domain is {SERVED_DOMAIN!r}"
        wait_until(lambda: wanted in log_path.read_text(errors="replace"), WAIT, what="the ERROR line")
    served = hashlib.md5(f"alice:{SYNC_REALM}:Al1ce-Pw".encode()).hexdigest()
    assert a1_of(document, "alice") == served  # the sync's realm: every digest check fails
    [line] = [text for text in log_path.read_text(errors="replace").splitlines() if wanted in text]
    assert "ERROR" in line, line

"""Tests of the FreeSWITCH emulator (loadtest.fsemu) against the captures of a real
FreeSWITCH 1.10.12.

The engine side is a tiny scripted server written here with raw bytes (not the
callgate engine, not the emulator's own parser), so the emulator is checked by an
independent reader.
"""

from __future__ import annotations

import contextlib
import json
import re
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import unquote

import gevent
import gevent.subprocess
import pytest
from gevent import socket as gsocket
from gevent.server import StreamServer

from loadtest.fsemu import (
    CallResult,
    CallSpec,
    InboundServer,
    Switch,
    place_call,
    run_calls,
    split_dial_string,
    templates,
    wire,
)
from tests.support import wait_until

CAPTURES = Path("/work/shared/reference/freeswitch-captures")
needs_captures = pytest.mark.skipif(not CAPTURES.is_dir(), reason="FreeSWITCH captures not available")
REPO = Path(__file__).resolve().parents[1]

CAPTURE_CORE_UUID = "91a12147-0b1e-45cd-b2d6-ca7d5ebf0ae5"

# ---------------------------------------------------------------------------
# a scripted engine, raw bytes
# ---------------------------------------------------------------------------


@dataclass
class Frame:
    raw_headers: bytes
    headers: list[tuple[str, str]]
    body: bytes

    def get(self, name: str) -> str | None:
        for k, v in self.headers:
            if k == name:
                return v
        return None

    @property
    def ctype(self) -> str:
        return self.get("Content-Type") or ""

    def event(self) -> list[tuple[str, str]]:
        """Headers of a text/event-plain body: split at ': ' first, then unquote."""
        out = []
        for line in self.body.decode().split("\n"):
            if not line:
                break
            k, _, v = line.partition(": ")
            out.append((k, unquote(v)))
        return out

    @property
    def event_name(self) -> str | None:
        if self.ctype != "text/event-plain":
            return None
        return self.event()[0][1]


def _header_lines(block: bytes) -> list[tuple[str, str]]:
    out = []
    for line in block.decode().split("\n"):
        if line:
            k, _, v = line.partition(": ")
            out.append((k, v))
    return out


class EngineConn:
    """What the engine sees of one FreeSWITCH connection."""

    def __init__(self, sock: gsocket.socket) -> None:
        self.sock = sock
        self.buf = b""
        self.frames: list[Frame] = []
        self.error: BaseException | None = None
        self.eof = False

    def send(self, data: bytes) -> None:
        self.sock.sendall(data)

    def _fill(self, timeout: float) -> bool:
        self.sock.settimeout(timeout)
        data = self.sock.recv(65536)
        if not data:
            self.eof = True
            return False
        self.buf += data
        return True

    def read_block(self, timeout: float = 3.0) -> bytes:
        while b"\n\n" not in self.buf:
            if not self._fill(timeout):
                raise EOFError
        i = self.buf.index(b"\n\n") + 2
        block, self.buf = self.buf[:i], self.buf[i:]
        return block

    def read_frame(self, timeout: float = 3.0) -> Frame | None:
        try:
            block = self.read_block(timeout)
        except EOFError:
            return None
        headers = _header_lines(block)
        clen = int(dict(headers).get("Content-Length", "0"))
        while len(self.buf) < clen:
            if not self._fill(timeout):
                raise EOFError
        body, self.buf = self.buf[:clen], self.buf[clen:]
        frame = Frame(block, headers, body)
        self.frames.append(frame)
        return frame

    def next_frame(self, timeout: float = 3.0) -> Frame:
        """The next frame, which must come (not EOF)."""
        frame = self.read_frame(timeout)
        assert frame is not None, "EOF where a frame was expected"
        return frame

    def connect(self) -> bytes:
        self.send(b"connect\n\n")
        return self.read_block()

    def read_until_event(self, name: str, timeout: float = 3.0) -> list[Frame]:
        got = []
        while True:
            f = self.read_frame(timeout)
            assert f is not None, f"EOF before {name}"
            got.append(f)
            if f.event_name == name:
                return got

    def read_to_eof(self, timeout: float = 3.0) -> list[Frame]:
        got = []
        while (f := self.read_frame(timeout)) is not None:
            got.append(f)
        return got

    def events(self) -> list[str]:
        return [f.event_name for f in self.frames if f.event_name]

    def replies(self) -> list[str]:
        return [f.get("Reply-Text") or "" for f in self.frames if f.ctype == "command/reply"]

    def event(self, name: str) -> dict[str, str]:
        for f in self.frames:
            if f.event_name == name:
                return dict(f.event())
        raise KeyError(name)

    def event_list(self, name: str) -> list[tuple[str, str]]:
        for f in self.frames:
            if f.event_name == name:
                return f.event()
        raise KeyError(name)


@contextlib.contextmanager
def scripted_engine(script: Callable[[EngineConn], None]) -> Iterator[tuple[int, list[EngineConn]]]:
    conns: list[EngineConn] = []

    def handle(sock: gsocket.socket, address: object) -> None:
        conn = EngineConn(sock)
        conns.append(conn)
        try:
            script(conn)
        except BaseException as exc:  # reported by the test
            conn.error = exc
        finally:
            sock.close()

    server = StreamServer(("127.0.0.1", 0), handle)
    server.start()
    try:
        yield server.server_port, conns
    finally:
        server.stop(timeout=1)


def execute(app: str, arg: str | None = None) -> bytes:
    msg = f"sendmsg\ncall-command: execute\nexecute-app-name: {app}\n"
    if arg is not None:
        msg += f"execute-app-arg: {arg}\n"
    return (msg + "\n").encode()


def hangup(cause: str) -> bytes:
    return f"sendmsg\ncall-command: hangup\nhangup-cause: {cause}\n\n".encode()


def run_scripted(
    script: Callable[[EngineConn], None],
    spec: CallSpec,
    *,
    timeout: float = 5.0,
    switch: Switch | None = None,
) -> tuple[CallResult, EngineConn]:
    with scripted_engine(script) as (port, conns):
        result = place_call("127.0.0.1", port, spec, timeout=timeout, switch=switch)
        gevent.sleep(0.01)
    assert len(conns) == 1
    if conns[0].error is not None:
        raise conns[0].error
    return result, conns[0]


def capture_like_spec(**kw: Any) -> CallSpec:
    """A call like the captured ones (SIPp user "sipp" from 127.0.0.1:5070)."""
    return CallSpec(destination="4412345678", caller_id_number="sipp", **kw)


# ---------------------------------------------------------------------------
# captures
# ---------------------------------------------------------------------------


def capture_sections(name: str) -> list[tuple[str, bytes]]:
    data = (CAPTURES / name).read_bytes()
    parts = re.split(rb"^----- (>>|<<) -----\n", data, flags=re.M)
    out = []
    for i in range(1, len(parts), 2):
        body = parts[i + 1]
        if i + 2 < len(parts):
            body = body[:-1]  # the extra "\n" between sections
        out.append((parts[i].decode(), body))
    return out


def capture_channel_data() -> bytes:
    return capture_sections("connect_reply_raw.txt")[1][1][:-1]


def capture_events(name: str) -> list[list[tuple[str, str]]]:
    data = (CAPTURES / name).read_bytes()
    events = []
    for m in re.finditer(rb"Content-Length: (\d+)\nContent-Type: text/event-plain\n\n", data):
        body = data[m.end() : m.end() + int(m.group(1))]
        events.append(Frame(b"", [], body).event())
    return events


# ---------------------------------------------------------------------------
# wire format
# ---------------------------------------------------------------------------


def test_url_encoding_like_switch_url_encode() -> None:
    assert wire.fs_urlencode("+OK\n") == "%2BOK%0A"
    assert wire.fs_urlencode("sofia/internal/sipp@127.0.0.1:5070") == "sofia/internal/sipp%40127.0.0.1%3A5070"
    assert wire.fs_urlencode("a-b_c.d/e~f,g") == "a-b_c.d/e~f,g"
    assert wire.fs_urlencode("ü") == "%C3%BC"
    assert wire.fs_urlencode(' #%&+:;<=>?@[\\]^`{|}"\r\n') == (
        "%20%23%25%26%2B%3A%3B%3C%3D%3E%3F%40%5B%5C%5D%5E%60%7B%7C%7D%22%0D%0A"
    )
    assert wire.serialize_event([("A", ""), ("B", "x y")]) == b"A: _undef_\nB: x%20y\n\n"
    assert unquote(wire.fs_urlencode("v=0\r\nc=IN IP4 1.2.3.4")) == "v=0\r\nc=IN IP4 1.2.3.4"


def test_command_parser_cuts_like_read_packet() -> None:
    parser = wire.CommandParser()
    data = (
        b"\r\n\nconnect\n\nmyevents\n\n"
        b"sendmsg abc\r\ncall-command: execute\r\nexecute-app-name: set\r\nContent-Length: 7\r\n\r\nfoo=bar"
        b"linger 5\n\n"
    )
    cmds = []
    for i in range(len(data)):  # one byte at a time
        cmds += parser.feed(data[i : i + 1])
    assert [c.line for c in cmds] == ["connect", "myevents", "sendmsg abc", "linger 5"]
    msg = cmds[2]
    assert msg.name == "sendmsg" and msg.arg == "abc"
    assert msg.header("CALL-COMMAND") == "execute"
    assert msg.body == b"foo=bar"
    assert cmds[3].arg == "5"
    assert not parser.has_partial()


def test_split_dial_string() -> None:
    dial = "{ignore_early_media=true}[leg_timeout=5]sofia/gw/a|[leg_timeout=5]sofia/gw/b"
    assert split_dial_string(dial) == [
        ["sofia/gw/a"],
        ["sofia/gw/b"],
    ]
    assert split_dial_string("[x=1,y=2]a,b|c") == [["a", "b"], ["c"]]


# ---------------------------------------------------------------------------
# connect: the CHANNEL_DATA block
# ---------------------------------------------------------------------------


@needs_captures
def test_templates_reproduce_the_captured_channel_data_bytes() -> None:
    params = {
        "core_uuid": CAPTURE_CORE_UUID,
        "hostname": "vm",
        "switchname": "vm",
        "ipv4": "192.0.2.2",
        "ipv6": "fd00::2",
        "date_local": "2026-11-25 20:22:46",
        "date_gmt": "Wed, 25 Nov 2026 20:22:46 GMT",
        "date_ts": 1795638166338417,
        "seq": 119761,
        "from_user": "sipp",
        "cid_name": "sipp",
        "cid_number": "sipp",
        "caller_ip": "127.0.0.1",
        "caller_port": 5070,
        "dest": "4412345678",
        "uuid": "18de0cbf-f510-4eca-83b5-35ad4384bf5e",
        "channel_name": "sofia/internal/sipp@127.0.0.1:5070",
        "created_us": 1795638166338417,
        "session_id": 5010,
        "call_id": "1-31365@127.0.0.1",
        "sip_authorized": "",
        "sip_auth_username": "",
        "sip_auth_realm": "",
        "from_tag": "31365SIPpTag001",
        "fs_sip_ip": "127.0.0.1",
        "fs_sip_port": 5080,
        "via_branch": "z9hG4bK-31365-1-0",
        "media_port": 6004,
        "socket_data": "127.0.0.1:8084 async full",
        "socket_host": "127.0.0.1",
        "socket_mode": "async",
        "control": "full",
    }
    assert set(params) == set(templates.CHANNEL_DATA_PARAMETERS)
    rendered = wire.serialize_event(templates.render_channel_data(params))
    assert rendered == capture_channel_data()


@needs_captures
def test_connect_reply_has_the_captured_headers_in_order() -> None:
    names = (CAPTURES / "connect_reply_header_names.txt").read_text().split()
    assert len(names) == 165
    blocks: list[bytes] = []

    def script(conn: EngineConn) -> None:
        blocks.append(conn.connect())

    switch = Switch(core_uuid=CAPTURE_CORE_UUID)
    spec = capture_like_spec(socket_mode="async full")
    result, _ = run_scripted(script, spec, switch=switch)
    block = blocks[0]
    assert block.endswith(b"\n\n") and b"Content-Length" not in block
    got = _header_lines(block)
    assert [k for k, _ in got] == names

    # every value is encoded like FreeSWITCH (decode + re-encode gives the same bytes)
    for _, v in got:
        assert wire.fs_urlencode(unquote(v)) == v
    values = {k: unquote(v) for k, v in got}
    assert values["Reply-Text"] == "+OK\n" and dict(got)["Reply-Text"] == "%2BOK%0A"
    assert values["Content-Type"] == "command/reply"
    assert (values["Socket-Mode"], values["Control"]) == ("async", "full")
    assert values["Unique-ID"] == values["Channel-Unique-ID"] == values["variable_uuid"] == spec.uuid
    assert values["variable_current_application_data"].endswith(" async full")

    # the rest equals the capture, except what is per call
    per_call = re.compile(
        r"Event-Date|Event-Sequence|Unique-ID|Call-UUID|variable_uuid|variable_call_uuid|Created-Time"
        r"|session_id|sip_call_id|invite_stamp|from_tag|full_via|full_from|switch_r_sdp|remote_media_port"
        r"|current_application_data"
    )
    captured = {k: unquote(v) for k, v in _header_lines(capture_channel_data())}
    differing = [k for k in names if not per_call.search(k) and values[k] != captured[k]]
    assert differing == []
    assert result.connected and result.commands == ["connect"]


def test_channel_data_carries_the_call() -> None:
    blocks: list[bytes] = []

    def script(conn: EngineConn) -> None:
        blocks.append(conn.connect())

    spec = CallSpec(
        destination="4412345678",
        caller_id_number="123",
        caller_id_name="Alice",
        from_user="1001",
        network_ip="10.0.0.5",
        sip_auth_username="1001",
        extra_variables={"sip_h_P-Accountcode": "1001"},
        socket_mode="async",
    )
    run_scripted(script, spec)
    values = {k: unquote(v) for k, v in _header_lines(blocks[0])}
    assert values["Caller-Destination-Number"] == values["variable_sip_req_user"] == "4412345678"
    assert values["variable_sip_to_user"] == "4412345678"
    assert values["Caller-Caller-ID-Number"] == "123" and values["Caller-Caller-ID-Name"] == "Alice"
    assert values["Caller-Username"] == values["variable_sip_from_user"] == "1001"
    assert values["Caller-Network-Addr"] == values["variable_sip_network_ip"] == "10.0.0.5"
    assert values["variable_sip_received_ip"] == "10.0.0.5"
    assert values["variable_sip_auth_username"] == "1001" and values["variable_sip_auth_realm"]
    assert values["variable_sip_h_P-Accountcode"] == "1001"
    assert (values["Socket-Mode"], values["Control"]) == ("async", "single-channel")


# ---------------------------------------------------------------------------
# commands, events, hangup
# ---------------------------------------------------------------------------


def test_pipelined_commands_get_seven_replies_in_order() -> None:
    def script(conn: EngineConn) -> None:
        conn.connect()
        conn.send(
            b"myevents\n\nlinger\n\n"
            + execute("set", "callgate_account=1001")
            + execute("set", "callgate_rate=0.012")
            + execute("set", "hangup_after_bridge=true")
            + execute("set", "continue_on_fail=false")
            + execute("bridge", "[leg_timeout=5]sofia/internal/4412345678@127.0.0.1:5090")
        )
        first = [conn.read_frame() for _ in range(7)]
        assert [f.ctype for f in first if f] == ["command/reply"] * 7
        conn.read_until_event("CHANNEL_HANGUP_COMPLETE")
        conn.read_frame()  # the linger notice

    result, conn = run_scripted(script, capture_like_spec(hold_seconds=0.1))
    assert conn.replies() == ["+OK Events Enabled", "+OK will linger"] + ["+OK"] * 5
    assert conn.frames[0].raw_headers == b"Content-Type: command/reply\nReply-Text: +OK Events Enabled\n\n"
    assert result.replies[1:] == conn.replies()
    assert result.commands == ["connect", "myevents", "linger"] + ["sendmsg"] * 5
    assert result.variables == {
        "callgate_account": "1001",
        "callgate_rate": "0.012",
        "hangup_after_bridge": "true",
        "continue_on_fail": "false",
    }
    assert [a for a, _ in result.executed] == ["set"] * 4 + ["bridge"]
    complete = conn.event("CHANNEL_HANGUP_COMPLETE")
    assert complete["variable_callgate_account"] == "1001"
    assert complete["variable_callgate_rate"] == "0.012"
    assert result.decision_latency is not None and 0 <= result.decision_latency < 1
    assert result.engine_closed and result.error is None


CAPTURE_SCENARIOS = {
    "bridged_call_wire.txt": (
        execute("bridge", "sofia/internal/4412345678@127.0.0.1:5090"),
        {"hold_seconds": 0.05},
    ),
    "respond_403_wire.txt": (execute("respond", "403 Forbidden"), {}),
    "hangup_call_rejected_wire.txt": (hangup("CALL_REJECTED"), {}),
    "answer_then_hangup_wire.txt": (execute("answer") + hangup("NORMAL_CLEARING"), {"hold_seconds": 1.5}),
}


@needs_captures
@pytest.mark.parametrize("capture", sorted(CAPTURE_SCENARIOS))
def test_event_sequence_matches_the_capture(capture: str) -> None:
    commands, spec_kw = CAPTURE_SCENARIOS[capture]

    def script(conn: EngineConn) -> None:
        conn.connect()
        conn.send(b"myevents\n\n")
        assert conn.next_frame().get("Reply-Text") == "+OK Events Enabled"
        conn.send(b"linger\n\n")
        assert conn.next_frame().get("Reply-Text") == "+OK will linger"
        conn.send(commands)
        conn.read_until_event("CHANNEL_HANGUP_COMPLETE")
        notice = conn.read_frame()
        assert notice is not None and notice.get("Content-Disposition") == "linger"

    result, conn = run_scripted(script, capture_like_spec(**spec_kw))
    expected = capture_events(capture)
    assert conn.events() == [e[0][1] for e in expected]
    assert result.events == conn.events()
    # the non-variable headers of each event, in wire order, are the captured ones
    for ours, theirs in zip((f.event() for f in conn.frames if f.event_name), expected, strict=True):
        assert [k for k, _ in ours if not k.startswith("variable_")] == [
            k for k, _ in theirs if not k.startswith("variable_")
        ], ours[0][1]
    complete = next(f for f in conn.frames if f.event_name == "CHANNEL_HANGUP_COMPLETE").event()
    assert [k for k, _ in complete].count("Hangup-Cause") == 2
    assert result.engine_closed and result.error is None


@needs_captures
def test_linger_notice_bytes_match_the_capture() -> None:
    notices: list[bytes] = []

    def script(conn: EngineConn) -> None:
        conn.connect()
        conn.send(b"myevents\n\nlinger\n\n" + hangup("CALL_REJECTED"))
        conn.read_until_event("CHANNEL_HANGUP_COMPLETE")
        notices.append(conn.next_frame().raw_headers)

    result, _ = run_scripted(script, capture_like_spec())
    captured = (CAPTURES / "bridged_call_wire.txt").read_bytes().split(b"----- << -----\n")[-1][:-1]
    expected = captured.replace(b"18de0cbf-f510-4eca-83b5-35ad4384bf5e", result.uuid.encode())
    assert notices == [expected]


def test_respond_402_after_set() -> None:
    def script(conn: EngineConn) -> None:
        conn.connect()
        conn.send(
            b"myevents\n\nlinger\n\n"
            + execute("set", "callgate_reason=insufficient balance")
            + execute("respond", "402 Payment Required")
        )
        conn.read_until_event("CHANNEL_HANGUP_COMPLETE")

    result, conn = run_scripted(script, CallSpec(destination="4412345678", caller_id_number="1001"))
    assert result.sip_response == (402, "Payment Required")
    assert result.hangup_cause == "CALL_REJECTED"
    assert result.executed == [
        ("set", "callgate_reason=insufficient balance"),
        ("respond", "402 Payment Required"),
    ]
    complete = conn.event_list("CHANNEL_HANGUP_COMPLETE")
    assert [v for k, v in complete if k == "Hangup-Cause"] == ["CALL_REJECTED", "CALL_REJECTED"]
    values = dict(complete)
    assert values["variable_callgate_reason"] == "insufficient balance"
    assert values["variable_hangup_cause"] == "CALL_REJECTED"
    assert values["variable_hangup_cause_q850"] == "21"
    assert values["variable_billsec"] == "0"
    assert values["variable_sip_hangup_disposition"] == "send_refuse"
    assert conn.events()[:5] == [
        "CHANNEL_PARK",
        "CHANNEL_EXECUTE",
        "CHANNEL_EXECUTE_COMPLETE",
        "CHANNEL_EXECUTE",
        "CHANNEL_HANGUP",
    ]
    assert result.decision_latency is not None


def test_hangup_cause_decides_what_the_caller_sees() -> None:
    def script(conn: EngineConn) -> None:
        conn.connect()
        conn.send(b"myevents\n\nlinger\n\n" + hangup("CALL_REJECTED"))
        conn.read_until_event("CHANNEL_HANGUP_COMPLETE")

    result, _ = run_scripted(script, CallSpec(destination="1"))
    assert result.sip_response == (603, "Decline")  # sipp_sees_call_rejected.txt


def test_bridge_fails_over_to_the_second_target() -> None:
    dial = (
        "[leg_timeout=5]sofia/internal/4412345678@127.0.0.1:5099"
        "|[leg_timeout=5]sofia/internal/4412345678@127.0.0.1:5090"
    )

    def script(conn: EngineConn) -> None:
        conn.connect()
        conn.send(b"myevents\n\nlinger\n\n" + execute("set", "x=1") + execute("bridge", dial))
        conn.read_until_event("CHANNEL_HANGUP_COMPLETE")

    spec = capture_like_spec(hold_seconds=0.1, answering_targets=lambda t: not t.endswith(":5099"))
    result, conn = run_scripted(script, spec)
    assert result.attempted_targets == [
        "sofia/internal/4412345678@127.0.0.1:5099",
        "sofia/internal/4412345678@127.0.0.1:5090",
    ]
    assert result.bridged_target == "sofia/internal/4412345678@127.0.0.1:5090"
    assert result.sip_response == (200, "OK") and result.answered
    bridge = conn.event("CHANNEL_BRIDGE")
    assert bridge["Other-Leg-Channel-Name"] == "sofia/internal/4412345678@127.0.0.1:5090"
    assert bridge["Bridge-A-Unique-ID"] == result.uuid
    assert conn.event("CHANNEL_HANGUP_COMPLETE")["variable_x"] == "1"
    assert result.hangup_cause == "NORMAL_CLEARING"


def test_bridge_with_every_target_failing_hangs_up_with_the_last_cause() -> None:
    def script(conn: EngineConn) -> None:
        conn.connect()
        conn.send(b"myevents\n\n" + execute("bridge", "sofia/gateway/gw1/44|sofia/gateway/gw2/44"))
        conn.read_to_eof()

    answers: dict[str, bool | str] = {"sofia/gateway/gw1/44": False, "sofia/gateway/gw2/44": "USER_BUSY"}
    result, conn = run_scripted(script, CallSpec(destination="44", answering_targets=answers.__getitem__))
    assert result.bridged_target is None and len(result.attempted_targets) == 2
    assert result.hangup_cause == "USER_BUSY"
    assert result.sip_response == (486, "Busy Here")
    # no linger: FreeSWITCH stops at CHANNEL_HANGUP, says goodbye and closes
    assert conn.events()[-1] == "CHANNEL_HANGUP"
    assert conn.frames[-1].get("Content-Disposition") == "disconnect"
    assert conn.frames[-1].body == wire.GOODBYE.encode()
    assert result.closed_by == "freeswitch" and not result.engine_closed


def test_sched_hangup_alloted_timeout_ends_a_held_call() -> None:
    def script(conn: EngineConn) -> None:
        conn.connect()
        conn.send(
            b"myevents\n\nlinger\n\n"
            + execute("set", "execute_on_answer=sched_hangup +1 alloted_timeout")
            + execute("bridge", "sofia/gateway/gw1/4412345678")
        )
        conn.read_until_event("CHANNEL_HANGUP_COMPLETE", timeout=4)

    t0 = time.monotonic()
    result, conn = run_scripted(script, CallSpec(destination="4412345678", hold_seconds=1.5))
    assert 0.9 < time.monotonic() - t0 < 3
    assert result.hangup_cause == "ALLOTTED_TIMEOUT"  # not the caller's NORMAL_CLEARING at 1.5 s
    assert result.sip_response == (200, "OK")
    complete = conn.event("CHANNEL_HANGUP_COMPLETE")
    assert complete["Hangup-Cause"] == "ALLOTTED_TIMEOUT"
    assert complete["variable_billsec"] == "1"
    assert complete["variable_sip_hangup_disposition"] == "send_bye"


def test_the_caller_hangs_up_after_hold_seconds() -> None:
    def script(conn: EngineConn) -> None:
        conn.connect()
        conn.send(b"myevents\n\nlinger\n\n" + execute("answer"))
        conn.read_until_event("CHANNEL_HANGUP_COMPLETE")

    result, conn = run_scripted(script, CallSpec(destination="1", hold_seconds=0.3))
    assert result.hangup_cause == "NORMAL_CLEARING" and result.answered
    assert conn.event("CHANNEL_HANGUP")["variable_sip_term_status"] == "200"
    assert conn.event("CHANNEL_HANGUP_COMPLETE")["variable_sip_hangup_disposition"] == "recv_bye"


def test_without_full_linger_event_and_api_are_refused() -> None:
    def script(conn: EngineConn) -> None:
        conn.connect()
        conn.send(b"myevents\n\nlinger\n\nevent plain ALL\n\napi show channels\n\n" + hangup("CALL_REJECTED"))
        conn.read_to_eof()

    result, conn = run_scripted(script, CallSpec(destination="1", socket_mode="async"))
    assert conn.replies() == [
        "+OK Events Enabled",
        "-ERR command not found",
        "-ERR command not found",
        "-ERR command not found",
        "+OK",
    ]
    assert conn.events() == ["CHANNEL_PARK", "CHANNEL_HANGUP"]
    assert conn.frames[-1].get("Content-Type") == "text/disconnect-notice"
    assert conn.frames[-1].get("Controlled-Session-UUID") == result.uuid
    assert result.hangup_cause == "CALL_REJECTED"


def test_events_only_after_myevents() -> None:
    def script(conn: EngineConn) -> None:
        conn.connect()
        conn.send(b"linger\n\n" + hangup("CALL_REJECTED"))
        conn.read_frame()
        conn.read_frame()
        conn.read_frame()  # the linger notice
        conn.send(b"exit\n\n")
        conn.read_to_eof()

    _result, conn = run_scripted(script, CallSpec(destination="1"))
    assert conn.events() == []
    assert conn.replies() == ["+OK will linger", "+OK", "+OK bye"]
    assert conn.frames[2].get("Content-Disposition") == "linger"
    assert conn.frames[-1].get("Content-Disposition") == "disconnect"


def test_linger_with_seconds_closes_after_them() -> None:
    def script(conn: EngineConn) -> None:
        conn.connect()
        conn.send(b"myevents\n\nlinger 1\n\n" + hangup("NORMAL_CLEARING"))
        conn.read_until_event("CHANNEL_HANGUP_COMPLETE")
        linger = conn.next_frame()
        assert linger.get("Linger-Time") == "1"
        t0 = time.monotonic()
        rest = conn.read_to_eof(timeout=15)
        # It waits the linger out, then closes by itself (the upper bound only says "not never":
        # a loaded CI machine can delay the close by seconds).
        assert 0.9 < time.monotonic() - t0 < 15
        assert [f.get("Content-Disposition") for f in rest] == ["disconnect"]

    result, conn = run_scripted(script, CallSpec(destination="1"))
    assert conn.replies()[1] == "+OK will linger 1 seconds"
    assert result.closed_by == "freeswitch"


def test_bare_linger_keeps_the_socket_until_the_engine_closes() -> None:
    def script(conn: EngineConn) -> None:
        conn.connect()
        conn.send(b"myevents\n\nlinger\n\n" + hangup("NORMAL_CLEARING"))
        conn.read_until_event("CHANNEL_HANGUP_COMPLETE")
        assert conn.next_frame().get("Linger-Time") == "-1"
        with pytest.raises(TimeoutError):
            conn.read_frame(timeout=0.3)
        assert not conn.eof

    result, _ = run_scripted(script, CallSpec(destination="1"))
    assert result.engine_closed and result.closed_by == "engine"


def test_an_engine_that_never_closes_a_lingering_socket_is_reported() -> None:
    def script(conn: EngineConn) -> None:
        conn.connect()
        conn.send(b"myevents\n\nlinger\n\n" + hangup("NORMAL_CLEARING"))
        conn.read_until_event("CHANNEL_HANGUP_COMPLETE")
        gevent.sleep(2)

    result, _ = run_scripted(script, CallSpec(destination="1"), timeout=0.5)
    assert result.closed_by == "timeout" and "did not close" in (result.error or "")


def test_engine_closing_early_leaves_the_call_uncontrolled() -> None:
    def script(conn: EngineConn) -> None:
        conn.connect()

    result, _ = run_scripted(script, CallSpec(destination="1"))
    assert result.uncontrolled and result.closed_by == "engine" and not result.engine_closed
    assert result.hangup_cause == "NORMAL_CLEARING"
    assert result.sip_response == (480, "Temporarily Unavailable")


def test_first_command_timeout() -> None:
    def script(conn: EngineConn) -> None:
        frames = conn.read_to_eof(timeout=2)
        assert [f.get("Content-Disposition") for f in frames] == ["disconnect"]

    result, _ = run_scripted(script, CallSpec(destination="1", first_command_timeout=0.3))
    assert not result.connected and result.commands == []
    assert "no command" in (result.error or "")
    assert result.sip_response == (480, "Temporarily Unavailable")


def test_connection_refused_falls_through_the_dialplan() -> None:
    with scripted_engine(lambda conn: None) as (port, _):
        pass  # closed again: nothing listens on the port any more
    result = place_call("127.0.0.1", port, CallSpec(destination="1"), timeout=2)
    assert not result.connected and result.error
    assert result.sip_response == (480, "Temporarily Unavailable")


def test_stalled_switch_and_garbage_channel_data() -> None:
    # Ordered by events, not by timers racing each other on a busy machine: the script waits
    # until the emulator has taken `myevents`, and the emulator's own deadline is far away.
    switch = Switch()

    def stalled(conn: EngineConn) -> None:
        conn.connect()
        conn.send(b"myevents\n\n")
        (channel,) = switch.channels.values()
        wait_until(lambda: "myevents" in channel.result.commands, what="the emulator to read myevents")
        # A switch that answered would have written its reply before taking the next command
        # (same greenlet, no wait in between): it would already be here, on loopback.
        with pytest.raises(TimeoutError):
            conn.read_frame(timeout=0.3)

    spec = CallSpec(destination="1", stall_after_connect=True)
    result, _ = run_scripted(stalled, spec, timeout=60, switch=switch)
    assert result.commands == ["connect", "myevents"] and result.closed_by == "engine"
    assert result.replies == ["+OK\n"] and result.events == []

    got: list[bytes] = []

    def garbage(conn: EngineConn) -> None:
        conn.send(b"connect\n\n")
        got.append(conn.read_block(timeout=60))

    spec = CallSpec(destination="1", raw_channel_data=b"\x00garbage: yes\n\n")
    result, _ = run_scripted(garbage, spec, timeout=60)
    assert got == [b"\x00garbage: yes\n\n"]


def test_sendmsg_body_carries_the_app_argument() -> None:
    def script(conn: EngineConn) -> None:
        conn.connect()
        conn.send(
            b"myevents\n\nsendmsg\ncall-command: execute\nexecute-app-name: set\n"
            b"content-type: text/plain\ncontent-length: 12\n\nfoo=bar baz!" + hangup("NORMAL_CLEARING")
        )
        conn.read_to_eof()

    result, _ = run_scripted(script, CallSpec(destination="1"))
    assert result.variables == {"foo": "bar baz!"}


# ---------------------------------------------------------------------------
# inbound socket
# ---------------------------------------------------------------------------


def test_inbound_auth_and_show_channels() -> None:
    switch = Switch()
    with InboundServer(switch, password="s3cret") as inbound:
        host, port = inbound.address

        bad = EngineConn(gsocket.create_connection((host, port)))
        assert bad.read_block() == b"Content-Type: auth/request\n\n"
        bad.send(b"auth ClueCon\n\n")
        assert bad.next_frame().get("Reply-Text") == "-ERR invalid"
        assert bad.next_frame().get("Content-Type") == "text/disconnect-notice"
        assert bad.read_frame() is None and bad.eof
        bad.sock.close()

        def engine(conn: EngineConn) -> None:
            conn.connect()
            conn.send(b"myevents\n\nlinger\n\n" + execute("bridge", "sofia/gateway/gw1/4412345678"))
            conn.read_until_event("CHANNEL_HANGUP_COMPLETE")

        spec = CallSpec(destination="4412345678", caller_id_number="1001", hold_seconds=1.0)
        with scripted_engine(engine) as (eport, _):
            call = gevent.spawn(place_call, "127.0.0.1", eport, spec, timeout=5, switch=switch)
            cli = EngineConn(gsocket.create_connection((host, port)))
            assert cli.read_block() == b"Content-Type: auth/request\n\n"
            cli.send(b"auth s3cret\n\n")
            assert cli.next_frame().get("Reply-Text") == "+OK accepted"
            cli.send(b"event plain CHANNEL_HANGUP_COMPLETE\n\n")
            assert cli.next_frame().get("Reply-Text") == "+OK event listener enabled plain"
            wait_until(
                lambda: spec.uuid in switch.channels and switch.channels[spec.uuid].bridged,
                timeout=10,
                what="the call bridged on the switch",
            )

            cli.send(b"api show channels\n\n")
            resp = cli.next_frame()
            assert resp.ctype == "api/response"
            text = resp.body.decode()
            lines = text.split("\n")
            assert lines[0].split(",")[:4] == ["uuid", "direction", "created", "created_epoch"]
            assert len(lines[0].split(",")) == 38
            rows = {ln.split(",")[0]: ln.split(",") for ln in lines[1:] if ln.count(",") == 37}
            assert rows[spec.uuid][1] == "inbound" and rows[spec.uuid][9] == "4412345678"
            assert rows[spec.uuid][7] == "1001"
            assert text.endswith(f"\n\n{len(rows)} total.\n")

            cli.send(b"api show channels as json\n\n")
            data = json.loads(cli.next_frame().body)
            assert spec.uuid in [r["uuid"] for r in data["rows"]]

            hup = cli.next_frame(timeout=3)
            assert hup.event_name == "CHANNEL_HANGUP_COMPLETE"
            assert dict(hup.event())["Unique-ID"] == spec.uuid
            result = call.get(timeout=5)
        assert result.bridged_target == "sofia/gateway/gw1/4412345678" and result.error is None
        cli.send(b"api show channels\n\n")
        assert cli.next_frame().body == b"\n0 total.\n"
        cli.send(b"exit\n\n")
        assert cli.next_frame().get("Reply-Text") == "+OK bye"
        assert cli.next_frame().get("Content-Type") == "text/disconnect-notice"
        assert cli.read_frame() is None
        cli.sock.close()


def test_uuid_kill_from_the_inbound_socket() -> None:
    switch = Switch()

    def engine(conn: EngineConn) -> None:
        conn.connect()
        conn.send(b"myevents\n\nlinger\n\n" + execute("answer"))
        conn.read_until_event("CHANNEL_HANGUP_COMPLETE", timeout=4)

    spec = CallSpec(destination="1", hold_seconds=3)
    with InboundServer(switch) as inbound, scripted_engine(engine) as (eport, _):
        call = gevent.spawn(place_call, "127.0.0.1", eport, spec, timeout=5, switch=switch)
        cli = EngineConn(gsocket.create_connection(inbound.address))
        cli.read_block()
        cli.send(b"auth ClueCon\n\n")
        cli.read_frame()
        while not (spec.uuid in switch.channels and switch.channels[spec.uuid].answered):
            gevent.sleep(0.02)
        cli.send(f"api uuid_kill {spec.uuid} MANAGER_REQUEST\n\n".encode())
        assert cli.next_frame().body == b"+OK\n"
        result = call.get(timeout=3)
        cli.sock.close()
    assert result.hangup_cause == "MANAGER_REQUEST"


# ---------------------------------------------------------------------------
# load helper and CLI
# ---------------------------------------------------------------------------


def test_run_calls_in_parallel() -> None:
    def engine(conn: EngineConn) -> None:
        values = {k: unquote(v) for k, v in _header_lines(conn.connect())}
        dest = values["Caller-Destination-Number"]
        if int(dest) % 2:
            conn.send(b"myevents\n\nlinger\n\n" + execute("respond", "403 Forbidden"))
        else:
            conn.send(b"myevents\n\nlinger\n\n" + execute("bridge", f"sofia/gateway/gw1/{dest}"))
        conn.read_until_event("CHANNEL_HANGUP_COMPLETE")

    specs = [CallSpec(destination=str(n), hold_seconds=0.05) for n in range(30)]
    with scripted_engine(engine) as (port, conns):
        results = run_calls("127.0.0.1", port, specs, concurrency=10, timeout=5)
    assert all(c.error is None for c in conns)
    assert [r.uuid for r in results] == [s.uuid for s in specs]
    for n, r in enumerate(results):
        assert r.error is None and r.engine_closed
        assert r.sip_response == ((403, "Forbidden") if n % 2 else (200, "OK"))


def test_cli_call_prints_the_result_as_json() -> None:
    seen: list[dict[str, str]] = []

    def engine(conn: EngineConn) -> None:
        seen.append({k: unquote(v) for k, v in _header_lines(conn.connect())})
        conn.send(b"myevents\n\nlinger\n\n" + execute("respond", "403 Forbidden"))
        conn.read_until_event("CHANNEL_HANGUP_COMPLETE")

    with scripted_engine(engine) as (port, conns):
        proc = gevent.subprocess.run(
            [
                sys.executable,
                "-m",
                "loadtest.fsemu",
                "call",
                "--engine",
                f"127.0.0.1:{port}",
                "--from-user",
                "1001",
                "--source-ip",
                "10.0.0.5",
                "--dest",
                "4412345678",
                "--cid",
                "123",
                "--json",
            ],
            cwd=REPO,
            capture_output=True,
            timeout=20,
        )
    assert proc.returncode == 0, proc.stderr
    out = json.loads(proc.stdout)
    assert out["sip_response"] == [403, "Forbidden"] and out["hangup_cause"] == "CALL_REJECTED"
    assert out["executed"] == [["respond", "403 Forbidden"]]
    assert seen[0]["Caller-Username"] == "1001" and seen[0]["Caller-Caller-ID-Number"] == "123"
    assert seen[0]["variable_sip_network_ip"] == "10.0.0.5"
    assert conns[0].error is None


def test_late_replies_while_the_queued_bridge_runs() -> None:
    """Issue 14: a saturated switch replies late, but already runs what it queued; an engine
    that gives up and closes leaves the call bridged and beyond its control."""

    def script(conn: EngineConn) -> None:
        conn.connect()
        conn.send(b"myevents\n\nlinger\n\n" + execute("set", "a=1") + execute("bridge", "sofia/gateway/gw/1"))
        with pytest.raises(TimeoutError):  # no reply within 0.2 s: the engine gives up and closes
            conn.read_frame(timeout=0.2)

    result, _ = run_scripted(script, CallSpec(destination="1", late_replies=0.5, hold_seconds=0.3))
    assert result.bridged_target == "sofia/gateway/gw/1" and result.answered
    assert result.uncontrolled and result.closed_by == "engine"


def test_late_replies_arrive_in_order_after_the_delay() -> None:
    def script(conn: EngineConn) -> None:
        conn.connect()
        started = time.monotonic()
        conn.send(b"myevents\n\nlinger\n\n" + execute("set", "a=1"))
        first = conn.read_frame(timeout=3)
        assert first is not None and first.get("Reply-Text") == "+OK Events Enabled"
        assert time.monotonic() - started >= 0.25
        conn.send(hangup("NORMAL_CLEARING"))
        conn.read_until_event("CHANNEL_HANGUP_COMPLETE")

    result, _ = run_scripted(script, CallSpec(destination="1", late_replies=0.3))
    assert result.replies[1:4] == ["+OK Events Enabled", "+OK will linger", "+OK"]
    assert result.channel_variables["a"] == "1"


def test_a_caller_who_hangs_up_before_the_channel_data() -> None:
    def script(conn: EngineConn) -> None:
        conn.send(b"connect\n\n")
        frames = conn.read_to_eof(timeout=2)
        assert [f.ctype for f in frames] == ["text/disconnect-notice"]

    result, _ = run_scripted(script, CallSpec(destination="1", abandon_before_connect=True))
    assert result.commands == ["connect"] and result.executed == []
    assert result.hangup_cause == "ORIGINATOR_CANCEL"


def test_cdr_variables_drop_what_was_set_empty() -> None:
    def script(conn: EngineConn) -> None:
        conn.connect()
        conn.send(
            b"myevents\n\nlinger\n\n" + execute("multiset", "^^|x=1|y=|z=3") + hangup("NORMAL_CLEARING")
        )
        conn.read_until_event("CHANNEL_HANGUP_COMPLETE")

    result, _ = run_scripted(script, CallSpec(destination="1", extra_variables={"y": "dialplan"}))
    assert result.variables["y"] == ""  # what was sent
    assert "y" not in result.channel_variables  # FreeSWITCH unset it
    assert (result.channel_variables["x"], result.channel_variables["z"]) == ("1", "3")

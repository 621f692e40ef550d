"""The FreeSWITCH side at scale: many outbound-socket calls per second into one server.

Why not :func:`loadtest.fsemu.place_call` for every call: the emulator renders every
event from its templates and runs three greenlets per call (~5-9 ms of CPU per call), so
on a 2-core machine it would saturate long before the engine. This driver speaks the
same bytes at a fraction of the cost: at start-up it *records* what the emulator writes
for a bridged and a rejected call (:func:`record_library`), then replays those frames,
with the call's own UUID, destination, SIP user and source address substituted, as a
small state machine that answers whatever commands the server sends:

* ``connect`` -> the CHANNEL_DATA block (the emulator's bytes, ~6 KiB);
* every command -> its ``command/reply`` with FreeSWITCH's text (``+OK Events Enabled``,
  ``+OK will linger``, ``+OK``, ``+OK bye``...), in order, replies first;
* every ``sendmsg`` execute -> CHANNEL_PARK before the first one, then CHANNEL_EXECUTE and
  CHANNEL_EXECUTE_COMPLETE (~5 KiB each), as the emulator writes them;
* ``bridge`` -> EXECUTE, PROGRESS, ANSWER, BRIDGE; after the call's hold time, HANGUP,
  the linger notice, UNBRIDGE, ..., CHANNEL_HANGUP_COMPLETE;
* ``respond 4xx`` / ``hangup`` -> EXECUTE, HANGUP, ..., CHANNEL_HANGUP_COMPLETE at once;
* ``exit`` -> ``+OK bye``, the disconnect notice, close (what FreeSWITCH does).

So an accepted call costs the server what the emulator (and a real switch, whose events
are the same size) would send for its subscription: ~200 KiB with every ``myevents`` type,
~45 KiB with callgate's ``nixevent`` (engine.esl.commands).

Latency is measured as the emulator does: from the moment the TCP connection is
established to the arrival of the frame carrying the decision (``bridge``, ``respond``
or ``hangup``). Arrivals are open-loop: call *k* is due at ``k / cps`` whatever happened to
earlier calls; ``lag`` (actual start - due time) tells whether the driver kept up.

Run it through :mod:`loadtest.run`, or alone::

    python -m loadtest.driver --target 127.0.0.1:8084 --cps 500 --duration 20 --hold 2

Several driver processes (``--procs``) share one run: process *i* places calls
i, i+N, i+2N...; the parent only sleeps and reads the probes at the window edges.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import socket
import struct
import subprocess
import sys
import tempfile
import time
import uuid as uuidlib
from collections import Counter
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, NamedTuple

from loadtest import child_env
from loadtest.dataset import ACCEPT_ONLY, DEFAULT_MIX, CallMix, CallPlan, Scale
from loadtest.stats import summarize

if TYPE_CHECKING:  # the package imports the emulator (gevent): loaded only when a call filters
    from loadtest.fsemu.filters import EventFilters

__all__ = [
    "CallRecord",
    "FsLibrary",
    "LoadConfig",
    "record_library",
    "run_load",
    "split_frames",
]

SENTINEL_UUID = "5e7e5e7e-0000-4000-8000-5e7e5e7e5e7e"
SENTINEL_DEST = "zqzdestzqz"
SENTINEL_USER = "zqzuserzqz"
SENTINEL_IP = "zqzipzqz"
_UUID_B = SENTINEL_UUID.encode()

READ_SIZE = 65536
# Kernel receive timestamps (struct timespec, CLOCK_REALTIME) on the driver's reads: the value
# of Linux's asm-generic SO_TIMESTAMPNS (x86-64, arm64), which Python's socket module does not
# name. Where it is refused, the engine's share of a call's latency is not measured.
SO_TIMESTAMPNS = getattr(socket, "SO_TIMESTAMPNS", 35)
_STAMP_SPACE = socket.CMSG_SPACE(16)


# --------------------------------------------------------------------------- framing


def split_frames(buf: bytes) -> tuple[list[bytes], bytes]:
    """Cut FreeSWITCH -> client output into raw frames (header block + Content-Length body).

    Returns (complete frames, the unconsumed rest)."""
    frames: list[bytes] = []
    pos = 0
    n = len(buf)
    while pos < n:
        while pos < n and buf[pos] == 0x0A:  # blank lines between frames
            pos += 1
        end = buf.find(b"\n\n", pos)
        if end < 0:
            break
        head_end = end + 2
        length = 0
        cl = buf.find(b"Content-Length: ", pos, end)
        if cl >= 0:
            stop = buf.find(b"\n", cl, head_end)
            length = int(buf[cl + 16 : stop])
        if head_end + length > n:
            break
        frames.append(buf[pos : head_end + length])
        pos = head_end + length
    return frames, buf[pos:]


def _event_name(frame: bytes) -> str:
    head_end = frame.find(b"\n\n")
    body = frame[head_end + 2 :]
    if b"Content-Type: text/event-plain" not in frame[:head_end]:
        kind = frame[frame.find(b"Content-Type: ") + 14 :].split(b"\n", 1)[0]
        return kind.decode()
    name = body.split(b"\n", 1)[0].removeprefix(b"Event-Name: ").decode()
    app = body.find(b"\nApplication: ")
    if app >= 0 and name.startswith("CHANNEL_EXECUTE"):
        name += ":" + body[app + 14 : body.find(b"\n", app + 1)].decode()
    return name


class CommandSplitter:
    """Cuts what a client writes to FreeSWITCH into command blocks (``read_packet``'s rules:
    a blank line ends the headers, ``Content-Length`` adds a body)."""

    __slots__ = ("_buf",)

    def __init__(self) -> None:
        self._buf = b""

    def feed(self, data: bytes) -> list[bytes]:
        buf = self._buf + data if self._buf else data
        out = []
        pos = 0
        n = len(buf)
        while pos < n:
            while pos < n and buf[pos] in (0x0A, 0x0D):
                pos += 1
            end = buf.find(b"\n\n", pos)
            if end < 0:
                break
            stop = end + 2
            cl = buf.find(b"Content-Length:", pos, end)
            if cl >= 0:
                line_end = buf.find(b"\n", cl, stop)
                stop += int(buf[cl + 15 : line_end].strip() or b"0")
                if stop > n:
                    break
            out.append(buf[pos:stop])
            pos = stop
        self._buf = buf[pos:]
        return out


def _header(block: bytes, name: bytes) -> bytes | None:
    at = block.find(b"\n" + name + b": ")
    if at < 0:
        return None
    start = at + len(name) + 3
    end = block.find(b"\n", start)
    return block[start:end] if end >= 0 else block[start:]


def _event_headers(frame: bytes) -> Callable[[str], str | None]:
    """``header(name)`` of a recorded text/event-plain frame (values percent-decoded)."""
    from urllib.parse import unquote

    from loadtest.fsemu.filters import header_lookup

    body = frame[frame.find(b"\n\n") + 2 :]
    block = body.split(b"\n\n", 1)[0].decode("utf-8", "replace")
    headers = []
    for line in block.split("\n"):
        name, sep, value = line.partition(": ")
        if sep:
            headers.append((name, unquote(value)))
    return header_lookup(headers)


# (filters so far, a `filter` line) -> (the filters after it, the reply): every call of a
# run sends the same filter lines, so the model parses each sequence once. Filters are never
# modified in place (a new object per step), so sharing them between calls is safe.
_FILTER_STEPS: dict[tuple[EventFilters | None, bytes], tuple[EventFilters, bytes]] = {}


def _filtered(filters: EventFilters | None, line: bytes) -> tuple[EventFilters, bytes]:
    step = _FILTER_STEPS.get((filters, line))
    if step is None:
        from loadtest.fsemu.filters import EventFilters

        after = EventFilters()
        if filters is not None:
            after.entries = list(filters.entries)
        reply = _reply(after.command(line.decode("utf-8", "replace")).encode())
        step = (after, reply)
        if len(_FILTER_STEPS) < 256:
            _FILTER_STEPS[(filters, line)] = step
    return step


def _api_response(body: bytes) -> bytes:
    return b"Content-Type: api/response\nContent-Length: %d\n\n%s" % (len(body), body)


def _reply(text: bytes) -> bytes:
    return b"Content-Type: command/reply\nReply-Text: " + text + b"\n\n"


_REPLY_OK = _reply(b"+OK")
_REPLY_EVENTS = _reply(b"+OK Events Enabled")
_REPLY_LINGER = _reply(b"+OK will linger")
_REPLY_NOLINGER = _reply(b"+OK will not linger")
_REPLY_BYE = _reply(b"+OK bye")
_REPLY_UNKNOWN = _reply(b"-ERR command not found")


# --------------------------------------------------------------------------- the library

Part = list[tuple[str, bytes]]  # (event name or Content-Type, raw frame)


@dataclass
class FsLibrary:
    """FreeSWITCH's output for the steps of a call, recorded from the emulator.

    Each part is a list of (name, frame): ``CHANNEL_EXECUTE:set``-style names for events,
    the Content-Type for notices. :meth:`burst` joins the frames a connection subscribed
    to (``myevents``, then ``nixevent``/``event``), as FreeSWITCH filters them; notices are
    always written."""

    connect_auth: bytes  # CHANNEL_DATA of a digest-authenticated caller (sentinels inside)
    connect_ip: bytes  # CHANNEL_DATA of a caller known by address only
    park: Part
    execute_pair: Part  # CHANNEL_EXECUTE + CHANNEL_EXECUTE_COMPLETE of one app (`set`)
    bridge_start: Part  # EXECUTE(bridge), PROGRESS, ANSWER, BRIDGE
    bridge_end: Part  # HANGUP ... HANGUP_COMPLETE, then the linger notice
    bridge_end_nolinger: Part  # HANGUP, UNBRIDGE, then the disconnect notice
    reject: Part  # EXECUTE(respond), HANGUP ... HANGUP_COMPLETE, linger notice
    reject_nolinger: Part
    disconnect: bytes  # the notice FreeSWITCH writes before it closes
    _bursts: dict[tuple[str, frozenset[str], EventFilters | None], bytes] = field(
        default_factory=dict, repr=False
    )

    def connect_reply(self, plan: CallPlan, call_uuid: str) -> bytes:
        from loadtest.fsemu.wire import fs_urlencode

        template = self.connect_auth if plan.sip_auth_username else self.connect_ip
        out = template.replace(_UUID_B, call_uuid.encode())
        out = out.replace(SENTINEL_DEST.encode(), fs_urlencode(plan.destination).encode())
        out = out.replace(SENTINEL_IP.encode(), fs_urlencode(plan.network_ip).encode())
        if plan.sip_auth_username:
            out = out.replace(SENTINEL_USER.encode(), fs_urlencode(plan.sip_auth_username).encode())
        return out

    def burst(self, part: str, subscribed: frozenset[str], filters: EventFilters | None = None) -> bytes:
        """The frames of ``part`` a connection subscribed to ``subscribed`` receives, less the
        events its ``filter`` commands drop (loadtest.fsemu.filters; notices always pass)."""
        key = (part, subscribed, filters)  # filters: shared, never modified (_filtered)
        out = self._bursts.get(key)
        if out is None:
            frames: Part = getattr(self, part)
            out = b"".join(
                frame
                for name, frame in frames
                if not name.startswith("CHANNEL_")
                or (
                    name.partition(":")[0] in subscribed
                    and (filters is None or filters.passes(_event_headers(frame)))
                )
            )
            self._bursts[key] = out
        return out

    def names(self, part: str) -> list[str]:
        return [name for name, _ in getattr(self, part)]

    def to_json(self) -> dict[str, Any]:
        out: dict[str, Any] = {}
        for f in dataclasses.fields(self):
            if f.name.startswith("_"):
                continue
            value = getattr(self, f.name)
            if isinstance(value, bytes):
                out[f.name] = value.decode("latin-1")
            else:
                out[f.name] = [[name, frame.decode("latin-1")] for name, frame in value]
        return out

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> FsLibrary:
        kwargs: dict[str, Any] = {}
        for name, value in data.items():
            if isinstance(value, str):
                kwargs[name] = value.encode("latin-1")
            else:
                kwargs[name] = [(n, frame.encode("latin-1")) for n, frame in value]
        return cls(**kwargs)


def record_library(timeout: float = 10.0) -> FsLibrary:
    """Run the emulator (``loadtest.fsemu``) against an in-process recorder for a bridged
    call, a rejected call and an address-identified call, and cut its output into parts."""
    import gevent
    from gevent.server import StreamServer

    from loadtest.fsemu import CallSpec, Switch, place_call, wire

    recordings: list[list[bytes]] = []
    batches = {
        "bridge": b"sendmsg\ncall-command: execute\nexecute-app-name: bridge\n"
        b"execute-app-arg: sofia/gateway/gw1/" + SENTINEL_DEST.encode() + b"\n\n",
        "respond": b"sendmsg\ncall-command: execute\nexecute-app-name: respond\n"
        b"execute-app-arg: 403 Forbidden\n\n",
    }
    plan: list[bytes] = []

    def handle(sock: Any, _addr: Any) -> None:
        frames: list[bytes] = []
        buf = b""
        sock.sendall(b"connect\n\n")
        sent = False
        with gevent.Timeout(timeout):
            while True:
                data = sock.recv(READ_SIZE)
                if not data:
                    break
                new, buf = split_frames(buf + data)
                frames += new
                if frames and not sent:
                    sent = True
                    sock.sendall(
                        b"myevents\n\nlinger\n\nsendmsg\ncall-command: execute\nexecute-app-name: set\n"
                        b"execute-app-arg: callgate_account=1000\n\n" + plan[0]
                    )
                if any(b"Event-Name: CHANNEL_HANGUP_COMPLETE" in f for f in new):
                    break
        # Whatever follows CHANNEL_HANGUP_COMPLETE while the socket lingers (the linger notice).
        with gevent.Timeout(0.2, False):
            while data := sock.recv(READ_SIZE):
                new, buf = split_frames(buf + data)
                frames += new
        recordings.append(frames)
        sock.close()

    server = StreamServer(("127.0.0.1", 0), handle)
    server.start()
    try:
        port = server.server_port
        switch = Switch()
        for kind, user in (("bridge", SENTINEL_USER), ("respond", SENTINEL_USER), ("respond", "")):
            plan[:] = [batches[kind]]
            spec = CallSpec(
                destination=SENTINEL_DEST,
                sip_auth_username=user,
                network_ip=SENTINEL_IP,
                uuid=SENTINEL_UUID,
                hold_seconds=0.0,
            )
            result = place_call("127.0.0.1", port, spec, timeout=timeout, switch=switch)
            if result.error:
                raise RuntimeError(f"recording the emulator failed: {result.error}")
    finally:
        server.stop()
    bridged, rejected, by_ip = recordings
    return _cut(bridged, rejected, by_ip[0], wire.disconnect_notice(SENTINEL_UUID))


def _cut(bridged: list[bytes], rejected: list[bytes], connect_ip: bytes, disconnect: bytes) -> FsLibrary:
    b_named = [(_event_name(f), f) for f in bridged]
    r_named = [(_event_name(f), f) for f in rejected]
    b_names = [n for n, _ in b_named]
    r_names = [n for n, _ in r_named]

    def index(seq: list[str], name: str) -> int:
        try:
            return seq.index(name)
        except ValueError:
            raise RuntimeError(f"the emulator's output has no {name}: {seq}") from None

    def nolinger(named: Part, hangup: int, start: int) -> Part:
        # Without linger FreeSWITCH stops at CHANNEL_HANGUP (and the UNBRIDGE fired with it).
        stop = hangup + 1
        if stop < len(named) and named[stop][0] == "CHANNEL_UNBRIDGE":
            stop += 1
        return [*named[start:stop], ("text/disconnect-notice", disconnect)]

    index(b_names, "CHANNEL_HANGUP_COMPLETE")
    index(r_names, "CHANNEL_HANGUP_COMPLETE")
    ex = index(b_names, "CHANNEL_EXECUTE:set")
    exc = index(b_names, "CHANNEL_EXECUTE_COMPLETE:set")
    b_start = index(b_names, "CHANNEL_EXECUTE:bridge")
    b_bridge = index(b_names, "CHANNEL_BRIDGE")
    r_start = index(r_names, "CHANNEL_EXECUTE:respond")
    library = FsLibrary(
        connect_auth=bridged[0],
        connect_ip=connect_ip,
        park=[b_named[index(b_names, "CHANNEL_PARK")]],
        execute_pair=[b_named[ex], b_named[exc]],
        bridge_start=b_named[b_start : b_bridge + 1],
        bridge_end=b_named[b_bridge + 1 :],
        bridge_end_nolinger=nolinger(b_named, index(b_names, "CHANNEL_HANGUP"), b_bridge + 1),
        reject=r_named[r_start:],
        reject_nolinger=nolinger(r_named, index(r_names, "CHANNEL_HANGUP"), r_start),
        disconnect=disconnect,
    )
    if SENTINEL_USER.encode() not in library.connect_auth or SENTINEL_USER.encode() in library.connect_ip:
        raise RuntimeError("unexpected CHANNEL_DATA recorded (SIP user placeholder)")
    return library


# --------------------------------------------------------------------------- one call


@dataclass(slots=True)
class CallRecord:
    kind: str  # the mix class
    due: float  # seconds after the run's start when the call was due
    lag: float  # actual start - due
    latency: float | None  # TCP connected -> decision frame received (REFUSED: connect() -> refusal)
    # "accept", a reject reason, "respond <code>", "exit", REFUSED, or "" (no decision)
    outcome: str
    error: str | None
    done: float  # seconds after the run's start when the call ended
    engine_latency: float | None = None  # Placed.engine_latency

    def row(self) -> list[Any]:
        return [
            self.kind,
            self.due,
            self.lag,
            self.latency,
            self.outcome,
            self.error,
            self.done,
            self.engine_latency,
        ]


class Placed(NamedTuple):
    """What :func:`place` observed of one call."""

    latency: float | None  # as CallRecord.latency, on the driver's clock when it read the frame
    outcome: str
    error: str | None
    # The engine's share of the latency, read from the wire: from before connect() to the
    # kernel's arrival time of `connect`, plus from the channel data's send to the kernel's
    # arrival time of the decision. The switch's own time (answering `connect`) and the
    # driver's lateness in reading are left out; None where the kernel gave no timestamps.
    engine_latency: float | None = None


def _recv_stamped(sock: Any) -> tuple[bytes, float | None]:
    """One read, with the kernel's arrival time of its bytes (CLOCK_REALTIME) when it gave one."""
    data, ancillary, _flags, _address = sock.recvmsg(READ_SIZE, _STAMP_SPACE)
    for level, kind, payload in ancillary:
        if level == socket.SOL_SOCKET and kind == SO_TIMESTAMPNS and len(payload) >= 16:
            seconds, nanoseconds = struct.unpack("qq", payload[:16])
            return data, seconds + nanoseconds / 1e9
    return data, None


_NOTHING: frozenset[str] = frozenset()
# The engine refused the connection (a saturated engine stops listening: the kernel answers the
# SYN with a RST). FreeSWITCH then tries its next engine at once: counted as shed, with the time
# connect() took to fail as its latency.
REFUSED = "REFUSED"


def _myevents() -> frozenset[str]:
    from loadtest.fsemu.outbound import MYEVENTS

    return frozenset(MYEVENTS)


class _Call:
    """One call's FreeSWITCH state; ``feed`` returns the bytes to write back."""

    __slots__ = (
        "bridged",
        "decided",
        "exited",
        "filters",
        "lib",
        "linger",
        "outcome",
        "over",
        "parked",
        "reason",
        "subscribed",
        "uuid_b",
    )

    MYEVENTS: frozenset[str] = frozenset()

    def __init__(self, lib: FsLibrary, uuid_b: bytes) -> None:
        self.lib = lib
        self.uuid_b = uuid_b
        self.linger = False
        self.parked = False
        self.decided = False
        self.bridged = False
        self.over = False  # CHANNEL_HANGUP_COMPLETE (or the disconnect) was written
        self.exited = False
        self.outcome = ""
        self.reason = ""
        self.subscribed = _NOTHING
        self.filters: EventFilters | None = None  # created by the first `filter` command

    def _events(self, part: str) -> bytes:
        return self.lib.burst(part, self.subscribed, self.filters)

    def feed(self, blocks: list[bytes]) -> bytes:
        replies: list[bytes] = []
        events: list[bytes] = []
        for block in blocks:
            if block.startswith(b"sendmsg"):
                replies.append(_REPLY_OK)
                if self.over:
                    continue
                command = _header(block, b"call-command") or b""
                if command == b"execute":
                    app = _header(block, b"execute-app-name") or b""
                    arg = _header(block, b"execute-app-arg") or b""
                    if not self.parked:
                        self.parked = True
                        events.append(self._events("park"))
                    if app == b"bridge":
                        self.decided = self.bridged = True
                        self.outcome = "accept"
                        events.append(self._events("bridge_start"))
                    elif app == b"hangup" or (app == b"respond" and arg[:1] in (b"4", b"5", b"6")):
                        self.decided = self.over = True
                        self.outcome = self.reason or (
                            "respond " + arg[:3].decode() if app == b"respond" else "hangup"
                        )
                        events.append(self._events("reject" if self.linger else "reject_nolinger"))
                    else:
                        if app == b"set" and arg.startswith(b"callgate_reason="):
                            self.reason = arg[16:].decode()
                        elif app == b"multiset" and b"callgate_reason=" in arg:
                            # multiset ^^<d>a=b<d>c=d (or space-separated without ^^)
                            sep = arg[2:3] if arg.startswith(b"^^") else b" "
                            for pair in (arg[3:] if arg.startswith(b"^^") else arg).split(sep):
                                if pair.startswith(b"callgate_reason="):
                                    self.reason = pair[16:].decode()
                        events.append(self._events("execute_pair"))
                elif command == b"hangup":
                    self.decided = self.over = True
                    self.outcome = self.reason or "hangup"
                    events.append(self._events("reject" if self.linger else "reject_nolinger"))
            elif block.startswith(b"api "):
                # FreeSWITCH runs `api` in the listener thread and answers in an api/response,
                # in order with the replies. The dialplan's frozen-engine guard (one scheduled
                # hangup) is what the engine's `api sched_del <uuid>` cancels: the real switch
                # answered "+OK Deleted: 1" (tests/fixtures/esl_filter/).
                words = block.split(b"\n", 1)[0].split()
                if words[1:2] == [b"sched_del"] and len(words) == 3:
                    replies.append(_api_response(b"+OK Deleted: 1\n"))
                else:
                    name = words[1] if len(words) > 1 else b""
                    replies.append(_api_response(b"-ERR " + name + b" Command not found!\n"))
            elif block.startswith(b"myevents"):
                self.subscribed = self.subscribed | _Call.MYEVENTS
                replies.append(_REPLY_EVENTS)
            elif block.startswith(b"linger"):
                self.linger = True
                replies.append(_REPLY_LINGER)
            elif block.startswith(b"nolinger"):
                self.linger = False
                replies.append(_REPLY_NOLINGER)
            elif block.startswith((b"exit", b"...")):
                replies.append(_REPLY_BYE)
                self.exited = True
                if not self.decided:
                    self.outcome = "exit"
                events.append(self.lib.disconnect)
                break
            elif block.startswith(b"nixevent"):
                nixed = block.split(b"\n", 1)[0].split()[1:]
                self.subscribed = self.subscribed - {n.decode() for n in nixed}
                replies.append(_reply(b"+OK events nixed"))
            elif block.startswith(b"event"):
                names = [n.decode() for n in block.split(b"\n", 1)[0].split()[1:]]
                if names and names[0] in ("plain", "json", "xml"):
                    names = names[1:]
                self.subscribed = self.subscribed | set(names)
                replies.append(_reply(b"+OK event listener enabled plain"))
            elif block[:7].lower() == b"filter ":
                self.filters, reply = _filtered(self.filters, block.split(b"\n", 1)[0])
                replies.append(reply)
            elif block.startswith((b"resume", b"divert_events")):
                replies.append(_REPLY_OK)
            else:
                replies.append(_REPLY_UNKNOWN)
        out = b"".join(replies)
        if events:
            out += b"".join(events).replace(_UUID_B, self.uuid_b)
        return out

    def hangup(self) -> bytes:
        """The caller hangs up a bridged call."""
        self.over = True
        return self._events("bridge_end" if self.linger else "bridge_end_nolinger").replace(
            _UUID_B, self.uuid_b
        )


_Call.MYEVENTS = _myevents()


def place(
    address: tuple[str, int],
    plan: CallPlan,
    lib: FsLibrary,
    *,
    timeout: float = 10.0,
    clock: Callable[[], float] = time.perf_counter,
) -> Placed:
    """Play FreeSWITCH for one call: its decision latency, outcome and error."""
    import gevent
    from gevent import socket as gsocket

    call_uuid = str(uuidlib.uuid4())
    call = _Call(lib, call_uuid.encode())
    splitter = CommandSplitter()
    latency: float | None = None
    engine: float | None = None
    sock = gsocket.socket(gsocket.AF_INET, gsocket.SOCK_STREAM)
    try:
        sock.setsockopt(gsocket.IPPROTO_TCP, gsocket.TCP_NODELAY, 1)
        stamped = _stamp_arrivals(sock)
        with gevent.Timeout(timeout + plan.hold, False):
            began, began_wall = clock(), time.time()
            try:
                sock.connect(address)
            except ConnectionRefusedError:
                return Placed(clock() - began, REFUSED, None)
            except OSError as exc:
                return Placed(None, "", f"connect: {exc.strerror or exc}")
            t0 = clock()
            connected = False
            switch_sent: float | None = None  # wall time the channel data was sent
            engine_before: float | None = None  # the engine's time until `connect` arrived
            while True:
                arrived: float | None = None
                try:
                    if stamped and latency is None:
                        data, arrived = _recv_stamped(sock)
                    else:
                        data = sock.recv(READ_SIZE)
                except OSError as exc:
                    error = None if call.over else f"reset: {exc.strerror or exc}"
                    return Placed(latency, call.outcome, error, engine)
                if not data:
                    if call.over or call.exited:
                        return Placed(latency, call.outcome, None, engine)
                    why = "closed before the decision" if latency is None else "closed early"
                    return Placed(latency, call.outcome, why, engine)
                blocks = splitter.feed(data)
                if not blocks:
                    continue
                if not connected:
                    if not blocks[0].startswith(b"connect"):
                        return Placed(None, "", f"first command is not connect: {blocks[0][:40]!r}")
                    connected = True
                    if arrived is not None:
                        engine_before = arrived - began_wall
                    out = lib.connect_reply(plan, call_uuid)
                    switch_sent = time.time()
                    blocks = blocks[1:]
                    if blocks:
                        out += call.feed(blocks)
                else:
                    out = call.feed(blocks)
                if latency is None and call.decided:
                    latency = clock() - t0
                    if engine_before is not None and switch_sent is not None and arrived is not None:
                        engine = engine_before + (arrived - switch_sent)
                if out:
                    sock.sendall(out)
                if call.exited:
                    return Placed(latency, call.outcome, None, engine)
                if call.bridged and not call.over:
                    if plan.hold > 0:
                        gevent.sleep(plan.hold)
                    sock.sendall(call.hangup())
        why = "timeout: no decision" if latency is None else "timeout: socket not closed"
        return Placed(latency, call.outcome, why, engine)
    except OSError as exc:
        return Placed(latency, call.outcome, f"socket: {exc.strerror or exc}", engine)
    finally:
        sock.close()


def _stamp_arrivals(sock: Any) -> bool:
    """Ask the kernel for each read's arrival time; False where it refuses (not Linux)."""
    try:
        sock.setsockopt(socket.SOL_SOCKET, SO_TIMESTAMPNS, 1)
    except OSError:
        return False
    return True


# --------------------------------------------------------------------------- a run


@dataclass
class LoadConfig:
    target: tuple[str, int]
    cps: float = 100.0  # open loop (ignored when concurrency > 0)
    concurrency: int = 0  # > 0: closed loop, this many calls back to back
    duration: float = 10.0  # seconds of arrivals (warmup included)
    warmup: float = 2.0  # first seconds left out of the statistics
    mix: dict[str, float] = field(default_factory=lambda: dict(DEFAULT_MIX))
    hold: float = 0.0
    scale: Scale = field(default_factory=Scale)
    timeout: float = 10.0
    seed: int = 7
    procs: int = 1
    drain: float = 15.0  # after the last arrival, wait this long for calls to end

    def to_json(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["target"] = f"{self.target[0]}:{self.target[1]}"
        return d


def run_load(
    config: LoadConfig,
    *,
    part: int = 0,
    parts: int = 1,
    start_at: float | None = None,
    lib: FsLibrary | None = None,
) -> list[CallRecord]:
    """Place this process's share of the run's calls (gevent, in this process)."""
    import gevent
    from gevent.pool import Pool

    lib = lib or record_library()
    mix = CallMix(config.scale, config.mix, hold=config.hold, seed=config.seed * 1000 + part)
    records: list[CallRecord] = []
    wall_start = start_at if start_at is not None else time.time() + 0.2
    start = time.perf_counter() + (wall_start - time.time())
    end = start + config.duration

    def one(plan: CallPlan, due: float) -> None:
        began = time.perf_counter()
        # Recorded before the call so that a call still running when the run gives up counts.
        record = CallRecord(
            plan.kind, due, began - start - due, None, "", "unfinished at the end of the run", 0.0
        )
        records.append(record)
        placed = place(config.target, plan, lib, timeout=config.timeout)
        record.latency, record.outcome, record.error, record.engine_latency = placed
        record.done = time.perf_counter() - start

    delay = start - time.perf_counter()
    if delay > 0:
        gevent.sleep(delay)
    greenlets = Pool()
    if config.concurrency > 0:
        share = config.concurrency // parts + (1 if part < config.concurrency % parts else 0)

        def worker() -> None:
            while (now := time.perf_counter()) < end:
                one(mix.next(), now - start)

        workers = [gevent.spawn(worker) for _ in range(share)]
        gevent.joinall(workers, timeout=config.duration + config.drain + config.timeout)
    else:
        interval = parts / config.cps
        k = 0
        while True:
            due = (part / config.cps) + k * interval
            if due >= config.duration:
                break
            wait = start + due - time.perf_counter()
            if wait > 0.0005:
                gevent.sleep(wait)
            greenlets.spawn(one, mix.next(), due)
            k += 1
        greenlets.join(timeout=config.drain + config.hold + config.timeout)
    greenlets.kill(block=False)
    return records


# --------------------------------------------------------------------------- reporting


OutcomeFilter = Callable[[str | None], bool]


def _latencies(
    records: Iterable[CallRecord], keep: OutcomeFilter | None = None, *, engine: bool = False
) -> list[float]:
    """The latencies read (``engine``: the engine's shares) of the records whose outcome
    ``keep`` accepts (of all by default)."""
    values = ((r.engine_latency if engine else r.latency, r.outcome) for r in records)
    return [value for value, outcome in values if value is not None and (keep is None or keep(outcome))]


def _degraded(outcome: str | None) -> bool:
    """Answered ENGINE_DEGRADED: a decision (503, fail closed), not an authorization."""
    return outcome == "ENGINE_DEGRADED"


def _authorized(outcome: str | None) -> bool:
    return not _degraded(outcome)


def report(
    records: list[CallRecord], config: LoadConfig, probes: dict[str, Any] | None = None
) -> dict[str, Any]:
    """Statistics of the calls due inside the measurement window [warmup, duration)."""
    window = max(1e-9, config.duration - config.warmup)
    measured = [r for r in records if config.warmup <= r.due < config.duration]
    refused = [r for r in measured if r.outcome == REFUSED]
    decided = [r for r in measured if r.latency is not None and r.outcome != REFUSED]
    shed = [r for r in decided if _degraded(r.outcome)] + refused
    errors = Counter(_error_kind(r.error) for r in measured if r.error)
    outcomes = Counter(r.outcome or "(none)" for r in measured)
    by_class: dict[str, Counter[str]] = {}
    for r in measured:
        by_class.setdefault(r.kind, Counter())[r.outcome or "(none)"] += 1
    accepted = _latencies(decided, lambda outcome: outcome == "accept")
    rejected = _latencies(decided, lambda outcome: outcome != "accept")
    lags = sorted(r.lag for r in measured)
    out: dict[str, Any] = {
        "config": config.to_json(),
        "window_seconds": window,
        "offered_cps": (len(measured) / window) if config.concurrency else config.cps,
        "calls": len(measured),
        "decided": len(decided),
        "achieved_cps": len(decided) / window,
        # ENGINE_DEGRADED is a decision (503, fail closed) but not an authorization: an engine
        # that falls behind answers it when its deadline passes or Redis cannot be asked.
        "degraded": sum(_degraded(r.outcome) for r in decided),
        "authorized_cps": sum(_authorized(r.outcome) for r in decided) / window,
        "errors": sum(errors.values()),
        "error_kinds": dict(errors.most_common()),
        "error_examples": _error_examples(r.error for r in measured if r.error),
        "latency": summarize(_latencies(decided)),
        "latency_accepted": summarize(accepted),
        "latency_rejected": summarize(rejected),
        # Beyond saturation the engine sheds (ENGINE_DEGRADED at once): the calls it decided
        # and the ones it shed, apart.
        "latency_not_degraded": summarize(_latencies(decided, _authorized)),
        "latency_degraded": summarize(_latencies(decided, _degraded)),
        # The engine's share of those latencies, from the kernel's arrival times (Placed):
        # without the switch model's time to answer `connect` and the driver's lateness.
        "latency_engine": summarize(_latencies(decided, engine=True)),
        "latency_engine_not_degraded": summarize(_latencies(decided, _authorized, engine=True)),
        # Connections the engine refused (it had stopped listening): how fast, and how many.
        "refused": len(refused),
        "latency_refused": summarize(_latencies(refused)),
        # Shed either way (ENGINE_DEGRADED or refused): the "rest shed fast" of issue 18.
        "shed": len(shed),
        "latency_shed": summarize(_latencies(shed)),
        "outcomes": dict(outcomes.most_common()),
        "outcomes_by_class": {k: dict(v.most_common()) for k, v in sorted(by_class.items())},
        "driver_lag_p99_ms": (lags[min(len(lags) - 1, math.ceil(0.99 * len(lags)) - 1)] * 1000)
        if lags
        else None,
        "driver_lag_max_ms": (lags[-1] * 1000) if lags else None,
    }
    if probes:
        out.update(_cost(probes, len(decided)))
    return out


def _error_kind(error: str) -> str:
    return error.split(":", 1)[0] if error.startswith(("connect", "socket", "reset")) else error


def _error_examples(errors: Iterable[str], most: int = 3) -> dict[str, list[str]]:
    """Per kind of error, its first ``most`` distinct messages (the kinds alone do not say
    whether a failed connect was a reset or a timeout)."""
    examples: dict[str, list[str]] = {}
    for error in errors:
        seen = examples.setdefault(_error_kind(error), [])
        if error not in seen and len(seen) < most:
            seen.append(error)
    return examples


def _cost(probes: dict[str, Any], decided: int) -> dict[str, Any]:
    begin, end = probes["begin"], probes["end"]
    per = max(1, decided)
    out: dict[str, Any] = {"window_wall_seconds": end["wall"] - begin["wall"]}
    for group in ("server", "driver"):
        if group in begin:
            cpu = end[group] - begin[group]
            out[f"{group}_cpu_seconds"] = cpu
            out[f"{group}_cpu_per_call_us"] = cpu / per * 1e6
            out[f"{group}_cpu_utilisation"] = cpu / max(1e-9, out["window_wall_seconds"])
    busy0, total0 = begin["system"]
    busy1, total1 = end["system"]
    cpus = os.cpu_count() or 1
    wall = max(1e-9, (total1 - total0) / cpus)
    out["system_cpu_busy_cores"] = (busy1 - busy0) / wall
    ours = out.get("server_cpu_seconds", 0.0) + out.get("driver_cpu_seconds", 0.0)
    r0, r1 = begin.get("redis") or {}, end.get("redis") or {}
    if r0 and r1:
        ours += r1["cpu"] - r0["cpu"]
        out["redis_cpu_per_call_us"] = (r1["cpu"] - r0["cpu"]) / per * 1e6
        commands = {k: r1[k] - r0.get(k, 0) for k in r1 if k != "cpu" and r1[k] - r0.get(k, 0) > 0}
        out["redis_commands_per_call"] = {k: round(v / per, 3) for k, v in sorted(commands.items())}
    # CPU used meanwhile by other processes (other people's jobs share this machine): high
    # values make a run suspect. Interrupt time (on loopback, much of the TCP receive path of
    # our own traffic) and hypervisor steal are reported apart.
    t0, t1 = begin.get("times"), end.get("times")
    if t0 and t1:
        out["foreign_cpu_cores"] = max(0.0, (t1["tasks"] - t0["tasks"]) - ours) / wall
        out["irq_cpu_cores"] = (t1["irq"] - t0["irq"]) / wall
        out["steal_cpu_cores"] = (t1["steal"] - t0["steal"]) / wall
    else:
        out["foreign_cpu_cores"] = max(0.0, (busy1 - busy0) - ours) / wall
    if "postgres_connections" in end:
        out["server_postgres_connections"] = end["postgres_connections"]
    return out


def take_probe(server_pids: list[int], driver_pids: list[int], redis_client: Any = None) -> dict[str, Any]:
    from loadtest import probes

    reading: dict[str, Any] = {
        "wall": time.time(),
        "system": probes.system_cpu(),
        "times": probes.cpu_times(),
    }
    if server_pids:
        reading["server"] = probes.cpu_seconds(server_pids)
        reading["postgres_connections"] = probes.postgres_connections(server_pids)
    if driver_pids:
        reading["driver"] = probes.cpu_seconds(driver_pids)
    if redis_client is not None:
        reading["redis"] = probes.redis_reading(redis_client)
    return reading


def drive(
    config: LoadConfig,
    *,
    server_pids: list[int] | None = None,
    redis_url: str | None = None,
    pin_cpus: str | None = None,
    library: FsLibrary | None = None,
) -> dict[str, Any]:
    """Run ``config`` with ``config.procs`` driver processes; probe around the window; report.

    The calling process does no I/O of the calls: it starts the driver processes (each
    records the library itself unless one is given), sleeps to the window edges to read the
    probes, then merges the calls the processes report."""
    redis_client = None
    if redis_url:
        import redis

        redis_client = redis.Redis.from_url(redis_url)
    lib = library or _library_in_subprocess()
    with tempfile.TemporaryDirectory(prefix="cgload-") as tmp:
        lib_path = os.path.join(tmp, "library.json")
        with open(lib_path, "w") as handle:
            json.dump(lib.to_json(), handle)
        start_at = time.time() + 1.0 + 0.1 * config.procs
        children = []
        outputs = []
        for part in range(config.procs):
            out_path = os.path.join(tmp, f"part{part}.json")
            outputs.append(out_path)
            cmd = [
                sys.executable,
                "-m",
                "loadtest.driver",
                "--child",
                f"{part}/{config.procs}",
                "--start-at",
                repr(start_at),
                "--library",
                lib_path,
                "--out",
                out_path,
                "--config-json",
                json.dumps(config.to_json()),
            ]
            if pin_cpus:
                cmd = ["taskset", "-c", pin_cpus, *cmd]
            children.append(subprocess.Popen(cmd, env=child_env()))
        pids = [c.pid for c in children]
        server_pids = server_pids or []
        time.sleep(max(0.0, start_at + config.warmup - time.time()))
        begin = take_probe(server_pids, pids, redis_client)
        time.sleep(max(0.0, start_at + config.duration - time.time()))
        end = take_probe(server_pids, pids, redis_client)
        records: list[CallRecord] = []
        failed = []
        for child, path in zip(children, outputs, strict=True):
            code = child.wait()
            if code != 0 or not os.path.exists(path):
                failed.append(code)
                continue
            with open(path) as handle:
                for row in json.load(handle):
                    records.append(CallRecord(*row))
    result = report(records, config, {"begin": begin, "end": end})
    if failed:
        result["driver_failures"] = failed
    if redis_client is not None:
        redis_client.close()
    return result


def _library_in_subprocess() -> FsLibrary:
    """Record the library in a fresh process (the emulator needs gevent's hub)."""
    code = (
        "import json, sys; from loadtest.driver import record_library; "
        "json.dump(record_library().to_json(), sys.stdout)"
    )
    out = subprocess.run([sys.executable, "-c", code], check=True, capture_output=True, text=True).stdout
    return FsLibrary.from_json(json.loads(out))


def config_from_json(data: dict[str, Any]) -> LoadConfig:
    data = dict(data)
    host, _, port = data.pop("target").rpartition(":")
    scale = Scale(**data.pop("scale"))
    return LoadConfig(target=(host, int(port)), scale=scale, **data)


def _child(args: argparse.Namespace) -> int:
    import resource

    _soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    config = config_from_json(json.loads(args.config_json))
    part, parts = (int(x) for x in args.child.split("/"))
    # The driver holds its side of every call up (5,000 per process with --held 10000): left
    # at CPython's defaults, its full collections walk them all and stall the driver for
    # 55-60 ms of CPU, late in reading the decisions it times (docs/performance.md, round 4).
    # Young collections only, as the engine (engine.gcpolicy); a run is too short for its
    # cyclic garbage to matter. LOADTEST_DRIVER_GC=default: CPython's defaults, as before.
    # Like the engine, it also runs a young collection every 20 ms: calls ending as fast as
    # they start keep CPython's net allocation count under the threshold while the young
    # generation grows to ~100,000 objects, then walked in one 40-50 ms pause (round 6).
    if os.environ.get("LOADTEST_DRIVER_GC") != "default":
        import gevent.event

        from engine import gcpolicy

        gcpolicy.apply(5000, 0)
        gevent.spawn(gcpolicy.run_young_collections, 0.02, gevent.event.Event())
    with open(args.library) as handle:
        lib = FsLibrary.from_json(json.load(handle))
    records = run_load(config, part=part, parts=parts, start_at=args.start_at, lib=lib)
    with open(args.out, "w") as handle:
        json.dump([r.row() for r in records], handle)
    return 0


def _parse_mix(text: str) -> dict[str, float]:
    if text == "default":
        return dict(DEFAULT_MIX)
    if text == "accept":
        return dict(ACCEPT_ONLY)
    out = {}
    for item in text.split(","):
        name, _, weight = item.partition("=")
        out[name.strip()] = float(weight or 1)
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m loadtest.driver", description=__doc__.split("\n\n")[0])
    parser.add_argument("--target", default="127.0.0.1:8084", help="host:port of the server under test")
    parser.add_argument("--cps", type=float, default=100.0, help="offered calls per second (open loop)")
    parser.add_argument(
        "--concurrency", type=int, default=0, help="closed loop with this many calls in flight"
    )
    parser.add_argument("--duration", type=float, default=10.0)
    parser.add_argument("--warmup", type=float, default=2.0)
    parser.add_argument("--hold", type=float, default=0.0, help="seconds answered calls stay up")
    parser.add_argument("--mix", default="default", help="'default', 'accept' or class=weight,...")
    parser.add_argument(
        "--accounts", type=int, default=Scale.accounts, help="the dataset's scale (for the mix)"
    )
    parser.add_argument("--rates", type=int, default=Scale.rates)
    parser.add_argument("--groups", type=int, default=Scale.groups)
    parser.add_argument("--procs", type=int, default=1, help="driver processes")
    parser.add_argument(
        "--server-pid", type=int, action="append", default=[], help="measure this process's CPU"
    )
    parser.add_argument("--redis", default=None, help="Redis URL: report its CPU and commands per call")
    parser.add_argument("--json", default=None, help="write the report here")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    parser.add_argument("--start-at", type=float, help=argparse.SUPPRESS)
    parser.add_argument("--library", help=argparse.SUPPRESS)
    parser.add_argument("--out", help=argparse.SUPPRESS)
    parser.add_argument("--config-json", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        return _child(args)
    host, _, port = args.target.rpartition(":")
    config = LoadConfig(
        target=(host, int(port)),
        cps=args.cps,
        concurrency=args.concurrency,
        duration=args.duration,
        warmup=args.warmup,
        mix=_parse_mix(args.mix),
        hold=args.hold,
        scale=Scale(accounts=args.accounts, rates=args.rates, groups=args.groups),
        procs=args.procs,
    )
    result = drive(config, server_pids=args.server_pid, redis_url=args.redis)
    text = json.dumps(result, indent=2, default=str)
    if args.json:
        with open(args.json, "w") as handle:
            handle.write(text)
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())

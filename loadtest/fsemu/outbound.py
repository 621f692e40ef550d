"""Outbound event socket: FreeSWITCH dials the engine and hands it a call.

``place_call(host, port, CallSpec(...))`` plays FreeSWITCH 1.10.12 for one inbound SIP
call whose dialplan runs ``socket host:port async full``: it connects to the engine,
writes nothing until ``connect``, answers with the CHANNEL_DATA block, replies to each
command the way ``mod_event_socket`` does, executes the messages the engine sends
(``set``, ``export``, ``answer``, ``bridge``, ``respond``, ``hangup``, ``sched_hangup``...)
as an async park would, and writes the events the captures show, until the socket is
closed.  The :class:`CallResult` says what the engine decided and what the SIP caller
saw.

Concurrency: one greenlet reads the socket, one writes it (the "listener": command
replies, queued events, disconnect notices, in FreeSWITCH's order) and one runs the
channel.  ``gevent.socket`` is used explicitly, so callers need not monkey-patch.
"""

from __future__ import annotations

import collections
import contextlib
import ipaddress
import itertools
import json
import random
import re
import string
import time
import traceback
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import NamedTuple, Protocol
from uuid import uuid4

import gevent
import gevent.event
from gevent import socket as gsocket
from gevent.pool import Pool

from . import templates, wire
from .filters import EventFilters, UnsupportedFilter, header_lookup

__all__ = [
    "CAUSE_TO_SIP",
    "Q850",
    "SIP_PHRASES",
    "CallResult",
    "CallSpec",
    "Channel",
    "EslConnection",
    "Switch",
    "cause_to_sip",
    "default_switch",
    "gateways_answering",
    "place_call",
    "run_calls",
    "sip_phrase",
    "sip_to_cause",
    "split_dial_string",
    "str2cause",
]

# ---------------------------------------------------------------------------
# hangup causes and SIP (switch_channel.c CAUSE_CHART, mod_sofia)
# ---------------------------------------------------------------------------

#: ``CAUSE_CHART`` of switch_channel.c: name -> numeric cause (Q.850 where one exists).
Q850: dict[str, int] = {
    "NONE": 0,
    "UNALLOCATED_NUMBER": 1,
    "NO_ROUTE_TRANSIT_NET": 2,
    "NO_ROUTE_DESTINATION": 3,
    "CHANNEL_UNACCEPTABLE": 6,
    "CALL_AWARDED_DELIVERED": 7,
    "NORMAL_CLEARING": 16,
    "USER_BUSY": 17,
    "NO_USER_RESPONSE": 18,
    "NO_ANSWER": 19,
    "SUBSCRIBER_ABSENT": 20,
    "CALL_REJECTED": 21,
    "NUMBER_CHANGED": 22,
    "REDIRECTION_TO_NEW_DESTINATION": 23,
    "EXCHANGE_ROUTING_ERROR": 25,
    "DESTINATION_OUT_OF_ORDER": 27,
    "INVALID_NUMBER_FORMAT": 28,
    "FACILITY_REJECTED": 29,
    "RESPONSE_TO_STATUS_ENQUIRY": 30,
    "NORMAL_UNSPECIFIED": 31,
    "NORMAL_CIRCUIT_CONGESTION": 34,
    "NETWORK_OUT_OF_ORDER": 38,
    "NORMAL_TEMPORARY_FAILURE": 41,
    "SWITCH_CONGESTION": 42,
    "ACCESS_INFO_DISCARDED": 43,
    "REQUESTED_CHAN_UNAVAIL": 44,
    "PRE_EMPTED": 45,
    "FACILITY_NOT_SUBSCRIBED": 50,
    "OUTGOING_CALL_BARRED": 52,
    "INCOMING_CALL_BARRED": 54,
    "BEARERCAPABILITY_NOTAUTH": 57,
    "BEARERCAPABILITY_NOTAVAIL": 58,
    "SERVICE_UNAVAILABLE": 63,
    "BEARERCAPABILITY_NOTIMPL": 65,
    "CHAN_NOT_IMPLEMENTED": 66,
    "FACILITY_NOT_IMPLEMENTED": 69,
    "SERVICE_NOT_IMPLEMENTED": 79,
    "INVALID_CALL_REFERENCE": 81,
    "INCOMPATIBLE_DESTINATION": 88,
    "INVALID_MSG_UNSPECIFIED": 95,
    "MANDATORY_IE_MISSING": 96,
    "MESSAGE_TYPE_NONEXIST": 97,
    "WRONG_MESSAGE": 98,
    "IE_NONEXIST": 99,
    "INVALID_IE_CONTENTS": 100,
    "WRONG_CALL_STATE": 101,
    "RECOVERY_ON_TIMER_EXPIRE": 102,
    "MANDATORY_IE_LENGTH_ERROR": 103,
    "PROTOCOL_ERROR": 111,
    "INTERWORKING": 127,
    "SUCCESS": 142,
    "ORIGINATOR_CANCEL": 487,
    "CRASH": 700,
    "SYSTEM_SHUTDOWN": 701,
    "LOSE_RACE": 702,
    "MANAGER_REQUEST": 703,
    "BLIND_TRANSFER": 800,
    "ATTENDED_TRANSFER": 801,
    "ALLOTTED_TIMEOUT": 602,
    "USER_CHALLENGE": 603,
    "MEDIA_TIMEOUT": 604,
    "PICKED_OFF": 605,
    "USER_NOT_REGISTERED": 606,
    "PROGRESS_TIMEOUT": 607,
    "INVALID_GATEWAY": 608,
    "GATEWAY_DOWN": 609,
    "INVALID_URL": 610,
    "INVALID_PROFILE": 611,
    "NO_PICKUP": 612,
    "SRTP_READ_ERROR": 613,
}
_BY_NUMBER = {v: k for k, v in Q850.items()}

#: Spellings the emulator accepts besides the chart's names.  ``alloted_timeout`` (one
#: "t", as ASTPP writes it) is mapped to ALLOTTED_TIMEOUT on purpose; note that
#: FreeSWITCH's own ``switch_channel_str2cause`` compares names exactly (ignoring case),
#: so a real switch does not recognise this spelling.
CAUSE_ALIASES = {"ALLOTED_TIMEOUT": "ALLOTTED_TIMEOUT"}

#: mod_sofia ``hangup_cause_to_sip()``: the final response an unanswered inbound call gets.
CAUSE_TO_SIP: dict[str, int] = {
    "UNALLOCATED_NUMBER": 404,
    "NO_ROUTE_TRANSIT_NET": 404,
    "NO_ROUTE_DESTINATION": 404,
    "USER_BUSY": 486,
    "NO_USER_RESPONSE": 408,
    "NO_ANSWER": 480,
    "SUBSCRIBER_ABSENT": 480,
    "CALL_REJECTED": 603,
    "NUMBER_CHANGED": 410,
    "REDIRECTION_TO_NEW_DESTINATION": 410,
    "DESTINATION_OUT_OF_ORDER": 502,
    "INVALID_PROFILE": 502,
    "INVALID_NUMBER_FORMAT": 484,
    "INVALID_URL": 484,
    "INVALID_GATEWAY": 484,
    "FACILITY_REJECTED": 501,
    "NORMAL_UNSPECIFIED": 480,
    "REQUESTED_CHAN_UNAVAIL": 503,
    "NORMAL_CIRCUIT_CONGESTION": 503,
    "NETWORK_OUT_OF_ORDER": 503,
    "NORMAL_TEMPORARY_FAILURE": 503,
    "SWITCH_CONGESTION": 503,
    "GATEWAY_DOWN": 503,
    "OUTGOING_CALL_BARRED": 403,
    "INCOMING_CALL_BARRED": 403,
    "BEARERCAPABILITY_NOTAUTH": 403,
    "BEARERCAPABILITY_NOTAVAIL": 503,
    "BEARERCAPABILITY_NOTIMPL": 488,
    "INCOMPATIBLE_DESTINATION": 488,
    "FACILITY_NOT_IMPLEMENTED": 501,
    "SERVICE_NOT_IMPLEMENTED": 501,
    "RECOVERY_ON_TIMER_EXPIRE": 504,
    "ORIGINATOR_CANCEL": 487,
    "EXCHANGE_ROUTING_ERROR": 483,
}

#: mod_sofia ``sofia_glue_sip_cause_to_freeswitch()``: the cause ``respond <code>`` hangs up with.
_SIP_TO_CAUSE: dict[int, str] = {
    200: "NORMAL_CLEARING",
    401: "CALL_REJECTED",
    402: "CALL_REJECTED",
    403: "CALL_REJECTED",
    407: "CALL_REJECTED",
    603: "CALL_REJECTED",
    608: "CALL_REJECTED",
    404: "UNALLOCATED_NUMBER",
    485: "NO_ROUTE_DESTINATION",
    604: "NO_ROUTE_DESTINATION",
    408: "RECOVERY_ON_TIMER_EXPIRE",
    504: "RECOVERY_ON_TIMER_EXPIRE",
    410: "NUMBER_CHANGED",
    413: "INTERWORKING",
    414: "INTERWORKING",
    416: "INTERWORKING",
    420: "INTERWORKING",
    421: "INTERWORKING",
    423: "INTERWORKING",
    505: "INTERWORKING",
    513: "INTERWORKING",
    480: "NO_USER_RESPONSE",
    400: "NORMAL_TEMPORARY_FAILURE",
    481: "NORMAL_TEMPORARY_FAILURE",
    500: "NORMAL_TEMPORARY_FAILURE",
    503: "NORMAL_TEMPORARY_FAILURE",
    486: "USER_BUSY",
    600: "USER_BUSY",
    484: "INVALID_NUMBER_FORMAT",
    488: "INCOMPATIBLE_DESTINATION",
    606: "INCOMPATIBLE_DESTINATION",
    502: "NETWORK_OUT_OF_ORDER",
    405: "SERVICE_UNAVAILABLE",
    406: "SERVICE_NOT_IMPLEMENTED",
    415: "SERVICE_NOT_IMPLEMENTED",
    501: "SERVICE_NOT_IMPLEMENTED",
    482: "EXCHANGE_ROUTING_ERROR",
    483: "EXCHANGE_ROUTING_ERROR",
    487: "ORIGINATOR_CANCEL",
}

#: Reason phrases sofia-sip's ``sip_status_phrase()`` gives.
SIP_PHRASES: dict[int, str] = {
    100: "Trying",
    180: "Ringing",
    181: "Call Is Being Forwarded",
    182: "Queued",
    183: "Session Progress",
    200: "OK",
    202: "Accepted",
    300: "Multiple Choices",
    301: "Moved Permanently",
    302: "Moved Temporarily",
    305: "Use Proxy",
    380: "Alternative Service",
    400: "Bad Request",
    401: "Unauthorized",
    402: "Payment Required",
    403: "Forbidden",
    404: "Not Found",
    405: "Method Not Allowed",
    406: "Not Acceptable",
    407: "Proxy Authentication Required",
    408: "Request Timeout",
    410: "Gone",
    413: "Request Entity Too Large",
    414: "Request-URI Too Long",
    415: "Unsupported Media Type",
    416: "Unsupported URI Scheme",
    420: "Bad Extension",
    421: "Extension Required",
    423: "Interval Too Brief",
    480: "Temporarily Unavailable",
    481: "Call/Transaction Does Not Exist",
    482: "Loop Detected",
    483: "Too Many Hops",
    484: "Address Incomplete",
    485: "Ambiguous",
    486: "Busy Here",
    487: "Request Terminated",
    488: "Not Acceptable Here",
    491: "Request Pending",
    493: "Undecipherable",
    500: "Internal Server Error",
    501: "Not Implemented",
    502: "Bad Gateway",
    503: "Service Unavailable",
    504: "Gateway Time-out",
    505: "Version Not Supported",
    513: "Message Too Large",
    600: "Busy Everywhere",
    603: "Decline",
    604: "Does Not Exist Anywhere",
    606: "Not Acceptable",
}

_DIALSTATUS = {
    "USER_BUSY": "BUSY",
    "NO_ANSWER": "NOANSWER",
    "NO_USER_RESPONSE": "NOANSWER",
    "ORIGINATOR_CANCEL": "CANCEL",
    "SUCCESS": "SUCCESS",
}


def str2cause(text: str | None, default: str = "NORMAL_CLEARING") -> str:
    """A cause name from what an app or header gave (name in any case, or a number)."""
    if text is None or not text.strip():
        return default
    s = text.strip()
    if s[0].isdigit():
        try:
            return _BY_NUMBER.get(int(s.split()[0]), "NONE")
        except ValueError:
            return "NONE"
    up = s.upper()
    up = CAUSE_ALIASES.get(up, up)
    return up if up in Q850 else "NONE"


def q850(cause: str) -> int:
    return Q850.get(cause, 0)


def cause_to_sip(cause: str) -> int:
    return CAUSE_TO_SIP.get(cause, 480)


def sip_to_cause(code: int) -> str:
    if code == 401:
        return "USER_CHALLENGE"
    return _SIP_TO_CAUSE.get(code, "NORMAL_UNSPECIFIED")


def sip_phrase(code: int) -> str:
    return SIP_PHRASES.get(code, "Unknown")


def dialstatus(cause: str) -> str:
    return _DIALSTATUS.get(cause, "CHANUNAVAIL")


# ---------------------------------------------------------------------------
# call description and result
# ---------------------------------------------------------------------------


@dataclass
class CallSpec:
    """One inbound SIP call that FreeSWITCH hands to the engine with ``socket``."""

    destination: str
    caller_id_number: str = "1000"
    caller_id_name: str = ""  # empty: the number (what a From without display name gives)
    sip_auth_username: str = ""  # adds variable_sip_auth_username/_realm only when set
    network_ip: str = "127.0.0.1"  # variable_sip_network_ip / Caller-Network-Addr / sip_received_ip
    uuid: str = field(default_factory=lambda: str(uuid4()))
    extra_variables: dict[str, str] = field(default_factory=dict)  # e.g. {"sip_h_P-Accountcode": "1001"}
    hold_seconds: float = 0.0  # how long an answered call stays up before the caller hangs up
    answering_targets: Callable[[str], bool | str] | None = None  # which dial targets answer; default all
    socket_mode: str = "async full"  # "async": linger/event/api get "-ERR command not found"
    # --- more of the emulated call -------------------------------------------------------
    from_user: str = ""  # SIP From user / Caller-Username; empty: caller_id_number
    network_port: int = 5070
    sip_auth_realm: str = ""  # empty: the switch's SIP address
    first_command_timeout: float = 25.0  # FreeSWITCH waits this long for the first command
    failed_leg_cause: str = "NO_ANSWER"  # cause of a dial target that does not answer
    failed_leg_seconds: float = 0.0  # time a failing target takes to fail
    ring_seconds: float = 0.0  # time between CHANNEL_PROGRESS and the answer of a target
    abandon_after: float | None = None  # caller cancels (ORIGINATOR_CANCEL, 487) if not answered by then
    linger_notice_before_hangup: bool = False  # linger notice before CHANNEL_HANGUP (seen in respond_403)
    # --- misbehaviour for tests ---------------------------------------------------------
    stall_after_connect: bool = False  # after the connect reply, FreeSWITCH never writes again
    # A saturated switch (issue 14): the replies to the decision's commands are written this
    # many seconds after they arrived, while the queued messages (multiset, bridge) already run.
    late_replies: float = 0.0
    # The caller hung up while FreeSWITCH connected: a disconnect notice instead of the channel data.
    abandon_before_connect: bool = False
    raw_channel_data: bytes | None = None  # sent instead of the CHANNEL_DATA reply to connect
    duplicate_hangup_complete: bool = False  # CHANNEL_HANGUP_COMPLETE delivered twice (billing test)
    # --- the dialplan around `socket` (dialplan/callgate.xml) -------------------------------
    # The frozen-engine guard: `sched_hangup +N NETWORK_OUT_OF_ORDER` before `socket`, filed
    # under the channel's UUID (cancelled by `api sched_del <uuid>`). None: no guard.
    # FreeSWITCH takes whole seconds; fractions are kept here to keep tests short.
    guard_seconds: float | None = None
    # What the dialplan runs when `socket` returns with the channel still up (the socket went
    # away without deciding), e.g. "respond 503 Service Unavailable". "": nothing follows
    # `socket`, the channel hangs up NORMAL_CLEARING.
    after_socket: str = ""
    # `park_timeout` as the dialplan sets it before `socket` ("<seconds>[:<cause>]", "": none).
    # switch_ivr_park reads it once when the park starts and checks it after every turn of its
    # loop, including right after a bridge it ran returns.
    park_timeout: str = ""


@dataclass
class CallResult:
    uuid: str
    connected: bool  # the engine accepted TCP and sent connect
    commands: list[str]  # first line of each command received, in order
    variables: dict[str, str]  # every set/export/multiset executed (name -> value)
    executed: list[tuple[str, str]]  # (app, arg) in execution order
    bridged_target: str | None  # the dial target that answered
    attempted_targets: list[str]
    sip_response: tuple[int, str] | None  # what the SIP caller saw (final response; 200 when answered)
    hangup_cause: str
    engine_closed: bool  # the engine closed the socket after CHANNEL_HANGUP_COMPLETE was sent
    decision_latency: float | None  # TCP connect -> frame carrying bridge/respond/hangup (None: none came)
    error: str | None
    # --- extra detail ---------------------------------------------------------------------
    uncontrolled: bool = False  # the socket went away while the channel was up (CF_CONTROLLED cleared)
    closed_by: str = ""  # "engine", "freeswitch" or "timeout"
    events: list[str] = field(default_factory=list)  # Event-Name of every event written, in order
    replies: list[str] = field(default_factory=list)  # Reply-Text of every command reply, in order
    answered: bool = False
    billsec: int = 0
    # The channel's variables as CHANNEL_HANGUP_COMPLETE carries them (what the CDR records);
    # a variable set to an empty value is absent, as on FreeSWITCH.
    channel_variables: dict[str, str] = field(default_factory=dict)
    duration: float = 0.0  # wall time of place_call
    hangup_after: float | None = None  # seconds from the call's start to its CHANNEL_HANGUP


# ---------------------------------------------------------------------------
# the switch: identity, event bus, registry of live channels, api commands
# ---------------------------------------------------------------------------

SHOW_CHANNELS_COLUMNS = (
    "uuid",
    "direction",
    "created",
    "created_epoch",
    "name",
    "state",
    "cid_name",
    "cid_num",
    "ip_addr",
    "dest",
    "application",
    "application_data",
    "dialplan",
    "context",
    "read_codec",
    "read_rate",
    "read_bit_rate",
    "write_codec",
    "write_rate",
    "write_bit_rate",
    "secure",
    "hostname",
    "presence_id",
    "presence_data",
    "accountcode",
    "callstate",
    "callee_name",
    "callee_num",
    "callee_direction",
    "call_uuid",
    "sent_callee_name",
    "sent_callee_num",
    "initial_cid_name",
    "initial_cid_num",
    "initial_ip_addr",
    "initial_dest",
    "initial_dialplan",
    "initial_context",
)


class EventListener(Protocol):
    def wants(self, event_name: str, uuid: str | None) -> bool: ...

    def deliver(self, event_name: str, headers: list[tuple[str, str]], body: str | None = None) -> None: ...


class Switch:
    """One emulated FreeSWITCH: what the event headers say about the host, the global
    Event-Sequence, the event bus inbound and outbound sockets listen on, and the
    registry of live channels that ``show channels`` lists."""

    def __init__(
        self,
        *,
        hostname: str = "vm",
        switchname: str | None = None,
        ipv4: str = "192.0.2.2",
        ipv6: str = "fd00::2",
        core_uuid: str | None = None,
        sip_ip: str = "127.0.0.1",
        sip_port: int = 5080,
        first_sequence: int = 1,
    ) -> None:
        self.hostname = hostname
        self.switchname = switchname or hostname
        self.ipv4 = ipv4
        self.ipv6 = ipv6
        self.core_uuid = core_uuid or str(uuid4())
        self.sip_ip = sip_ip
        self.sip_port = sip_port
        self._seq = itertools.count(first_sequence)
        self._session_ids = itertools.count(1)
        self._pid = random.randint(1000, 65000)
        self.channels: dict[str, Channel] = {}
        self._listeners: list[EventListener] = []  # listeners of every channel's events
        self._scoped: dict[str, list[EventListener]] = {}  # myevents listeners, by uuid

    # identity ---------------------------------------------------------------------------
    def identity(self) -> dict[str, object]:
        return {
            "core_uuid": self.core_uuid,
            "hostname": self.hostname,
            "switchname": self.switchname,
            "ipv4": self.ipv4,
            "ipv6": self.ipv6,
        }

    def next_sequence(self) -> int:
        return next(self._seq)

    def next_session_id(self) -> int:
        return next(self._session_ids)

    # event bus ----------------------------------------------------------------------------
    def add_listener(self, listener: EventListener, uuid: str | None = None) -> None:
        """Listen to events; with ``uuid``, only to that channel's (a ``myevents`` socket)."""
        self.remove_listener(listener)
        if uuid is None:
            self._listeners.append(listener)
        else:
            self._scoped.setdefault(uuid, []).append(listener)

    def remove_listener(self, listener: EventListener) -> None:
        with contextlib.suppress(ValueError):
            self._listeners.remove(listener)
        for uuid, lst in list(self._scoped.items()):
            if listener in lst:
                lst.remove(listener)
                if not lst:
                    del self._scoped[uuid]

    def fire(
        self,
        event_name: str,
        uuid: str | None,
        build: Callable[[int], list[tuple[str, str]]],
        body: str | None = None,
    ) -> None:
        """Fire an event: it takes the next Event-Sequence and goes to every listener
        that wants it; headers are only built when someone does."""
        seq = self.next_sequence()
        candidates = self._listeners + self._scoped.get(uuid, []) if uuid else self._listeners
        targets = [lst for lst in list(candidates) if lst.wants(event_name, uuid)]
        if not targets:
            return
        headers = build(seq)
        for lst in targets:
            lst.deliver(event_name, headers, body)

    # channels -----------------------------------------------------------------------------
    def register(self, channel: Channel) -> None:
        self.channels[channel.uuid] = channel

    def unregister(self, channel: Channel) -> None:
        self.channels.pop(channel.uuid, None)

    def live_uuids(self) -> list[str]:
        return list(self.channels)

    def channel_rows(self) -> list[dict[str, str]]:
        rows: list[dict[str, str]] = []
        for ch in list(self.channels.values()):
            rows.extend(ch.show_rows())
        return rows

    def kill(self, uuid: str, cause: str = "NORMAL_CLEARING") -> bool:
        for ch in list(self.channels.values()):
            if ch.uuid == uuid or ch.other_uuid == uuid:
                ch.request_hangup(cause, "send_bye" if ch.answered else "send_refuse")
                return True
        return False

    # api ----------------------------------------------------------------------------------
    def api(self, command: str) -> str:
        """Answer an ``api`` command the way FreeSWITCH's mod_commands does (a few of them)."""
        cmd, _, arg = command.strip().partition(" ")
        arg = arg.strip()
        low = cmd.lower()
        if low == "show":
            what, _, rest = arg.partition(" ")
            if what.lower() in ("channels", "calls"):
                return self._show_channels(rest.strip())
            return "-USAGE: show ...\n"
        if low == "uuid_kill":
            uuid, _, cause = arg.partition(" ")
            if self.kill(uuid.strip(), str2cause(cause or None)):
                return "+OK\n"
            return "-ERR No such channel!\n"
        if low == "uuid_exists":
            return "true" if arg in self.channels else "false"
        if low == "uuid_getvar":
            uuid, _, name = arg.partition(" ")
            ch = self.channels.get(uuid.strip())
            if ch is None:
                return "-ERR No such channel!\n"
            return ch.variables.get(name.strip(), "_undef_")
        if low == "hupall":
            cause = str2cause(arg.split()[0] if arg else None)
            for ch in list(self.channels.values()):
                ch.request_hangup(cause, "send_bye" if ch.answered else "send_refuse")
            return "+OK hupall\n"
        if low == "sched_del":
            return self._sched_del(arg)
        if low == "version":
            return "FreeSWITCH Version 1.10.12-release~64bit (fsemu)\n"
        if low == "status":
            return (
                "UP 0 years, 0 days, 0 hours, 0 minutes, 1 second, 0 milliseconds, 0 microseconds\n"
                f"FreeSWITCH (Version 1.10.12-release 64bit) is ready\n"
                f"{len(self.channels)} session(s) - peak 0, last 5min 0\n"
            )
        return f"-ERR {cmd} Command not found!\n"

    def _sched_del(self, arg: str) -> str:
        """mod_commands' sched_del: a task id or a group (a channel's scheduled hangups are
        filed under its UUID); the reply counts the tasks deleted, 0 included."""
        count = 0  # no argument: FreeSWITCH 1.10.12 answers "+OK Deleted: 0" too
        if arg and not arg.isdigit():  # task ids are not emulated: none matches
            for ch in list(self.channels.values()):
                if ch.uuid == arg:
                    count += ch.delete_scheduled()
        return f"+OK Deleted: {count}\n"

    def _show_channels(self, rest: str) -> str:
        rows = self.channel_rows()
        words = rest.split()
        if words[:1] == ["count"]:
            return f"\n{len(rows)} total.\n"
        if words[:2] == ["as", "json"]:
            if not rows:
                return json.dumps({"row_count": 0}, separators=(",", ":"))
            return json.dumps({"row_count": len(rows), "rows": rows}, indent="\t")
        delim = ","
        if words[:2] == ["as", "delim"] and len(words) > 2:
            delim = words[2]
        if not rows:
            return "\n0 total.\n"
        lines = [delim.join(SHOW_CHANNELS_COLUMNS)]
        lines += [delim.join(r[c] for c in SHOW_CHANNELS_COLUMNS) for r in rows]
        return "\n".join(lines) + f"\n\n{len(rows)} total.\n"


# ---------------------------------------------------------------------------
# helpers
# ---------------------------------------------------------------------------


def _now_us() -> int:
    return time.time_ns() // 1000


def _date_local(us: int) -> str:
    return time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(us / 1e6))


def _date_gmt(us: int) -> str:
    return time.strftime("%a, %d %b %Y %H:%M:%S GMT", time.gmtime(us / 1e6))


def _connect_tcp(host: str, port: int, timeout: float) -> gsocket.socket:
    """TCP connect; IP literals skip the resolver (gevent's default one uses a thread pool)."""
    try:
        family = gsocket.AF_INET6 if ipaddress.ip_address(host).version == 6 else gsocket.AF_INET
    except ValueError:
        return gsocket.create_connection((host, port), timeout=timeout)
    sock = gsocket.socket(family, gsocket.SOCK_STREAM)
    sock.settimeout(timeout)
    try:
        sock.connect((host, port))
    except ConnectionResetError:
        # Only a completed handshake can be reset: FreeSWITCH's blocking connect() succeeded and
        # its first read fails ("Socket Error!", no next host). gevent's non-blocking connect
        # reports the reset instead when it arrives before the connect is checked.
        return sock
    except OSError:
        sock.close()
        raise
    return sock


_VAR_REF = re.compile(r"\$\{([^}]*)\}")


def split_dial_string(dial: str) -> list[list[str]]:
    """Targets of a ``bridge`` dial string: ``|`` separates sequential groups, ``,``
    simultaneous targets; ``{..}`` globals and each target's ``[..]`` are stripped."""
    s = dial.strip()
    if s.startswith("<"):
        end = s.find(">")
        s = s[end + 1 :] if end >= 0 else s
    if s.startswith("{"):
        end = s.find("}")
        s = s[end + 1 :] if end >= 0 else s

    def split_top(text: str, sep: str) -> list[str]:
        parts: list[str] = []
        depth = 0
        cur: list[str] = []
        for ch in text:
            if ch in "[{<":
                depth += 1
            elif ch in "]}>":
                depth = max(0, depth - 1)
            if ch == sep and depth == 0:
                parts.append("".join(cur))
                cur = []
            else:
                cur.append(ch)
        parts.append("".join(cur))
        return parts

    groups: list[list[str]] = []
    for group in split_top(s, "|"):
        targets = []
        for t in split_top(group, ","):
            t = t.strip()
            while t.startswith("["):
                end = t.find("]")
                if end < 0:
                    break
                t = t[end + 1 :].strip()
            if t:
                targets.append(t)
        if targets:
            groups.append(targets)
    return groups


def _target_dest_host(target: str, default_host: str) -> tuple[str, str]:
    rest = target
    parts = rest.split("/")
    if parts[0] == "sofia" and len(parts) >= 3:
        rest = "/".join(parts[3:]) if parts[1] == "gateway" and len(parts) >= 4 else "/".join(parts[2:])
    user, _, host = rest.partition("@")
    host = host.split(":")[0].split(";")[0] if host else default_host
    return user or rest, host


def originated_legs(legs: list[tuple[str, str]]) -> str:
    """variable_originated_legs as FreeSWITCH 1.10 writes it: ``uuid;Outbound Call;number`` for
    one leg, ``ARRAY::a|:b`` for several (answered_gateway_failover_wire.txt)."""
    entries = [f"{uuid};Outbound Call;{number}" for uuid, number in legs]
    if len(entries) == 1:
        return entries[0]
    return "ARRAY::" + "|:".join(entries)


def gateways_answering(names: Iterable[str]) -> Callable[[str], bool]:
    """``answering_targets`` for the CLI: a target answers when one of ``names`` is one
    of its ``/``, ``@`` or ``:`` separated parts (e.g. ``sofia/gateway/gw1/4412...``)."""
    wanted = {n.strip() for n in names if n.strip()}

    def answers(target: str) -> bool:
        return bool(wanted.intersection(re.split(r"[/@:;]", target)))

    return answers


_FORMATS = ("plain", "json", "xml")
#: Event types ``myevents`` subscribes to (mod_event_socket.c).
MYEVENTS = frozenset(
    {
        "CHANNEL_ANSWER",
        "CHANNEL_APPLICATION",
        "CHANNEL_BRIDGE",
        "CHANNEL_CREATE",
        "CHANNEL_DATA",
        "CHANNEL_DESTROY",
        "CHANNEL_EXECUTE",
        "CHANNEL_EXECUTE_COMPLETE",
        "CHANNEL_HANGUP",
        "CHANNEL_HANGUP_COMPLETE",
        "CHANNEL_ORIGINATE",
        "CHANNEL_UUID",
        "CHANNEL_OUTGOING",
        "CHANNEL_PARK",
        "CHANNEL_PROGRESS",
        "CHANNEL_PROGRESS_MEDIA",
        "CHANNEL_STATE",
        "CHANNEL_UNBRIDGE",
        "CHANNEL_UNPARK",
        "DETECTED_SPEECH",
        "DTMF",
        "NOTALK",
        "TALK",
    }
)


# ---------------------------------------------------------------------------
# an event-socket connection, FreeSWITCH side (shared by outbound and inbound)
# ---------------------------------------------------------------------------


class EslConnection:
    """Command handling and event subscription common to both socket directions.

    Every write to the socket happens in one greenlet (``_send``/``_flush``), like the
    single listener thread of mod_event_socket; other greenlets only queue events."""

    outbound = False

    def __init__(self, switch: Switch, sock: gsocket.socket) -> None:
        self.switch = switch
        self.sock = sock
        self.parser = wire.CommandParser()
        self.authed = False
        self.full = True
        self.running = True
        self.event_format = "plain"
        self.events_on = False
        self.event_all = False
        self.event_names: set[str] = set()
        self.custom_subclasses: set[str] = set()
        self.myevents_uuid: str | None = None
        self.filters = EventFilters()  # mod_event_socket's `filter` (loadtest.fsemu.filters)
        self._out: list[bytes] = []
        self._event_names_out: list[str | None] = []
        self._wake = gevent.event.Event()
        self._cmds: collections.deque[tuple[wire.Command, float]] = collections.deque()
        self._reply_not_before = 0.0  # a saturated switch's late replies (CallSpec.late_replies)
        self.peer_closed = False
        self.sent_event_names: list[str] = []
        self.replies: list[str] = []

    # reading ------------------------------------------------------------------------------
    def _reader(self) -> None:
        while True:
            try:
                data = self.sock.recv(65536)
            except (OSError, ValueError):
                data = b""
            if not data:
                self.peer_closed = True
                self._wake.set()
                return
            now = time.monotonic()
            for cmd in self.parser.feed(data):
                self._cmds.append((cmd, now))
            self._wake.set()

    # writing ------------------------------------------------------------------------------
    def _send(self, data: bytes) -> bool:
        if self.sock is None:
            return False
        try:
            self.sock.sendall(data)
            return True
        except OSError:
            self.peer_closed = True
            return False

    def _hold_reply(self) -> None:
        late = self._reply_not_before - time.monotonic()
        if late > 0:  # the command already ran; its reply comes late
            gevent.sleep(late)

    def _reply(self, text: str) -> None:
        self._hold_reply()
        self.replies.append(text)
        if text.startswith("~"):
            self._send(b"Content-Type: command/reply\n" + text[1:].encode())
        else:
            self._send(wire.command_reply(text))

    def _flush(self) -> None:
        while self._out:
            frame = self._out.pop(0)
            name = self._event_names_out.pop(0)
            if self._send(frame) and name:
                self.sent_event_names.append(name)

    def _queue_frame(self, frame: bytes, event_name: str | None = None) -> None:
        self._out.append(frame)
        self._event_names_out.append(event_name)
        self._wake.set()

    def close_socket(self) -> None:
        sock, self.sock = self.sock, None
        if sock is not None:
            with contextlib.suppress(OSError):
                sock.shutdown(gsocket.SHUT_RDWR)
            with contextlib.suppress(OSError):
                sock.close()

    # events -------------------------------------------------------------------------------
    def wants(self, event_name: str, uuid: str | None) -> bool:
        if not self.running or not self.events_on or self.sock is None:
            return False
        if not (self.event_all or event_name in self.event_names):
            return False
        return not (self.myevents_uuid is not None and uuid != self.myevents_uuid)

    def deliver(self, event_name: str, headers: list[tuple[str, str]], body: str | None = None) -> None:
        # event_handler applies the filters to the events subscribed to, before myevents' UUID check.
        if self.filters and not self.filters.passes(header_lookup(headers)):
            return
        if self.event_format == "json":
            frame = wire.event_json_frame(headers, body)
        else:
            frame = wire.event_plain_frame(headers, body)
        self._queue_frame(frame, event_name)

    # commands -------------------------------------------------------------------------------
    def handle_common(self, cmd: wire.Command) -> str | None:
        """Commands both directions share; returns the reply text, "" for none sent,
        or None when the command is not one of these."""
        name = cmd.line.strip()
        low = name.lower()
        if low.startswith("filter "):
            try:
                return self.filters.command(cmd.line)
            except UnsupportedFilter as exc:
                return f"-ERR emulator: {exc}"
        if low.startswith("sendmsg"):
            return self.cmd_sendmsg(cmd)
        if self.outbound and not self.full:
            return None
        if low.startswith("sendevent"):
            return f"+OK {uuid4()}"
        if low.startswith("api "):
            self._api(name[4:].strip())
            return ""
        if low.startswith("bgapi "):
            return self._bgapi(name[6:].strip(), cmd.header("job-uuid"))
        if low.startswith("log"):
            level = name[3:].strip() or "debug"
            return f"+OK log level {level} [7]"
        if low.startswith("linger"):
            return self.cmd_linger(name[6:])
        if low.startswith("nolinger"):
            return self.cmd_nolinger()
        if low.startswith("nolog"):
            return "-ERR not loging"
        if low.startswith("event"):
            return self._cmd_event(name[5:])
        if low.startswith("nixevent"):
            return self._cmd_nixevent(name[8:])
        if low.startswith("noevents"):
            if self.events_on:
                self.events_on = False
                self.event_all = False
                self.event_names.clear()
                self._out.clear()
                self._event_names_out.clear()
                return "+OK no longer listening for events"
            return "-ERR not listening for events"
        return None

    def cmd_sendmsg(self, cmd: wire.Command) -> str:
        uuid = cmd.arg or cmd.header("session-id") or ""
        ch = self.switch.channels.get(uuid)
        if ch is None:
            return f"-ERR invalid session id [{uuid}]"
        ch.queue_message(cmd)
        return "+OK"

    def cmd_linger(self, rest: str) -> str:
        return "-ERR not controlling a session"

    def cmd_nolinger(self) -> str:
        return "-ERR not controlling a session"

    def _cmd_event(self, rest: str) -> str:
        words = rest.split()
        key_count = 0
        custom = False
        for i, w in enumerate(words):
            if i == 0 and w.lower() in _FORMATS:
                self.event_format = "json" if w.lower() == "json" else "plain"
                continue
            if custom:
                self.custom_subclasses.add(w)
                continue
            up = w.upper()
            key_count += 1
            if up == "ALL":
                self.event_all = True
            elif up == "CUSTOM":
                custom = True
            self.event_names.add(up)
        if not key_count:
            return "-ERR no keywords supplied"
        self.events_on = True
        if self.myevents_uuid is None:
            self.switch.add_listener(self)  # every channel's events, not only its own
        return f"+OK event listener enabled {self.event_format}"

    def _cmd_nixevent(self, rest: str) -> str:
        words = [w.upper() for w in rest.split()]
        if not words:
            return "-ERR no keywords supplied"
        for w in words:
            if w == "ALL":
                self.event_all = False
                self.event_names.clear()
            else:
                self.event_names.discard(w)
        self.events_on = True
        return "+OK events nixed"

    def _api(self, command: str) -> None:
        # Run at once by the listener (mod_event_socket runs `api` in its own thread, while a
        # `sendmsg` waits for the channel's park loop); the reply takes its turn with the others.
        body = self.switch.api(command) or "-ERR no reply\n"
        self._hold_reply()
        self.replies.append("api/response")
        self._send(wire.api_response(body))

    def _bgapi(self, command: str, job_uuid: str | None) -> str:
        job = job_uuid or str(uuid4())
        body = self.switch.api(command) or "-ERR no reply\n"
        cmd_name, _, cmd_arg = command.partition(" ")

        def build(seq: int) -> list[tuple[str, str]]:
            now = _now_us()
            hdrs: list[tuple[str, str]] = [
                ("Event-Name", "BACKGROUND_JOB"),
                ("Core-UUID", self.switch.core_uuid),
                ("FreeSWITCH-Hostname", self.switch.hostname),
                ("FreeSWITCH-Switchname", self.switch.switchname),
                ("FreeSWITCH-IPv4", self.switch.ipv4),
                ("FreeSWITCH-IPv6", self.switch.ipv6),
                ("Event-Date-Local", _date_local(now)),
                ("Event-Date-GMT", _date_gmt(now)),
                ("Event-Date-Timestamp", str(now)),
                ("Event-Calling-File", "mod_event_socket.c"),
                ("Event-Calling-Function", "api_exec"),
                ("Event-Calling-Line-Number", "1572"),
                ("Event-Sequence", str(seq)),
                ("Job-UUID", job),
                ("Job-Command", cmd_name),
            ]
            if cmd_arg:
                hdrs.append(("Job-Command-Arg", cmd_arg))
            return hdrs

        gevent.spawn(self.switch.fire, "BACKGROUND_JOB", None, build, body)
        return f"~Reply-Text: +OK Job-UUID: {job}\nJob-UUID: {job}\n\n"


# ---------------------------------------------------------------------------
# the outbound call
# ---------------------------------------------------------------------------


class _Hangup(NamedTuple):
    cause: str
    disposition: str  # recv_bye, send_bye, send_refuse, recv_cancel


class Channel(EslConnection):
    """An inbound SIP call parked on an outbound event socket: the channel and its
    listener.  Create with :func:`place_call`."""

    outbound = True

    def __init__(self, switch: Switch, host: str, port: int, spec: CallSpec, timeout: float) -> None:
        super().__init__(switch, None)  # its socket comes with connect()
        self.spec = spec
        self.host = host
        self.port = port
        self.timeout = timeout
        self.uuid = spec.uuid
        mode = spec.socket_mode.lower().split()
        self.async_mode = "async" in mode
        self.full = "full" in mode
        self.authed = True
        self.result = CallResult(
            uuid=self.uuid,
            connected=False,
            commands=[],
            variables={},
            executed=[],
            bridged_target=None,
            attempted_targets=[],
            sip_response=None,
            hangup_cause="",
            engine_closed=False,
            decision_latency=None,
            error=None,
        )
        # channel state
        self.channel_state = "CS_EXECUTE"
        self.call_state = "RINGING"
        self.state_number = 4
        self.answer_state = "ringing"
        self.hangup_cause = ""
        self.answered = False
        self.created_us = _now_us()
        self.answered_us = 0
        self.progress_us = 0
        self.progress_media_us = 0
        self.bridged_us = 0
        self.hangup_us = 0
        self.callee_name = ""
        self.callee_number = ""
        self.other: dict[str, object] | None = None
        self.other_uuid: str | None = None
        self.bridged = False
        self.application = "socket"
        self.application_data = ""
        self.last_app = "socket"
        self.last_arg = ""
        self.variables: dict[str, str] = {}
        self._pending: _Hangup | None = None
        self._disposition = ""
        self._down = False  # CHANNEL_HANGUP fired
        self._complete = False  # CHANNEL_HANGUP_COMPLETE fired
        self._hungup = False
        self._running_app: tuple[str, str, str] | None = None
        self._park_emitted = False
        self._msgs: collections.deque[wire.Command] = collections.deque()
        self._kick = gevent.event.Event()
        self._timers: list[gevent.Greenlet] = []
        self._sched_hangups: list[gevent.Greenlet] = []
        self.connected = False
        self.controlled = False  # the socket is open
        self._got_first = False
        self.linger: int | None = None  # None: no linger; -1 forever; n seconds
        self._linger_notice_sent = False
        self._stalled = False
        self._t_connect = 0.0
        self._t_start = time.monotonic()
        self._after_socket_run = False
        self._park_expires: float | None = None
        self._orphan_park = False  # parked after the socket had already closed (no decision)
        self._park_timeout_cause = "NORMAL_CLEARING"
        self._last_bridge_sip: int | None = None
        self._socket_app_uuid = str(uuid4())
        self._enc_static: templates.Encoded | None = None
        self._enc_caller: templates.Encoded | None = None
        self._enc_other: templates.Encoded | None = None
        self._params = self._build_params()
        self.application_data = str(self._params["socket_data"])
        # the channel variables as the INVITE and the `socket` app left them
        initial = self._channel_params()
        initial.update(date_local="", date_gmt="", date_ts=0, seq=0)
        for name, value in templates.render_channel_data(initial, spec.extra_variables.items()):
            if name.startswith("variable_"):
                self.variables[name[9:]] = value
        self._sync_done: gevent.event.Event | None = None
        self._greenlets: list[gevent.Greenlet] = []

    # --- parameters ------------------------------------------------------------------
    def _build_params(self) -> dict[str, object]:
        spec, sw = self.spec, self.switch
        n = sw.next_session_id()
        from_user = spec.from_user or spec.caller_id_number
        cid_name = spec.caller_id_name or spec.caller_id_number
        socket_data = f"{self.host}:{self.port} {spec.socket_mode}".strip()
        p: dict[str, object] = dict(sw.identity())
        p.update(
            uuid=self.uuid,
            from_user=from_user,
            cid_name=cid_name,
            cid_number=spec.caller_id_number,
            caller_ip=spec.network_ip,
            caller_port=spec.network_port,
            dest=spec.destination,
            channel_name=f"sofia/internal/{from_user}@{spec.network_ip}:{spec.network_port}",
            created_us=self.created_us,
            session_id=n,
            call_id=f"{n}-{sw._pid}@{spec.network_ip}",
            sip_authorized="true" if spec.sip_auth_username else "",
            sip_auth_username=spec.sip_auth_username,
            sip_auth_realm=(spec.sip_auth_realm or sw.sip_ip) if spec.sip_auth_username else "",
            from_tag=f"{sw._pid}SIPpTag{n % 1000:03d}",
            fs_sip_ip=sw.sip_ip,
            fs_sip_port=sw.sip_port,
            via_branch=f"z9hG4bK-{sw._pid}-{n}-0",
            media_port=6000 + 2 * (n % 1000),
            socket_data=socket_data,
            socket_host=self.host,
            socket_mode="async" if self.async_mode else "static",
            control="full" if self.full else "single-channel",
            to_tag="".join(random.choices(string.ascii_letters + string.digits, k=13)),
            sdp_session_id=int(time.time()),
            sdp_session_version=int(time.time()) + 1,
            local_media_port=random.randrange(16384, 32768, 2),
            ssrc=random.randint(1, 2**32 - 1),
        )
        return p

    def _state_params(self) -> dict[str, object]:
        return {
            "channel_state": self.channel_state,
            "call_state": self.call_state,
            "state_number": self.state_number,
            "answer_state": self.answer_state,
            "hangup_cause": self.hangup_cause,
            "other_uuid": self.other_uuid or "",
        }

    def _channel_params(self) -> dict[str, object]:
        p = dict(self._params)
        p.update(self._state_params())
        return p

    def _encoded_params(self, **extra: object) -> templates.Encoded:
        """Channel parameters, percent-encoded (the per-call part only once)."""
        if self._enc_static is None:
            self._enc_static = templates.encode_params(self._params)
        dynamic = self._state_params()
        dynamic.update(extra)
        return templates.encode_params(dynamic, base=self._enc_static)

    def _caller_profile(self) -> templates.Encoded:
        if self._enc_caller is None:
            p = self._params
            self._enc_caller = templates.encode_params(
                {
                    "direction": "inbound",
                    "from_user": p["from_user"],
                    "cid_name": p["cid_name"],
                    "cid_number": p["cid_number"],
                    "caller_ip": p["caller_ip"],
                    "dest": p["dest"],
                    "uuid": self.uuid,
                    "channel_name": p["channel_name"],
                    "profile_index": "1",
                    "created_us": self.created_us,
                }
            )
        return templates.encode_params(
            {
                "callee_name": self.callee_name,
                "callee_number": self.callee_number,
                "answered_us": self.answered_us,
                "progress_us": self.progress_us,
                "progress_media_us": self.progress_media_us,
                "hangup_us": self.hangup_us,
                "bridged_us": self.bridged_us,
            },
            base=self._enc_caller,
        )

    # --- events ------------------------------------------------------------------------
    def _fire(self, event_name: str, **extra: object) -> None:
        def build(seq: int) -> list[tuple[str, str]]:
            now = _now_us()
            params = self._encoded_params(
                date_local=_date_local(now), date_gmt=_date_gmt(now), date_ts=now, seq=seq, **extra
            )
            if self.other is not None and self._enc_other is None:
                self._enc_other = templates.encode_params(self.other)
            return templates.render_event(
                event_name,
                params,
                caller=self._caller_profile(),
                other=self._enc_other if self.other is not None else None,
                variables=self.variables,
            )

        self.switch.fire(event_name, self.uuid, build)

    def _apply(self, group: str, **extra: object) -> None:
        templates.apply_vars(self.variables, group, self._encoded_params(**extra))

    def _set_var(self, name: str, value: str) -> None:
        self.variables.pop(name, None)
        if value != "":
            self.variables[name] = value

    def wants(self, event_name: str, uuid: str | None) -> bool:
        if self._stalled:
            return False
        if self._down and self.linger is None and event_name != "CHANNEL_HANGUP":
            return False  # without linger the listener stops at hangup
        return super().wants(event_name, uuid)

    # --- show channels -------------------------------------------------------------------
    def show_rows(self) -> list[dict[str, str]]:
        p = self._params
        created = self.created_us
        base = {
            "uuid": self.uuid,
            "direction": "inbound",
            "created": _date_local(created),
            "created_epoch": str(created // 1_000_000),
            "name": str(p["channel_name"]),
            "state": self.channel_state,
            "cid_name": str(p["cid_name"]),
            "cid_num": str(p["cid_number"]),
            "ip_addr": str(p["caller_ip"]),
            "dest": str(p["dest"]),
            "application": self.application,
            "application_data": self.application_data,
            "dialplan": "XML",
            "context": "default",
            "read_codec": "PCMU",
            "read_rate": "8000",
            "read_bit_rate": "64000",
            "write_codec": "PCMU",
            "write_rate": "8000",
            "write_bit_rate": "64000",
            "secure": "",
            "hostname": self.switch.hostname,
            "presence_id": "",
            "presence_data": "",
            "accountcode": self.variables.get("accountcode", ""),
            "callstate": self.call_state,
            "callee_name": self.callee_name,
            "callee_num": self.callee_number,
            "callee_direction": "SEND" if self.bridged else "",
            "call_uuid": self.uuid,
            "sent_callee_name": "",
            "sent_callee_num": "",
            "initial_cid_name": str(p["cid_name"]),
            "initial_cid_num": str(p["cid_number"]),
            "initial_ip_addr": str(p["caller_ip"]),
            "initial_dest": str(p["dest"]),
            "initial_dialplan": "XML",
            "initial_context": "default",
        }
        rows = [base]
        if self.bridged and self.other:
            o = self.other
            b = dict(base)
            b.update(
                uuid=str(o["uuid"]),
                direction="outbound",
                created=_date_local(int(o["created_us"])),  # type: ignore[call-overload]
                created_epoch=str(int(o["created_us"]) // 1_000_000),  # type: ignore[call-overload]
                name=str(o["channel_name"]),
                state="CS_EXCHANGE_MEDIA",
                ip_addr=str(p["caller_ip"]),
                dest=str(o["dest"]),
                application="",
                application_data="",
                callstate="ACTIVE",
                callee_name="Outbound Call",
                callee_num=str(o["dest"]),
                callee_direction="",
                initial_dest=str(o["dest"]),
            )
            rows.append(b)
        return rows

    # --- hangup requests -------------------------------------------------------------------
    def request_hangup(self, cause: str, disposition: str) -> None:
        """Ask the channel to hang up (caller BYE/CANCEL, sched_hangup, uuid_kill...)."""
        if self._pending is None and not self._hungup:
            self._pending = _Hangup(cause, disposition)
            self._kick.set()

    def _later(self, seconds: float, fn: Callable[..., object], *args: object) -> gevent.Greenlet:
        g = gevent.spawn_later(max(0.0, seconds), fn, *args)
        self._timers.append(g)
        return g

    def _wait(self, seconds: float | None) -> bool:
        """Sleep up to ``seconds`` (None: forever) unless a hangup is requested; True if one was."""
        deadline = None if seconds is None else time.monotonic() + seconds
        while self._pending is None:
            remaining = None if deadline is None else deadline - time.monotonic()
            if remaining is not None and remaining <= 0:
                return False
            self._kick.clear()
            if self._pending is not None:
                break
            self._kick.wait(remaining)
        return True

    def queue_message(self, cmd: wire.Command) -> None:
        """A ``sendmsg`` for this channel (from its own socket or another connection)."""
        if (cmd.header("call-command") or "").lower() == "hangup" and self._running_app is not None:
            # a running application (bridge, sleep...) breaks out for a hangup message
            self.request_hangup(str2cause(cmd.header("hangup-cause")), self._local_disposition())
        self._msgs.append(cmd)
        self._kick.set()

    def _local_disposition(self) -> str:
        return "send_bye" if self.answered else "send_refuse"

    # --- the listener (socket side) ----------------------------------------------------------
    def _listener(self) -> None:
        spec = self.spec
        first_deadline = self._t_connect + spec.first_command_timeout
        linger_deadline: float | None = None
        handled_disco = False
        try:
            while True:
                self._wake.clear()
                while self._cmds and self.running:
                    cmd, t_recv = self._cmds.popleft()
                    self._handle(cmd, t_recv)
                if not self.running:  # exit: queued events are dropped, goodbye, close
                    self._close_with_notice(flush=False)
                    return
                if not self.parser.has_partial():
                    self._flush()
                if self.peer_closed:
                    self.result.closed_by = self.result.closed_by or "engine"
                    self.result.engine_closed = (
                        self._complete and "CHANNEL_HANGUP_COMPLETE" in self.sent_event_names
                    )
                    if not self._hungup and not self._stalled:
                        self.result.uncontrolled = True
                    return
                if self._down and not handled_disco and not self._stalled:
                    handled_disco = True
                    if self.linger is None:
                        self._close_with_notice()
                        return
                    if not self._linger_notice_sent:
                        self._send_linger_notice()
                    if self.linger >= 0:
                        linger_deadline = time.monotonic() + self.linger
                now = time.monotonic()
                if linger_deadline is not None and now > linger_deadline and self._complete:
                    self._flush()
                    self._close_with_notice()
                    return
                if not self._got_first and now >= first_deadline:
                    self.result.error = f"no command from the engine within {spec.first_command_timeout:g} s"
                    self._close_with_notice(flush=False)
                    return
                waits = [d - now for d in (linger_deadline, None if self._got_first else first_deadline) if d]
                self._wake.wait(max(0.0, min(waits)) + 0.001 if waits else None)
        finally:
            self.controlled = False
            self.running = False
            self.close_socket()
            self._kick.set()

    def _close_with_notice(self, *, flush: bool = True) -> None:
        if flush:
            self._flush()
        self._send(wire.disconnect_notice(self.uuid))
        self.result.closed_by = self.result.closed_by or "freeswitch"

    def _send_linger_notice(self) -> None:
        self._linger_notice_sent = True
        linger = self.linger if self.linger is not None else -1
        notice = wire.linger_notice(self.uuid, str(self._params["channel_name"]), linger)
        self._queue_frame(notice)

    def _handle(self, cmd: wire.Command, t_recv: float) -> None:
        self.result.commands.append(cmd.line)
        if self._stalled:
            return
        first = not self._got_first
        self._got_first = True
        # A saturated switch: the commands already run, their replies come late.
        self._reply_not_before = t_recv + self.spec.late_replies
        self._note_decision(cmd, t_recv)
        low = cmd.line.strip().lower()
        if low.startswith("connect"):
            self._connect()
            return
        if low.startswith("exit") or low.startswith("..."):
            reply = "+OK bye"
            self.running = False
        else:
            reply = self._dispatch(cmd)
        if first:
            return  # FreeSWITCH parses the first packet without sending its reply
        if reply:
            self._reply(reply)

    def _note_decision(self, cmd: wire.Command, t_recv: float) -> None:
        if self.result.decision_latency is not None or not cmd.line.lower().startswith("sendmsg"):
            return
        cc = (cmd.header("call-command") or "").lower()
        app = (cmd.header("execute-app-name") or "").lower()
        if cc == "hangup" or (cc == "execute" and app in ("bridge", "respond", "hangup")):
            self.result.decision_latency = t_recv - self._t_connect

    def _dispatch(self, cmd: wire.Command) -> str:
        name = cmd.line.strip()
        low = name.lower()
        if low.startswith("resume"):
            self._set_var("socket_resume", "true")
            return "+OK"
        if low.startswith("getvar"):
            var = name[6:].strip()
            return self.variables.get(var, "") or "-ERR command not found"
        if low.startswith("myevents"):
            if self.myevents_uuid is not None:
                return "-ERR aready enabled."
            self.myevents_uuid = self.uuid
            self.event_names |= MYEVENTS
            self.events_on = True
            if "json" in low:
                self.event_format = "json"
            return "+OK Events Enabled"
        if low.startswith("divert_events"):
            onoff = name[13:].strip().lower()
            if not onoff:
                return "-ERR missing value."
            return "+OK events diverted" if onoff == "on" else "+OK events not diverted"
        reply = self.handle_common(cmd)
        if reply is None:
            return "-ERR command not found"
        return reply

    def _connect(self) -> None:
        self.result.connected = True
        if self.spec.abandon_before_connect:
            # The channel hung up before the listener answered `connect`: the listener ends,
            # writing its disconnect notice, and closes.
            self.replies.append("<disconnect>")
            self.request_hangup("ORIGINATOR_CANCEL", "recv_cancel")
            self.running = False
            return
        if self.spec.raw_channel_data is not None:
            self.replies.append("<raw>")
            self._send(self.spec.raw_channel_data)
        else:
            now = _now_us()
            params = self._channel_params()
            seq = self.switch.next_sequence()
            params.update(date_local=_date_local(now), date_gmt=_date_gmt(now), date_ts=now, seq=seq)
            headers = templates.render_channel_data(params, self.spec.extra_variables.items())
            self.replies.append("+OK\n")
            self._send(wire.serialize_event(headers))
        if self.spec.stall_after_connect:
            self._stalled = True
        if not self.connected:
            self.connected = True
            self._kick.set()

    def cmd_sendmsg(self, cmd: wire.Command) -> str:
        uuid = cmd.arg or cmd.header("session-id") or ""
        if uuid and uuid != self.uuid:
            return super().cmd_sendmsg(cmd)
        if self.async_mode or (cmd.header("async") or "").lower() in ("true", "yes", "on", "1"):
            self.queue_message(cmd)
            return "+OK"
        # sync socket: the message runs inline and +OK comes when it is done
        done = gevent.event.Event()
        self._msgs.append(cmd)
        self._sync_done = done
        self._kick.set()
        done.wait()
        return "+OK"

    def cmd_linger(self, rest: str) -> str:
        if rest.startswith(" ") and rest.strip():
            try:
                secs = int(rest.strip().split()[0])
            except ValueError:
                secs = 0
            self.linger = secs
            return f"+OK will linger {secs} seconds"
        self.linger = -1
        return "+OK will linger"

    def cmd_nolinger(self) -> str:
        self.linger = None
        return "+OK will not linger"

    # --- the session (channel side) ------------------------------------------------------------
    def _session(self) -> None:
        spec = self.spec
        if spec.abandon_after is not None:
            self._later(spec.abandon_after, self._abandon)
        while not (self.connected or self._pending or not self.controlled):
            self._kick.clear()
            if self.connected or self._pending or not self.controlled:
                break
            self._kick.wait()
        if self._stalled:
            # FreeSWITCH stopped writing; wait for the engine to give up
            while self.controlled:
                self._kick.clear()
                if not self.controlled:
                    break
                self._kick.wait()
            return
        while True:
            if self._pending is not None:
                if not self._hungup:
                    self._hangup_now(self._pending.cause, self._pending.disposition)
                break
            if self._msgs:
                msg = self._msgs.popleft()
                if self.async_mode and not self._park_emitted:
                    self._park()
                self._process(msg)
                done = self._sync_done
                if done is not None:
                    self._sync_done = None
                    done.set()
                if self._hungup:
                    break
                self._check_park_timeout()
                continue
            if not self.controlled:
                if spec.after_socket and self.async_mode and not self._park_emitted:
                    # The socket closed before any decision was queued. On the real switch the
                    # `socket` app usually entered switch_ivr_park only after the listener had
                    # ended, and the park set CF_CONTROLLED again itself: the call stayed parked
                    # until the guard (3 of 4 tries; the 4th got the dialplan's 503 at once).
                    # Whether the engine had sent `connect` or not: socket_function waits for the
                    # listener to finish *or* connect, then parks. A connection reset at accept
                    # (8 of 8 on the lab) and a frozen engine after the 25 s wait end up here too.
                    self._park()
                    self._orphan_park = True
                if self._orphan_park and not self._hungup:
                    self._kick.clear()
                    if self._pending is None:
                        expires = self._park_expires
                        self._kick.wait(None if expires is None else max(0.0, expires - time.monotonic()))
                        self._check_park_timeout()
                    continue
                # the socket is gone: park returns and the dialplan goes on after `socket`
                if not self._hungup and self.connected:
                    self.result.uncontrolled = True
                if spec.after_socket and not self._after_socket_run:
                    self._after_socket_run = True
                    app, _, arg = spec.after_socket.partition(" ")
                    self._execute(app, arg)
                    if self._hungup:
                        break
                    continue
                self.request_hangup("NORMAL_CLEARING", self._local_disposition())
                continue
            self._kick.clear()
            if self._pending is None and not self._msgs and self.controlled:
                expires = self._park_expires
                self._kick.wait(None if expires is None else max(0.0, expires - time.monotonic()))
                self._check_park_timeout()
        if self._sync_done is not None:  # a sync sendmsg that will never run
            self._sync_done.set()
        self._finish_hangup()

    def _abandon(self) -> None:
        if not self.answered:
            self.request_hangup("ORIGINATOR_CANCEL", "recv_cancel")

    def _park(self) -> None:
        self._park_emitted = True
        timeout, _, cause = self.spec.park_timeout.partition(":")
        if timeout.strip():
            self._park_expires = time.monotonic() + float(timeout)
            self._park_timeout_cause = str2cause(cause or None, default="NORMAL_CLEARING")
        self._fire("CHANNEL_PARK")

    def _check_park_timeout(self) -> None:
        """switch_ivr_park: past park_timeout, the parked channel hangs up with its cause, even
        when a bridge the park ran has just failed and the engine's own hang-up is on its way."""
        expires = self._park_expires
        if expires is not None and time.monotonic() >= expires and not self._hungup:
            self.request_hangup(self._park_timeout_cause, self._local_disposition())

    def _process(self, cmd: wire.Command) -> None:
        cc = (cmd.header("call-command") or "").lower()
        if cc == "execute":
            app = cmd.header("execute-app-name") or ""
            arg = cmd.header("execute-app-arg")
            if arg is None:
                arg = cmd.body_text() if cmd.body else ""
            try:
                loops = max(1, int(cmd.header("loops") or "1"))
            except ValueError:
                loops = 1
            for _ in range(loops):
                self._execute(app, arg)
                if self._hungup:
                    break
        elif cc == "hangup":
            self.request_hangup(str2cause(cmd.header("hangup-cause")), self._local_disposition())
        # nomedia, unicast, xferext...: not emulated, ignored

    def _expand(self, text: str) -> str:
        if "${" not in text:
            return text
        return _VAR_REF.sub(lambda m: self.variables.get(m.group(1), ""), text)

    def _execute(self, app: str, arg: str) -> None:
        key = app.strip().lower()
        handler = getattr(self, f"_app_{key}", None) if key.isidentifier() else None
        if handler is None:
            self.result.error = f"application {app!r} is not emulated (FreeSWITCH: Invalid Application)"
            self._hangup_now("DESTINATION_OUT_OF_ORDER", self._local_disposition())
            return
        self.result.executed.append((app, arg))
        data = self._expand(arg)
        app_uuid = str(uuid4())
        self._apply("execute", app=app, app_data=data)
        self.application, self.application_data = app, data
        self.last_app, self.last_arg = app, data
        self._fire("CHANNEL_EXECUTE", app=app, app_data=data, app_uuid=app_uuid)
        self._running_app = (app, data, app_uuid)
        try:
            response = handler(data)
        finally:
            self._running_app = None
        self._fire(
            "CHANNEL_EXECUTE_COMPLETE",
            app=app,
            app_data=data,
            app_uuid=app_uuid,
            app_response=response or "_none_",
        )
        self.variables.pop("current_loop", None)
        self.variables.pop("total_loops", None)

    # --- applications --------------------------------------------------------------------------
    def _record_var(self, name: str, value: str) -> None:
        self.result.variables[name] = value
        self._set_var(name, value)

    def _app_set(self, data: str) -> str:
        name, sep, value = data.partition("=")
        if sep and name.strip():
            self._record_var(name.strip(), value)
        return "_none_"

    def _app_export(self, data: str) -> str:
        name, sep, value = data.partition("=")
        local = True
        if name.startswith("nolocal:"):
            name, local = name[8:], False
        name = name.strip()
        if sep and name:
            self.result.variables[name] = value
            if local:
                self._set_var(name, value)
            exported = [v for v in self.variables.get("export_vars", "").split(",") if v]
            if name not in exported:
                exported.append(name)
            self._set_var("export_vars", ",".join(exported))
        return "_none_"

    def _app_multiset(self, data: str) -> str:
        sep = " "
        if data.startswith("^^") and len(data) > 2:
            sep, data = data[2], data[3:]
        for item in data.split(sep):
            self._app_set(item)
        return "_none_"

    def _app_unset(self, data: str) -> str:
        self.variables.pop(data.strip(), None)
        return "_none_"

    def _app_log(self, data: str) -> str:
        return "_none_"

    _app_info = _app_log
    _app_park = _app_log
    _app_playback = _app_log

    def _app_sleep(self, data: str) -> str:
        try:
            ms = int(data.strip() or "0")
        except ValueError:
            ms = 0
        if self._wait(ms / 1000.0):
            self._hangup_now(self._pending.cause, self._pending.disposition)  # type: ignore[union-attr]
        return "_none_"

    def _app_answer(self, data: str) -> str:
        if not self.answered:
            self._mark_answered()
        return "_none_"

    def _app_pre_answer(self, data: str) -> str:
        if not self.progress_media_us and not self.answered:
            self.progress_media_us = _now_us()
            self._fire("CHANNEL_PROGRESS_MEDIA")
        return "_none_"

    def _app_ring_ready(self, data: str) -> str:
        if not self.progress_us and not self.answered:
            self.progress_us = _now_us()
            self._fire("CHANNEL_PROGRESS")
        return "_none_"

    def _app_hangup(self, data: str) -> str:
        self._hangup_now(str2cause(data or None), self._local_disposition())
        return "_none_"

    def _app_respond(self, data: str) -> str:
        code_s, _, text = data.strip().partition(" ")
        try:
            code = int(code_s)
        except ValueError:
            return "_none_"
        text = text.strip() or sip_phrase(code)
        if code == 180:
            return self._app_ring_ready("")
        if code == 183:
            return self._app_pre_answer("")
        if code == 200:
            return self._app_answer("")
        if code > 399:
            if self.result.sip_response is None:
                self.result.sip_response = (code, text)
            self._hangup_now(sip_to_cause(code), self._local_disposition())
        return "_none_"

    def _app_sched_hangup(self, data: str) -> str:
        self._schedule_hangup(data)
        return "_none_"

    def _app_sched_cancel(self, data: str) -> str:
        for g in self._sched_hangups:
            g.kill(block=False)
        self._sched_hangups.clear()
        return "_none_"

    def _schedule_hangup(self, data: str) -> None:
        words = data.split()
        if not words:
            return
        when = words[0]
        cause = str2cause(words[1] if len(words) > 1 else None, default="ALLOTTED_TIMEOUT")
        try:
            # whole seconds, like FreeSWITCH's atol(); "+N" is relative, else an epoch time
            if when.startswith("+"):
                secs = float(int(float(when[1:])))
            else:
                secs = max(0.0, float(int(float(when))) - time.time())
        except ValueError:
            return
        g = self._later(secs, self._scheduled_hangup, cause)
        self._sched_hangups.append(g)

    def _scheduled_hangup(self, cause: str) -> None:
        """A scheduled hangup fires (sch_hangup_callback): the channel hangs up with its cause,
        answered or not (unanswered: the caller gets the cause's SIP code, e.g. 503)."""
        self.request_hangup(cause, self._local_disposition())

    def delete_scheduled(self) -> int:
        """``sched_del <uuid>``: cancel the channel's scheduled hangups not yet fired."""
        live = [g for g in self._sched_hangups if not g.dead]
        for g in live:
            g.kill(block=False)
        self._sched_hangups.clear()
        return len(live)

    def _mark_answered(self) -> None:
        self.answered = True
        self.result.answered = True
        self.answered_us = _now_us()
        self.answer_state = "answered"
        self._apply("answer")
        self._fire("CHANNEL_ANSWER")
        self.call_state = "ACTIVE"
        self._apply("answered")
        if self.result.sip_response is None:
            self.result.sip_response = (200, "OK")
        self._later(self.spec.hold_seconds, self.request_hangup, "NORMAL_CLEARING", "recv_bye")
        eoa = self.variables.get("execute_on_answer", "")
        app, _, arg = eoa.strip().partition(" ")
        if app.lower() == "sched_hangup":
            self._schedule_hangup(arg)

    def _app_bridge(self, data: str) -> str:
        groups = split_dial_string(data)
        fail_cause = "NO_ROUTE_DESTINATION"
        causes: list[str] = []
        answers = self.spec.answering_targets
        # Every leg tried, (uuid, destination) in dial-string order: FreeSWITCH lists them in
        # variable_originated_legs, and last_bridge_to names the one that answered.
        tried: list[tuple[str, str]] = []
        for group in groups:
            winner = None
            for target in group:
                self.result.attempted_targets.append(target)
                verdict = True if answers is None else answers(target)
                if verdict is True:
                    if winner is None:
                        winner = target
                    continue
                fail_cause = self._leg_failure(verdict)
                leg_uuid = str(uuid4())
                tried.append((leg_uuid, _target_dest_host(target, self.switch.sip_ip)[0]))
                causes.append(f"{leg_uuid};{fail_cause}")
            if winner is None:
                if self._wait(self.spec.failed_leg_seconds):
                    self._hangup_now(self._pending.cause, self._pending.disposition)  # type: ignore[union-attr]
                    return "_none_"
                continue
            return self._bridge_to(winner, tried)
        # every target failed
        self._apply(
            "bridge_failed",
            fail_cause=fail_cause,
            dialstatus=dialstatus(fail_cause),
            originate_causes="|".join(causes),
        )
        if self._continue_on_fail(fail_cause):
            return "_none_"
        self._hangup_now(fail_cause, self._local_disposition())
        return "_none_"

    def _continue_on_fail(self, cause: str) -> bool:
        cof = self.variables.get("continue_on_fail", "").strip()
        if cof.lower() in ("true", "yes", "on", "1"):
            return True
        items = [c.strip().upper() for c in cof.split(",") if c.strip()]
        return cause in items or str(q850(cause)) in items

    def _leg_failure(self, verdict: object) -> str:
        """The cause of a failed leg: answering_targets returned False, a cause name, or
        the SIP code the target answered (which then also becomes the caller's response,
        like last_bridge_proto_specific_hangup_cause)."""
        if isinstance(verdict, int) and not isinstance(verdict, bool) and verdict >= 300:
            self._last_bridge_sip = verdict
            return sip_to_cause(verdict)
        if isinstance(verdict, str):
            return str2cause(verdict, default=self.spec.failed_leg_cause)
        return str2cause(self.spec.failed_leg_cause)

    def _bridge_to(self, target: str, tried: list[tuple[str, str]] | None = None) -> str:
        other_dest, other_host = _target_dest_host(target, self.switch.sip_ip)
        b_uuid = str(uuid4())
        b_created = _now_us()
        self.other_uuid = b_uuid
        extra = {
            "other_uuid": b_uuid,
            "other_dest": other_dest,
            "other_host": other_host,
            "other_channel_name": target,
            "originated_legs": originated_legs([*(tried or ()), (b_uuid, other_dest)]),
        }
        # the B leg rings
        self._apply("bridge_progress", **extra)
        self.callee_name, self.callee_number = "Outbound Call", other_dest
        self.progress_us = self.progress_us or _now_us()
        self._fire("CHANNEL_PROGRESS")
        if self.spec.ring_seconds and self._wait(self.spec.ring_seconds):
            self._hangup_now(self._pending.cause, self._pending.disposition)  # type: ignore[union-attr]
            return "_none_"
        # the B leg answers
        self._apply("bridge_answer", **extra)
        if not self.answered:
            self._mark_answered()
        self._apply("bridge_success", **extra)
        self.bridged_us = _now_us()
        self.other = {
            "direction": "outbound",
            "from_user": self._params["from_user"],
            "cid_name": self._params["cid_name"],
            "cid_number": self._params["cid_number"],
            "callee_name": "Outbound Call",
            "callee_number": other_dest,
            "caller_ip": self._params["caller_ip"],
            "dest": other_dest,
            "uuid": b_uuid,
            "channel_name": target,
            "profile_index": "",
            "created_us": b_created,
            "answered_us": b_created,
            "progress_us": b_created,
            "progress_media_us": 0,
            "hangup_us": 0,
            "bridged_us": 0,
        }
        self.bridged = True
        self.result.bridged_target = target
        self._fire("CHANNEL_BRIDGE")
        self._apply("bridged", **extra)
        # talk until someone hangs up
        self._wait(None)
        self._hangup_now(self._pending.cause, self._pending.disposition)  # type: ignore[union-attr]
        return "_none_"

    # --- hangup ---------------------------------------------------------------------------------
    def _hangup_now(self, cause: str, disposition: str) -> None:
        """The channel hangs up: CHANNEL_HANGUP (and CHANNEL_UNBRIDGE when bridged)."""
        if self._hungup:
            return
        self._hungup = True
        self._disposition = disposition
        for g in self._timers:
            g.kill(block=False)
        if self.connected and self.async_mode and not self._park_emitted and not self._stalled:
            self._park()
        if disposition == "recv_bye" and self.answered:
            self._apply("recv_bye")
        if self.bridged:
            self._apply("bridge_hangup")
        self.hangup_cause = cause
        self.result.hangup_cause = cause
        self.result.hangup_after = time.monotonic() - self._t_start
        self.answer_state = "hangup"
        self.state_number = 10
        if self.result.sip_response is None:
            code = self._last_bridge_sip or cause_to_sip(cause)
            self.result.sip_response = (code, sip_phrase(code))
        if self.linger is not None and self.spec.linger_notice_before_hangup and not self._linger_notice_sent:
            self._send_linger_notice()
        self._fire("CHANNEL_HANGUP")
        self._down = True
        self._wake.set()
        if disposition == "recv_bye":
            self._set_var("sip_hangup_disposition", "recv_bye")
        if self.bridged:
            self._apply("unbridge")
            self._fire("CHANNEL_UNBRIDGE")
            self.bridged = False

    def _finish_hangup(self) -> None:
        """After the running app returned: UNPARK, the socket app completes, CS_HANGUP,
        CS_REPORTING, CHANNEL_HANGUP_COMPLETE."""
        if not self._hungup:
            return
        if self.async_mode and self._park_emitted:
            self._fire("CHANNEL_UNPARK")
        self._fire(
            "CHANNEL_EXECUTE_COMPLETE",
            app="socket",
            app_data=self._params["socket_data"],
            app_uuid=self._socket_app_uuid,
            app_response="_none_",
        )
        self.channel_state = "CS_HANGUP"
        self._fire("CHANNEL_STATE")
        self.hangup_us = _now_us()
        self.channel_state = "CS_REPORTING"
        self.state_number = 11
        self.call_state = "HANGUP"
        self._fire("CHANNEL_STATE")
        self._apply("cdr", **self._cdr_params())
        if self.answered:
            self._apply("rtp_stats")
        if self._disposition in ("send_bye", "send_refuse", "send_cancel"):
            self._set_var("sip_hangup_disposition", self._disposition)
        self._fire("CHANNEL_HANGUP_COMPLETE")
        if self.spec.duplicate_hangup_complete:
            self._fire("CHANNEL_HANGUP_COMPLETE")
        self.result.channel_variables = dict(self.variables)
        self._complete = True
        self.result.billsec = int(self.variables.get("billsec", "0") or 0)
        self._wake.set()

    def _cdr_params(self) -> dict[str, object]:
        start, end = self.created_us, self.hangup_us
        ans, prog, pmed, br = self.answered_us, self.progress_us, self.progress_media_us, self.bridged_us

        def diff(a: int, b: int, unit: int) -> int:
            return (b // unit - a // unit) if a and b else 0

        p: dict[str, object] = {
            "answered_us": ans,
            "progress_us": prog,
            "progress_media_us": pmed,
            "bridged_us": br,
            "hangup_us": end,
            "q850": q850(self.hangup_cause),
            "start_stamp": _date_local(start),
            "answer_stamp": _date_local(ans) if ans else "",
            "bridge_stamp": _date_local(br) if br else "",
            "progress_stamp": _date_local(prog) if prog else "",
            "end_stamp": _date_local(end),
            "start_epoch": start // 1_000_000,
            "answer_epoch": ans // 1_000_000,
            "bridge_epoch": br // 1_000_000,
            "progress_epoch": prog // 1_000_000,
            "progress_media_epoch": pmed // 1_000_000,
            "end_epoch": end // 1_000_000,
            "last_app": self.last_app,
            "last_arg": self.last_arg if self.last_app != "socket" else self._params["socket_data"],
        }
        for suffix, unit in (("sec", 1_000_000), ("msec", 1000), ("usec", 1)):
            dur = "duration" if suffix == "sec" else {"msec": "mduration", "usec": "uduration"}[suffix]
            p[dur] = diff(start, end, unit)
            p["bill" + suffix] = diff(ans, end, unit)
            p["progress" + suffix] = diff(start, prog, unit)
            p["answer" + suffix] = diff(start, ans, unit)
            p["wait" + suffix] = diff(start, br, unit)
            p["progress_media" + suffix] = diff(start, pmed, unit)
            p["flow_bill" + suffix] = diff(start, end, unit)
        return p

    # --- running the call --------------------------------------------------------------------------
    def run(self) -> CallResult:
        t0 = time.monotonic()
        try:
            with gevent.Timeout(self.timeout, False):
                try:
                    self._run()
                except Exception as exc:  # a bug of the emulator: report it in the result
                    self.result.error = f"emulator error: {exc!r}\n{traceback.format_exc()}"
            if not self._done() and self.result.error is None:
                self.result.error = self.result.error or self._timeout_message()
                self.result.closed_by = self.result.closed_by or "timeout"
        finally:
            self._cleanup()
            self.result.duration = time.monotonic() - t0
            self.result.events = list(self.sent_event_names)
            self.result.replies = list(self.replies)
        return self.result

    def _timeout_message(self) -> str:
        if self._complete and self.controlled:
            return "timeout: the engine did not close the socket after CHANNEL_HANGUP_COMPLETE"
        if self._stalled and self.controlled:
            return "timeout: the engine kept the socket of a stalled switch open"
        return "timeout before the call ended"

    def _done(self) -> bool:
        return not self.controlled and (self._complete or not self.connected or self._stalled)

    def _run(self) -> None:
        self.switch.register(self)
        if self.spec.guard_seconds is not None:
            # The dialplan's `sched_hangup +N NETWORK_OUT_OF_ORDER`, run before `socket`.
            guard = self._later(self.spec.guard_seconds, self._scheduled_hangup, "NETWORK_OUT_OF_ORDER")
            self._sched_hangups.append(guard)
        try:
            sock = _connect_tcp(self.host, self.port, min(self.timeout, 5.0))
        except OSError as exc:
            # "Socket Error!" on every host: the app returns and the dialplan goes on after
            # `socket` (the shipped dialplan's `respond 503`: 503 in 3 ms on the real switch
            # with no engine listening); with nothing after it, the call is cleared (480).
            self.result.error = f"connect to {self.host}:{self.port} failed: {exc}"
            self.controlled = False
            if self.spec.after_socket:
                app, _, arg = self.spec.after_socket.partition(" ")
                self._execute(app, arg)
                if self._hungup:
                    self._finish_hangup()
                    return
            self._hungup = True
            self.hangup_cause = "NORMAL_CLEARING"
            self.result.hangup_cause = "NORMAL_CLEARING"
            self.result.sip_response = (480, sip_phrase(480))
            return
        sock.settimeout(None)
        with contextlib.suppress(OSError):
            sock.setsockopt(gsocket.IPPROTO_TCP, gsocket.TCP_NODELAY, 1)
        self.sock = sock
        self._t_connect = time.monotonic()
        self.controlled = True
        self.switch.add_listener(self, self.uuid)
        reader = gevent.spawn(self._reader)
        listener = gevent.spawn(self._listener)
        session = gevent.spawn(self._session)
        self._greenlets = [reader, listener, session]
        gevent.joinall([listener, session], raise_error=True)

    def _cleanup(self) -> None:
        self.running = False
        for g in self._timers:
            g.kill(block=False)
        for g in getattr(self, "_greenlets", []):
            g.kill(block=False)
        self.close_socket()
        self.switch.remove_listener(self)
        self.switch.unregister(self)


def place_call(
    host: str, port: int, spec: CallSpec, *, timeout: float = 10.0, switch: Switch | None = None
) -> CallResult:
    """Emulate FreeSWITCH handing one call to the engine at ``host:port`` with
    ``socket host:port <spec.socket_mode>`` and return what happened."""
    return Channel(switch or default_switch(), host, port, spec, timeout).run()


def run_calls(
    host: str,
    port: int,
    specs: Iterable[CallSpec],
    concurrency: int,
    *,
    timeout: float = 10.0,
    switch: Switch | None = None,
) -> list[CallResult]:
    """Place many calls, ``concurrency`` at a time (gevent Pool); results in spec order."""
    sw = switch or default_switch()
    pool = Pool(max(1, concurrency))
    return list(pool.imap(lambda s: place_call(host, port, s, timeout=timeout, switch=sw), specs))


_DEFAULT_SWITCH: Switch | None = None


def default_switch() -> Switch:
    global _DEFAULT_SWITCH
    if _DEFAULT_SWITCH is None:
        _DEFAULT_SWITCH = Switch()
    return _DEFAULT_SWITCH

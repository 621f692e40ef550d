"""Load driver for a real FreeSWITCH lab: calls originated through the inbound event socket.

Where :mod:`loadtest.driver` plays FreeSWITCH, this driver makes a real FreeSWITCH place
the calls, so the whole path is measured: SIP, the dialplan's ``socket`` application,
callgate's decision, and the bridge (or the rejection) as the caller sees it.

Lab layout (one FreeSWITCH is enough; see docs/performance.md, "Real FreeSWITCH lab")::

    lab.py --bgapi originate--> FreeSWITCH :8021 (inbound ESL)
      A leg: sofia/external/<dest>@<fs>:5080  --SIP-->  profile "callgate" (port 5080)
             dialplan: socket <callgate>:8084 async full      <-- callgate decides here
             bridge -> callgate's gateways -> a SIP sink that answers (SIPp UAS, or a
             FreeSWITCH profile whose dialplan answers and parks)
      A leg, once answered: playback(silence_stream://<hold ms>), then hangs up

For each call the driver sends ``bgapi originate`` with ``origination_uuid`` set to a
fresh UUID and a ``X-Cgload-Call`` SIP header carrying it (so the B leg, the one callgate
handled, can be recognised), and ``P-Accountcode: <account>`` so that callgate identifies
the caller through its ``rules.trusted_proxies`` (add FreeSWITCH's address there). It
subscribes to ``BACKGROUND_JOB CHANNEL_ANSWER CHANNEL_HANGUP_COMPLETE`` and collects, per
call: the originate result, the hangup cause and SIP status of the A leg, FreeSWITCH's own
timestamps (created -> answered / hung up), and callgate's variables from the B leg's
CHANNEL_HANGUP_COMPLETE (``callgate_account`` when accepted, ``callgate_reason`` when
rejected).

The client is python-ESL (blocking, C libesl; the ``lab`` extra) when it is installed,
else :class:`PyEslConnection`, a small pure-Python blocking client with the same method
names, which is also what the tests drive against an emulated inbound socket::

    python -m loadtest.lab --fs 127.0.0.1:8021 --password ClueCon --cps 20 --duration 60 \\
        --target 'sofia/external/{dest}@127.0.0.1:5080' --hold 5 --accounts 100000
"""

from __future__ import annotations

import argparse
import contextlib
import json
import socket
import sys
import time
import uuid as uuidlib
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any, Protocol
from urllib.parse import unquote

from loadtest.dataset import DEFAULT_MIX, CallMix, CallPlan, Scale, account_number
from loadtest.stats import summarize

__all__ = [
    "LabCall",
    "LabOptions",
    "PyEslConnection",
    "PyEslEvent",
    "connect",
    "originate_args",
    "run_lab",
]

SUBSCRIBED = "BACKGROUND_JOB CHANNEL_ANSWER CHANNEL_HANGUP_COMPLETE"
CALL_HEADER = "X-Cgload-Call"
LINGER_AFTER_LAST = 1.0  # seconds of events still read once every A leg has hung up


# --------------------------------------------------------------------------- a blocking ESL client


class PyEslEvent:
    """An event or reply with python-ESL's ``ESLevent`` accessors."""

    def __init__(self, headers: dict[str, str], body: str = "", kind: str = "") -> None:
        self.headers = headers
        self.body = body
        self.kind = kind

    def getHeader(self, name: str) -> str | None:
        return self.headers.get(name)

    def getBody(self) -> str:
        return self.body

    def getType(self) -> str:
        return self.headers.get("Event-Name", self.kind)

    def serialize(self, _format: str = "plain") -> str:
        return "".join(f"{k}: {v}\n" for k, v in self.headers.items()) + (
            "\n" + self.body if self.body else ""
        )


class PyEslConnection:
    """Inbound ESL over a blocking socket, with python-ESL's method names.

    Events that arrive while a command waits for its reply are queued and returned by the
    next ``recvEvent``/``recvEventTimed``, as libesl does."""

    def __init__(self, host: str, port: int | str, password: str, timeout: float = 5.0) -> None:
        self._sock = socket.create_connection((host, int(port)), timeout=timeout)
        self._sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self._buf = b""
        self._queue: list[PyEslEvent] = []
        self._connected = False
        hello = self._read_frame(timeout)
        if hello is None or hello[0].get("Content-Type") != "auth/request":
            raise ConnectionError("no auth/request from the inbound socket")
        reply = self.sendRecv(f"auth {password}")
        self._connected = (reply.getHeader("Reply-Text") or "").startswith("+OK")
        if not self._connected:
            self._sock.close()

    # python-ESL API ------------------------------------------------------------------------
    def connected(self) -> int:
        return 1 if self._connected else 0

    def send(self, command: str) -> None:
        self._sock.sendall(command.rstrip("\n").encode() + b"\n\n")

    def sendRecv(self, command: str) -> PyEslEvent:
        self.send(command)
        while True:
            frame = self._read_frame(None)
            if frame is None:
                self._connected = False
                return PyEslEvent({"Reply-Text": "-ERR disconnected"}, kind="command/reply")
            headers, body = frame
            kind = headers.get("Content-Type", "")
            if kind in ("command/reply", "api/response"):
                return PyEslEvent(headers, body.decode("utf-8", "replace"), kind)
            event = self._event(headers, body)
            if event is not None:
                self._queue.append(event)

    def api(self, command: str, arg: str = "") -> PyEslEvent:
        return self.sendRecv(f"api {command} {arg}".rstrip())

    def bgapi(self, command: str, arg: str = "", job_uuid: str | None = None) -> PyEslEvent:
        text = f"bgapi {command} {arg}".rstrip()
        if job_uuid:
            text += f"\nJob-UUID: {job_uuid}"
        return self.sendRecv(text)

    def events(self, etype: str, value: str) -> PyEslEvent:
        return self.sendRecv(f"event {etype} {value}")

    def filter(self, header: str, value: str) -> PyEslEvent:
        return self.sendRecv(f"filter {header} {value}")

    def recvEvent(self) -> PyEslEvent | None:
        return self.recvEventTimed(-1)

    def recvEventTimed(self, ms: int) -> PyEslEvent | None:
        deadline = None if ms < 0 else time.monotonic() + ms / 1000
        while not self._queue:
            remaining = None if deadline is None else max(0.0, deadline - time.monotonic())
            frame = self._read_frame(remaining)
            if frame is None:
                return None
            event = self._event(*frame)
            if event is not None:
                self._queue.append(event)
        return self._queue.pop(0)

    def disconnect(self) -> None:
        self._connected = False
        with contextlib.suppress(OSError):
            self._sock.close()

    # framing ---------------------------------------------------------------------------------
    def _read_frame(self, timeout: float | None) -> tuple[dict[str, str], bytes] | None:
        """One frame; None on timeout (``timeout`` 0 = poll) or when the socket closed."""
        deadline = None if timeout is None else time.monotonic() + timeout
        while True:
            end = self._buf.find(b"\n\n")
            if end >= 0:
                headers = _parse_headers(self._buf[:end].decode("utf-8", "replace"), decode=False)
                length = int(headers.get("Content-Length", "0") or 0)
                if len(self._buf) >= end + 2 + length:
                    body = self._buf[end + 2 : end + 2 + length]
                    self._buf = self._buf[end + 2 + length :]
                    return headers, body
            remaining = None if deadline is None else deadline - time.monotonic()
            if remaining is not None and remaining <= 0:
                return None
            self._sock.settimeout(remaining)
            try:
                data = self._sock.recv(65536)
            except TimeoutError:
                return None
            except OSError:
                data = b""
            if not data:
                self._connected = False
                return None
            self._buf += data

    @staticmethod
    def _event(headers: dict[str, str], body: bytes) -> PyEslEvent | None:
        kind = headers.get("Content-Type", "")
        if kind == "text/event-plain":
            text = body.decode("utf-8", "replace")
            head, _, rest = text.partition("\n\n")
            event_headers = _parse_headers(head, decode=True)
            inner = int(event_headers.get("Content-Length", "0") or 0)
            return PyEslEvent(event_headers, rest[:inner] if inner else "", kind)
        if kind == "text/disconnect-notice":
            return PyEslEvent(headers, body.decode("utf-8", "replace"), kind)
        return None


def _parse_headers(text: str, *, decode: bool) -> dict[str, str]:
    """Split lines first, then each value is decoded on its own (FreeSWITCH's %-encoding)."""
    headers: dict[str, str] = {}
    for line in text.split("\n"):
        name, sep, value = line.partition(": ")
        if not sep:
            continue
        value = value.rstrip("\r")
        if decode:
            value = "" if value == "_undef_" else unquote(value)
        headers.setdefault(name, value)
    return headers


class EslClient(Protocol):
    def connected(self) -> int: ...
    def events(self, etype: str, value: str) -> Any: ...
    def bgapi(self, command: str, arg: str = "", job_uuid: str | None = None) -> Any: ...
    def recvEventTimed(self, ms: int) -> Any: ...
    def disconnect(self) -> None: ...


def connect(host: str, port: int, password: str, client: str = "auto") -> EslClient:
    """python-ESL's ESLconnection when available (``client`` "auto" or "python-esl"), else
    :class:`PyEslConnection` ("pure")."""
    if client in ("auto", "python-esl"):
        try:
            import ESL  # type: ignore[import-not-found,unused-ignore]  # optional (the lab extra)
        except ImportError:
            if client == "python-esl":
                raise
        else:
            esl_conn: EslClient = ESL.ESLconnection(host, str(port), password)
            if not esl_conn.connected():
                raise ConnectionError(f"cannot log in to {host}:{port} (python-ESL)")
            return esl_conn
    conn = PyEslConnection(host, port, password)
    if not conn.connected():
        raise ConnectionError(f"cannot log in to {host}:{port}")
    return conn


# --------------------------------------------------------------------------- the lab run


@dataclass
class LabOptions:
    target: str = "sofia/external/{dest}@127.0.0.1:5080"  # {dest}: the plan's destination
    cps: float = 10.0
    duration: float = 30.0
    hold: float = 5.0  # seconds the answered A leg stays up (playback of silence)
    drain: float = 30.0  # after the last originate, wait this long for the hangups
    caller_id: str = "1000"
    originate_timeout: int = 30
    account_header: str = "P-Accountcode"  # "" to send none (identification by other means)
    extra_variables: dict[str, str] = field(default_factory=dict)


@dataclass
class LabCall:
    uuid: str
    plan: CallPlan
    sent_at: float
    job_uuid: str = ""
    job_result: str = ""  # "+OK <uuid>" or "-ERR <CAUSE>" from BACKGROUND_JOB
    answered: bool = False
    hangup_cause: str = ""
    sip_status: str = ""
    created_us: int = 0
    answered_us: int = 0
    hangup_us: int = 0
    callgate: dict[str, str] = field(default_factory=dict)  # callgate_* variables of the B leg
    done: bool = False

    @property
    def outcome(self) -> str:
        reason = self.callgate.get("callgate_reason", "")
        if reason and reason != "ACCEPTED":  # accepted calls carry ACCEPTED (ROUTES_FAILED if all failed)
            return reason
        if self.answered or self.callgate.get("callgate_account"):
            return "accept"
        if self.job_result.startswith("-ERR"):
            return self.job_result[4:].strip() or "originate failed"
        return self.hangup_cause or "(no result)"

    @property
    def setup_seconds(self) -> float | None:
        """FreeSWITCH's own clock: A leg created -> answered (accepted) or hung up (refused)."""
        end = self.answered_us or self.hangup_us
        if not (self.created_us and end):
            return None
        return (end - self.created_us) / 1e6


def account_of(plan: CallPlan) -> str:
    """The account a lab call claims in the account header (the plan's caller)."""
    if plan.sip_auth_username.startswith("u") and plan.sip_auth_username[1:].isdigit():
        return plan.sip_auth_username[1:]
    if plan.network_ip.startswith("10."):
        a, b, c = (int(x) for x in plan.network_ip.split(".")[1:])
        return account_number((a << 16) | (b << 8) | c)
    return plan.sip_auth_username or "0"


def originate_args(plan: CallPlan, call_uuid: str, options: LabOptions) -> str:
    """The argument of ``bgapi originate`` for one call."""
    variables = {
        "origination_uuid": call_uuid,
        "origination_caller_id_number": options.caller_id,
        "originate_timeout": str(options.originate_timeout),
        "ignore_early_media": "true",
        f"sip_h_{CALL_HEADER}": call_uuid,
        **options.extra_variables,
    }
    if options.account_header:
        variables[f"sip_h_{options.account_header}"] = account_of(plan)
    joined = ",".join(f"{k}={v}" for k, v in variables.items())
    hold_ms = max(0, int(options.hold * 1000))
    return (
        "{"
        + joined
        + "}"
        + options.target.format(dest=plan.destination)
        + f" &playback(silence_stream://{hold_ms})"
    )


def run_lab(
    conn: EslClient,
    plans: Iterator[CallPlan],
    options: LabOptions,
    *,
    clock: Callable[[], float] = time.monotonic,
    new_uuid: Callable[[], str] = lambda: str(uuidlib.uuid4()),
) -> list[LabCall]:
    """Originate ``options.cps`` calls per second for ``options.duration`` seconds on one
    blocking connection, reading events between originates; return every call's result."""
    reply = conn.events("plain", SUBSCRIBED)
    if isinstance(reply, int):  # python-ESL returns libesl's status: 0 = ESL_SUCCESS
        if reply != 0:
            raise RuntimeError(f"event subscription failed (status {reply})")
    elif not (reply.getHeader("Reply-Text") or "").startswith("+OK"):
        raise RuntimeError(f"event subscription refused: {reply.getHeader('Reply-Text')}")
    calls: dict[str, LabCall] = {}
    by_job: dict[str, LabCall] = {}
    start = clock()
    interval = 1.0 / options.cps
    sent = 0
    stop_sending = start + options.duration
    deadline = stop_sending + options.drain + options.hold
    while True:
        now = clock()
        due = start + sent * interval
        if now >= due and due < stop_sending:
            plan = next(plans)
            call_uuid = new_uuid()
            job_uuid = new_uuid()
            call = LabCall(call_uuid, plan, now, job_uuid=job_uuid)
            calls[call_uuid] = call
            by_job[job_uuid] = call
            reply = conn.bgapi("originate", originate_args(plan, call_uuid, options), job_uuid)
            answer = (reply.getHeader("Reply-Text") or "") if reply is not None else ""
            if answer and not answer.startswith("+OK"):
                call.job_result, call.done = answer, True
            sent += 1
            continue
        if now >= deadline:
            break
        if due >= stop_sending and all(c.done for c in calls.values()):
            # The B legs' CHANNEL_HANGUP_COMPLETE can trail the A legs': a short grace.
            deadline = min(deadline, now + LINGER_AFTER_LAST)
            if now >= deadline:
                break
        wait = min(due, deadline) - now if due < stop_sending else deadline - now
        event = conn.recvEventTimed(max(1, int(min(wait, 0.25) * 1000)))
        if event is not None:
            _on_event(event, calls, by_job)
        elif not conn.connected():
            break
    return list(calls.values())


def _on_event(event: Any, calls: dict[str, LabCall], by_job: dict[str, LabCall]) -> None:
    name = event.getHeader("Event-Name")
    if name == "BACKGROUND_JOB":
        call = by_job.get(event.getHeader("Job-UUID") or "")
        if call is not None:
            call.job_result = (event.getBody() or "").strip()
            if call.job_result.startswith("-ERR"):
                call.done = True  # its A leg's CHANNEL_HANGUP_COMPLETE may still fill in details
        return
    uuid = event.getHeader("Unique-ID") or ""
    call = calls.get(uuid)
    if name == "CHANNEL_ANSWER" and call is not None:
        call.answered = True
        return
    if name != "CHANNEL_HANGUP_COMPLETE":
        return
    if call is not None:  # the A leg, which the driver originated
        call.hangup_cause = event.getHeader("Hangup-Cause") or ""
        call.sip_status = event.getHeader("variable_sip_term_status") or ""
        call.created_us = _int(event.getHeader("Caller-Channel-Created-Time"))
        call.answered_us = _int(event.getHeader("Caller-Channel-Answered-Time"))
        call.hangup_us = _int(event.getHeader("Caller-Channel-Hangup-Time"))
        call.answered = call.answered or call.answered_us > 0
        call.done = True
        return
    tagged = calls.get(event.getHeader(f"variable_sip_h_{CALL_HEADER}") or "")
    if tagged is not None:  # the B leg: the call as callgate saw it
        for key in ("callgate_account", "callgate_reason", "callgate_routes", "callgate_max_duration"):
            value = event.getHeader(f"variable_{key}")
            if value:
                tagged.callgate[key] = value


def _int(text: str | None) -> int:
    try:
        return int(text or 0)
    except ValueError:
        return 0


def report(calls: list[LabCall], options: LabOptions) -> dict[str, Any]:
    outcomes = Counter(c.outcome for c in calls)
    accepted = [c.setup_seconds for c in calls if c.outcome == "accept" and c.setup_seconds is not None]
    refused = [c.setup_seconds for c in calls if c.outcome != "accept" and c.setup_seconds is not None]
    return {
        "calls": len(calls),
        "offered_cps": options.cps,
        "completed": sum(c.done for c in calls),
        "outcomes": dict(outcomes.most_common()),
        "hangup_causes": dict(Counter(c.hangup_cause or "(none)" for c in calls).most_common()),
        "sip_status": dict(Counter(c.sip_status or "(none)" for c in calls).most_common()),
        "setup_accepted": summarize(accepted),  # created -> answered, FreeSWITCH's clock
        "setup_refused": summarize(refused),  # created -> hung up
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m loadtest.lab", description=__doc__.split("\n\n")[0])
    parser.add_argument("--fs", default="127.0.0.1:8021", help="FreeSWITCH inbound event socket host:port")
    parser.add_argument("--password", default="ClueCon")
    parser.add_argument("--client", choices=("auto", "python-esl", "pure"), default="auto")
    parser.add_argument("--target", default=LabOptions.target, help="dial string template ({dest})")
    parser.add_argument("--cps", type=float, default=10.0)
    parser.add_argument("--duration", type=float, default=30.0)
    parser.add_argument("--hold", type=float, default=5.0)
    parser.add_argument("--account-header", default="P-Accountcode", help="'' to send none")
    parser.add_argument("--mix", default="default", help="'default', 'accept' or class=weight,...")
    parser.add_argument("--accounts", type=int, default=Scale.accounts, help="the published dataset's scale")
    parser.add_argument("--rates", type=int, default=Scale.rates)
    parser.add_argument("--groups", type=int, default=Scale.groups)
    parser.add_argument("--json", default=None)
    args = parser.parse_args(argv)
    from loadtest.driver import _parse_mix

    host, _, port = args.fs.rpartition(":")
    options = LabOptions(
        target=args.target,
        cps=args.cps,
        duration=args.duration,
        hold=args.hold,
        account_header=args.account_header,
    )
    mix = CallMix(
        Scale(accounts=args.accounts, rates=args.rates, groups=args.groups),
        _parse_mix(args.mix) or DEFAULT_MIX,
    )
    conn = connect(host, int(port), args.password, args.client)
    try:
        calls = run_lab(conn, iter(mix), options)
    finally:
        conn.disconnect()
    result = report(calls, options)
    text = json.dumps(result, indent=2)
    if args.json:
        with open(args.json, "w") as handle:
            handle.write(text)
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""One call's conversation with FreeSWITCH as a sans-I/O state machine (h11's discipline).

No socket, no clock, no gevent: the driver (engine.call.driver) feeds it what happened
(:meth:`CallSession.start`, :meth:`~CallSession.frame`, :meth:`~CallSession.decided`,
:meth:`~CallSession.expired`, :meth:`~CallSession.peer_gone`,
:meth:`~CallSession.protocol_error`) and carries out the actions each returns, in order:
:class:`Send` bytes, :class:`Arm`/:class:`Disarm` a deadline, :class:`Decide` the call,
:class:`Warn` (log and count, the call goes on), :class:`Release` the call's counted
limit slots, :class:`Bill` (hand the call to accounting: its hangup facts, or the
reject), :class:`Finish` (close the socket; nothing more will come).

Billing (issue 13): each decided call is billed exactly once per session: a rejected call
as soon as its answer is written (one CDR row per attempt), an accepted call on its
CHANNEL_HANGUP_COMPLETE (rated, debited, its funds reservation released). Once an accept's
batch is built the session keeps only what billing needs of it, its BillingTicket (~17
objects the collector tracks instead of the whole decision's ~44, for as long as the call is
up). An accepted call whose hangup is never seen (deadline, reset, garbage, disconnect without the event)
is not billed here: its reservation holds its funds until the reservation's deadline in
Redis (docs/accounting.md, "Failure modes").

The phases::

    CONNECTING --channel data--> DECIDING --accept--> COMMITTED --HANGUP_COMPLETE--> DONE
        |                            \\--reject--> ANSWERING --HANGUP_COMPLETE----> DONE
        \\--disconnect notice (the caller gave up) / timeout / garbage / EOF--> DONE

COMMITTED is the rule of issue 14 item 1: once the bytes of an accept are written,
FreeSWITCH may run the ``bridge`` whatever happens to the socket, so the call is counted
(its limit slots are NOT released) until FreeSWITCH says the channel is gone:
CHANNEL_HANGUP_COMPLETE, a ``disconnect`` notice (sent once the channel is down), or a
clean end of stream before the bridge's reply (FreeSWITCH replies to each command as it
queues it, in order, so a bridge never acknowledged was never queued). Late replies only
warn; the engine keeps reading. At the hangup deadline, a reset connection or garbage the
socket is dropped but the slots are kept: they expire by their own deadline in Redis
(max duration + limits.margin_seconds) unless the reconciler sees the call gone earlier.
"""

from __future__ import annotations

import enum
from collections.abc import Callable
from dataclasses import dataclass, field

from engine.billing.ticket import BillingTicket, ticket_of
from engine.call.channel import call_request
from engine.call.render import accept_batch, reject_batch, routes_failed_batch
from engine.decision import Accept, Decision, Reason
from engine.esl.protocol import Frame, command
from engine.model import CallRequest

CONNECT = command("connect")


class Phase(enum.Enum):
    CONNECTING = "connecting"  # `connect` sent, waiting for the channel data
    DECIDING = "deciding"  # channel data in: the driver decides
    ANSWERING = "answering"  # a reject written: nothing can be bridged
    COMMITTED = "committed"  # an accept written: possibly bridged until FreeSWITCH says otherwise
    DONE = "done"


# Read on every frame: module constants are found faster than enum members.
_ANSWERING, _COMMITTED, _DONE = Phase.ANSWERING, Phase.COMMITTED, Phase.DONE


class Deadline(enum.IntEnum):
    # An IntEnum: the driver keys its timers by deadline, and an IntEnum hashes as an int
    # (a plain Enum's __hash__ is Python code, run on every lookup).
    CONNECT = 1  # engine.connect_timeout: the channel data
    REPLIES = 2  # engine.reply_timeout: every command/reply of the written batch
    HANGUP = 3  # engine.hangup_timeout: CHANNEL_HANGUP_COMPLETE, counted from the decision


class Outcome(enum.Enum):
    ENDED = "ended"  # CHANNEL_HANGUP_COMPLETE (or FreeSWITCH's disconnect notice) after the decision
    ABANDONED = "abandoned"  # the caller hung up before the channel data: counted as gone
    GONE = "gone"  # the connection ended without FreeSWITCH saying the call is over
    TIMEOUT = "timeout"  # a deadline passed
    PROTOCOL = "protocol"  # FreeSWITCH sent something that is not what the conversation expects


@dataclass(frozen=True, slots=True)
class Send:
    data: bytes


@dataclass(frozen=True, slots=True)
class Arm:
    deadline: Deadline
    seconds: float  # from now


@dataclass(frozen=True, slots=True)
class Disarm:
    deadline: Deadline


@dataclass(frozen=True, slots=True)
class Decide:
    request: CallRequest


@dataclass(frozen=True, slots=True)
class Warn:
    kind: str  # "late_replies", "refused_command", "routes_failed"
    message: str


@dataclass(frozen=True, slots=True)
class Release:
    """Release the call's counted limit slots now."""


@dataclass(frozen=True, slots=True)
class Bill:
    """Hand the call to accounting. ``hangup``: the CHANNEL_HANGUP_COMPLETE of an accepted
    call (decoded by the driver: rated and settled); None: a rejected call (a CDR of the
    attempt, nothing debited)."""

    hangup: Frame | None
    # A rejected call whose decision may have taken a funds reservation (a late or failed
    # decision): the record releases it.
    may_hold_funds: bool = False


@dataclass(frozen=True, slots=True)
class Finish:
    outcome: Outcome
    detail: str
    kept: bool = False  # counted slots deliberately left to their Redis deadline / the reconciler


Action = Send | Arm | Disarm | Decide | Warn | Release | Bill | Finish

_RELEASE = Release()
_BILL_REJECT = Bill(None)
_BILL_LATE_REJECT = Bill(None, may_hold_funds=True)
_DISARM_REPLIES = Disarm(Deadline.REPLIES)
_DISARMED: list[Action] = [_DISARM_REPLIES]  # shared, like _NOTHING
# "Nothing to do", shared: the driver never modifies the lists it is given.
_NOTHING: list[Action] = []


@dataclass(frozen=True, slots=True)
class SessionSettings:
    connect_timeout: float = 2.0
    reply_timeout: float = 2.0
    hangup_timeout: float = 14400.0
    ticket_key: bytes | None = field(default=None, repr=False)  # signs callgate_bill ([billing] ticket_keys)


SipResponse = Callable[[Reason], tuple[int, str]]


class CallSession:
    """The state of one outbound-socket connection; every method returns the actions to take."""

    def __init__(self, settings: SessionSettings, sip_response: SipResponse) -> None:
        self._settings = settings
        self._sip_response = sip_response
        self.phase = Phase.CONNECTING
        self.request: CallRequest | None = None
        # The decision; a priced accept is kept as its BillingTicket once its batch is built.
        self.decision: Decision | BillingTicket | None = None
        self.hangup_cause = ""
        self.holds_slots = False  # limits may hold slots for this call
        self.replies_pending = 0
        self._batch_replies = 0  # replies still due for the decision's own batch (the bridge is last)
        self._routes_failed = False

    @property
    def done(self) -> bool:
        return self.phase is _DONE

    # ------------------------------------------------------------------ inputs

    def start(self) -> list[Action]:
        return [Send(CONNECT), Arm(Deadline.CONNECT, self._settings.connect_timeout)]

    def frame(self, frame: Frame) -> list[Action]:
        phase = self.phase
        if phase is _COMMITTED or phase is _ANSWERING:  # the frequent case first
            kind = frame.content_type
            if kind == "command/reply":  # eight of them per call: the usual +OK in a few steps
                headers = frame.headers
                text = headers.get("Reply-Text", "")
                if text.startswith("+OK") and "Event-Name" not in headers:  # reply_ok(), undecoded
                    return _DISARMED if self._count_reply() else _NOTHING
                return self._reply(frame)
            if kind == "api/response":  # the guard's sched_del
                return self._reply(frame)
            if kind == "text/event-plain":
                return self._event(frame)
            return self._other(frame)
        if phase is Phase.CONNECTING:
            return self._channel_data(frame)
        raise RuntimeError(f"no frame is expected while {phase.value}")

    def decided(self, decision: Decision, *, holds_slots: bool) -> list[Action]:
        """The decision for the call; ``holds_slots``: the limits may have counted it."""
        if self.phase is not Phase.DECIDING:
            raise RuntimeError(f"a decision is not expected while {self.phase.value}")
        self.decision = decision
        settings = self._settings
        # The batch cancels the dialplan's frozen-engine guard (render.guard_cancel).
        uuid = self.request.uuid if self.request is not None else None
        if isinstance(decision, Accept):
            batch = accept_batch(decision, settings.ticket_key, uuid or "", guard_uuid=uuid)
            # From here on the call needs only its bill: keep that, not the decision's routes.
            self.decision = ticket_of(decision) or decision
            self.phase = Phase.COMMITTED
            self.holds_slots = True
            release: list[Action] = []
        else:
            code, text = self._sip_response(decision.reason)
            batch = reject_batch(decision, code, text, guard_uuid=uuid)
            self.phase = Phase.ANSWERING
            # A respond never bridges: whatever a late or abandoned decision took goes back now,
            # and the attempt is recorded once its answer is written.
            release = [_RELEASE, _BILL_LATE_REJECT] if holds_slots else [_BILL_REJECT]
            self.holds_slots = False
        self.replies_pending = self._batch_replies = batch.replies_expected
        return [
            Send(batch.payload),
            *release,
            Arm(Deadline.REPLIES, settings.reply_timeout),
            Arm(Deadline.HANGUP, settings.hangup_timeout),
        ]

    def expired(self, deadline: Deadline) -> list[Action]:
        if self.phase is Phase.DONE:
            return []
        if deadline is Deadline.CONNECT:
            waited = self._settings.connect_timeout
            return self._finish(
                Outcome.TIMEOUT, f"no channel data within {waited:g}s (engine.connect_timeout)"
            )
        if deadline is Deadline.REPLIES:
            # FreeSWITCH is slow, not gone: it may still run the queued bridge, so keep reading.
            return [
                Warn(
                    "late_replies",
                    f"{self.replies_pending} command replies still due after engine.reply_timeout; "
                    "still following the call",
                )
            ]
        waited = self._settings.hangup_timeout
        return self._finish(
            Outcome.TIMEOUT, f"no CHANNEL_HANGUP_COMPLETE within {waited:g}s (engine.hangup_timeout)"
        )

    def peer_gone(self, why: str, *, clean: bool) -> list[Action]:
        """The connection ended: ``clean`` for an orderly end of stream (everything FreeSWITCH
        wrote has been read), False for a reset or a failed write."""
        if self.phase is Phase.DONE:
            return []
        if self.phase is Phase.COMMITTED and clean and self._batch_replies > 0:
            # The bridge (last in the batch) was never acknowledged, hence never queued.
            return self._finish(Outcome.GONE, f"{why} before the bridge was queued", call_over=True)
        return self._finish(Outcome.GONE, why)

    def protocol_error(self, why: str) -> list[Action]:
        if self.phase is Phase.DONE:
            return []
        return self._finish(Outcome.PROTOCOL, f"malformed data from FreeSWITCH: {why}")

    # ------------------------------------------------------------------ phases

    def _channel_data(self, frame: Frame) -> list[Action]:
        kind = frame.content_type
        if kind == "text/disconnect-notice":
            # The caller hung up while FreeSWITCH was connecting: nothing to decide.
            return self._finish(Outcome.ABANDONED, "the call ended before its channel data")
        if kind != "command/reply":
            got = kind or "no Content-Type"
            return self.protocol_error(f"expected the connect reply, got {got!r}")
        self.request = call_request(frame.headers)
        self.phase = Phase.DECIDING
        return [Disarm(Deadline.CONNECT), Decide(self.request)]

    def _other(self, frame: Frame) -> list[Action]:
        kind = frame.content_type
        if kind == "text/disconnect-notice" and frame.headers.get("Content-Disposition") != "linger":
            # FreeSWITCH disconnects once the channel is down (the linger notice only says it lingers).
            return self._finish(Outcome.ENDED, "FreeSWITCH disconnected", call_over=True)
        return _NOTHING

    def _count_reply(self) -> bool:
        """Count one reply of the batch; True when it was the last one awaited."""
        pending = self.replies_pending
        if not pending:
            return False
        self.replies_pending = pending - 1
        if self._batch_replies:
            self._batch_replies -= 1
        return pending == 1

    def _reply(self, frame: Frame) -> list[Action]:
        actions: list[Action] = []
        if self._count_reply():
            actions.append(_DISARM_REPLIES)
        if frame.content_type == "api/response":
            if not frame.body.startswith(b"+OK"):  # `+OK Deleted: <n>`; 0 when the dialplan has no guard
                text = frame.body.decode("utf-8", "replace").strip()
                actions.append(Warn("refused_command", f"FreeSWITCH refused the guard's sched_del: {text}"))
        elif not frame.reply_ok():
            actions.append(
                Warn("refused_command", f"FreeSWITCH refused a command: {frame.reply_text.strip()}")
            )
        return actions

    def _event(self, frame: Frame) -> list[Action]:
        # Events are read header by header: a full decode costs ~100 µs and an accepted call
        # brings a few events, of which two or three headers matter.
        name = frame.event_name
        if name == "CHANNEL_HANGUP_COMPLETE":
            self.hangup_cause = frame.event_header("Hangup-Cause") or ""
            return self._finish(Outcome.ENDED, self.hangup_cause, call_over=True, hangup=frame)
        if name == "CHANNEL_EXECUTE_COMPLETE" and self._bridge_failed(frame):
            return self._hang_up_failed_call(frame)
        return _NOTHING

    def _bridge_failed(self, frame: Frame) -> bool:
        return (
            self.phase is Phase.COMMITTED
            and not self._routes_failed
            and frame.event_header("Application") == "bridge"
            # ringing/early: nobody answered and the caller is still there. ("hangup": the
            # call is over; "answered": a leg answered and hangup_after_bridge ends the call.)
            and frame.event_header("Answer-State") not in ("hangup", "answered")
        )

    def _hang_up_failed_call(self, frame: Frame) -> list[Action]:
        # Every leg failed and the call is parked (nothing else ends the park): record
        # ROUTES_FAILED and hang up with the bridge's own cause.
        self._routes_failed = True
        cause = frame.event_header("variable_originate_disposition") or ""
        batch = routes_failed_batch(cause)
        actions: list[Action] = [
            Send(batch.payload),
            Warn("routes_failed", f"every route failed: {cause or '-'}"),
        ]
        if not self.replies_pending:
            actions.append(Arm(Deadline.REPLIES, self._settings.reply_timeout))
        self.replies_pending += batch.replies_expected
        return actions

    def _finish(
        self, outcome: Outcome, detail: str, *, call_over: bool = False, hangup: Frame | None = None
    ) -> list[Action]:
        """The end. ``call_over``: FreeSWITCH showed that the channel is gone or was never
        bridged; an accepted call's slots are released only then, else kept (see module doc).
        ``hangup``: the CHANNEL_HANGUP_COMPLETE that ended it (an accepted call is billed on it)."""
        self.phase = Phase.DONE
        if not self.holds_slots:
            return [Finish(outcome, detail)]
        if call_over:
            if hangup is not None:
                return [Bill(hangup), _RELEASE, Finish(outcome, detail)]
            return [_RELEASE, Finish(outcome, detail)]
        return [Finish(outcome, detail, kept=True)]

"""The thin gevent driver of a call: socket, deadlines, metrics and logs around CallSession.

Everything the call's conversation decides (what to send, when a deadline matters, when to
release the call's limit slots, when it is over) lives in engine.call.session; this module
only carries the actions out. Deadlines cost one gevent timer at a time: the earliest armed
one, re-armed only when it changes (a timer per read costs more than the read).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any, Protocol

import gevent

from engine.billing.hangup import HANGUP_HEADERS
from engine.billing.ticket import BillingTicket, ticket_keys
from engine.call.channel import call_request
from engine.call.session import (
    Action,
    Arm,
    Bill,
    CallSession,
    Deadline,
    Decide,
    Disarm,
    Finish,
    Outcome,
    Phase,
    Release,
    Send,
    SessionSettings,
    Warn,
)
from engine.config import Config
from engine.decision import Accept, Decision, Reason, Reject
from engine.esl.connection import EslConnection, PeerGone
from engine.esl.protocol import HeaderPicker, ProtocolError
from engine.logs import Every
from engine.metrics import EngineMetrics
from engine.model import CallRequest
from engine.rules.config import RulesConfig
from engine.rules.text import show
from engine.shedding import PAUSE, RESUME, SHED_WAIT, ListenGate, LoadShedder

__all__ = ["CallHandler", "CallRecord", "call_request"]

log = logging.getLogger("callgate.call")
_DONE = Phase.DONE
decision_log = logging.getLogger("callgate.decision")

#: Socket-error metric kind per way a call's connection was dropped (none for a normal end).
_DROP_KINDS = {
    Outcome.ABANDONED: "gone",
    Outcome.GONE: "gone",
    Outcome.TIMEOUT: "timeout",
    Outcome.PROTOCOL: "protocol",
}


@dataclass
class CallRecord:
    """What the engine knows of one call when it ends (given to the end hook)."""

    peer: tuple[object, ...]
    request: CallRequest | None = None
    decision: Decision | BillingTicket | None = None  # a priced accept: its ticket (billing's record)
    hangup_cause: str = ""
    hangup: Mapping[str, str] | None = None  # the CHANNEL_HANGUP_COMPLETE headers billing reads


DecideFn = Callable[[CallRequest], Decision]
EndHook = Callable[[CallRecord], None]
# (the call, whether a rejected call's decision may hold a funds reservation)
BillHook = Callable[[CallRecord, bool], None]


class Listener(Protocol):
    """What the handler needs of the server to stop and resume listening (engine.esl.server)."""

    def stop_listening(self) -> int: ...

    def listen_again(self) -> None: ...


# The CHANNEL_HANGUP_COMPLETE headers billing reads (~25 of ~280), picked out of the event in
# one pass (compiled) instead of splitting and decoding the whole block: ~140 -> ~15 us per call.
_HANGUP_FIELDS = HeaderPicker(HANGUP_HEADERS)


class _Expired(Exception):
    """Raised into the call's greenlet by its deadline timer."""

    def __init__(self, deadline: Deadline) -> None:
        super().__init__()
        self.deadline = deadline


class _DecisionLate(BaseException):
    """Raised into a call's greenlet when its decision passed ``engine.decision_deadline``.

    A BaseException, as gevent.Timeout is: no ``except Exception`` on the way (the limits
    client, the rules) may swallow it; the Redis connection it interrupts is dropped."""


def _throw_later(seconds: float, exc: BaseException) -> Any:
    """A started one-shot timer that raises ``exc`` into the current greenlet after ``seconds``;
    the caller closes it. What ``gevent.Timeout.start_new`` does, without building its Python
    object: 0.37 against 1.9 us per timer (timeit), and a call starts about four."""
    timer = gevent.get_hub().loop.timer(seconds)
    timer.start(gevent.getcurrent().throw, exc, update=True)  # update: the loop's clock is now
    return timer


LISTENER_LOG_INTERVAL = 10.0  # seconds: at most one "stopped listening" and one "recovered" line


class CallHandler:
    def __init__(
        self,
        config: Config,
        decide: DecideFn,
        metrics: EngineMetrics,
        rules: RulesConfig,
        on_end: EndHook | None = None,
        on_bill: BillHook | None = None,
    ) -> None:
        self._config = config
        engine = config.engine
        self._settings = SessionSettings(
            connect_timeout=engine.connect_timeout,
            reply_timeout=engine.reply_timeout,
            hangup_timeout=engine.hangup_timeout,
            ticket_key=next(iter(ticket_keys(config.billing.ticket_keys)), None),
        )
        self._sip_response = rules.sip_response
        self._decide = decide
        self._metrics = metrics
        self._on_end = on_end  # called when the call's counted slots are to be released
        self._on_bill = on_bill  # called once per decided call: accounting (engine.billing.live)
        self._decision_level = logging.getLevelName(config.logging.decision_level)
        self._in_flight = 0
        # Load shedding (engine.shedding): the greenlets of the calls not decided yet, and the
        # event-loop lag monitor, which runs while calls are up.
        self._shedder = LoadShedder(
            max_lag=engine.shed_loop_lag,
            max_backlog=engine.shed_backlog,
            max_wait=engine.shed_accept_wait,
        )
        self._undecided: set[object] = set()
        self._lag_monitor: gevent.Greenlet | None = None
        # Stop listening while saturated (engine.shedding.ListenGate), once a server is attached.
        self._gate = ListenGate(
            max_lag=engine.shed_loop_lag if engine.shed_stop_listening else 0.0,
            max_backlog=engine.shed_backlog if engine.shed_stop_listening else 0,
            min_pause=engine.shed_min_pause,
        )
        self._listener: Listener | None = None
        # Under overload with tight bounds the listener may stop and resume many times a
        # second: the metrics count every change, the log writes one line of each kind per
        # LISTENER_LOG_INTERVAL with how many it held back.
        self._stop_lines = Every(LISTENER_LOG_INTERVAL)
        self._resume_lines = Every(LISTENER_LOG_INTERVAL)

    def attach_listener(self, listener: Listener) -> None:
        """The server whose listening the handler stops while the process is saturated."""
        self._listener = listener

    def __call__(
        self, conn: EslConnection, peer: tuple[object, ...], accepted_at: float | None = None
    ) -> None:
        self._metrics.active_calls.inc()
        self._in_flight += 1
        me = gevent.getcurrent()
        self._undecided.add(me)
        if (self._shedder.max_lag or self._gate.enabled) and (
            self._lag_monitor is None or self._lag_monitor.dead
        ):
            self._shedder.restart()
            self._lag_monitor = gevent.spawn(
                self._shedder.run_lag_monitor, gevent.sleep, self._busy, self._check_listener
            )
        try:
            _Call(self, conn, peer, time.monotonic() if accepted_at is None else accepted_at).run()
        finally:
            self._undecided.discard(me)
            self._in_flight -= 1
            self._metrics.active_calls.dec()

    def _busy(self) -> bool:
        return self._in_flight > 0 or self._gate.paused

    def _check_listener(self) -> None:
        """After each lag-monitor tick: stop or resume listening (engine.shedding.ListenGate)."""
        listener = self._listener
        if listener is None or not self._gate.enabled:
            return
        self._change_listener(self._gate.update(self._shedder.lag(), len(self._undecided)))

    def _change_listener(self, change: str | None, why: str = "") -> None:
        listener = self._listener
        if listener is None or change is None:
            return
        lag, backlog = self._shedder.lag(), len(self._undecided)
        if change == PAUSE:
            try:
                taken = listener.stop_listening()
            except OSError:
                log.exception("stopping the listener failed; still listening")
                self._gate.resume_failed_pause()
                return
            self._metrics.listener_stopped()
            held = self._stop_lines.due()
            if held is not None:
                log.warning(
                    "saturated: stopped listening (%sevent loop %.0f ms behind, %d calls waiting "
                    "for their decision; %d queued connections taken first); new connections are "
                    "refused until it recovers%s",
                    why,
                    lag * 1000,
                    backlog,
                    taken,
                    f" ({held} more stops since the last line)" if held else "",
                )
        elif change == RESUME:
            try:
                listener.listen_again()
            except OSError:
                log.exception("listening again failed; retrying")
                self._gate.retry_resume()
                return
            paused = self._gate.last_pause
            self._metrics.listener_resumed(paused)
            held = self._resume_lines.due()
            if held is not None:
                log.warning(
                    "recovered: listening again after %.3f s (event loop %.0f ms behind, %d calls waiting)%s",
                    paused,
                    lag * 1000,
                    backlog,
                    f" ({held} more since the last line)" if held else "",
                )

    # What _Call needs of the handler --------------------------------------------------------

    def decide(self, request: CallRequest, queued: float = 0.0) -> tuple[Decision, bool]:
        """(decision, whether the limits may hold slots for the call); ``queued``: the seconds
        the call's connection waited between the engine's accept and its greenlet's first run
        (load shedding: the engine's own queue, not FreeSWITCH's time to send the channel data)."""
        self._undecided.discard(gevent.getcurrent())
        if self._in_flight > self._config.engine.max_connections:
            return Reject(Reason.ENGINE_DEGRADED, detail="over engine.max_connections"), False
        shed = self._shedder.verdict(len(self._undecided), queued)
        if shed is not None:  # saturated: refuse before the rules and the limits cost anything
            if shed == SHED_WAIT and self._listener is not None:
                why = f"a call waited {queued * 1000:.0f} ms in the engine after its accept, "
                self._change_listener(self._gate.overflowing(), why)
            return Reject(Reason.ENGINE_DEGRADED, detail=shed), False
        return self._decide_within_deadline(request)

    def _decide_within_deadline(self, request: CallRequest) -> tuple[Decision, bool]:
        timer = _throw_later(self._config.engine.decision_deadline, _DecisionLate())
        try:
            decision = self._decide(request)
            return decision, isinstance(decision, Accept)
        except _DecisionLate:
            # The limits script may have run before the deadline: release whatever it took.
            return Reject(Reason.ENGINE_DEGRADED, detail="decision deadline exceeded"), True
        except Exception:
            log.exception("uuid=%s decision failed; answering ENGINE_DEGRADED", request.uuid)
            return Reject(Reason.ENGINE_DEGRADED, detail="internal error"), True
        finally:
            timer.close()

    def observe(self, request: CallRequest, decision: Decision, seconds: float) -> None:
        if isinstance(decision, Accept):
            result, reason, account, detail = "accept", "", decision.account_number, ""
        else:
            result, reason = "reject", decision.reason.value
            account, detail = str(decision.account_id or ""), decision.detail
        self._metrics.observe_decision(result, reason, seconds, detail=detail)
        if decision_log.isEnabledFor(self._decision_level):
            decision_log.log(
                self._decision_level,
                "uuid=%s result=%s reason=%s account=%s destination=%s latency_ms=%.3f",
                request.uuid,
                result,
                reason or "-",
                account or "-",
                show(request.destination, 64),
                seconds * 1000,
                extra={
                    "uuid": request.uuid,
                    "result": result,
                    "reason": reason,
                    "account": account,
                    "latency_ms": round(seconds * 1000, 3),
                },
            )


class _Call:
    """One connection: runs the session's actions until it finishes."""

    __slots__ = (
        "_conn",
        "_deadlines",
        "_handler",
        "_peer",
        "_queued",
        "_session",
        "_timer",
        "_timer_for",
    )

    def __init__(
        self, handler: CallHandler, conn: EslConnection, peer: tuple[object, ...], accepted_at: float
    ) -> None:
        self._handler = handler
        # The wait that load shedding judges ends here: _Call is built by the connection's
        # greenlet as it first runs, when the engine is about to send `connect`. What follows,
        # until the channel data arrives, is FreeSWITCH's time: a slow switch must not make an
        # idle engine shed its calls and stop listening for every switch it serves (seen on the
        # real switch with delayed replies: docs/real-switch-lab.md).
        self._queued = time.monotonic() - accepted_at
        self._conn = conn
        self._peer = peer
        self._session = CallSession(handler._settings, handler._sip_response)
        self._deadlines: dict[Deadline, float] = {}  # armed deadline -> monotonic time
        self._timer: Any = None  # the gevent loop timer of the earliest deadline (_throw_later)
        self._timer_for: Deadline | None = None

    def run(self) -> None:
        session = self._session
        conn = self._conn
        try:
            self._apply(session.start())
            while session.phase is not _DONE:
                # One frame in, its actions out (inlined: this loop runs for every frame).
                try:
                    actions = session.frame(conn.read_frame(None))
                except _Expired as expired:
                    actions = self._expired(expired)
                except PeerGone as exc:
                    actions = session.peer_gone(str(exc), clean=exc.clean)
                except ProtocolError as exc:
                    actions = session.protocol_error(str(exc))
                if actions:
                    self._apply(actions)
        finally:
            if self._timer is not None:
                self._timer.close()

    def _expired(self, expired: _Expired) -> list[Action]:
        self._timer = self._timer_for = None  # it fired: nothing to close
        self._deadlines.pop(expired.deadline, None)
        actions = self._session.expired(expired.deadline)
        self._rearm()
        return actions

    def _apply(self, actions: list[Action]) -> None:
        queue = list(actions)  # actions may add more (a failed write, a decision): the loop sees them
        for action in queue:
            if isinstance(action, Send):
                try:
                    self._conn.send(action.data)
                except PeerGone as exc:
                    queue.extend(self._session.peer_gone(str(exc), clean=False))
                except _Expired as expired:  # a write blocked past a deadline: FreeSWITCH reads nothing
                    queue.extend(self._expired(expired))
            elif isinstance(action, Arm):
                self._arm(action.deadline, action.seconds)
            elif isinstance(action, Disarm):
                self._disarm(action.deadline)
            elif isinstance(action, Decide):
                queue.extend(self._decide(action.request))
            elif isinstance(action, Release):
                self._release()
            elif isinstance(action, Bill):
                self._bill(action)
            elif isinstance(action, Finish):
                self._finish(action)
            else:
                self._warn(action)

    def _decide(self, request: CallRequest) -> list[Action]:
        started = time.perf_counter()
        decision, holds_slots = self._handler.decide(request, self._queued)
        actions = self._session.decided(decision, holds_slots=holds_slots)
        # The decision is written by the first action: observe it once it has left.
        self._apply(actions[:1])
        self._handler.observe(request, decision, time.perf_counter() - started)
        return actions[1:]

    def _warn(self, warning: Warn) -> None:
        if warning.kind == "late_replies":
            self._handler._metrics.socket_error("late_replies")
        log.warning("uuid=%s %s", self._uuid(), warning.message)

    def _arm(self, deadline: Deadline, seconds: float) -> None:
        when = time.monotonic() + seconds
        self._deadlines[deadline] = when
        current = self._timer_for
        if current is None or current is deadline or when < self._deadlines[current]:
            self._start_timer(deadline, seconds)

    def _disarm(self, deadline: Deadline) -> None:
        if self._deadlines.pop(deadline, None) is not None and deadline is self._timer_for:
            self._rearm()

    def _rearm(self) -> None:
        """The timer for the earliest deadline still armed (none when none is)."""
        deadlines = self._deadlines
        if not deadlines:
            self._stop_timer()
            return
        earliest = min(deadlines, key=deadlines.__getitem__)
        self._start_timer(earliest, max(0.0, deadlines[earliest] - time.monotonic()))

    def _start_timer(self, deadline: Deadline, seconds: float) -> None:
        if self._timer is not None:
            self._timer.close()
        self._timer_for = deadline
        self._timer = _throw_later(seconds, _Expired(deadline))

    def _stop_timer(self) -> None:
        if self._timer is not None:
            self._timer.close()
            self._timer = None
        self._timer_for = None

    def _release(self) -> None:
        on_end = self._handler._on_end
        if on_end is not None:
            session = self._session
            on_end(CallRecord(self._peer, session.request, session.decision, session.hangup_cause))

    def _bill(self, bill: Bill) -> None:
        on_bill = self._handler._on_bill
        if on_bill is None:
            return
        session = self._session
        hangup = _HANGUP_FIELDS.pick(bill.hangup.body) if bill.hangup is not None else None
        record = CallRecord(self._peer, session.request, session.decision, session.hangup_cause, hangup)
        on_bill(record, bill.may_hold_funds)

    def _finish(self, finish: Finish) -> None:
        kind = _DROP_KINDS.get(finish.outcome)
        if finish.outcome is Outcome.GONE and self._session.decision is not None:
            kind = None  # FreeSWITCH may close a decided call's socket: not an error
        if kind is not None:
            self._handler._metrics.socket_error(kind)
            level = logging.INFO if finish.outcome is Outcome.ABANDONED else logging.WARNING
            log.log(level, "uuid=%s peer=%s dropped: %s", self._uuid(), self._peer_text(), finish.detail)
        if finish.kept:
            log.warning(
                "uuid=%s %s while the call may be bridged: its limit slots are kept until their "
                "deadline or the reconciler",
                self._uuid(),
                finish.detail,
            )

    def _uuid(self) -> str:
        request = self._session.request
        return request.uuid if request is not None else "-"

    def _peer_text(self) -> str:
        return ":".join(str(part) for part in self._peer[:2]) if self._peer else "-"

"""One call on the outbound socket: channel data in, one pipelined decision out, then follow to hangup.

The sequence for every call:
1. send `connect`, read the CHANNEL_DATA reply (deadline: engine.connect_timeout);
2. decide (pure rules on the in-memory snapshot; deadline: engine.decision_deadline);
3. one write: myevents, nixevent, linger, the variables, then `bridge` or `respond`
   (engine.esl.commands);
4. read until CHANNEL_HANGUP_COMPLETE (a bare linger never ends on its own), then close.
A peer that stalls or sends garbage is dropped; the dialplan then fails the call closed.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass

import gevent

from engine.config import Config
from engine.decision import Accept, Decision, Reason, Reject
from engine.esl.channel import call_request
from engine.esl.commands import Batch, bridge_batch, respond_batch
from engine.esl.connection import EslConnection, PeerGone, PeerTimeout
from engine.esl.protocol import Frame, ProtocolError, sendmsg_hangup
from engine.metrics import EngineMetrics
from engine.model import CallRequest
from engine.rules.config import RulesConfig
from engine.rules.variables import channel_variables, reject_variables

log = logging.getLogger("callgate.call")
decision_log = logging.getLogger("callgate.decision")

BRIDGE_FAILED_CAUSE = "NORMAL_TEMPORARY_FAILURE"


@dataclass
class CallRecord:
    """What the engine knows of one call while it holds its socket."""

    peer: tuple
    request: CallRequest | None = None
    decision: Decision | None = None
    hangup_cause: str = ""
    replies_pending: int = 0
    counted: bool = False  # limits may hold a slot for this call: release it at the end


DecideFn = Callable[[CallRequest], Decision]
EndHook = Callable[[CallRecord], None]


class CallHandler:
    def __init__(
        self,
        config: Config,
        decide: DecideFn,
        metrics: EngineMetrics,
        rules: RulesConfig,
        on_end: EndHook | None = None,
    ) -> None:
        self._config = config
        self._rules = rules
        self._decide = decide
        self._metrics = metrics
        self._on_end = on_end
        self._decision_level = logging.getLevelName(config.logging.decision_level)
        self._in_flight = 0

    def __call__(self, conn: EslConnection, peer: tuple) -> None:
        record = CallRecord(peer)
        self._metrics.active_calls.inc()
        self._in_flight += 1
        try:
            self._run(conn, record)
        except ProtocolError as exc:
            self._drop(record, "protocol", f"malformed data from FreeSWITCH: {exc}")
        except PeerTimeout as exc:
            self._drop(record, "timeout", str(exc))
        except PeerGone as exc:
            if record.decision is None:
                self._drop(record, "gone", str(exc))
        finally:
            self._in_flight -= 1
            self._metrics.active_calls.dec()
            if record.counted and self._on_end is not None:
                self._on_end(record)

    def _run(self, conn: EslConnection, record: CallRecord) -> None:
        conn.send(b"connect\n\n")
        reply = conn.read_frame(self._config.engine.connect_timeout)
        if reply.content_type != "command/reply":
            raise ProtocolError(
                f"expected the connect reply, got {reply.content_type or 'no Content-Type'!r}"
            )
        record.request = call_request(reply.headers)
        started = time.perf_counter()
        if self._in_flight > self._config.engine.max_connections:
            record.decision = Reject(Reason.ENGINE_DEGRADED, detail="over engine.max_connections")
        else:
            self._decide_within_deadline(record)
        batch = self._render(record.decision)
        conn.send(batch.payload)
        self._observe(record, time.perf_counter() - started)
        record.replies_pending = batch.replies_expected
        self._follow_until_hangup(conn, record)

    def _decide_within_deadline(self, record: CallRecord) -> None:
        request = record.request
        assert request is not None
        try:
            with gevent.Timeout(self._config.engine.decision_deadline):
                record.decision = self._decide(request)
            record.counted = isinstance(record.decision, Accept)
        except gevent.Timeout:
            # The limits script may have run before the deadline: release whatever it took.
            record.decision = Reject(Reason.ENGINE_DEGRADED, detail="decision deadline exceeded")
            record.counted = True
        except Exception:
            log.exception("uuid=%s decision failed; answering ENGINE_DEGRADED", request.uuid)
            record.decision = Reject(Reason.ENGINE_DEGRADED, detail="internal error")
            record.counted = True

    def _render(self, decision: Decision) -> Batch:
        if isinstance(decision, Accept):
            return bridge_batch(channel_variables(decision), decision.dial_string)
        code, text = self._rules.sip_response(decision.reason)
        return respond_batch(reject_variables(decision), code, text)

    def _follow_until_hangup(self, conn: EslConnection, record: CallRecord) -> None:
        # One timer per phase, not per read: the reply deadline while replies are due, then
        # the hangup deadline, both counted from the decision.
        engine = self._config.engine
        started = time.monotonic()
        if record.replies_pending:
            with gevent.Timeout(engine.reply_timeout, PeerTimeout("no command replies before the deadline")):
                while record.replies_pending:
                    if self._next_frame_ends_call(conn, record):
                        return
        remaining = max(0.0, engine.hangup_timeout - (time.monotonic() - started))
        with gevent.Timeout(remaining, PeerTimeout("no CHANNEL_HANGUP_COMPLETE before the deadline")):
            while not self._next_frame_ends_call(conn, record):
                pass

    def _next_frame_ends_call(self, conn: EslConnection, record: CallRecord) -> bool:
        try:
            frame = conn.read_frame(None)
        except PeerGone:
            record.hangup_cause = record.hangup_cause or "SOCKET_CLOSED"
            return True
        return self._handle_frame(conn, record, frame)

    def _handle_frame(self, conn: EslConnection, record: CallRecord, frame: Frame) -> bool:
        """Returns True once the call is over for us."""
        kind = frame.content_type
        if kind == "command/reply":
            record.replies_pending = max(0, record.replies_pending - 1)
            if not frame.reply_ok():
                log.warning(
                    "uuid=%s FreeSWITCH refused a command: %s", _uuid(record), frame.headers.get("Reply-Text")
                )
            return False
        if kind == "text/disconnect-notice":
            return frame.headers.get("Content-Disposition") != "linger"
        if kind == "text/event-plain":
            return self._handle_event(conn, record, frame)
        return False

    def _handle_event(self, conn: EslConnection, record: CallRecord, frame: Frame) -> bool:
        # Events are read header by header: a full decode costs ~100 µs and an accepted call
        # brings a dozen events, of which two or three headers matter.
        name = frame.event_name
        if name == "CHANNEL_HANGUP_COMPLETE":
            record.hangup_cause = frame.event_header("Hangup-Cause") or ""
            return True
        if name == "CHANNEL_EXECUTE_COMPLETE" and self._bridge_failed(frame):
            # Every route failed; the parked call would otherwise wait for park_timeout.
            cause = frame.event_header("variable_originate_disposition") or BRIDGE_FAILED_CAUSE
            conn.send(sendmsg_hangup(_hangup_cause(cause)))
        return False

    @staticmethod
    def _bridge_failed(frame: Frame) -> bool:
        return (
            frame.event_header("Application") == "bridge" and frame.event_header("Answer-State") != "hangup"
        )

    def _observe(self, record: CallRecord, seconds: float) -> None:
        decision = record.decision
        assert decision is not None and record.request is not None
        if isinstance(decision, Accept):
            result, reason, account = "accept", "", decision.account_number
        else:
            result, reason, account = "reject", decision.reason.value, str(decision.account_id or "")
        detail = "" if isinstance(decision, Accept) else decision.detail
        self._metrics.observe_decision(result, reason, seconds, detail=detail)
        if decision_log.isEnabledFor(self._decision_level):
            decision_log.log(
                self._decision_level,
                "uuid=%s result=%s reason=%s account=%s destination=%s latency_ms=%.3f",
                record.request.uuid,
                result,
                reason or "-",
                account or "-",
                record.request.destination,
                seconds * 1000,
                extra={
                    "uuid": record.request.uuid,
                    "result": result,
                    "reason": reason,
                    "account": account,
                    "latency_ms": round(seconds * 1000, 3),
                },
            )

    def _drop(self, record: CallRecord, kind: str, why: str) -> None:
        self._metrics.socket_error(kind)
        log.warning("uuid=%s peer=%s dropped: %s", _uuid(record), _peer(record), why)


def _uuid(record: CallRecord) -> str:
    return record.request.uuid if record.request else "-"


def _peer(record: CallRecord) -> str:
    return ":".join(str(part) for part in record.peer[:2]) if record.peer else "-"


def _hangup_cause(text: str) -> str:
    cause = text.strip().upper()
    return cause if cause.replace("_", "").isalnum() else BRIDGE_FAILED_CAUSE
